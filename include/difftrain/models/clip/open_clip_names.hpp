#pragma once
// The text encoders of original single-file checkpoints: where each sits (ClipSingleFileLayout)
// and OpenCLIP's names ↔ transformers' (open_clip_name), for load_clip_text_model_single_file.
//
//   layout          prefix                                 names below the prefix
//   hf_transformer  cond_stage_model.transformer.          transformers' (SD 1.x)
//   sdxl_first      conditioner.embedders.0.transformer.   transformers' (SDXL, CLIP ViT-L)
//   open_clip       cond_stage_model.model.                OpenCLIP's (SD 2.x, ViT-H)
//   sdxl_second     conditioner.embedders.1.model.         OpenCLIP's (SDXL, ViT-bigG, projection)
//
// OpenCLIP's text tower ↔ transformers' CLIPTextModel(WithProjection) (D hidden_size,
// P projection_dim):
//   token_embedding.weight ↔ text_model.embeddings.token_embedding.weight
//   positional_embedding [77, D] ↔ text_model.embeddings.position_embedding.weight
//   transformer.resblocks.i. ↔ text_model.encoder.layers.i.
//     ln_1 / ln_2 ↔ layer_norm1 / layer_norm2;  mlp.c_fc / mlp.c_proj ↔ mlp.fc1 / mlp.fc2
//     attn.out_proj ↔ self_attn.out_proj
//     attn.in_proj_weight [3D, D] = rows [Wq; Wk; Wv] ↔ self_attn.{q,k,v}_proj.weight [D, D]
//     attn.in_proj_bias [3D] = [bq; bk; bv] ↔ self_attn.{q,k,v}_proj.bias [D]
//   ln_final ↔ text_model.final_layer_norm
//   text_projection [D, P] = Wᵀ ↔ text_projection.weight W [P, D] (OpenCLIP computes x · W)
// logit_scale (the contrastive temperature) and attn_mask (the causal-mask buffer) are not
// parameters of the text model.

#include <cstddef>
#include <limits>
#include <string>
#include <string_view>

#include "difftrain/models/ldm_names.hpp"

namespace difftrain::models {

/// Where a single-file checkpoint holds a text encoder, and in which naming (see the table above).
enum class ClipSingleFileLayout { hf_transformer, sdxl_first, open_clip, sdxl_second };

/// The layout's prefix ("cond_stage_model.transformer.", ...).
inline std::string_view clip_single_file_prefix(ClipSingleFileLayout layout) {
  switch (layout) {
    case ClipSingleFileLayout::hf_transformer:
      return kLdmClipPrefix;
    case ClipSingleFileLayout::sdxl_first:
      return "conditioner.embedders.0.transformer.";
    case ClipSingleFileLayout::open_clip:
      return "cond_stage_model.model.";
    case ClipSingleFileLayout::sdxl_second:
      return "conditioner.embedders.1.model.";
  }
  return kLdmClipPrefix;
}

/// The enumerator's name ("hf_transformer", ...).
inline const char* to_string(ClipSingleFileLayout layout) {
  switch (layout) {
    case ClipSingleFileLayout::hf_transformer:
      return "hf_transformer";
    case ClipSingleFileLayout::sdxl_first:
      return "sdxl_first";
    case ClipSingleFileLayout::open_clip:
      return "open_clip";
    case ClipSingleFileLayout::sdxl_second:
      return "sdxl_second";
  }
  return "?";
}

/// Whether the layout uses OpenCLIP's names (open_clip, sdxl_second).
inline bool is_open_clip(ClipSingleFileLayout layout) {
  return layout == ClipSingleFileLayout::open_clip || layout == ClipSingleFileLayout::sdxl_second;
}

/// The OpenCLIP name of a transformers CLIP text-model parameter; q_proj, k_proj and v_proj of a
/// layer share one name (the fused in_proj). Error for any other name.
inline std::string open_clip_name(const std::string& name) {
  const ldm_detail::NameParts p("open_clip_name", name);
  if (name == "text_model.embeddings.token_embedding.weight") return "token_embedding.weight";
  if (name == "text_model.embeddings.position_embedding.weight") return "positional_embedding";
  if (name == "text_projection.weight") return "text_projection";
  if (p.is(0, "text_model") && p.is(1, "final_layer_norm")) return "ln_final." + p.rest(2);
  if (p.is(0, "text_model") && p.is(1, "encoder") && p.is(2, "layers")) {
    const std::string block = "transformer.resblocks." +
                              std::to_string(p.index(3, std::numeric_limits<std::size_t>::max())) +
                              ".";
    if (p.is(4, "layer_norm1")) return block + "ln_1." + p.rest(5);
    if (p.is(4, "layer_norm2")) return block + "ln_2." + p.rest(5);
    if (p.is(4, "mlp") && p.is(5, "fc1")) return block + "mlp.c_fc." + p.rest(6);
    if (p.is(4, "mlp") && p.is(5, "fc2")) return block + "mlp.c_proj." + p.rest(6);
    if (p.is(4, "self_attn") && p.is(5, "out_proj")) return block + "attn.out_proj." + p.rest(6);
    if (p.is(4, "self_attn") && (p.is(5, "q_proj") || p.is(5, "k_proj") || p.is(5, "v_proj")) &&
        p.size() == 7 && (p.is(6, "weight") || p.is(6, "bias")))
      return block + "attn.in_proj_" + p.rest(6);
  }
  p.fail();
}

}  // namespace difftrain::models
