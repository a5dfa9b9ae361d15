// The UNet compiled once for the project's own targets (tests, tools, examples, benchmarks): they
// define DIFFTRAIN_EXTERN_TEMPLATES and link this; users of the header-only library do neither.
#include "difftrain/models/unet/load.hpp"
#include "difftrain/models/unet/unet2d_condition.hpp"

namespace difftrain::models {

template class CompositeModule<UNet2DConditionModel<float>>;
template class CompositeModule<UNet2DConditionModel<double>>;
template class UNet2DConditionModel<float>;
template class UNet2DConditionModel<double>;
template UNet2DConditionModel<float> load_unet<float>(const std::string&);
template UNet2DConditionModel<double> load_unet<double>(const std::string&);
template UNet2DConditionModel<float> load_unet_single_file<float>(const std::string&,
                                                                  const UNet2DConditionConfig&);
template UNet2DConditionModel<double> load_unet_single_file<double>(const std::string&,
                                                                    const UNet2DConditionConfig&);

}  // namespace difftrain::models
