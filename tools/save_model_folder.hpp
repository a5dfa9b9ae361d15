#pragma once
// Writes a diffusers pipeline folder that load_model_folder (model_folder.hpp) and diffusers'
// StableDiffusionPipeline.from_pretrained read: unet/, text_encoder/, tokenizer/, scheduler/ and
// optionally vae/. Weights by their diffusers / transformers names (LoRA adapters are not part of
// a base model and are left out: save them with lora::save_lora). Each component's files are
// written atomically (safetensors through a temporary file, JSON likewise).

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/lora/inject.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::tools {

/// Writes `json` (indented) to path through a temporary file renamed into place.
inline void write_json_file(const std::filesystem::path& path, const nlohmann::json& json) {
  const std::filesystem::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    require(out.good(), "write_json_file", "cannot open '", tmp.string(), "' for writing");
    out << json.dump(2) << "\n";
    require(out.good(), "write_json_file", "writing '", tmp.string(), "' failed");
  }
  std::filesystem::rename(tmp, path);
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
  write_json_file(dir / "unet" / "config.json", parts.unet_config);
  save_model_weights(parts.unet, dir / "unet" / "diffusion_pytorch_model.safetensors");
  write_json_file(dir / "text_encoder" / "config.json", parts.text_config);
  save_model_weights(parts.text_model, dir / "text_encoder" / "model.safetensors");
  require(fs::is_directory(parts.tokenizer_dir), "save_model_folder", "tokenizer folder '",
          parts.tokenizer_dir.string(), "' does not exist");
  for (const auto& entry : fs::directory_iterator(parts.tokenizer_dir))
    if (entry.is_regular_file())
      fs::copy_file(entry.path(), dir / "tokenizer" / entry.path().filename(),
                    fs::copy_options::overwrite_existing);
  write_json_file(dir / "scheduler" / "scheduler_config.json", parts.scheduler_config);
  write_json_file(dir / "model_index.json", {{"_class_name", "StableDiffusionPipeline"},
                                             {"unet", {"diffusers", "UNet2DConditionModel"}},
                                             {"text_encoder", {"transformers", "CLIPTextModel"}},
                                             {"tokenizer", {"transformers", "CLIPTokenizer"}},
                                             {"scheduler", {"diffusers", "DDPMScheduler"}},
                                             {"vae", nullptr}});
}

}  // namespace difftrain::tools
