// The CLIP text model compiled once for the project's own targets (see unet.cpp).
#include "difftrain/models/clip/clip_text_model.hpp"

namespace difftrain::models {

template class ClipTextModel<float>;
template class ClipTextModel<double>;
template ClipTextModel<float> load_clip_text_model<float>(const std::string&);
template ClipTextModel<double> load_clip_text_model<double>(const std::string&);
template ClipTextModel<float> load_clip_text_model_single_file<float>(const std::string&,
                                                                      const ClipTextConfig&);
template ClipTextModel<double> load_clip_text_model_single_file<double>(const std::string&,
                                                                        const ClipTextConfig&);

}  // namespace difftrain::models
