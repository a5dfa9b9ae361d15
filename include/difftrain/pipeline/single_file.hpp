#pragma once
// An original single-file checkpoint (SD 1.x, SD 2.x, SDXL .safetensors, e.g.
// v1-5-pruned-emaonly.safetensors, sd_xl_base_1.0.safetensors) loaded as a ModelFolder, the model
// family told from the file's tensor names, as kohya sd-scripts and diffusers' from_single_file do.
//
//   sdxl: text encoders conditioner.embedders.0.transformer.* (transformers' names) and
//         conditioner.embedders.1.model.* (OpenCLIP, with projection); presets UNet sdxl,
//         VAE sdxl, CLIP sd15 + sdxl_text_encoder_2
//   sd2:  text encoder cond_stage_model.model.* (OpenCLIP); presets UNet sd21, VAE sd15, CLIP sd21
//   sd1:  text encoder cond_stage_model.transformer.* (transformers'); presets UNet sd15, VAE sd15,
//         CLIP sd15
// UNet model.diffusion_model.* and VAE first_stage_model.* in every family (ldm_names.hpp); the VAE
// is required. Scheduler preset: diffusers' SD one (DDPM scaled_linear β 0.00085 … 0.012, T 1000,
// epsilon, leading with steps_offset 1, set_alpha_to_one false, no clip_sample).
//
// Configs: SingleFileOptions::config_dir, a diffusers pipeline folder of the same model, is read
// for its configs only (unet/, vae/, text_encoder/, text_encoder_2/ config.json, tokenizer/,
// tokenizer_2/, scheduler/scheduler_config.json; its weights are not read), as diffusers'
// from_single_file(config=...); without it, the family's presets above.
// Tokenizers: tokenizer_dir, when given, is the tokenizer, and for SDXL also tokenizer_2 with pad
// token "!" (SDXL's second tokenizer is CLIP's, padding with "!"); else config_dir's tokenizer/
// and tokenizer_2/; neither is an Error naming tokenizer_dir (a single file holds no vocabulary).
// The parts are checked as load_model_folder checks a folder (check_model_parts).

#include <algorithm>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/clip/clip_config.hpp"
#include "difftrain/models/clip/clip_text_model.hpp"
#include "difftrain/models/clip/open_clip_names.hpp"
#include "difftrain/models/clip/text_encoder.hpp"
#include "difftrain/models/clip_tokenizer.hpp"
#include "difftrain/models/ldm_names.hpp"
#include "difftrain/models/unet/load.hpp"
#include "difftrain/models/unet/unet_config.hpp"
#include "difftrain/models/vae/vae_config.hpp"
#include "difftrain/models/vae/vae_load.hpp"
#include "difftrain/pipeline/model_folder.hpp"
#include "difftrain/schedule/sampling_config.hpp"

namespace difftrain::pipeline {

/// The model families of original single-file checkpoints.
enum class ModelFamily { sd1, sd2, sdxl };

inline std::string_view to_string(ModelFamily family) {
  switch (family) {
    case ModelFamily::sd1:
      return "sd1";
    case ModelFamily::sd2:
      return "sd2";
    case ModelFamily::sdxl:
      return "sdxl";
  }
  return "?";
}

/// The text encoder layout that tells each family (the first one found, in this order, wins).
inline constexpr std::pair<ModelFamily, models::ClipSingleFileLayout> kFamilyLayouts[] = {
    {ModelFamily::sdxl, models::ClipSingleFileLayout::sdxl_second},
    {ModelFamily::sd2, models::ClipSingleFileLayout::open_clip},
    {ModelFamily::sd1, models::ClipSingleFileLayout::hf_transformer},
};

namespace single_file_detail {

inline bool has_prefix(const std::vector<std::string>& names, std::string_view prefix) {
  return std::any_of(names.begin(), names.end(),
                     [&](const std::string& name) { return name.starts_with(prefix); });
}

}  // namespace single_file_detail

/// The family of the single-file checkpoint `file`, from its tensor names:
/// conditioner.embedders.1.model.* → sdxl, cond_stage_model.model.* → sd2,
/// cond_stage_model.transformer.* → sd1; none of them is an Error naming the file and the three.
inline ModelFamily detect_model_family(const std::string& file) {
  const std::vector<std::string> names = io::SafetensorsFile::open(file).names();
  std::string looked_for;
  for (const auto& [family, layout] : kFamilyLayouts) {
    const std::string_view prefix = models::clip_single_file_prefix(layout);
    if (single_file_detail::has_prefix(names, prefix)) return family;
    looked_for += (looked_for.empty() ? "" : ", ") + std::string(prefix) + "* (" +
                  std::string(to_string(family)) + ")";
  }
  fail("detect_model_family", "'", file,
       "' is not an SD 1.x, SD 2.x or SDXL single-file checkpoint: it has no tensor named ",
       looked_for);
}

/// The configs of a single file's components.
struct SingleFileConfigs {
  models::UNet2DConditionConfig unet;
  models::AutoencoderKLConfig vae;
  models::ClipTextConfig text_encoder;
  std::optional<models::ClipTextConfig> text_encoder_2;  // SDXL
  SamplingConfig scheduler;
};

/// diffusers' scheduler of SD checkpoints (its from_single_file default). SD 2.x 768-v files
/// (v-prediction) cannot be told from the 512 epsilon ones by their tensors: the prediction type
/// stays epsilon unless a config_dir's scheduler_config.json says otherwise.
inline SamplingConfig sd_scheduler_config() {
  SamplingConfig s;
  s.train.num_train_timesteps = 1000;
  s.train.beta_start = 0.00085;
  s.train.beta_end = 0.012;
  s.train.beta_schedule = BetaSchedule::scaled_linear;
  s.train.prediction_type = PredictionType::epsilon;
  s.timestep_spacing = TimestepSpacing::leading;
  s.steps_offset = 1;
  s.set_alpha_to_one = false;
  s.clip_sample = false;
  return s;
}

/// The configs of a `family` single file: read from the diffusers pipeline folder `config_dir`
/// (configs only; SDXL: text_encoder_2/ too), or the family's presets when it is empty (see the
/// header comment). A missing config is an Error naming config_dir and the file.
inline SingleFileConfigs single_file_configs(ModelFamily family,
                                             const std::string& config_dir = {}) {
  namespace fs = std::filesystem;
  const bool sdxl = family == ModelFamily::sdxl;
  if (config_dir.empty()) {
    switch (family) {
      case ModelFamily::sd1:
        return {models::UNet2DConditionConfig::sd15(), models::AutoencoderKLConfig::sd15(),
                models::ClipTextConfig::sd15(), std::nullopt, sd_scheduler_config()};
      case ModelFamily::sd2:
        return {models::UNet2DConditionConfig::sd21(), models::AutoencoderKLConfig::sd15(),
                models::ClipTextConfig::sd21(), std::nullopt, sd_scheduler_config()};
      case ModelFamily::sdxl:
        return {models::UNet2DConditionConfig::sdxl(), models::AutoencoderKLConfig::sdxl(),
                models::ClipTextConfig::sd15(), models::ClipTextConfig::sdxl_text_encoder_2(),
                sd_scheduler_config()};
    }
  }
  const fs::path root(config_dir);
  std::error_code ec;
  require(fs::is_directory(root, ec), "single_file_configs", "config_dir '", config_dir,
          "' does not exist or is not a directory");
  const auto config = [&](const char* component, const char* file) {
    const fs::path path = root / component / file;
    require(fs::exists(path, ec), "single_file_configs", "config_dir '", config_dir, "' has no ",
            component, "/", file);
    return path.string();
  };
  SingleFileConfigs c{models::UNet2DConditionConfig::from_file(config("unet", "config.json")),
                      models::AutoencoderKLConfig::from_file(config("vae", "config.json")),
                      models::ClipTextConfig::from_file(config("text_encoder", "config.json")),
                      std::nullopt,
                      SamplingConfig::from_file(config("scheduler", "scheduler_config.json"))};
  if (sdxl)
    c.text_encoder_2 = models::ClipTextConfig::from_file(config("text_encoder_2", "config.json"));
  return c;
}

struct SingleFileOptions {
  ModelFolderOptions folder;  // load_vae, clip_skip
  std::string config_dir;     // a diffusers pipeline folder read for its configs; empty: presets
  std::string tokenizer_dir;  // a CLIP tokenizer folder; required without config_dir
};

/// Loads an original single-file checkpoint (see the header comment); root is the file's path.
inline ModelFolder load_model_single_file(const std::string& file,
                                          const SingleFileOptions& options = {}) {
  namespace fs = std::filesystem;
  constexpr const char* fn = "load_model_single_file";
  using models::ClipSingleFileLayout;
  const ModelFamily family = detect_model_family(file);
  const bool sdxl = family == ModelFamily::sdxl;
  const fs::path config_dir(options.config_dir);
  require(!options.tokenizer_dir.empty() || !options.config_dir.empty(), fn, "'", file,
          "' holds no tokenizer: set tokenizer_dir (a CLIP tokenizer folder: vocab.json, "
          "merges.txt) or config_dir (a diffusers pipeline folder with tokenizer/)");
  require(single_file_detail::has_prefix(io::SafetensorsFile::open(file).names(),
                                         models::kLdmVaePrefix),
          fn, "'", file, "' has no VAE (no tensor named ", models::kLdmVaePrefix,
          "*): a single-file checkpoint must hold its VAE");
  SingleFileConfigs configs = single_file_configs(family, options.config_dir);

  auto unet = models::load_unet_single_file<float>(file, configs.unet);
  std::optional<models::AutoencoderKL<float>> vae;
  if (options.folder.load_vae) vae.emplace(models::load_vae_single_file<float>(file, configs.vae));
  const ClipSingleFileLayout layout =
      family == ModelFamily::sd1   ? ClipSingleFileLayout::hf_transformer
      : family == ModelFamily::sd2 ? ClipSingleFileLayout::open_clip
                                   : ClipSingleFileLayout::sdxl_first;
  models::ClipTextEncoder text_encoder(
      models::load_clip_text_model_single_file<float>(file, configs.text_encoder, layout),
      models::ClipTextEncoderOptions{options.folder.clip_skip});
  std::optional<models::ClipTextEncoder> text_encoder_2;
  if (sdxl)
    text_encoder_2.emplace(models::load_clip_text_model_single_file<float>(
        file, *configs.text_encoder_2, ClipSingleFileLayout::sdxl_second));

  // tokenizer_dir wins; SDXL's second tokenizer is then the same files padding with "!".
  const bool own_tokenizer = !options.tokenizer_dir.empty();
  auto tokenizer = ClipTokenizer::from_folder(own_tokenizer ? options.tokenizer_dir
                                                            : (config_dir / "tokenizer").string());
  std::optional<ClipTokenizer> tokenizer_2;
  if (sdxl)
    tokenizer_2.emplace(own_tokenizer
                            ? ClipTokenizer::from_folder(options.tokenizer_dir, std::string("!"))
                            : ClipTokenizer::from_folder((config_dir / "tokenizer_2").string()));

  ModelFolder model{fs::path(file),
                    std::move(unet),
                    std::move(vae),
                    std::move(text_encoder),
                    std::move(tokenizer),
                    std::move(configs.scheduler),
                    std::move(text_encoder_2),
                    std::move(tokenizer_2),
                    options.folder.clip_skip};
  check_model_parts(model, fn, file, !options.folder.load_vae);
  return model;
}

/// A diffusers pipeline folder (load_model_folder with options.folder) or an original single-file
/// checkpoint (load_model_single_file); config_dir and tokenizer_dir are for a file only (an Error
/// with a folder). A path that is neither is an Error naming it.
inline ModelFolder load_pipeline(const std::string& path, const SingleFileOptions& options = {}) {
  namespace fs = std::filesystem;
  constexpr const char* fn = "load_pipeline";
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    require(options.config_dir.empty() && options.tokenizer_dir.empty(), fn, "'", path,
            "' is a pipeline folder: config_dir and tokenizer_dir apply to a single-file "
            "checkpoint only");
    return load_model_folder(path, options.folder);
  }
  require(fs::is_regular_file(path, ec), fn, "'", path,
          "' is neither a diffusers pipeline folder nor a single-file checkpoint (.safetensors)",
          fs::exists(path, ec) ? "" : ": it does not exist");
  return load_model_single_file(path, options);
}

}  // namespace difftrain::pipeline
