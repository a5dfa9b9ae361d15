#pragma once
// UNet2DConditionConfig: the diffusers UNet2DConditionModel configuration (config.json), resolved
// to one value per block, with the SD 1.x / SD 2.x presets.
//
// Parsing is strict: a key set to a value this implementation does not support throws
// difftrain::Error naming the key and the value; a key diffusers' UNet2DConditionModel does not
// have throws unless its value is null; keys with a leading underscore (`_class_name`,
// `_diffusers_version`, ...) are ignored. Keys that only matter for features we do not have
// (class embeddings, encoder_hid_proj, addition embeddings other than SDXL's "text_time", ...)
// must keep the value that disables them.
//
// Per-block values (diffusers' rules, n = number of down blocks):
//   num_attention_heads[i] = attention_head_dim[i] (SD1.x/2.x misnomer: it IS the head count;
//   diffusers refuses a non-null num_attention_heads); layers_per_block, cross_attention_dim,
//   transformer_layers_per_block: an int for every block or a list of n. Down block i uses entry
//   i, the mid block the last entry, up block i the reversed list's entry i.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/memory.hpp"
#include "difftrain/io/json_file.hpp"

namespace difftrain::models {

/// Down block kinds: resnets only, or resnets each followed by a Transformer2DModel.
enum class DownBlockType { DownBlock2D, CrossAttnDownBlock2D };
/// Up block kinds (the same two shapes on the way up).
enum class UpBlockType { UpBlock2D, CrossAttnUpBlock2D };

/// addition_embed_type: none, or SDXL's "text_time" (pooled text embedding + size/crop time ids).
enum class AdditionEmbedType { none, text_time };

inline const char* to_string(DownBlockType t) {
  return t == DownBlockType::DownBlock2D ? "DownBlock2D" : "CrossAttnDownBlock2D";
}
inline const char* to_string(UpBlockType t) {
  return t == UpBlockType::UpBlock2D ? "UpBlock2D" : "CrossAttnUpBlock2D";
}

struct UNet2DConditionConfig {
  std::size_t sample_size = 64;  // informational (latent size the model was trained at)
  std::size_t in_channels = 4;
  std::size_t out_channels = 4;
  bool center_input_sample = false;  // sample ← 2·sample − 1 first
  bool flip_sin_to_cos = true;       // time_proj gives [cos, sin]
  double freq_shift = 0;             // time_proj downscale_freq_shift
  std::vector<DownBlockType> down_block_types;
  std::vector<UpBlockType> up_block_types;
  // mid_block_type is "UNetMidBlock2DCrossAttn" (has_mid_block) or null (no mid block)
  bool has_mid_block = true;
  std::vector<std::size_t> block_out_channels;
  std::vector<std::size_t> layers_per_block;              // per down block
  std::vector<std::size_t> cross_attention_dim;           // per down block
  std::vector<std::size_t> transformer_layers_per_block;  // per down block
  std::vector<std::size_t> num_attention_heads;           // per down block (attention_head_dim)
  std::size_t downsample_padding = 1;  // 0: pad (0,1,0,1) before the stride-2 conv
  double mid_block_scale_factor = 1;   // mid-block resnets divide their output by it
  std::size_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  bool use_linear_projection = false;  // Transformer2DModel proj_in/out as Linear, not 1×1 conv
  bool upcast_attention = false;       // fp32 scores: nothing to do in a float implementation
  std::size_t time_embedding_dim = 0;  // 0: 4 · block_out_channels[0]
  std::size_t conv_in_kernel = 3;
  std::size_t conv_out_kernel = 3;
  // SDXL: emb += add_embedding([text_embeds, add_time_proj(time_ids)]) (see unet2d_condition.hpp)
  AdditionEmbedType addition_embed_type = AdditionEmbedType::none;
  std::size_t addition_time_embed_dim = 0;                // width of each time id's sinusoids
  std::size_t projection_class_embeddings_input_dim = 0;  // add_embedding's input width

  std::size_t num_blocks() const { return block_out_channels.size(); }
  std::size_t time_embed_dim() const {
    return time_embedding_dim != 0 ? time_embedding_dim : 4 * block_out_channels.at(0);
  }
  /// Entry of a per-block list for up block i (the reversed list).
  template <class V>
  static const typename V::value_type& reversed_at(const V& list, std::size_t i) {
    return list.at(list.size() - 1 - i);
  }

  /// Throws difftrain::Error if the configuration cannot be built.
  void validate() const;

  /// diffusers' config.json object (see the header comment for the rules).
  static UNet2DConditionConfig from_json(const nlohmann::json& json);
  /// Reads and parses a config.json file.
  static UNet2DConditionConfig from_file(const std::string& path);

  /// runwayml/stable-diffusion-v1-5 unet/config.json.
  static UNet2DConditionConfig sd15();
  /// stabilityai/stable-diffusion-2-1 (768-v) unet/config.json.
  static UNet2DConditionConfig sd21();
  /// stabilityai/stable-diffusion-xl-base-1.0 unet/config.json.
  static UNet2DConditionConfig sdxl();
};

namespace unet_config_detail {

inline constexpr const char* kFunction = "UNet2DConditionConfig";

// Bounded: a config value may be arbitrarily long (within io::kMaxJsonDepth levels).
inline std::string dump(const nlohmann::json& v) { return io::json_excerpt(v); }

[[noreturn]] inline void unsupported(const std::string& key, const nlohmann::json& value,
                                     const std::string& supported) {
  fail(kFunction, key, " = ", dump(value), " is not supported (supported: ", supported, ")");
}

inline std::size_t positive_int(const std::string& key, const nlohmann::json& v,
                                bool allow_zero = false) {
  if (!v.is_number_integer() &&
      !(v.is_number_float() && std::floor(v.get<double>()) == v.get<double>()))
    fail(kFunction, key, " = ", dump(v), ", expected an integer");
  const double d = v.get<double>();
  if (d < (allow_zero ? 0 : 1))
    fail(kFunction, key, " = ", dump(v), ", expected ",
         allow_zero ? "a non-negative" : "a positive", " integer");
  if (d > kMaxConfigInteger)
    fail(kFunction, key, " = ", dump(v), ", expected at most ", kMaxConfigInteger);
  return static_cast<std::size_t>(d);
}

inline double number(const std::string& key, const nlohmann::json& v) {
  if (!v.is_number()) fail(kFunction, key, " = ", dump(v), ", expected a number");
  return v.get<double>();
}

inline bool boolean(const std::string& key, const nlohmann::json& v) {
  if (!v.is_boolean()) fail(kFunction, key, " = ", dump(v), ", expected true or false");
  return v.get<bool>();
}

// An int for every block, or a list of exactly n positive ints.
inline std::vector<std::size_t> per_block(const std::string& key, const nlohmann::json& v,
                                          std::size_t n) {
  if (v.is_array()) {
    if (v.size() != n)
      fail(kFunction, key, " = ", dump(v), " has ", v.size(),
           " entries, expected one per down block (", n, ")");
    std::vector<std::size_t> out;
    for (std::size_t i = 0; i < n; ++i)
      out.push_back(positive_int(key + "[" + std::to_string(i) + "]", v[i]));
    return out;
  }
  return std::vector<std::size_t>(n, positive_int(key, v));
}

}  // namespace unet_config_detail

inline void UNet2DConditionConfig::validate() const {
  using unet_config_detail::kFunction;
  const std::size_t n = num_blocks();
  require(n > 0, kFunction, "block_out_channels is empty");
  require(down_block_types.size() == n, kFunction, "down_block_types has ", down_block_types.size(),
          " entries, expected one per block_out_channels entry (", n, ")");
  require(up_block_types.size() == n, kFunction, "up_block_types has ", up_block_types.size(),
          " entries, expected as many as down_block_types (", n, ")");
  auto check_list = [&](const char* key, const std::vector<std::size_t>& list) {
    require(list.size() == n, kFunction, key, " has ", list.size(),
            " entries, expected one per down block (", n, ")");
    for (std::size_t i = 0; i < list.size(); ++i)
      require(list[i] > 0, kFunction, key, "[", i, "] is 0, expected a positive integer");
  };
  check_list("block_out_channels", block_out_channels);
  check_list("layers_per_block", layers_per_block);
  check_list("cross_attention_dim", cross_attention_dim);
  check_list("transformer_layers_per_block", transformer_layers_per_block);
  check_list("num_attention_heads", num_attention_heads);
  require(in_channels > 0 && out_channels > 0, kFunction,
          "in_channels and out_channels must be positive, got ", in_channels, " and ",
          out_channels);
  require(norm_num_groups > 0, kFunction, "norm_num_groups must be positive");
  require(norm_eps > 0, kFunction, "norm_eps = ", norm_eps, ", expected > 0");
  require(mid_block_scale_factor != 0 && std::isfinite(mid_block_scale_factor), kFunction,
          "mid_block_scale_factor = ", mid_block_scale_factor, ", expected finite and non-zero");
  require(downsample_padding <= 1, kFunction, "downsample_padding = ", downsample_padding,
          " is not supported (supported: 0, 1)");
  require(conv_in_kernel % 2 == 1, kFunction, "conv_in_kernel = ", conv_in_kernel,
          ", expected an odd kernel size");
  require(conv_out_kernel % 2 == 1, kFunction, "conv_out_kernel = ", conv_out_kernel,
          ", expected an odd kernel size");
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t c = block_out_channels[i];
    require(c % norm_num_groups == 0, kFunction, "block_out_channels[", i, "] = ", c,
            " is not divisible by norm_num_groups = ", norm_num_groups);
  }
  // attention blocks need at least one channel per head
  auto check_heads = [&](std::size_t block, std::size_t heads, const char* where) {
    require(block_out_channels[block] >= heads, kFunction, where, " block ", block, " has ",
            block_out_channels[block], " channels, fewer than its ", heads,
            " attention heads (attention_head_dim)");
  };
  for (std::size_t i = 0; i < n; ++i) {
    if (down_block_types[i] == DownBlockType::CrossAttnDownBlock2D)
      check_heads(i, num_attention_heads[i], "down");
    if (up_block_types[i] == UpBlockType::CrossAttnUpBlock2D)
      check_heads(n - 1 - i, reversed_at(num_attention_heads, i), "up");
  }
  if (has_mid_block) check_heads(n - 1, num_attention_heads.back(), "mid");
  if (addition_embed_type == AdditionEmbedType::text_time) {
    require(addition_time_embed_dim > 0, kFunction,
            "addition_embed_type = \"text_time\" needs a positive addition_time_embed_dim");
    require(projection_class_embeddings_input_dim > 0, kFunction,
            "addition_embed_type = \"text_time\" needs a positive "
            "projection_class_embeddings_input_dim");
  }
  // A lower bound of the weights, before any is allocated: per block, 2 3×3 convs (18c²) per
  // resnet and ≥ 12c² per transformer layer (attention 4c², feed-forward 8c²), down and up.
  double weights = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double c = double(block_out_channels[i]), resnets = 2.0 * double(layers_per_block[i]) + 1;
    const bool attention = down_block_types[i] == DownBlockType::CrossAttnDownBlock2D;
    weights +=
        resnets * c * c * (18 + (attention ? 12.0 * double(transformer_layers_per_block[i]) : 0.0));
  }
  require_fits_in_memory(kFunction, "the config's UNet (block_out_channels, layers_per_block)",
                         weights * sizeof(float));
}

inline UNet2DConditionConfig UNet2DConditionConfig::from_json(const nlohmann::json& json) {
  using namespace unet_config_detail;
  require(json.is_object(), kFunction, "config is ", json.type_name(), ", expected an object");
  UNet2DConditionConfig c;
  // The keys this reader knows are the ones it asks about: every lookup records its key, and the
  // unknown-key check at the end accepts exactly those (one list, written once).
  std::set<std::string, std::less<>> known;
  auto contains = [&](const char* key) {
    known.insert(key);
    return json.contains(key);
  };
  auto has = [&](const char* key) { return contains(key) && !json.at(key).is_null(); };
  auto at = [&](const char* key) -> const nlohmann::json& { return json.at(key); };
  auto value_or = [&](const char* key, int fallback) {
    return has(key) ? at(key) : nlohmann::json(fallback);
  };

  // keys that must keep the value that disables a feature we do not implement
  auto require_value = [&](const char* key, const nlohmann::json& allowed) {
    if (has(key) && json.at(key) != allowed) unsupported(key, json.at(key), dump(allowed));
  };
  auto require_null = [&](const char* key) {
    if (has(key)) unsupported(key, at(key), "null");
  };

  // --- block structure ---
  require(has("block_out_channels"), kFunction, "block_out_channels is missing");
  {
    const auto& v = at("block_out_channels");
    if (!v.is_array() || v.empty())
      fail(kFunction, "block_out_channels = ", dump(v), ", expected a non-empty list");
    for (std::size_t i = 0; i < v.size(); ++i)
      c.block_out_channels.push_back(
          positive_int("block_out_channels[" + std::to_string(i) + "]", v[i]));
  }
  const std::size_t n = c.block_out_channels.size();
  auto block_types = [&](const char* key, auto parse) {
    require(has(key), kFunction, key, " is missing");
    const auto& v = at(key);
    if (!v.is_array()) fail(kFunction, key, " = ", dump(v), ", expected a list");
    if (v.size() != n)
      fail(kFunction, key, " = ", dump(v), " has ", v.size(), " entries, expected ", n,
           " (one per block_out_channels entry)");
    for (std::size_t i = 0; i < n; ++i)
      parse(std::string(key) + "[" + std::to_string(i) + "]", v[i]);
  };
  block_types("down_block_types", [&](const std::string& key, const nlohmann::json& v) {
    if (v == "DownBlock2D") {
      c.down_block_types.push_back(DownBlockType::DownBlock2D);
    } else if (v == "CrossAttnDownBlock2D") {
      c.down_block_types.push_back(DownBlockType::CrossAttnDownBlock2D);
    } else {
      unsupported(key, v, "\"DownBlock2D\", \"CrossAttnDownBlock2D\"");
    }
  });
  block_types("up_block_types", [&](const std::string& key, const nlohmann::json& v) {
    if (v == "UpBlock2D") {
      c.up_block_types.push_back(UpBlockType::UpBlock2D);
    } else if (v == "CrossAttnUpBlock2D") {
      c.up_block_types.push_back(UpBlockType::CrossAttnUpBlock2D);
    } else {
      unsupported(key, v, "\"UpBlock2D\", \"CrossAttnUpBlock2D\"");
    }
  });
  if (contains("mid_block_type")) {
    const auto& v = at("mid_block_type");
    if (v.is_null()) {
      c.has_mid_block = false;
    } else if (v != "UNetMidBlock2DCrossAttn") {
      unsupported("mid_block_type", v, "\"UNetMidBlock2DCrossAttn\", null");
    }
  }

  // --- per-block lists ---
  c.layers_per_block = per_block("layers_per_block", value_or("layers_per_block", 2), n);
  c.cross_attention_dim =
      per_block("cross_attention_dim", value_or("cross_attention_dim", 1280), n);
  c.transformer_layers_per_block =
      per_block("transformer_layers_per_block", value_or("transformer_layers_per_block", 1), n);
  require_null("reverse_transformer_layers_per_block");
  if (has("num_attention_heads"))
    unsupported("num_attention_heads", at("num_attention_heads"),
                "null; diffusers' UNet2DConditionModel takes the head count from "
                "attention_head_dim");
  c.num_attention_heads = per_block("attention_head_dim", value_or("attention_head_dim", 8), n);

  // --- scalars ---
  if (has("sample_size")) {
    const auto& v = at("sample_size");
    c.sample_size = v.is_array() && !v.empty() ? positive_int("sample_size[0]", v[0])
                                               : positive_int("sample_size", v);
  }
  if (has("in_channels")) c.in_channels = positive_int("in_channels", at("in_channels"));
  if (has("out_channels")) c.out_channels = positive_int("out_channels", at("out_channels"));
  if (has("center_input_sample"))
    c.center_input_sample = boolean("center_input_sample", at("center_input_sample"));
  if (has("flip_sin_to_cos")) c.flip_sin_to_cos = boolean("flip_sin_to_cos", at("flip_sin_to_cos"));
  if (has("freq_shift")) c.freq_shift = number("freq_shift", at("freq_shift"));
  if (has("downsample_padding")) {
    c.downsample_padding = positive_int("downsample_padding", at("downsample_padding"), true);
    if (c.downsample_padding > 1)
      unsupported("downsample_padding", at("downsample_padding"), "0, 1");
  }
  if (has("mid_block_scale_factor"))
    c.mid_block_scale_factor = number("mid_block_scale_factor", at("mid_block_scale_factor"));
  if (contains("norm_num_groups")) {
    if (at("norm_num_groups").is_null())
      unsupported("norm_num_groups", nullptr, "a positive integer");
    c.norm_num_groups = positive_int("norm_num_groups", at("norm_num_groups"));
  }
  if (has("norm_eps")) c.norm_eps = number("norm_eps", at("norm_eps"));
  if (has("use_linear_projection"))
    c.use_linear_projection = boolean("use_linear_projection", at("use_linear_projection"));
  if (has("upcast_attention"))
    c.upcast_attention = boolean("upcast_attention", at("upcast_attention"));
  if (has("time_embedding_dim"))
    c.time_embedding_dim = positive_int("time_embedding_dim", at("time_embedding_dim"));
  if (has("conv_in_kernel"))
    c.conv_in_kernel = positive_int("conv_in_kernel", at("conv_in_kernel"));
  if (has("conv_out_kernel"))
    c.conv_out_kernel = positive_int("conv_out_kernel", at("conv_out_kernel"));
  if (has("dropout") && number("dropout", at("dropout")) != 0.0)
    unsupported("dropout", at("dropout"), "0");
  if (contains("act_fn") && at("act_fn") != "silu") unsupported("act_fn", at("act_fn"), "\"silu\"");
  if (contains("time_embedding_type") && at("time_embedding_type") != "positional")
    unsupported("time_embedding_type", at("time_embedding_type"), "\"positional\"");
  if (contains("resnet_time_scale_shift") && at("resnet_time_scale_shift") != "default")
    unsupported("resnet_time_scale_shift", at("resnet_time_scale_shift"), "\"default\"");
  if (contains("attention_type") && at("attention_type") != "default")
    unsupported("attention_type", at("attention_type"), "\"default\"");
  if (has("resnet_out_scale_factor") &&
      number("resnet_out_scale_factor", at("resnet_out_scale_factor")) != 1.0)
    unsupported("resnet_out_scale_factor", at("resnet_out_scale_factor"), "1.0");
  if (has("only_cross_attention")) {
    const auto& v = at("only_cross_attention");
    const bool any_true =
        v.is_array() ? std::any_of(v.begin(), v.end(), [](const auto& e) { return e != false; })
                     : v != false;
    if (any_true) unsupported("only_cross_attention", v, "false");
  }
  require_value("dual_cross_attention", false);
  require_value("resnet_skip_time_act", false);
  require_value("class_embeddings_concat", false);
  for (const char* key :
       {"class_embed_type", "num_class_embeds", "encoder_hid_dim", "encoder_hid_dim_type",
        "time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim", "cross_attention_norm"})
    require_null(key);
  if (has("addition_embed_type")) {
    if (at("addition_embed_type") != "text_time")
      unsupported("addition_embed_type", at("addition_embed_type"), "\"text_time\", null");
    c.addition_embed_type = AdditionEmbedType::text_time;
  }
  // read only with an addition embedding (diffusers ignores them otherwise)
  if (has("addition_time_embed_dim"))
    c.addition_time_embed_dim =
        positive_int("addition_time_embed_dim", at("addition_time_embed_dim"));
  if (has("projection_class_embeddings_input_dim"))
    c.projection_class_embeddings_input_dim = positive_int(
        "projection_class_embeddings_input_dim", at("projection_class_embeddings_input_dim"));
  // only read by block types we do not build: any value is harmless
  if (has("mid_block_only_cross_attention"))
    (void)boolean("mid_block_only_cross_attention", at("mid_block_only_cross_attention"));
  if (has("addition_embed_type_num_heads"))
    (void)positive_int("addition_embed_type_num_heads", at("addition_embed_type_num_heads"));

  // --- unknown keys ---
  for (const auto& [key, value] : json.items()) {
    if (!key.empty() && key[0] == '_') continue;
    if (known.contains(key) || value.is_null()) continue;
    fail(kFunction, "unknown key ", key, " = ", dump(value),
         " (not a diffusers UNet2DConditionModel setting)");
  }
  c.validate();
  return c;
}

inline UNet2DConditionConfig UNet2DConditionConfig::from_file(const std::string& path) {
  const nlohmann::json json = io::read_json_file("UNet2DConditionConfig::from_file", path);
  try {
    return from_json(json);
  } catch (const Error& e) {
    throw Error(message(e.what(), " (in '", path, "')"));
  }
}

inline UNet2DConditionConfig UNet2DConditionConfig::sd15() {
  UNet2DConditionConfig c;
  c.sample_size = 64;
  c.block_out_channels = {320, 640, 1280, 1280};
  c.down_block_types = {DownBlockType::CrossAttnDownBlock2D, DownBlockType::CrossAttnDownBlock2D,
                        DownBlockType::CrossAttnDownBlock2D, DownBlockType::DownBlock2D};
  c.up_block_types = {UpBlockType::UpBlock2D, UpBlockType::CrossAttnUpBlock2D,
                      UpBlockType::CrossAttnUpBlock2D, UpBlockType::CrossAttnUpBlock2D};
  c.layers_per_block = {2, 2, 2, 2};
  c.cross_attention_dim = {768, 768, 768, 768};
  c.transformer_layers_per_block = {1, 1, 1, 1};
  c.num_attention_heads = {8, 8, 8, 8};
  return c;
}

inline UNet2DConditionConfig UNet2DConditionConfig::sd21() {
  UNet2DConditionConfig c = sd15();
  c.sample_size = 96;
  c.cross_attention_dim = {1024, 1024, 1024, 1024};
  c.num_attention_heads = {5, 10, 20, 20};
  c.use_linear_projection = true;
  c.upcast_attention = true;
  return c;
}

inline UNet2DConditionConfig UNet2DConditionConfig::sdxl() {
  UNet2DConditionConfig c;
  c.sample_size = 128;
  c.block_out_channels = {320, 640, 1280};
  c.down_block_types = {DownBlockType::DownBlock2D, DownBlockType::CrossAttnDownBlock2D,
                        DownBlockType::CrossAttnDownBlock2D};
  c.up_block_types = {UpBlockType::CrossAttnUpBlock2D, UpBlockType::CrossAttnUpBlock2D,
                      UpBlockType::UpBlock2D};
  c.layers_per_block = {2, 2, 2};
  c.cross_attention_dim = {2048, 2048, 2048};
  c.transformer_layers_per_block = {1, 2, 10};
  c.num_attention_heads = {5, 10, 20};
  c.use_linear_projection = true;
  c.addition_embed_type = AdditionEmbedType::text_time;
  c.addition_time_embed_dim = 256;
  c.projection_class_embeddings_input_dim = 2816;
  return c;
}

}  // namespace difftrain::models
