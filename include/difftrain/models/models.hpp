#pragma once
// difftrain/models: reference models built from nn layers: UNet2DConditionModel, AutoencoderKL,
// CLIPTextModel and the CLIP tokenizer.
#include "difftrain/models/clip/clip.hpp"
#include "difftrain/models/clip_tokenizer.hpp"
#include "difftrain/models/sdxl_conditioning.hpp"
#include "difftrain/models/unet/attention.hpp"
#include "difftrain/models/unet/load.hpp"
#include "difftrain/models/unet/lora_names.hpp"
#include "difftrain/models/unet/module_tree.hpp"
#include "difftrain/models/unet/resample.hpp"
#include "difftrain/models/unet/resnet_block.hpp"
#include "difftrain/models/unet/transformer_2d.hpp"
#include "difftrain/models/unet/unet2d_condition.hpp"
#include "difftrain/models/unet/unet_blocks.hpp"
#include "difftrain/models/unet/unet_config.hpp"
#include "difftrain/models/vae/vae.hpp"
