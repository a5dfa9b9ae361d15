#pragma once
// Tiny UNet configs shared by the model tests (gradient check, checkpointing): two levels with
// cross-attention in one (conv projections, 4 groups, context width 6), and an SDXL-shaped one.

#include <nlohmann/json.hpp>

namespace difftrain::test {

inline nlohmann::json tiny_unet_config() {
  return {{"block_out_channels", {8, 16}},
          {"down_block_types", {"CrossAttnDownBlock2D", "DownBlock2D"}},
          {"up_block_types", {"UpBlock2D", "CrossAttnUpBlock2D"}},
          {"layers_per_block", 1},
          {"attention_head_dim", 2},
          {"norm_num_groups", 4},
          {"cross_attention_dim", 6},
          {"in_channels", 3},
          {"out_channels", 2}};
}

// SDXL-shaped: three levels, the first without attention, 1/2/3 transformer layers (reversed for
// the up blocks), linear projections, text_time added conditions with a pooled width of 5.
inline nlohmann::json tiny_sdxl_unet_config() {
  nlohmann::json j = tiny_unet_config();
  j["block_out_channels"] = {8, 8, 16};
  j["down_block_types"] = {"DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"};
  j["up_block_types"] = {"CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"};
  j["transformer_layers_per_block"] = {1, 2, 3};
  j["attention_head_dim"] = {2, 2, 4};
  j["use_linear_projection"] = true;
  j["addition_embed_type"] = "text_time";
  j["addition_time_embed_dim"] = 4;
  j["projection_class_embeddings_input_dim"] = 5 + 6 * 4;
  return j;
}

}  // namespace difftrain::test
