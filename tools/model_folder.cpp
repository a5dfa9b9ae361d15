// ModelFolder's members and load_model_folder (model_folder.hpp).
#include "model_folder.hpp"

#include <system_error>
#include <utility>

#include "difftrain/core/error.hpp"
#include "difftrain/models/unet/load.hpp"
#include "difftrain/models/vae/vae_load.hpp"

namespace difftrain::tools {

std::array<std::size_t, 3> ModelFolder::latent_shape(std::size_t height, std::size_t width) const {
  const std::size_t f = vae_scale_factor() << (unet.config().num_blocks() - 1);
  require(height > 0 && width > 0 && height % f == 0 && width % f == 0, "ModelFolder",
          "image size ", height, "x", width, " is not a positive multiple of ", f, " (VAE factor ",
          vae_scale_factor(), " × 2^", unet.config().num_blocks() - 1, " UNet downsamplings)");
  return {latent_channels(), height / vae_scale_factor(), width / vae_scale_factor()};
}

Tensor3<float> ModelFolder::encode_prompts(const std::vector<std::string>& prompts) {
  return text_encoder.encode(tokenizer.encode_batch(prompts, tokenizer.model_max_length()));
}

Tensor4<float> ModelFolder::decode(const Tensor4<float>& latents) const {
  return vae ? vae->decode_latents(latents) : latents;
}

ModelFolder load_model_folder(const std::string& dir, const ModelFolderOptions& options) {
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
  auto scheduler =
      SamplingConfig::from_file((root / "scheduler" / "scheduler_config.json").string());

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
  return ModelFolder{root,
                     std::move(unet),
                     std::move(vae),
                     std::move(text_encoder),
                     std::move(tokenizer),
                     std::move(scheduler)};
}

}  // namespace difftrain::tools
