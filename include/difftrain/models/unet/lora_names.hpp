#pragma once
// The UNet's part of a LoRA file (lora::LoraComponent) as the ecosystem names it. kohya trains
// SD 1.x/2.x with a diffusers-shaped UNet, so its keys are the diffusers module paths
// (lora_unet_down_blocks_0_attentions_0_…); SDXL it trains with its own UNet class
// (sd-scripts library/sdxl_original_unet.py), which keeps the original SGM blocks, so an SDXL
// UNet's keys are the LDM names of ldm_unet_name (lora_unet_input_blocks_4_1_transformer_blocks_…,
// lora_unet_middle_block_1_…, lora_unet_output_blocks_2_1_…; resnets as in_layers_2,
// emb_layers_1, …). That is what A1111, Forge, ComfyUI and stable-diffusion.cpp exchange.
// PEFT keys (unet.<module path>) are the same for both.

#include <string>

#include "difftrain/lora/lora_file.hpp"
#include "difftrain/models/ldm_names.hpp"
#include "difftrain/models/unet/unet2d_condition.hpp"

namespace difftrain::models {

/// True for an SDXL-shaped UNet (addition_embed_type "text_time"): kohya names it by SGM blocks.
inline bool uses_sgm_lora_names(const UNet2DConditionConfig& c) {
  return c.addition_embed_type == AdditionEmbedType::text_time;
}

/// The kohya name of a UNet module below "lora_unet_": its LDM path with "." → "_" (SDXL).
inline std::string kohya_sgm_module_name(const UNet2DConditionConfig& c,
                                         const std::string& module) {
  std::string ldm = ldm_unet_name(c, module + ".weight");
  ldm.resize(ldm.size() - std::string(".weight").size());
  return lora::lora_file_detail::underscored(ldm);
}

/// lora::kLoraUnet, with kohya's SGM names for every module of an SDXL UNet.
template <class T>
lora::LoraComponent unet_lora_component(UNet2DConditionModel<T>& unet) {
  lora::LoraComponent component = lora::kLoraUnet;
  if (!uses_sgm_lora_names(unet.config())) return component;
  unet.for_each_slot("", [&](const std::string& name, auto&) {
    component.kohya_names.emplace(name, kohya_sgm_module_name(unet.config(), name));
  });
  return component;
}

}  // namespace difftrain::models
