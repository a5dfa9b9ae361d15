#pragma once
// A model's state read from safetensors files: name → tensor source, for a strict loader such as
// nn::load_state_dict (anything with shape(), begin(), end()). One path for every model (UNet,
// VAE, CLIP):
//   - weight files of a model folder: `<stem>.safetensors`, or the shards listed by
//     `<stem>.safetensors.index.json` ({"weight_map": {name: file}});
//   - sources that read one tensor at a time from the memory-mapped files, converted to T
//     (F32, F16, BF16, F64, ...: see safetensors.hpp) into one buffer reused by the whole load,
//     so loading needs no second copy of the weights;
//   - renaming (and reshaping without copying) a state, e.g. from an older naming scheme.

#include <cstddef>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/io/json_file.hpp"
#include "difftrain/io/safetensors.hpp"

namespace difftrain::io {

/// One tensor of an open safetensors file as a state-dict value: shape() from the header;
/// begin()/end() convert the data to T on first access into a buffer shared by all sources of
/// one load (one tensor resident at a time).
template <class T>
class SafetensorsSource {
 public:
  struct Buffer {
    const SafetensorsSource* owner = nullptr;
    std::vector<T> values;
  };

  SafetensorsSource(std::shared_ptr<const SafetensorsFile> file, std::string name,
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

  std::shared_ptr<const SafetensorsFile> file_;
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
    auto file = std::make_shared<const SafetensorsFile>(SafetensorsFile::open(path));
    for (const auto& name : file->names()) {
      auto [it, inserted] = state.emplace(name, SafetensorsSource<T>(file, name, buffer));
      require(inserted, "open_safetensors_state", "tensor ", name, " is in both '",
              it->second.file_path(), "' and '", path, "'");
    }
  }
  return state;
}

/// The weight files of a diffusers / transformers model folder: `<stem>.safetensors`, or the
/// shards listed by `<stem>.safetensors.index.json` (each shard once, in name order).
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
  const nlohmann::json json = read_json_file(fn, index.string());
  require(json.is_object() && json.contains("weight_map") && json["weight_map"].is_object(), fn,
          "'", index.string(), "' has no \"weight_map\" object");
  std::set<std::string> shards;
  for (const auto& [name, file] : json["weight_map"].items()) {
    require(file.is_string(), fn, "'", index.string(), "': weight_map[", name,
            "] = ", json_excerpt(file), ", expected a file name");
    // transformers and diffusers name shards beside the index: a path leaving the folder
    // ("../../etc/x", "/abs") would read a file the model does not own.
    const std::string shard = file.get<std::string>();
    const fs::path relative = fs::path(shard).lexically_normal();
    require(!shard.empty() && relative.is_relative() && *relative.begin() != ".." &&
                relative.has_filename(),
            fn, "'", index.string(), "': weight_map[", name, "] = '", shard,
            "', expected a file inside the model folder");
    shards.insert(shard);
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

/// A state-dict value seen under another shape with the same elements (e.g. a 1×1 conv weight
/// [C, C, 1, 1] read as a Linear weight [C, C]); the wrapped source must outlive it.
template <class Source>
class ReshapedSource {
 public:
  ReshapedSource(const Source& base, std::vector<std::size_t> shape)
      : base_(&base), shape_(std::move(shape)) {}
  const std::vector<std::size_t>& shape() const { return shape_; }
  auto begin() const { return base_->begin(); }
  auto end() const { return base_->end(); }

 private:
  const Source* base_;
  std::vector<std::size_t> shape_;
};

/// The name and shape a tensor of a state takes after renaming.
struct StateKey {
  std::string name;
  std::vector<std::size_t> shape;
};

/// The state under new names: rename(name, shape) → StateKey, or std::nullopt to leave the tensor
/// out. A shape may change only when the element count does not (checked). Two tensors renamed to
/// one name are an Error naming both. The views refer to `state`, which must outlive them.
template <class Source, class Rename>
std::map<std::string, ReshapedSource<Source>> rename_state(
    const std::map<std::string, Source>& state, Rename&& rename, std::string_view what) {
  auto numel = [](const auto& shape) {
    std::size_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  };
  std::map<std::string, ReshapedSource<Source>> out;
  std::map<std::string, std::string> original;  // new name → name in `state`
  for (const auto& [name, source] : state) {
    const std::vector<std::size_t> shape(source.shape().begin(), source.shape().end());
    std::optional<StateKey> key = rename(name, shape);
    if (!key) continue;
    require(numel(key->shape) == numel(shape), what, "tensor ", name, " of shape ",
            shape_string(shape), " cannot be read as ", key->name, " of shape ",
            shape_string(key->shape));
    auto [it, inserted] =
        out.emplace(key->name, ReshapedSource<Source>(source, std::move(key->shape)));
    require(inserted, what, "tensors ", original[it->first], " and ", name,
            " are both the parameter ", it->first);
    original[it->first] = name;
  }
  return out;
}

}  // namespace difftrain::io
