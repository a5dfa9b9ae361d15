#pragma once
// AutoencoderKLConfig: diffusers' AutoencoderKL configuration (vae/config.json), with the SD 1.x
// and SDXL presets.
//
// Parsing is strict: a key set to a value this implementation does not support throws
// difftrain::Error naming the key and the value; a key AutoencoderKL does not have throws unless
// its value is null; keys with a leading underscore (`_class_name`, `_diffusers_version`, ...) are
// ignored. Defaults are diffusers' (a missing key takes AutoencoderKL's default argument).
// `force_upcast` and `sample_size` are accepted and ignored (this model computes in T, float32 by
// default, at any size). `latents_mean` / `latents_std` are used by some pipelines, not by the
// model itself, and are only accepted as null.

#include <cmath>
#include <cstddef>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/memory.hpp"
#include "difftrain/io/json_file.hpp"

namespace difftrain::models {

struct AutoencoderKLConfig {
  std::size_t in_channels = 3;
  std::size_t out_channels = 3;
  std::vector<std::size_t> block_out_channels{64};  // one per DownEncoderBlock2D/UpDecoderBlock2D
  std::size_t layers_per_block = 1;                 // encoder resnets per block (decoder: +1)
  std::size_t latent_channels = 4;
  std::size_t norm_num_groups = 32;
  double scaling_factor = 0.18215;
  double shift_factor = 0.0;  // diffusers' null means no shift
  bool mid_block_add_attention = true;
  bool use_quant_conv = true;
  bool use_post_quant_conv = true;
  std::size_t sample_size = 32;  // informational

  /// Every VAE GroupNorm (resnets, mid-block attention, conv_norm_out) uses eps 1e-6.
  static constexpr double kNormEps = 1e-6;

  std::size_t num_blocks() const { return block_out_channels.size(); }
  /// Spatial downsampling factor 2^(blocks − 1) (8 for SD).
  std::size_t downsample_factor() const { return std::size_t{1} << (num_blocks() - 1); }

  /// Throws difftrain::Error if the model cannot be built.
  void validate() const;

  /// diffusers' config.json object (see the header comment for the rules).
  static AutoencoderKLConfig from_json(const nlohmann::json& json);
  /// Reads and parses a config.json file.
  static AutoencoderKLConfig from_file(const std::string& path);

  /// runwayml/stable-diffusion-v1-5 vae/config.json (also SD 2.x's VAE).
  static AutoencoderKLConfig sd15() {
    AutoencoderKLConfig c;
    c.block_out_channels = {128, 256, 512, 512};
    c.layers_per_block = 2;
    c.sample_size = 512;
    return c;
  }
  /// stabilityai/stable-diffusion-xl-base-1.0 vae/config.json: sd15()'s architecture, another
  /// scaling_factor.
  static AutoencoderKLConfig sdxl() {
    AutoencoderKLConfig c = sd15();
    c.scaling_factor = 0.13025;
    c.sample_size = 1024;
    return c;
  }
};

namespace vae_config_detail {

inline constexpr const char* kFunction = "AutoencoderKLConfig";

[[noreturn]] inline void unsupported(const std::string& key, const nlohmann::json& value,
                                     const std::string& supported) {
  fail(kFunction, key, " = ", io::json_excerpt(value), " is not supported (supported: ", supported,
       ")");
}

inline std::size_t positive_int(const std::string& key, const nlohmann::json& v) {
  const bool integral =
      v.is_number_integer() || (v.is_number_float() && std::isfinite(v.get<double>()) &&
                                std::floor(v.get<double>()) == v.get<double>());
  if (!integral || v.get<double>() < 1 || v.get<double>() > kMaxConfigInteger)
    fail(kFunction, key, " = ", io::json_excerpt(v), ", expected a positive integer up to ",
         kMaxConfigInteger);
  return static_cast<std::size_t>(v.get<double>());
}

inline double finite_number(const std::string& key, const nlohmann::json& v) {
  if (!v.is_number() || !std::isfinite(v.get<double>()))
    fail(kFunction, key, " = ", io::json_excerpt(v), ", expected a finite number");
  return v.get<double>();
}

inline bool boolean(const std::string& key, const nlohmann::json& v) {
  if (!v.is_boolean()) fail(kFunction, key, " = ", io::json_excerpt(v), ", expected true or false");
  return v.get<bool>();
}

}  // namespace vae_config_detail

inline void AutoencoderKLConfig::validate() const {
  using vae_config_detail::kFunction;
  require(!block_out_channels.empty(), kFunction, "block_out_channels is empty");
  require(block_out_channels.size() <= 16, kFunction, "block_out_channels has ",
          block_out_channels.size(), " entries, expected at most 16");
  require(in_channels > 0 && out_channels > 0 && latent_channels > 0, kFunction,
          "in_channels, out_channels and latent_channels must be positive, got ", in_channels, ", ",
          out_channels, " and ", latent_channels);
  require(layers_per_block > 0, kFunction, "layers_per_block must be positive");
  require(norm_num_groups > 0, kFunction, "norm_num_groups must be positive");
  for (std::size_t i = 0; i < block_out_channels.size(); ++i)
    require(block_out_channels[i] > 0 && block_out_channels[i] % norm_num_groups == 0, kFunction,
            "block_out_channels[", i, "] = ", block_out_channels[i],
            " is not a positive multiple of norm_num_groups = ", norm_num_groups);
  require(std::isfinite(scaling_factor) && scaling_factor != 0, kFunction,
          "scaling_factor = ", scaling_factor, ", expected finite and non-zero");
  require(std::isfinite(shift_factor), kFunction, "shift_factor = ", shift_factor,
          ", expected finite");
  // A lower bound of the weights: 2 3×3 convs (18c²) per resnet, encoder L and decoder L + 1.
  double weights = 0;
  for (const std::size_t c : block_out_channels)
    weights += (2.0 * double(layers_per_block) + 1) * 18 * double(c) * double(c);
  require_fits_in_memory(kFunction, "the config's VAE (block_out_channels, layers_per_block)",
                         weights * sizeof(float));
}

inline AutoencoderKLConfig AutoencoderKLConfig::from_json(const nlohmann::json& json) {
  using namespace vae_config_detail;
  require(json.is_object(), kFunction, "config is ", json.type_name(), ", expected an object");
  AutoencoderKLConfig c;
  auto has = [&](const std::string& key) { return json.contains(key) && !json.at(key).is_null(); };
  auto at = [&](const std::string& key) -> const nlohmann::json& { return json.at(key); };

  if (has("block_out_channels")) {
    const auto& v = at("block_out_channels");
    if (!v.is_array() || v.empty())
      unsupported("block_out_channels", v, "a non-empty list of positive integers");
    c.block_out_channels.clear();
    for (std::size_t i = 0; i < v.size(); ++i)
      c.block_out_channels.push_back(
          positive_int("block_out_channels[" + std::to_string(i) + "]", v[i]));
  }
  const std::size_t n = c.block_out_channels.size();
  auto block_types = [&](const char* key, const char* only) {
    // default: one block of the only supported type per block_out_channels entry
    if (!has(key)) {
      if (n != 1)
        fail(kFunction, key, " is missing, expected ", n,
             " entries (one per block_out_channels entry)");
      return;
    }
    const auto& v = at(key);
    if (!v.is_array()) unsupported(key, v, std::string("a list of \"") + only + "\"");
    if (v.size() != n)
      fail(kFunction, key, " = ", io::json_excerpt(v), " has ", v.size(), " entries, expected ", n,
           " (one per block_out_channels entry)");
    for (std::size_t i = 0; i < n; ++i)
      if (v[i] != only)
        unsupported(std::string(key) + "[" + std::to_string(i) + "]", v[i],
                    std::string("\"") + only + "\"");
  };
  block_types("down_block_types", "DownEncoderBlock2D");
  block_types("up_block_types", "UpDecoderBlock2D");

  if (has("in_channels")) c.in_channels = positive_int("in_channels", at("in_channels"));
  if (has("out_channels")) c.out_channels = positive_int("out_channels", at("out_channels"));
  if (has("layers_per_block"))
    c.layers_per_block = positive_int("layers_per_block", at("layers_per_block"));
  if (has("latent_channels"))
    c.latent_channels = positive_int("latent_channels", at("latent_channels"));
  if (has("norm_num_groups"))
    c.norm_num_groups = positive_int("norm_num_groups", at("norm_num_groups"));
  if (has("scaling_factor"))
    c.scaling_factor = finite_number("scaling_factor", at("scaling_factor"));
  if (has("shift_factor")) c.shift_factor = finite_number("shift_factor", at("shift_factor"));
  if (has("mid_block_add_attention"))
    c.mid_block_add_attention = boolean("mid_block_add_attention", at("mid_block_add_attention"));
  if (has("use_quant_conv")) c.use_quant_conv = boolean("use_quant_conv", at("use_quant_conv"));
  if (has("use_post_quant_conv"))
    c.use_post_quant_conv = boolean("use_post_quant_conv", at("use_post_quant_conv"));
  if (has("act_fn") && at("act_fn") != "silu") unsupported("act_fn", at("act_fn"), "\"silu\"");
  if (has("force_upcast")) (void)boolean("force_upcast", at("force_upcast"));
  if (has("sample_size")) {
    const auto& v = at("sample_size");
    c.sample_size = v.is_array() && !v.empty() ? positive_int("sample_size[0]", v[0])
                                               : positive_int("sample_size", v);
  }
  if (has("latents_mean")) unsupported("latents_mean", at("latents_mean"), "null");
  if (has("latents_std")) unsupported("latents_std", at("latents_std"), "null");

  static const std::set<std::string> known = {
      "in_channels",    "out_channels",        "down_block_types",
      "up_block_types", "block_out_channels",  "layers_per_block",
      "act_fn",         "latent_channels",     "norm_num_groups",
      "sample_size",    "scaling_factor",      "shift_factor",
      "latents_mean",   "latents_std",         "force_upcast",
      "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"};
  for (const auto& [key, value] : json.items()) {
    if (key.starts_with("_") || known.count(key) || value.is_null()) continue;
    fail(kFunction, "unknown key ", key, " = ", io::json_excerpt(value),
         " (AutoencoderKL has no such argument)");
  }
  c.validate();
  return c;
}

inline AutoencoderKLConfig AutoencoderKLConfig::from_file(const std::string& path) {
  return from_json(io::read_json_file(vae_config_detail::kFunction, path));
}

}  // namespace difftrain::models
