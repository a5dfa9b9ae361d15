#pragma once
// difftrain/models/clip: the frozen CLIP text encoder (transformers' CLIPTextModel).
#include "difftrain/models/clip/clip_attention.hpp"
#include "difftrain/models/clip/clip_config.hpp"
#include "difftrain/models/clip/clip_mlp.hpp"
#include "difftrain/models/clip/clip_text_model.hpp"
#include "difftrain/models/clip/open_clip_names.hpp"
#include "difftrain/models/clip/text_encoder.hpp"
