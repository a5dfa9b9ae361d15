#pragma once
// ModelFolder: a diffusers text-to-image pipeline folder loaded for sampling or training.
//
//   DIR/unet/                        config.json + diffusion_pytorch_model.safetensors (required)
//   DIR/vae/                         AutoencoderKL (optional: absent → pixel space, the UNet works
//                                    on images [B,3,H,W] in [−1, 1] directly)
//   DIR/text_encoder/                transformers CLIPTextModel (required)
//   DIR/tokenizer/                   vocab.json + merges.txt (required)
//   DIR/scheduler/scheduler_config.json                                  (required)
//
// The parts must fit together: the UNet's in/out channels equal the VAE's latent_channels (3 in
// pixel space) and its cross_attention_dim the text encoder's hidden_size; a mismatch or a
// missing part is an Error naming the folder and the values.
// The definitions are in model_folder.cpp.

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "difftrain/core/tensor.hpp"
#include "difftrain/models/clip/text_encoder.hpp"
#include "difftrain/models/clip_tokenizer.hpp"
#include "difftrain/models/unet/unet2d_condition.hpp"
#include "difftrain/models/vae/autoencoder_kl.hpp"
#include "difftrain/schedule/sampling_config.hpp"

namespace difftrain::tools {

struct ModelFolderOptions {
  bool load_vae = true;       // false: skip vae/ even if present (e.g. latents are cached)
  std::size_t clip_skip = 0;  // diffusers' clip_skip for the text encoder
};

struct ModelFolder {
  std::filesystem::path root;
  models::UNet2DConditionModel<float> unet;
  std::optional<models::AutoencoderKL<float>> vae;  // empty: pixel space
  models::ClipTextEncoder text_encoder;
  ClipTokenizer tokenizer;
  SamplingConfig scheduler;

  /// Spatial factor between images and the UNet's sample: the VAE's 2^(blocks−1), 1 in pixel space.
  std::size_t vae_scale_factor() const { return vae ? vae->downsample_factor() : 1; }
  /// Channels of the UNet's sample (the VAE's latent_channels, or the image channels).
  std::size_t latent_channels() const { return unet.config().in_channels; }

  /// The UNet sample shape [C, h, w] for images of height × width pixels; both must be
  /// multiples of vae_scale_factor() × 2^(UNet blocks − 1) (the UNet halves the size that often).
  std::array<std::size_t, 3> latent_shape(std::size_t height, std::size_t width) const;

  /// Context [B, L, D] of the prompts: tokenized to the tokenizer's model_max_length (77 for
  /// CLIP), then the text encoder (with clip_skip).
  Tensor3<float> encode_prompts(const std::vector<std::string>& prompts);

  /// Images [B, 3, H, W] (≈ [−1, 1], not clamped) from UNet samples: the VAE decoder of
  /// latents / scaling_factor (+ shift), or the samples themselves in pixel space.
  Tensor4<float> decode(const Tensor4<float>& latents) const;
};

/// Loads a pipeline folder (see the header comment).
ModelFolder load_model_folder(const std::string& dir, const ModelFolderOptions& options = {});

}  // namespace difftrain::tools
