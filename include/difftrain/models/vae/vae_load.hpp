#pragma once
// Loading AutoencoderKL weights: a diffusers folder (config.json +
// diffusion_pytorch_model.safetensors) or any name → tensor map, strictly (every parameter present
// with its shape, nothing left over; one Error lists all problems). F16 / BF16 / F64 files are
// converted to T.
//
// Older checkpoints spell the mid-block attention differently; their names are mapped first:
//   <…attentions.N>.query / key / value / proj_attn . weight|bias → to_q / to_k / to_v / to_out.0
// and an attention projection weight stored as a 1×1 conv [C, C, 1, 1] (original SD checkpoints
// converted without squeezing) is read as the Linear weight [C, C] (same values, same order).
// A file holding both spellings of one parameter is an Error naming both.

#include <array>
#include <cstddef>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/vae/autoencoder_kl.hpp"
#include "difftrain/models/vae/vae_config.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::models {

/// diffusers' current name for a VAE state-dict name (legacy attention names mapped, others kept).
inline std::string canonical_vae_name(const std::string& name) {
  const auto leaf_dot = name.rfind('.');
  if (leaf_dot == std::string::npos || name.find(".attentions.") == std::string::npos) return name;
  const std::string leaf = name.substr(leaf_dot);  // ".weight" / ".bias"
  const std::string module = name.substr(0, leaf_dot);
  const auto dot = module.rfind('.');
  if (dot == std::string::npos) return name;
  const std::string last = module.substr(dot + 1), parent = module.substr(0, dot + 1);
  if (last == "query") return parent + "to_q" + leaf;
  if (last == "key") return parent + "to_k" + leaf;
  if (last == "value") return parent + "to_v" + leaf;
  if (last == "proj_attn") return parent + "to_out.0" + leaf;
  return name;
}

/// True for the weight of a mid-block attention projection (to_q, to_k, to_v, to_out.0).
inline bool is_vae_attention_projection_weight(const std::string& canonical) {
  if (canonical.find(".attentions.") == std::string::npos) return false;
  for (const char* suffix : {".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"})
    if (canonical.ends_with(suffix)) return true;
  return false;
}

/// One tensor of an open safetensors file as a state-dict value: shape() from the header,
/// begin()/end() convert it to T on first access into a buffer shared by one load (one tensor
/// resident at a time).
template <class T>
class SafetensorsTensorSource {
 public:
  struct Buffer {
    const SafetensorsTensorSource* owner = nullptr;
    std::vector<T> values;
  };
  SafetensorsTensorSource(std::shared_ptr<const io::SafetensorsFile> file, std::string name,
                          std::shared_ptr<Buffer> buffer)
      : file_(std::move(file)), name_(std::move(name)), buffer_(std::move(buffer)) {}

  const std::vector<std::size_t>& shape() const { return file_->info(name_).shape; }
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

/// name → source for every tensor of a safetensors file.
template <class T>
std::map<std::string, SafetensorsTensorSource<T>> open_safetensors_sources(
    const std::string& path) {
  auto file = std::make_shared<const io::SafetensorsFile>(io::SafetensorsFile::open(path));
  auto buffer = std::make_shared<typename SafetensorsTensorSource<T>::Buffer>();
  std::map<std::string, SafetensorsTensorSource<T>> out;
  for (const auto& name : file->names())
    out.emplace(name, SafetensorsTensorSource<T>(file, name, buffer));
  return out;
}

/// A state-dict value seen under another shape with the same elements (the 1×1-conv attention
/// weights); the wrapped source must outlive it.
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

/// Loads a state dict (diffusers or legacy attention names) into the model, strictly.
template <class T, class Source>
void load_vae_state_dict(AutoencoderKL<T>& vae, const std::map<std::string, Source>& state,
                         std::string_view what = "load_vae_state_dict") {
  std::map<std::string, ReshapedSource<Source>> canonical;
  std::map<std::string, std::string> original;  // canonical → name in the source
  for (const auto& [name, source] : state) {
    const std::string key = canonical_vae_name(name);
    std::vector<std::size_t> shape(source.shape().begin(), source.shape().end());
    if (is_vae_attention_projection_weight(key) && shape.size() == 4 && shape[2] == 1 &&
        shape[3] == 1)
      shape.resize(2);
    auto [it, inserted] = canonical.emplace(key, ReshapedSource<Source>(source, std::move(shape)));
    if (!inserted)
      throw Error(difftrain::detail::concat(what, ": tensors ", original[key], " and ", name,
                                            " are both the parameter ", key));
    original[key] = name;
  }
  nn::load_state_dict<T>(vae, canonical, what);
}

/// Loads one safetensors file of VAE weights into the model.
template <class T>
void load_vae_weights(AutoencoderKL<T>& vae, const std::string& path) {
  load_vae_state_dict(vae, open_safetensors_sources<T>(path), "load_vae('" + path + "')");
}

/// An AutoencoderKL from a diffusers folder: config.json + diffusion_pytorch_model.safetensors.
template <class T = float>
AutoencoderKL<T> load_vae(const std::string& folder) {
  namespace fs = std::filesystem;
  const fs::path dir(folder);
  const fs::path config = dir / "config.json",
                 weights = dir / "diffusion_pytorch_model.safetensors";
  require(fs::exists(config), "load_vae", "'", folder, "' has no config.json");
  require(fs::exists(weights), "load_vae", "'", folder,
          "' has no diffusion_pytorch_model.safetensors");
  AutoencoderKL<T> vae(AutoencoderKLConfig::from_file(config.string()));
  load_vae_weights(vae, weights.string());
  return vae;
}

}  // namespace difftrain::models
