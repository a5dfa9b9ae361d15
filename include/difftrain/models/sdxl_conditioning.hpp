#pragma once
// SDXL's conditioning (diffusers StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids,
// as train_text_to_image_lora_sdxl.py uses them):
//   prompt_embeds        = cat_features[hidden_states_1[n1 − 1 − clip_skip],
//                                       hidden_states_2[n2 − 1 − clip_skip]]  [B, L, D1 + D2]
//                          (the penultimate layers by default, without the final layer norm)
//   pooled_prompt_embeds = text_embeds of encoder 2 (text_projection of its pooled output) [B, P]
//   add_time_ids         = [original h, w, crop top, crop left, target h, w]  (pixels)    [B, 6]
// The two encoders take the ids of their own tokenizers (SDXL's tokenizer_2 pads with another
// token), so each gets its own TokenIds; L must agree. hidden_states index: [0] embeddings, [i]
// after layer i; the penultimate layer's output is index n − 1.

#include <algorithm>
#include <array>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>
#include <xtensor/xbuilder.hpp>
#include <xtensor/xview.hpp>

#include "difftrain/concepts.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/models/clip/clip_text_model.hpp"

namespace difftrain::models {

/// Original size, crop top-left and target size of one image (pixels, as (height, width)).
struct SdxlSizeConditioning {
  std::array<double, 2> original_size{};
  std::array<double, 2> crop_top_left{};
  std::array<double, 2> target_size{};
};

/// time_ids [B, 6] = [orig h, orig w, crop top, crop left, target h, target w] per image.
inline Tensor<float, 2> sdxl_time_ids(const std::vector<SdxlSizeConditioning>& images) {
  Tensor<float, 2> ids(std::array<std::size_t, 2>{images.size(), 6});
  for (std::size_t b = 0; b < images.size(); ++b) {
    const SdxlSizeConditioning& s = images[b];
    const std::array<double, 6> row = {s.original_size[0], s.original_size[1], s.crop_top_left[0],
                                       s.crop_top_left[1], s.target_size[0],   s.target_size[1]};
    for (std::size_t k = 0; k < 6; ++k) ids(b, k) = static_cast<float>(row[k]);
  }
  return ids;
}

/// encode's result: the UNet's encoder_hidden_states and its text_embeds.
struct SdxlPromptEmbeds {
  Tensor3<float> prompt_embeds;           // [B, L, D1 + D2]
  Tensor<float, 2> pooled_prompt_embeds;  // [B, P]
};

/// SDXL's two text encoders, CLIPTextModel (text_encoder) and CLIPTextModelWithProjection
/// (text_encoder_2), held by reference. As a step's TextEncoder (a PooledTextEncoder) it takes
/// both tokenizers' ids side by side, [B, 2L] = [ids_1 | ids_2] (sdxl_token_ids), and trains the
/// encoders that have trainable parameters (LoRA on either or both): backward splits dL/dcontext
/// along the features into the two penultimate states and gives dL/dpooled to encoder 2.
class SdxlTextEncoders {
 public:
  using input_type = TokenIds;
  using output_type = Tensor3<float>;

  SdxlTextEncoders(ClipTextModel<float>& text_encoder, ClipTextModel<float>& text_encoder_2,
                   std::size_t clip_skip = 0)
      : encoders_{&text_encoder, &text_encoder_2}, clip_skip_(clip_skip) {
    constexpr const char* fn = "SdxlTextEncoders";
    require(!text_encoder.has_projection(), fn,
            "text_encoder is a CLIPTextModelWithProjection, expected a CLIPTextModel");
    require(text_encoder_2.has_projection(), fn,
            "text_encoder_2 is a CLIPTextModel, expected a CLIPTextModelWithProjection (its "
            "text_embeds are SDXL's pooled conditioning)");
    for (const auto* model : encoders_)
      require(clip_skip_ < model->config().num_hidden_layers, fn, "clip_skip ", clip_skip_,
              " leaves no layer of a ", model->config().num_hidden_layers, "-layer encoder");
  }

  /// ids_1 [B, L] (tokenizer), ids_2 [B, L] (tokenizer_2) → prompt_embeds, pooled_prompt_embeds.
  SdxlPromptEmbeds encode(const TokenIds& ids_1, const TokenIds& ids_2) {
    return run(ids_1, ids_2, false);
  }

  /// TextEncoder: ids [B, 2L] (sdxl_token_ids) → prompt_embeds; the pooled embeddings are kept
  /// for pooled_prompt_embeds().
  Tensor3<float> encode(const TokenIds& ids) { return keep(run_pair(ids, false)); }
  /// encode, saving for backward what the trainable encoders need.
  Tensor3<float> encode_train(const TokenIds& ids) { return keep(run_pair(ids, true)); }
  /// pooled_prompt_embeds [B, P] of the last encode / encode_train.
  const Tensor<float, 2>& pooled_prompt_embeds() const { return pooled_; }

  /// After encode_train: dL/dprompt_embeds [B, L, D1 + D2] and dL/dpooled [B, P] (empty: none) →
  /// parameter gradients (+=) of the trainable encoders.
  void backward(const Tensor3<float>& grad_context, const Tensor<float, 2>& grad_pooled = {}) {
    constexpr const char* fn = "SdxlTextEncoders::backward";
    require(trained_[0] || trained_[1], fn, "no saved encode_train (call encode_train first)");
    const std::size_t D1 = encoders_[0]->config().hidden_size;
    const std::size_t D2 = encoders_[1]->config().hidden_size;
    const auto& s = grad_context.shape();
    require(s[2] == D1 + D2, fn, "grad_context has shape ", shape_string(s), ", expected ", D1 + D2,
            " features");
    for (std::size_t k = 0; k < 2; ++k) {
      if (!trained_[k]) continue;
      const std::size_t D = k == 0 ? D1 : D2, offset = k == 0 ? 0 : D1;
      Tensor3<float> part(std::array<std::size_t, 3>{s[0], s[1], D});
      for (std::size_t r = 0; r < s[0] * s[1]; ++r)
        std::copy_n(grad_context.data() + r * (D1 + D2) + offset, D, part.data() + r * D);
      ClipTextOutputGrads<float> grads;
      grads.hidden_states.emplace(layer(k), std::move(part));
      if (k == 1) grads.text_embeds = grad_pooled;
      encoders_[k]->backward(grads);
    }
    trained_ = {false, false};
  }

  /// Whether either encoder has a trainable parameter.
  bool is_training() const { return has_trainable(0) || has_trainable(1); }

  /// Parameters and LoRA slots: text_encoder's under `prefix`, text_encoder_2's under
  /// prefix.text_encoder_2 (so "text_encoder." of a trained pair covers both, as kohya's
  /// --text_encoder_lr does).
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) {
    encoders_[0]->for_each_parameter(prefix, visit);
    encoders_[1]->for_each_parameter(second_prefix(prefix), visit);
  }
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) const {
    std::as_const(*encoders_[0]).for_each_parameter(prefix, visit);
    std::as_const(*encoders_[1]).for_each_parameter(second_prefix(prefix), visit);
  }
  template <class F>
  void for_each_slot(const std::string& prefix, F&& visit) {
    encoders_[0]->for_each_slot(prefix, visit);
    encoders_[1]->for_each_slot(second_prefix(prefix), visit);
  }

  ClipTextModel<float>& text_encoder() { return *encoders_[0]; }
  ClipTextModel<float>& text_encoder_2() { return *encoders_[1]; }
  const ClipTextModel<float>& text_encoder() const { return *encoders_[0]; }
  const ClipTextModel<float>& text_encoder_2() const { return *encoders_[1]; }
  std::size_t clip_skip() const { return clip_skip_; }

 private:
  static std::string second_prefix(const std::string& prefix) {
    return prefix.empty() ? "text_encoder_2" : prefix + ".text_encoder_2";
  }
  // The hidden-state index of encoder k's context: the penultimate layer, clip_skip more back.
  std::size_t layer(std::size_t k) const {
    return encoders_[k]->config().num_hidden_layers - 1 - clip_skip_;
  }
  bool has_trainable(std::size_t k) const {
    bool any = false;
    std::as_const(*encoders_[k]).for_each_parameter("", [&](const std::string&, const auto& p) {
      any |= p.trainable;
    });
    return any;
  }

  SdxlPromptEmbeds run_pair(const TokenIds& ids, bool train) {
    const std::size_t L2 = ids.shape()[1];
    require(ids.dimension() == 2 && L2 % 2 == 0 && L2 > 0, "SdxlTextEncoders::encode",
            "token ids have shape ", shape_string(ids.shape()),
            ", expected [B, 2L]: both tokenizers' ids side by side");
    const TokenIds ids_1 = xt::view(ids, xt::all(), xt::range(0, L2 / 2));
    const TokenIds ids_2 = xt::view(ids, xt::all(), xt::range(L2 / 2, L2));
    return run(ids_1, ids_2, train);
  }

  Tensor3<float> keep(SdxlPromptEmbeds embeds) {
    pooled_ = std::move(embeds.pooled_prompt_embeds);
    return std::move(embeds.prompt_embeds);
  }

  SdxlPromptEmbeds run(const TokenIds& ids_1, const TokenIds& ids_2, bool train) {
    constexpr const char* fn = "SdxlTextEncoders::encode";
    require(ids_1.shape() == ids_2.shape(), fn, "the two tokenizers' ids have shapes ",
            shape_string(ids_1.shape()), " and ", shape_string(ids_2.shape()),
            ", expected the same");
    trained_ = {false, false};
    std::array<ClipTextOutput<float>, 2> out;
    for (std::size_t k = 0; k < 2; ++k) {
      const TokenIds& ids = k == 0 ? ids_1 : ids_2;
      const bool t = train && has_trainable(k);
      out[k] = t ? encoders_[k]->forward_train(ids) : encoders_[k]->forward(ids);
      trained_[k] = t;
    }
    const Tensor3<float>& h1 = out[0].hidden_states[layer(0)];
    const Tensor3<float>& h2 = out[1].hidden_states[layer(1)];
    const std::size_t B = h1.shape()[0], L = h1.shape()[1], D1 = h1.shape()[2], D2 = h2.shape()[2];
    SdxlPromptEmbeds result;
    result.prompt_embeds.resize({B, L, D1 + D2});
    for (std::size_t r = 0; r < B * L; ++r) {
      std::copy_n(h1.data() + r * D1, D1, result.prompt_embeds.data() + r * (D1 + D2));
      std::copy_n(h2.data() + r * D2, D2, result.prompt_embeds.data() + r * (D1 + D2) + D1);
    }
    result.pooled_prompt_embeds = std::move(out[1].text_embeds);
    return result;
  }

  std::array<ClipTextModel<float>*, 2> encoders_;
  std::size_t clip_skip_ = 0;
  std::array<bool, 2> trained_{false, false};
  Tensor<float, 2> pooled_;
};

static_assert(TrainableTextEncoder<SdxlTextEncoders> && PooledTextEncoder<SdxlTextEncoders>);

/// Both tokenizers' ids side by side, [B, 2L] = [ids_1 | ids_2]: SdxlTextEncoders' input.
inline TokenIds sdxl_token_ids(const TokenIds& ids_1, const TokenIds& ids_2) {
  require(ids_1.shape() == ids_2.shape(), "sdxl_token_ids", "the two tokenizers' ids have shapes ",
          shape_string(ids_1.shape()), " and ", shape_string(ids_2.shape()), ", expected the same");
  return xt::concatenate(xt::xtuple(ids_1, ids_2), 1);
}

}  // namespace difftrain::models
