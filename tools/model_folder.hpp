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

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/models/clip/text_encoder.hpp"
#include "difftrain/models/clip_tokenizer.hpp"
#include "difftrain/models/unet/load.hpp"
#include "difftrain/models/unet/unet2d_condition.hpp"
#include "difftrain/models/vae/autoencoder_kl.hpp"
#include "difftrain/models/vae/vae_load.hpp"
#include "difftrain/schedule/sampling_config.hpp"

namespace difftrain::tools {

struct ModelFolderOptions {
  bool load_vae = true;         // false: skip vae/ even if present (e.g. latents are cached)
  std::size_t clip_skip = 0;    // diffusers' clip_skip for the text encoder
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
  std::array<std::size_t, 3> latent_shape(std::size_t height, std::size_t width) const {
    const std::size_t f = vae_scale_factor() << (unet.config().num_blocks() - 1);
    require(height > 0 && width > 0 && height % f == 0 && width % f == 0, "ModelFolder",
            "image size ", height, "x", width, " is not a positive multiple of ", f,
            " (VAE factor ", vae_scale_factor(), " × 2^", unet.config().num_blocks() - 1,
            " UNet downsamplings)");
    return {latent_channels(), height / vae_scale_factor(), width / vae_scale_factor()};
  }

  /// Context [B, L, D] of the prompts: tokenized to the tokenizer's model_max_length (77 for
  /// CLIP), then the text encoder (with clip_skip).
  Tensor3<float> encode_prompts(const std::vector<std::string>& prompts) {
    return text_encoder.encode(tokenizer.encode_batch(prompts, tokenizer.model_max_length()));
  }

  /// Images [B, 3, H, W] (≈ [−1, 1], not clamped) from UNet samples: the VAE decoder of
  /// latents / scaling_factor (+ shift), or the samples themselves in pixel space.
  Tensor4<float> decode(const Tensor4<float>& latents) const {
    return vae ? vae->decode_latents(latents) : latents;
  }
};

/// Loads a pipeline folder (see the header comment).
inline ModelFolder load_model_folder(const std::string& dir, const ModelFolderOptions& options = {}) {
  namespace fs = std::filesystem;
  constexpr const char* fn = "load_model_folder";
  const fs::path root(dir);
  std::error_code ec;
  require(fs::is_directory(root, ec), fn, "model folder '", dir,
          "' does not exist or is not a directory");
  const auto need = [&](const fs::path& path, const char* what) {
    require(fs::exists(path, ec), fn, "'", dir, "' has no ", path.lexically_relative(root).string(),
            " (", what, ")");
  };
  need(root / "unet" / "config.json", "the UNet's config");
  need(root / "text_encoder" / "config.json", "the text encoder's config");
  need(root / "tokenizer", "the tokenizer folder");
  need(root / "scheduler" / "scheduler_config.json", "the scheduler config");

  auto unet = models::load_unet<float>((root / "unet").string());
  std::optional<models::AutoencoderKL<float>> vae;
  const bool has_vae = fs::exists(root / "vae", ec);
  if (has_vae && options.load_vae) vae.emplace(models::load_vae<float>((root / "vae").string()));
  auto text_encoder = models::ClipTextEncoder::from_folder(
      (root / "text_encoder").string(), models::ClipTextEncoderOptions{options.clip_skip});
  auto tokenizer = ClipTokenizer::from_folder((root / "tokenizer").string());
  auto scheduler = SamplingConfig::from_file((root / "scheduler" / "scheduler_config.json").string());

  const auto& u = unet.config();
  if (vae) {
    const std::size_t z = vae->config().latent_channels;
    require(u.in_channels == z && u.out_channels == z, fn, "'", dir, "': unet in/out_channels ",
            u.in_channels, "/", u.out_channels, ", expected the VAE's latent_channels ", z);
  } else if (!has_vae) {
    require(u.in_channels == 3 && u.out_channels == 3, fn, "'", dir,
            "' has no vae/ (pixel space) but unet in/out_channels are ", u.in_channels, "/",
            u.out_channels, ", expected 3 (RGB)");
  }
  const std::size_t hidden = text_encoder.model().config().hidden_size;
  for (const std::size_t d : u.cross_attention_dim) {
    require(d == hidden, fn, "'", dir, "': unet cross_attention_dim ", d,
            ", expected the text encoder's hidden_size ", hidden);
  }
  return ModelFolder{root, std::move(unet), std::move(vae), std::move(text_encoder),
                     std::move(tokenizer), std::move(scheduler)};
}

}  // namespace difftrain::tools
