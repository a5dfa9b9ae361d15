#pragma once
// ModelFolder: a diffusers text-to-image pipeline folder loaded for sampling or training.
//
//   DIR/unet/                        config.json + diffusion_pytorch_model.safetensors (required)
//   DIR/vae/                         AutoencoderKL (optional: absent → pixel space, the UNet works
//                                    on images [B,3,H,W] in [−1, 1] directly)
//   DIR/text_encoder/                transformers CLIPTextModel (required)
//   DIR/tokenizer/                   vocab.json + merges.txt (required)
//   DIR/scheduler/scheduler_config.json                                  (required)
//   DIR/text_encoder_2/, DIR/tokenizer_2/  SDXL: CLIPTextModelWithProjection and its tokenizer
//                                    (both, or neither); the UNet then has addition_embed_type
//                                    "text_time" and is conditioned as SdxlTextEncoders says
//
// The parts must fit together: the UNet's in/out channels equal the VAE's latent_channels (3 in
// pixel space) and its cross_attention_dim the text encoder's hidden_size (SDXL: the sum of
// both, and projection_class_embeddings_input_dim = projection_dim + 6·addition_time_embed_dim);
// a mismatch or a missing part is an Error naming the folder and the values (check_model_parts,
// also run on an original single-file checkpoint loaded as a ModelFolder: single_file.hpp).
//
// save_model_folder writes such a folder (pixel space: no vae/) that load_model_folder and
// diffusers' StableDiffusionPipeline.from_pretrained read. Weights by their diffusers /
// transformers names (LoRA adapters are not part of a base model and are left out: save them
// with lora::save_lora). Each component's files are written atomically.

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/io/json_file.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/lora/inject.hpp"
#include "difftrain/lora/lora_file.hpp"
#include "difftrain/models/clip/text_encoder.hpp"
#include "difftrain/models/clip_tokenizer.hpp"
#include "difftrain/models/sdxl_conditioning.hpp"
#include "difftrain/models/unet/load.hpp"
#include "difftrain/models/unet/lora_names.hpp"
#include "difftrain/models/unet/unet2d_condition.hpp"
#include "difftrain/models/vae/autoencoder_kl.hpp"
#include "difftrain/models/vae/vae_load.hpp"
#include "difftrain/nn/parameter.hpp"
#include "difftrain/schedule/sampling_config.hpp"

namespace difftrain::pipeline {

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
  std::optional<models::ClipTextEncoder> text_encoder_2;  // SDXL
  std::optional<ClipTokenizer> tokenizer_2;               // SDXL
  std::size_t clip_skip = 0;                              // diffusers' clip_skip

  /// An SDXL pipeline (text_encoder_2/, tokenizer_2/, a "text_time" UNet).
  bool is_sdxl() const { return text_encoder_2.has_value(); }
  /// SDXL: both text encoders as one (held by reference), with clip_skip.
  models::SdxlTextEncoders sdxl_text_encoders();

  /// Spatial factor between images and the UNet's sample: the VAE's 2^(blocks−1), 1 in pixel space.
  std::size_t vae_scale_factor() const { return vae ? vae->downsample_factor() : 1; }
  /// Channels of the UNet's sample (the VAE's latent_channels, or the image channels).
  std::size_t latent_channels() const { return unet.config().in_channels; }

  /// The UNet sample shape [C, h, w] for images of height × width pixels; both must be
  /// multiples of vae_scale_factor() × 2^(UNet blocks − 1) (the UNet halves the size that often).
  std::array<std::size_t, 3> latent_shape(std::size_t height, std::size_t width) const;

  /// Token ids of the prompts, padded to the tokenizer's model_max_length L (77 for CLIP): [B, L],
  /// or for SDXL both tokenizers' ids side by side, [B, 2L] (models::sdxl_token_ids).
  TokenIds tokenize(const std::vector<std::string>& prompts) const;

  /// Context [B, L, D] of the prompts: tokenize, then the text encoder (with clip_skip); SDXL:
  /// SdxlTextEncoders' prompt_embeds (encode_sdxl_prompts has the pooled embeddings too).
  Tensor3<float> encode_prompts(const std::vector<std::string>& prompts);
  /// SDXL: prompt_embeds [B, L, D1 + D2] and pooled_prompt_embeds [B, P].
  models::SdxlPromptEmbeds encode_sdxl_prompts(const std::vector<std::string>& prompts);

  /// Applies a LoRA file with multiplier m: its UNet part to the UNet, its text-encoder part
  /// (kohya lora_te_, PEFT text_encoder.) to the text encoder; SDXL: lora_te1_ / text_encoder.
  /// and lora_te2_ / text_encoder_2. to the two encoders. A part for a component this pipeline
  /// lacks (lora_te_ on SDXL, lora_te1_ on SD 1.x) is an Error naming it.
  /// Everything but the adapters is frozen. Returns the adapted modules (text encoder's last).
  std::vector<std::string> apply_lora(const std::string& path, double multiplier = 1.0);

  /// Images [B, 3, H, W] (≈ [−1, 1], not clamped) from UNet samples: the VAE decoder of
  /// latents / scaling_factor (+ shift), or the samples themselves in pixel space.
  Tensor4<float> decode(const Tensor4<float>& latents) const;
};

/// Loads a pipeline folder (see the header comment).
ModelFolder load_model_folder(const std::string& dir, const ModelFolderOptions& options = {});

/// Throws an Error (from `fn`, naming `where`: the folder or file) unless the parts of `model` fit
/// together as the header comment says. `vae_skipped`: the pipeline has a VAE that was not loaded
/// (ModelFolderOptions::load_vae false), so the UNet's channels are not checked against it.
/// load_model_folder and load_model_single_file (single_file.hpp) both end with it.
void check_model_parts(const ModelFolder& model, std::string_view fn, const std::string& where,
                       bool vae_skipped);

inline std::array<std::size_t, 3> ModelFolder::latent_shape(std::size_t height,
                                                            std::size_t width) const {
  const std::size_t f = vae_scale_factor() << (unet.config().num_blocks() - 1);
  require(height > 0 && width > 0 && height % f == 0 && width % f == 0, "ModelFolder",
          "image size ", height, "x", width, " is not a positive multiple of ", f, " (VAE factor ",
          vae_scale_factor(), " × 2^", unet.config().num_blocks() - 1, " UNet downsamplings)");
  return {latent_channels(), height / vae_scale_factor(), width / vae_scale_factor()};
}

inline models::SdxlTextEncoders ModelFolder::sdxl_text_encoders() {
  require(is_sdxl(), "ModelFolder", "'", root.string(), "' is not an SDXL pipeline");
  return models::SdxlTextEncoders(text_encoder.model(), text_encoder_2->model(), clip_skip);
}

inline TokenIds ModelFolder::tokenize(const std::vector<std::string>& prompts) const {
  const TokenIds ids = tokenizer.encode_batch(prompts, tokenizer.model_max_length());
  if (!is_sdxl()) return ids;
  return models::sdxl_token_ids(ids,
                                tokenizer_2->encode_batch(prompts, tokenizer.model_max_length()));
}

inline Tensor3<float> ModelFolder::encode_prompts(const std::vector<std::string>& prompts) {
  if (is_sdxl()) return encode_sdxl_prompts(prompts).prompt_embeds;
  return text_encoder.encode(tokenize(prompts));
}

inline models::SdxlPromptEmbeds ModelFolder::encode_sdxl_prompts(
    const std::vector<std::string>& prompts) {
  const auto L = tokenizer.model_max_length();
  return sdxl_text_encoders().encode(tokenizer.encode_batch(prompts, L),
                                     tokenizer_2->encode_batch(prompts, L));
}

inline std::vector<std::string> ModelFolder::apply_lora(const std::string& path,
                                                        double multiplier) {
  // The text encoders of this pipeline and their LoRA components.
  std::vector<std::pair<models::ClipTextEncoder*, const lora::LoraComponent*>> encoders;
  if (is_sdxl())
    encoders = {{&text_encoder, &lora::kLoraSdxlTextEncoder1},
                {&*text_encoder_2, &lora::kLoraSdxlTextEncoder2}};
  else
    encoders = {{&text_encoder, &lora::kLoraTextEncoder}};
  std::vector<lora::LoraComponent> known{lora::kLoraUnet};
  for (const auto& e : encoders) known.push_back(*e.second);
  lora::require_lora_components(path, known);
  std::vector<std::string> applied = lora::apply_lora(
      unet, lora::read_lora(path, lora::module_names(unet), models::unet_lora_component(unet)),
      multiplier);
  const std::set<std::string> parts = lora::lora_file_components(path);
  for (auto& [encoder, component] : encoders) {
    nn::set_trainable<float>(*encoder, false);
    if (!parts.count(component->peft)) continue;
    for (auto& name : lora::apply_lora(
             *encoder, lora::read_lora(path, lora::module_names(*encoder), *component), multiplier))
      applied.push_back(std::move(name));
  }
  require(!applied.empty(), "ModelFolder::apply_lora", "'", path,
          "' has no adapter for this model's UNet or text encoder");
  return applied;
}

inline Tensor4<float> ModelFolder::decode(const Tensor4<float>& latents) const {
  return vae ? vae->decode_latents(latents) : latents;
}

inline void check_model_parts(const ModelFolder& model, std::string_view fn,
                              const std::string& where, bool vae_skipped) {
  const auto& u = model.unet.config();
  if (model.vae) {
    const std::size_t z = model.vae->config().latent_channels;
    require(u.in_channels == z && u.out_channels == z, fn, "'", where, "': unet in/out_channels ",
            u.in_channels, "/", u.out_channels, ", expected the VAE's latent_channels ", z);
  } else if (!vae_skipped) {
    require(u.in_channels == 3 && u.out_channels == 3, fn, "'", where,
            "' has no vae/ (pixel space) but unet in/out_channels are ", u.in_channels, "/",
            u.out_channels, ", expected 3 (RGB)");
  }
  std::size_t hidden = model.text_encoder.model().config().hidden_size;
  if (model.is_sdxl()) {
    require(model.tokenizer_2.has_value(), fn, "'", where,
            "' has SDXL's second text encoder but not its tokenizer (tokenizer_2)");
    const auto& c2 = model.text_encoder_2->model().config();
    require(model.text_encoder_2->model().has_projection(), fn, "'", where,
            "': text_encoder_2 is a CLIPTextModel, expected a CLIPTextModelWithProjection");
    require(model.tokenizer_2->model_max_length() == model.tokenizer.model_max_length(), fn, "'",
            where, "': tokenizer_2's model_max_length is ", model.tokenizer_2->model_max_length(),
            ", expected tokenizer's ", model.tokenizer.model_max_length());
    require(u.addition_embed_type == models::AdditionEmbedType::text_time, fn, "'", where,
            "' has text_encoder_2 (SDXL), but unet's addition_embed_type is not \"text_time\"");
    const std::size_t want = c2.projection_dim + 6 * u.addition_time_embed_dim;
    require(u.projection_class_embeddings_input_dim == want, fn, "'", where,
            "': unet projection_class_embeddings_input_dim ",
            u.projection_class_embeddings_input_dim, ", expected text_encoder_2's projection_dim ",
            c2.projection_dim, " + 6 × addition_time_embed_dim ", u.addition_time_embed_dim, " = ",
            want);
    for (const auto* text_model : {&model.text_encoder.model(), &model.text_encoder_2->model()})
      require(model.clip_skip < text_model->config().num_hidden_layers, fn, "'", where,
              "': clip_skip ", model.clip_skip, " leaves no layer of a ",
              text_model->config().num_hidden_layers, "-layer text encoder");
    hidden += c2.hidden_size;
  } else {
    require(u.addition_embed_type == models::AdditionEmbedType::none, fn, "'", where,
            "': unet's addition_embed_type is \"text_time\" (SDXL), but there is no "
            "text_encoder_2/ (SDXL's second text encoder)");
  }
  for (const std::size_t d : u.cross_attention_dim) {
    require(d == hidden, fn, "'", where, "': unet cross_attention_dim ", d, ", expected ",
            model.is_sdxl() ? "the sum of the text encoders' hidden_size "
                            : "the text encoder's hidden_size ",
            hidden);
  }
}

inline ModelFolder load_model_folder(const std::string& dir, const ModelFolderOptions& options) {
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

  // SDXL: the second text encoder and tokenizer.
  std::optional<models::ClipTextEncoder> text_encoder_2;
  std::optional<ClipTokenizer> tokenizer_2;
  if (fs::exists(root / "text_encoder_2", ec) || fs::exists(root / "tokenizer_2", ec)) {
    need(root / "text_encoder_2" / "config.json", "SDXL's second text encoder's config");
    need(root / "tokenizer_2", "SDXL's second tokenizer folder");
    text_encoder_2.emplace(
        models::ClipTextEncoder::from_folder((root / "text_encoder_2").string()));
    tokenizer_2.emplace(ClipTokenizer::from_folder((root / "tokenizer_2").string()));
  }
  ModelFolder model{root,
                    std::move(unet),
                    std::move(vae),
                    std::move(text_encoder),
                    std::move(tokenizer),
                    std::move(scheduler),
                    std::move(text_encoder_2),
                    std::move(tokenizer_2),
                    options.clip_skip};
  check_model_parts(model, fn, dir, has_vae && !options.load_vae);
  return model;
}

/// Every non-adapter parameter of `model` as a safetensors file (F32).
template <nn::Module M>
void save_model_weights(M& model, const std::filesystem::path& path) {
  std::vector<io::TensorToWrite> tensors;
  for (auto& [name, p] : nn::named_parameters<float>(model))
    if (!lora::is_adapter_parameter(name))
      tensors.push_back(io::TensorToWrite::from_tensor(name, p->value));
  io::save_safetensors(path.string(), tensors);
}

/// The parts of a pipeline folder. The configs are the JSON the component was built from.
template <class UNetT, class TextModelT>
struct ModelFolderParts {
  UNetT& unet;
  nlohmann::json unet_config;
  TextModelT& text_model;
  nlohmann::json text_config;
  std::filesystem::path tokenizer_dir;  // copied file by file
  nlohmann::json scheduler_config;
};

/// Writes dir/{unet,text_encoder,tokenizer,scheduler}/ and model_index.json (pixel space: no
/// vae/). The folder is created if needed; existing component files are replaced.
template <class UNetT, class TextModelT>
void save_model_folder(const std::filesystem::path& dir,
                       const ModelFolderParts<UNetT, TextModelT>& parts) {
  namespace fs = std::filesystem;
  for (const char* sub : {"unet", "text_encoder", "tokenizer", "scheduler"})
    fs::create_directories(dir / sub);
  io::write_json_file(dir / "unet" / "config.json", parts.unet_config);
  save_model_weights(parts.unet, dir / "unet" / "diffusion_pytorch_model.safetensors");
  io::write_json_file(dir / "text_encoder" / "config.json", parts.text_config);
  save_model_weights(parts.text_model, dir / "text_encoder" / "model.safetensors");
  require(fs::is_directory(parts.tokenizer_dir), "save_model_folder", "tokenizer folder '",
          parts.tokenizer_dir.string(), "' does not exist");
  for (const auto& entry : fs::directory_iterator(parts.tokenizer_dir))
    if (entry.is_regular_file())
      fs::copy_file(entry.path(), dir / "tokenizer" / entry.path().filename(),
                    fs::copy_options::overwrite_existing);
  io::write_json_file(dir / "scheduler" / "scheduler_config.json", parts.scheduler_config);
  io::write_json_file(dir / "model_index.json",
                      {{"_class_name", "StableDiffusionPipeline"},
                       {"unet", {"diffusers", "UNet2DConditionModel"}},
                       {"text_encoder", {"transformers", "CLIPTextModel"}},
                       {"tokenizer", {"transformers", "CLIPTokenizer"}},
                       {"scheduler", {"diffusers", "DDPMScheduler"}},
                       {"vae", nullptr}});
}

}  // namespace difftrain::pipeline
