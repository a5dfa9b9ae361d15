#pragma once
// Loading AutoencoderKL weights: a diffusers folder (config.json +
// diffusion_pytorch_model.safetensors, or its shards via .safetensors.index.json), an original
// single-file checkpoint (first_stage_model.*, names in ldm_names.hpp) or any name → tensor map,
// strictly (every parameter present with its shape, nothing left over; one Error lists all
// problems). F16 / BF16 / F64 files are converted to T.
//
// Older checkpoints spell the mid-block attention differently; their names are mapped first:
//   <…attentions.N>.query / key / value / proj_attn . weight|bias → to_q / to_k / to_v / to_out.0
// and an attention projection weight stored as a 1×1 conv [C, C, 1, 1] (original SD checkpoints
// converted without squeezing) is read as the Linear weight [C, C] (same values, same order).
// A file holding both spellings of one parameter is an Error naming both.

#include <algorithm>
#include <cstddef>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/io/state_dict.hpp"
#include "difftrain/models/ldm_names.hpp"
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

/// Loads a state dict (diffusers or legacy attention names) into the model, strictly.
template <class T, class Source>
void load_vae_state_dict(AutoencoderKL<T>& vae, const std::map<std::string, Source>& state,
                         std::string_view what = "load_vae_state_dict") {
  const auto canonical = io::rename_state(
      state,
      [](const std::string& name, std::vector<std::size_t> shape) -> std::optional<io::StateKey> {
        std::string key = canonical_vae_name(name);
        if (is_vae_attention_projection_weight(key) && shape.size() == 4 && shape[2] == 1 &&
            shape[3] == 1)
          shape.resize(2);
        return io::StateKey{std::move(key), std::move(shape)};
      },
      what);
  nn::load_state_dict<T>(vae, canonical, what);
}

/// Loads safetensors files of VAE weights (one file, or the shards of one model) into the model.
template <class T>
void load_vae_weights(AutoencoderKL<T>& vae, const std::vector<std::string>& paths,
                      std::string_view what = "load_vae_weights") {
  load_vae_state_dict(vae, io::open_safetensors_state<T>(paths), what);
}

/// Loads one safetensors file of VAE weights into the model.
template <class T>
void load_vae_weights(AutoencoderKL<T>& vae, const std::string& path) {
  load_vae_weights(vae, std::vector<std::string>{path}, "load_vae('" + path + "')");
}

/// An AutoencoderKL from a diffusers folder: config.json + diffusion_pytorch_model.safetensors,
/// or the shards listed by diffusion_pytorch_model.safetensors.index.json.
template <class T = float>
AutoencoderKL<T> load_vae(const std::string& folder) {
  namespace fs = std::filesystem;
  const fs::path config = fs::path(folder) / "config.json";
  require(fs::exists(config), "load_vae", "'", folder, "' has no config.json");
  AutoencoderKL<T> vae(AutoencoderKLConfig::from_file(config.string()));
  load_vae_weights(vae, io::diffusers_weight_files(folder), "load_vae('" + folder + "')");
  return vae;
}

/// True when an LDM VAE name (below first_stage_model.) is a mid-block attention projection
/// weight (q, k, v, proj_out), which LDM stores as a 1×1 conv [C, C, 1, 1].
inline bool is_ldm_vae_attention_weight(std::string_view name) {
  if (!name.starts_with("encoder.mid.attn_1.") && !name.starts_with("decoder.mid.attn_1."))
    return false;
  for (const char* leaf : {"q.weight", "k.weight", "v.weight", "proj_out.weight"})
    if (name.substr(19) == leaf) return true;
  return false;
}

/// An AutoencoderKL of `config` from an original single-file checkpoint: its first_stage_model.*
/// tensors, strictly (errors in the file's names), the other tensors ignored. A file with no
/// first_stage_model.* tensor is read as a VAE-only LDM file (e.g. vae-ft-mse-840000-ema-pruned:
/// the same names without the prefix; then every tensor must belong to the VAE).
template <class T = float>
AutoencoderKL<T> load_vae_single_file(const std::string& path, const AutoencoderKLConfig& config) {
  std::string_view prefix = kLdmVaePrefix;
  {
    const auto file = io::SafetensorsFile::open(path);
    const auto names = file.names();
    if (std::none_of(names.begin(), names.end(),
                     [&](const std::string& name) { return name.starts_with(prefix); }))
      prefix = "";
  }
  AutoencoderKL<T> vae(config);
  load_single_file_component<T>(
      vae, path, prefix,
      [&](const std::string& name) { return std::string(prefix) + ldm_vae_name(config, name); },
      [&](const std::string& name, std::vector<std::size_t> shape) -> std::optional<io::StateKey> {
        if (!name.starts_with(prefix)) return std::nullopt;
        if (is_ldm_vae_attention_weight(std::string_view(name).substr(prefix.size())) &&
            shape.size() == 4 && shape[2] == 1 && shape[3] == 1)
          shape.resize(2);
        return io::StateKey{name, std::move(shape)};
      },
      "load_vae_single_file('" + path + "')");
  return vae;
}

#ifdef DIFFTRAIN_EXTERN_TEMPLATES
extern template AutoencoderKL<float> load_vae<float>(const std::string&);
extern template AutoencoderKL<double> load_vae<double>(const std::string&);
extern template AutoencoderKL<float> load_vae_single_file<float>(const std::string&,
                                                                 const AutoencoderKLConfig&);
extern template AutoencoderKL<double> load_vae_single_file<double>(const std::string&,
                                                                   const AutoencoderKLConfig&);
#endif

}  // namespace difftrain::models
