#pragma once
// SDXL's conditioning (diffusers StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids,
// as train_text_to_image_lora_sdxl.py uses them):
//   prompt_embeds        = cat_features[hidden_states_1[n1 − 1 − clip_skip],
//                                       hidden_states_2[n2 − 1 − clip_skip]]  [B, L, D1 + D2]
//                          (the penultimate layers by default, without the final layer norm)
//   pooled_prompt_embeds = text_embeds of encoder 2 (text_projection of its pooled output) [B, P]
//   add_time_ids         = [original h, w, crop top, crop left, target h, w]  (pixels)    [B, 6]
// The two encoders take the ids of their own tokenizers (SDXL's tokenizer_2 pads with another
// token), so each gets its own TokenIds; L must agree.

#include <algorithm>
#include <array>
#include <cstddef>
#include <utility>
#include <vector>

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

/// SDXL's two frozen text encoders: CLIPTextModel (text_encoder) and CLIPTextModelWithProjection
/// (text_encoder_2).
class SdxlTextEncoders {
 public:
  SdxlTextEncoders(ClipTextModel<float> text_encoder, ClipTextModel<float> text_encoder_2,
                   std::size_t clip_skip = 0)
      : text_encoder_(std::move(text_encoder)),
        text_encoder_2_(std::move(text_encoder_2)),
        clip_skip_(clip_skip) {
    constexpr const char* fn = "SdxlTextEncoders";
    require(!text_encoder_.has_projection(), fn,
            "text_encoder is a CLIPTextModelWithProjection, expected a CLIPTextModel");
    require(text_encoder_2_.has_projection(), fn,
            "text_encoder_2 is a CLIPTextModel, expected a CLIPTextModelWithProjection (its "
            "text_embeds are SDXL's pooled conditioning)");
    for (const auto* model : {&text_encoder_, &text_encoder_2_})
      require(clip_skip_ + 1 < model->config().num_hidden_layers + 1, fn, "clip_skip ", clip_skip_,
              " leaves no layer of a ", model->config().num_hidden_layers, "-layer encoder");
  }

  /// ids_1 [B, L] (tokenizer), ids_2 [B, L] (tokenizer_2) → prompt_embeds, pooled_prompt_embeds.
  SdxlPromptEmbeds encode(const TokenIds& ids_1, const TokenIds& ids_2) {
    constexpr const char* fn = "SdxlTextEncoders::encode";
    require(ids_1.shape() == ids_2.shape(), fn, "the two tokenizers' ids have shapes ",
            shape_string(ids_1.shape()), " and ", shape_string(ids_2.shape()),
            ", expected the same");
    const ClipTextOutput<float> a = text_encoder_.forward(ids_1);
    ClipTextOutput<float> b = text_encoder_2_.forward(ids_2);
    const Tensor3<float>& h1 = a.hidden_states[a.hidden_states.size() - 2 - clip_skip_];
    const Tensor3<float>& h2 = b.hidden_states[b.hidden_states.size() - 2 - clip_skip_];
    const std::size_t B = h1.shape()[0], L = h1.shape()[1], D1 = h1.shape()[2], D2 = h2.shape()[2];
    SdxlPromptEmbeds out;
    out.prompt_embeds.resize({B, L, D1 + D2});
    for (std::size_t r = 0; r < B * L; ++r) {
      std::copy_n(h1.data() + r * D1, D1, out.prompt_embeds.data() + r * (D1 + D2));
      std::copy_n(h2.data() + r * D2, D2, out.prompt_embeds.data() + r * (D1 + D2) + D1);
    }
    out.pooled_prompt_embeds = std::move(b.text_embeds);
    return out;
  }

  ClipTextModel<float>& text_encoder() { return text_encoder_; }
  ClipTextModel<float>& text_encoder_2() { return text_encoder_2_; }

 private:
  ClipTextModel<float> text_encoder_, text_encoder_2_;
  std::size_t clip_skip_ = 0;
};

}  // namespace difftrain::models
