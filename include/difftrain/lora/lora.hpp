#pragma once
// difftrain/lora: LoRA adapters over nn layers (LoraLinear, LoraConv2d), injection by module
// name, merge/unmerge.

#include "difftrain/lora/inject.hpp"
#include "difftrain/lora/lora_conv2d.hpp"
#include "difftrain/lora/lora_linear.hpp"
