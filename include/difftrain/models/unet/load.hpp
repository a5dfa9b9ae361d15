#pragma once
// Loading a diffusers UNet folder: config.json + diffusion_pytorch_model.safetensors, or the
// sharded form diffusion_pytorch_model.safetensors.index.json ({"weight_map": {name: file}}).
//
// Strict (nn::load_state_dict): every parameter must be present with its shape and no tensor may
// be left over; all missing, unexpected and misshapen names are listed in one Error. F32, F16,
// BF16 (any floating or integer dtype, see io/safetensors.hpp) are converted to T.
// Tensors are read from the memory-mapped files one at a time straight into a reused buffer
// (SafetensorsSource), so loading needs no second copy of the weights.

#include <cstddef>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/unet/unet2d_condition.hpp"
#include "difftrain/models/unet/unet_config.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::models {

/// One tensor of an open safetensors file as a state-dict value for nn::load_state_dict: shape()
/// from the header; begin()/end() convert the data to T on first access into a buffer shared by
/// all sources of one load (one tensor resident at a time).
template <class T>
class SafetensorsSource {
 public:
  struct Buffer {
    const SafetensorsSource* owner = nullptr;
    std::vector<T> values;
  };

  SafetensorsSource(std::shared_ptr<const io::SafetensorsFile> file, std::string name,
                    std::shared_ptr<Buffer> buffer)
      : file_(std::move(file)), name_(std::move(name)), buffer_(std::move(buffer)) {}

  const std::vector<std::size_t>& shape() const { return file_->info(name_).shape; }
  const std::string& file_path() const { return file_->path(); }
  const T* begin() const { return load().data(); }
  const T* end() const { return load().data() + load().size(); }

 private:
  const std::vector<T>& load() const {
    if (buffer_->owner != this) {
      buffer_->values.resize(file_->info(name_).numel());
      file_->read_into(name_, std::span<T>(buffer_->values));
      buffer_->owner = this;
    }
    return buffer_->values;
  }

  std::shared_ptr<const io::SafetensorsFile> file_;
  std::string name_;
  std::shared_ptr<Buffer> buffer_;
};

/// name → source for every tensor of the given safetensors files (Error on a name in two files).
template <class T>
std::map<std::string, SafetensorsSource<T>> open_safetensors_state(
    const std::vector<std::string>& paths) {
  auto buffer = std::make_shared<typename SafetensorsSource<T>::Buffer>();
  std::map<std::string, SafetensorsSource<T>> state;
  for (const auto& path : paths) {
    auto file = std::make_shared<const io::SafetensorsFile>(io::SafetensorsFile::open(path));
    for (const auto& name : file->names()) {
      auto [it, inserted] = state.emplace(name, SafetensorsSource<T>(file, name, buffer));
      require(inserted, "open_safetensors_state", "tensor ", name, " is in both '",
              it->second.file_path(), "' and '", path, "'");
    }
  }
  return state;
}

/// The weight files of a diffusers model folder: `<stem>.safetensors`, or the shards listed by
/// `<stem>.safetensors.index.json`.
inline std::vector<std::string> diffusers_weight_files(
    const std::string& folder, const std::string& stem = "diffusion_pytorch_model") {
  namespace fs = std::filesystem;
  constexpr const char* fn = "diffusers_weight_files";
  const fs::path dir(folder);
  const fs::path single = dir / (stem + ".safetensors");
  if (fs::exists(single)) return {single.string()};
  const fs::path index = dir / (stem + ".safetensors.index.json");
  require(fs::exists(index), fn, "'", folder, "' has neither ", single.filename().string(), " nor ",
          index.filename().string());
  std::ifstream in(index);
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw Error(
        difftrain::detail::concat(fn, ": '", index.string(), "' is not valid JSON: ", e.what()));
  }
  require(json.is_object() && json.contains("weight_map") && json["weight_map"].is_object(), fn,
          "'", index.string(), "' has no \"weight_map\" object");
  std::set<std::string> shards;
  for (const auto& [name, file] : json["weight_map"].items()) {
    require(file.is_string(), fn, "'", index.string(), "': weight_map[", name, "] = ", file.dump(),
            ", expected a file name");
    shards.insert(file.get<std::string>());
  }
  require(!shards.empty(), fn, "'", index.string(), "' has an empty weight_map");
  std::vector<std::string> paths;
  for (const auto& shard : shards) {
    const fs::path path = dir / shard;
    require(fs::exists(path), fn, "shard '", path.string(), "' listed in '", index.string(),
            "' does not exist");
    paths.push_back(path.string());
  }
  return paths;
}

/// Copies the tensors of safetensors files into a model (strict; one Error lists every problem).
template <class T, nn::Module M>
void load_safetensors(M& model, const std::vector<std::string>& paths,
                      std::string_view what = "load_safetensors") {
  nn::load_state_dict<T>(model, open_safetensors_state<T>(paths), what);
}

/// A UNet2DConditionModel from a diffusers folder (config.json + weights).
template <class T = float>
UNet2DConditionModel<T> load_unet(const std::string& folder) {
  const auto config =
      UNet2DConditionConfig::from_file((std::filesystem::path(folder) / "config.json").string());
  UNet2DConditionModel<T> model(config);
  load_safetensors<T>(model, diffusers_weight_files(folder), "load_unet('" + folder + "')");
  return model;
}

}  // namespace difftrain::models
