#pragma once
// ClipTextEncoder: the CLIP text model as the TextEncoder of a training step (token ids
// [B, L] → context [B, L, D]), with diffusers' clip_skip. Frozen unless some parameter is made
// trainable (inject_lora on it, or nn::set_trainable): then it is a TrainableTextEncoder whose
// encode_train / backward train it with the denoiser (diffusers' --train_text_encoder).
//
//   context = final_layer_norm(hidden_states[num_hidden_layers − clip_skip])
//   clip_skip 0: last_hidden_state (SD 1.x/2.x training default); 1: the penultimate layer, as
//   diffusers pipelines' clip_skip=1 (kohya's --clip_skip 2).

#include <cstddef>
#include <string>
#include <utility>

#include "difftrain/concepts.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/models/clip/clip_text_model.hpp"

namespace difftrain::models {

struct ClipTextEncoderOptions {
  std::size_t clip_skip = 0;  // layers skipped from the end (diffusers' convention)
};

class ClipTextEncoder {
 public:
  using input_type = TokenIds;
  using output_type = Tensor3<float>;

  explicit ClipTextEncoder(ClipTextModel<float> model, ClipTextEncoderOptions options = {})
      : model_(std::move(model)), options_(options) {
    require(options_.clip_skip <= model_.config().num_hidden_layers, "ClipTextEncoder",
            "clip_skip is ", options_.clip_skip,
            ", expected at most num_hidden_layers = ", model_.config().num_hidden_layers);
  }

  /// config.json + model.safetensors of a transformers CLIPTextModel folder (an SD
  /// `text_encoder/` folder; a CLIPTextModelWithProjection folder loads too, its context being
  /// the same hidden states: encode does not use text_projection).
  static ClipTextEncoder from_folder(const std::string& folder,
                                     ClipTextEncoderOptions options = {}) {
    return ClipTextEncoder(load_clip_text_model<float>(folder), options);
  }

  // context = final_layer_norm(hidden_states[layers − clip_skip]), ids [B, L] → [B, L, D]
  Tensor3<float> encode(const TokenIds& ids) { return model_.encode(ids, options_.clip_skip); }

  // encode, saving for backward
  Tensor3<float> encode_train(const TokenIds& ids) {
    return model_.encode_train(ids, options_.clip_skip);
  }
  /// dL/dcontext of the last encode_train → parameter gradients (+=).
  void backward(const Tensor3<float>& grad_context) { model_.encode_backward(grad_context); }
  /// Whether any parameter is trainable (text-encoder training on).
  bool is_training() const {
    bool any = false;
    model_.for_each_parameter("", [&](const std::string&, const auto& p) { any |= p.trainable; });
    return any;
  }

  /// The model's parameters and LoRA slots (nn::Module, lora::HasLoraSlots).
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) {
    model_.for_each_parameter(prefix, visit);
  }
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) const {
    model_.for_each_parameter(prefix, visit);
  }
  template <class F>
  void for_each_slot(const std::string& prefix, F&& visit) {
    model_.for_each_slot(prefix, visit);
  }

  const ClipTextEncoderOptions& options() const { return options_; }
  ClipTextModel<float>& model() { return model_; }
  const ClipTextModel<float>& model() const { return model_; }

 private:
  ClipTextModel<float> model_;
  ClipTextEncoderOptions options_;
};

static_assert(TrainableTextEncoder<ClipTextEncoder>);

}  // namespace difftrain::models
