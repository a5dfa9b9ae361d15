#pragma once
// Tiny diffusers pipeline folders built from tests/data, for tests that load whole pipelines:
//   SD 1.x: unet_tiny, vae_tiny, clip_tiny, tokenizer_tiny, an SD scheduler config;
//   SDXL:   unet_sdxl_tiny, vae_tiny, clip_tiny (eos_token_id 2), text_encoder_2 = clip_proj_tiny's
//           config with projection_dim 32 and eos_token_id 2 and seeded random weights (pooled
//           width 32 = the UNet's projection_class_embeddings_input_dim 80 − 6 × 8),
//           tokenizer_tiny twice (tokenizer_2 padding with "!"), the scheduler config.
// write_tiny_sdxl_file writes such an SDXL folder as one original single file.

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "difftrain/core/random.hpp"
#include "difftrain/io/json_file.hpp"
#include "difftrain/models/clip/clip.hpp"
#include "difftrain/models/ldm_names.hpp"
#include "difftrain/models/unet/load.hpp"
#include "difftrain/models/vae/vae_load.hpp"
#include "difftrain/nn/init.hpp"
#include "difftrain/nn/parameter.hpp"
#include "difftrain/pipeline/model_folder.hpp"
#include "support/ldm_file_builder.hpp"
#include "support/tensor_match.hpp"

namespace difftrain::test {

// Copies files of the test data folder `from` into `to` (created).
inline void copy_data_files(const std::string& from, const std::filesystem::path& to,
                            const std::vector<std::string>& names) {
  std::filesystem::create_directories(to);
  const std::filesystem::path source = data_path(from);
  for (const auto& name : names)
    std::filesystem::copy_file(source / name, to / name,
                               std::filesystem::copy_options::overwrite_existing);
}

// The scheduler_config.json of SD checkpoints (DDPM, scaled_linear β 0.00085 … 0.012).
inline nlohmann::json sd_scheduler_config_json() {
  return {{"_class_name", "DDPMScheduler"},
          {"num_train_timesteps", 1000},
          {"beta_start", 0.00085},
          {"beta_end", 0.012},
          {"beta_schedule", "scaled_linear"},
          {"prediction_type", "epsilon"},
          {"clip_sample", false},
          {"set_alpha_to_one", false},
          {"steps_offset", 1},
          {"timestep_spacing", "leading"}};
}

// A tiny SD 1.x pipeline folder at `dir` (see the header comment).
inline void write_tiny_sd_folder(const std::filesystem::path& dir,
                                 const nlohmann::json& scheduler = sd_scheduler_config_json()) {
  namespace fs = std::filesystem;
  copy_data_files("unet_tiny", dir / "unet",
                  {"config.json", "diffusion_pytorch_model.safetensors"});
  copy_data_files("vae_tiny", dir / "vae", {"config.json", "diffusion_pytorch_model.safetensors"});
  copy_data_files("clip_tiny", dir / "text_encoder", {"config.json", "model.safetensors"});
  copy_data_files("tokenizer_tiny", dir / "tokenizer",
                  {"vocab.json", "merges.txt", "tokenizer_config.json"});
  fs::create_directories(dir / "scheduler");
  io::write_json_file(dir / "scheduler" / "scheduler_config.json", scheduler);
}

// A tiny SDXL pipeline folder at `dir` (see the header comment).
inline void write_tiny_sdxl_folder(const std::filesystem::path& dir,
                                   const nlohmann::json& scheduler = sd_scheduler_config_json()) {
  namespace fs = std::filesystem;
  copy_data_files("unet_sdxl_tiny", dir / "unet",
                  {"config.json", "diffusion_pytorch_model.safetensors"});
  copy_data_files("vae_tiny", dir / "vae", {"config.json", "diffusion_pytorch_model.safetensors"});
  copy_data_files("clip_tiny", dir / "text_encoder", {"config.json", "model.safetensors"});
  // SDXL's configs have eos_token_id 2: the legacy rule, pooled at the highest id (the eos of
  // tokenizer_tiny; the golden configs name another vocabulary's eos)
  nlohmann::json te1 = io::read_json_file("test", dir / "text_encoder" / "config.json");
  te1["eos_token_id"] = 2;
  io::write_json_file(dir / "text_encoder" / "config.json", te1);
  const std::vector<std::string> tokenizer{"vocab.json", "merges.txt", "tokenizer_config.json"};
  copy_data_files("tokenizer_tiny", dir / "tokenizer", tokenizer);
  copy_data_files("tokenizer_tiny", dir / "tokenizer_2", tokenizer);
  nlohmann::json tok = io::read_json_file("test", dir / "tokenizer_2" / "tokenizer_config.json");
  tok["pad_token"] = "!";
  io::write_json_file(dir / "tokenizer_2" / "tokenizer_config.json", tok);
  nlohmann::json te2 = io::read_json_file("test", data_path("clip_proj_tiny/config.json"));
  te2["projection_dim"] = 32;
  te2["eos_token_id"] = 2;
  models::ClipTextModel<float> text_encoder_2(models::ClipTextConfig::from_json(te2));
  nn::init_like_pytorch<float>(text_encoder_2, RandomStream{3, 0});
  fs::create_directories(dir / "text_encoder_2");
  io::write_json_file(dir / "text_encoder_2" / "config.json", te2);
  pipeline::save_model_weights(text_encoder_2, dir / "text_encoder_2" / "model.safetensors");
  fs::create_directories(dir / "scheduler");
  io::write_json_file(dir / "scheduler" / "scheduler_config.json", scheduler);
}

// The folder's UNet and VAE under their original names.
inline void add_unet_and_vae(FileBuilder& out, const std::filesystem::path& folder) {
  auto unet = models::load_unet<float>((folder / "unet").string());
  for (auto& [name, p] : nn::named_parameters<float>(unet))
    out.add_tensor(std::string(models::kLdmUnetPrefix) + models::ldm_unet_name(unet.config(), name),
                   p->value);
  auto vae = models::load_vae<float>((folder / "vae").string());
  for (auto& [name, p] : nn::named_parameters<float>(vae))
    out.add_tensor(std::string(models::kLdmVaePrefix) + models::ldm_vae_name(vae.config(), name),
                   p->value);
}

inline std::string component_weights(const std::filesystem::path& folder, const char* component) {
  return (folder / component / "model.safetensors").string();
}

// An SDXL folder as one file: embedders.0 transformers' names, embedders.1 OpenCLIP's.
inline void write_tiny_sdxl_file(const std::filesystem::path& folder, const std::string& path) {
  FileBuilder file;
  add_unet_and_vae(file, folder);
  add_transformers(file, component_weights(folder, "text_encoder"),
                   "conditioner.embedders.0.transformer.");
  add_open_clip(file, component_weights(folder, "text_encoder_2"),
                "conditioner.embedders.1.model.");
  file.add("denoiser.sigmas", std::vector<float>(10, 1.0f), {10});  // other tensors are ignored
  file.write(path);
}

}  // namespace difftrain::test
