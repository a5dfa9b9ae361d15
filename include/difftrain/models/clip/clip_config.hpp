#pragma once
// ClipTextConfig: the transformers CLIPTextConfig (a text encoder's config.json), with the SD 1.x
// (openai/clip-vit-large-patch14), SD 2.x (OpenCLIP ViT-H/14) and SDXL
// second-encoder (OpenCLIP ViT-bigG/14) presets.
//
// Parsing is strict: a key set to a value this implementation does not support throws
// difftrain::Error naming the key and the value; a key that is not a CLIPTextConfig setting throws
// unless its value is null. Ignored: `model_type`, `torch_dtype`, `transformers_version`, keys with
// a leading underscore (`_name_or_path`, ...), the initialisers, and PretrainedConfig's generation
// and bookkeeping settings (num_beams, id2label, return_dict, ...), which do not change the
// text model's forward.
//
// The class: `architectures` ["CLIPTextModel"] or ["CLIPTextModelWithProjection"] (SDXL's second
// text encoder: text_projection, hidden_size → projection_dim, on the pooled output); absent, null
// or [] leaves `architecture` unset, and load_clip_text_model decides from the weights (a
// text_projection.weight tensor makes it the projection model). `projection_dim` (transformers'
// default 512) is used by the projection model only. Dropout (`dropout`, `attention_dropout`) is
// inactive in a frozen forward: any probability in [0, 1] is accepted and not applied.
//
// Pooling (transformers ≥ 4.31): with eos_token_id == 2 (the legacy configs of SD 1.x/2.x,
// written before the tokenizer's eos id reached the config) the pooled position is the argmax of
// the ids (the eos has the largest id in CLIP's vocabulary); otherwise it is the first position
// whose id equals eos_token_id.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>

#include "difftrain/core/error.hpp"
#include "difftrain/core/memory.hpp"
#include "difftrain/io/json_file.hpp"

namespace difftrain::models {

/// transformers' hidden_act of the CLIP MLP: quick_gelu(x) = x·σ(1.702x), or gelu (exact erf).
enum class ClipActivation { quick_gelu, gelu };

inline const char* to_string(ClipActivation a) {
  return a == ClipActivation::quick_gelu ? "quick_gelu" : "gelu";
}

/// transformers' text model classes: CLIPTextModel (pooler_output) and
/// CLIPTextModelWithProjection (text_embeds = text_projection(pooled), no pooler_output).
enum class ClipTextArchitecture { clip_text_model, clip_text_model_with_projection };

/// The transformers class name ("CLIPTextModel", "CLIPTextModelWithProjection").
inline const char* to_string(ClipTextArchitecture a) {
  return a == ClipTextArchitecture::clip_text_model ? "CLIPTextModel"
                                                    : "CLIPTextModelWithProjection";
}

struct ClipTextConfig {
  // transformers' CLIPTextConfig defaults
  std::size_t vocab_size = 49408;
  std::size_t hidden_size = 512;         // D
  std::size_t intermediate_size = 2048;  // MLP width
  std::size_t num_hidden_layers = 12;
  std::size_t num_attention_heads = 8;
  std::size_t max_position_embeddings = 77;
  ClipActivation hidden_act = ClipActivation::quick_gelu;
  double layer_norm_eps = 1e-5;
  std::optional<std::int64_t> bos_token_id = 49406;  // informational (the tokenizer's)
  std::int64_t eos_token_id = 49407;                 // selects the pooled position
  std::optional<std::int64_t> pad_token_id = 1;      // informational (the tokenizer's)
  std::size_t projection_dim = 512;                  // P, text_projection's width
  // config.json's `architectures`; unset: not stated (the loader decides from the weights; a
  // model built from the config alone is a CLIPTextModel)
  std::optional<ClipTextArchitecture> architecture;

  /// Whether the model has text_projection (CLIPTextModelWithProjection).
  bool with_projection() const {
    return architecture == ClipTextArchitecture::clip_text_model_with_projection;
  }

  std::size_t head_dim() const { return hidden_size / num_attention_heads; }
  /// transformers' rule: eos_token_id == 2 pools at argmax(input_ids).
  bool pools_at_argmax() const { return eos_token_id == 2; }

  /// Throws difftrain::Error if the model cannot be built.
  void validate() const;

  /// transformers' config.json object (see the header comment for the rules).
  static ClipTextConfig from_json(const nlohmann::json& json);
  /// Reads and parses a config.json file.
  static ClipTextConfig from_file(const std::string& path);

  /// runwayml/stable-diffusion-v1-5 text_encoder/config.json (CLIP ViT-L/14 text tower).
  static ClipTextConfig sd15();
  /// stabilityai/stable-diffusion-2-1 text_encoder/config.json (OpenCLIP ViT-H/14 text tower).
  static ClipTextConfig sd21();
  /// stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json (OpenCLIP ViT-bigG/14
  /// text tower, CLIPTextModelWithProjection; SDXL's first encoder is sd15()'s ViT-L/14).
  static ClipTextConfig sdxl_text_encoder_2();
};

namespace clip_config_detail {

inline constexpr const char* kFunction = "ClipTextConfig";

[[noreturn]] inline void bad_value(const std::string& key, const nlohmann::json& value,
                                   const std::string& expected) {
  fail(kFunction, key, " = ", io::json_excerpt(value), ", expected ", expected);
}

inline bool is_integer(const nlohmann::json& v) {
  return v.is_number_integer() || (v.is_number_float() && std::isfinite(v.get<double>()) &&
                                   std::floor(v.get<double>()) == v.get<double>());
}

inline std::size_t positive_int(const std::string& key, const nlohmann::json& v) {
  if (!is_integer(v) || v.get<double>() < 1 || v.get<double>() > kMaxConfigInteger)
    bad_value(key, v, "a positive integer up to 2^40");
  return static_cast<std::size_t>(v.get<double>());
}

inline std::int64_t token_id(const std::string& key, const nlohmann::json& v) {
  if (!is_integer(v) || v.get<double>() < 0 || v.get<double>() > kMaxConfigInteger)
    bad_value(key, v, "a non-negative integer token id up to 2^40");
  return v.is_number_unsigned() ? static_cast<std::int64_t>(v.get<std::uint64_t>())
                                : v.get<std::int64_t>();
}

inline double positive_number(const std::string& key, const nlohmann::json& v) {
  if (!v.is_number() || !(v.get<double>() > 0) || !std::isfinite(v.get<double>()))
    bad_value(key, v, "a positive number");
  return v.get<double>();
}

inline void probability(const std::string& key, const nlohmann::json& v) {
  if (!v.is_number() || !(v.get<double>() >= 0 && v.get<double>() <= 1))
    bad_value(key, v, "a probability in [0, 1]");
}

}  // namespace clip_config_detail

inline void ClipTextConfig::validate() const {
  using clip_config_detail::kFunction;
  auto positive = [](const char* key, std::size_t v) {
    require(v > 0, kFunction, key, " = ", v, ", expected a positive integer");
  };
  positive("vocab_size", vocab_size);
  positive("hidden_size", hidden_size);
  positive("intermediate_size", intermediate_size);
  positive("num_hidden_layers", num_hidden_layers);
  positive("num_attention_heads", num_attention_heads);
  positive("max_position_embeddings", max_position_embeddings);
  positive("projection_dim", projection_dim);
  require(hidden_size % num_attention_heads == 0, kFunction, "hidden_size = ", hidden_size,
          " is not divisible by num_attention_heads = ", num_attention_heads);
  require(layer_norm_eps > 0 && std::isfinite(layer_norm_eps), kFunction,
          "layer_norm_eps = ", layer_norm_eps, ", expected a positive number");
  require(eos_token_id >= 0 && static_cast<std::uint64_t>(eos_token_id) < vocab_size, kFunction,
          "eos_token_id = ", eos_token_id, ", expected an id in [0, vocab_size = ", vocab_size,
          ")");
  // The weights: embeddings, then per layer attention 4h² and MLP 2·h·intermediate.
  const double h = double(hidden_size);
  const double weights =
      (double(vocab_size) + double(max_position_embeddings)) * h +
      double(num_hidden_layers) * (4 * h * h + 2 * h * double(intermediate_size)) +
      (with_projection() ? double(projection_dim) * h : 0.0);
  require_fits_in_memory(kFunction,
                         "the config's text encoder (vocab_size, hidden_size, num_hidden_layers, "
                         "intermediate_size, max_position_embeddings, projection_dim)",
                         weights * sizeof(float));
}

inline ClipTextConfig ClipTextConfig::from_json(const nlohmann::json& json) {
  using namespace clip_config_detail;
  require(json.is_object(), kFunction, "config is ", json.type_name(), ", expected an object");
  ClipTextConfig c;
  auto has = [&](const char* key) { return json.contains(key) && !json.at(key).is_null(); };
  auto at = [&](const char* key) -> const nlohmann::json& { return json.at(key); };

  // --- the model ---
  if (has("vocab_size")) c.vocab_size = positive_int("vocab_size", at("vocab_size"));
  if (has("hidden_size")) c.hidden_size = positive_int("hidden_size", at("hidden_size"));
  if (has("intermediate_size"))
    c.intermediate_size = positive_int("intermediate_size", at("intermediate_size"));
  if (has("num_hidden_layers"))
    c.num_hidden_layers = positive_int("num_hidden_layers", at("num_hidden_layers"));
  if (has("num_attention_heads"))
    c.num_attention_heads = positive_int("num_attention_heads", at("num_attention_heads"));
  if (has("max_position_embeddings"))
    c.max_position_embeddings =
        positive_int("max_position_embeddings", at("max_position_embeddings"));
  if (json.contains("hidden_act")) {
    const auto& v = at("hidden_act");
    if (v == "quick_gelu") {
      c.hidden_act = ClipActivation::quick_gelu;
    } else if (v == "gelu") {
      c.hidden_act = ClipActivation::gelu;
    } else {
      fail(kFunction, "hidden_act = ", io::json_excerpt(v),
           " is not supported (supported: \"quick_gelu\", \"gelu\")");
    }
  }
  if (has("layer_norm_eps"))
    c.layer_norm_eps = positive_number("layer_norm_eps", at("layer_norm_eps"));
  if (json.contains("eos_token_id")) c.eos_token_id = token_id("eos_token_id", at("eos_token_id"));
  if (json.contains("bos_token_id"))
    c.bos_token_id = has("bos_token_id")
                         ? std::optional(token_id("bos_token_id", at("bos_token_id")))
                         : std::nullopt;
  if (json.contains("pad_token_id"))
    c.pad_token_id = has("pad_token_id")
                         ? std::optional(token_id("pad_token_id", at("pad_token_id")))
                         : std::nullopt;
  if (has("projection_dim"))
    c.projection_dim = positive_int("projection_dim", at("projection_dim"));
  if (has("architectures") && !(at("architectures").is_array() && at("architectures").empty())) {
    const auto& v = at("architectures");
    const auto a = v.is_array() && v.size() == 1 ? v[0] : nlohmann::json();
    if (a == "CLIPTextModel") {
      c.architecture = ClipTextArchitecture::clip_text_model;
    } else if (a == "CLIPTextModelWithProjection") {
      c.architecture = ClipTextArchitecture::clip_text_model_with_projection;
    } else {
      bad_value("architectures", v,
                "[\"CLIPTextModel\"] or [\"CLIPTextModelWithProjection\"] (or no architectures)");
    }
  }
  for (const char* key : {"dropout", "attention_dropout"})
    if (has(key)) probability(key, at(key));
  // pruned heads would remove rows of q/k/v/out_proj: only the empty set is this model
  if (has("pruned_heads")) {
    const auto& v = at("pruned_heads");
    if (!(v.is_object() || v.is_array()) || !v.empty())
      bad_value("pruned_heads", v, "{} (no pruning)");
  }
  for (const char* key : {"add_cross_attention", "is_decoder", "is_encoder_decoder"})
    if (has(key) && at(key) != false) bad_value(key, at(key), "false");

  // --- keys that do not change the text model's forward ---
  static const std::set<std::string> ignored = {
      // bookkeeping
      "model_type", "torch_dtype", "transformers_version", "initializer_range",
      "initializer_factor", "id2label", "label2id", "finetuning_task", "problem_type",
      "tokenizer_class", "prefix", "task_specific_params", "sep_token_id", "decoder_start_token_id",
      "cross_attention_hidden_size", "tie_word_embeddings", "tie_encoder_decoder", "use_bfloat16",
      "torchscript", "tf_legacy_loss", "chunk_size_feed_forward",
      // outputs and generation
      "return_dict", "output_attentions", "output_hidden_states", "output_scores",
      "return_dict_in_generate", "max_length", "min_length", "do_sample", "early_stopping",
      "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
      "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
      "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
      "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
      "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens"};
  static const std::set<std::string> model_keys = {
      "vocab_size",        "hidden_size",         "intermediate_size",
      "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
      "hidden_act",        "layer_norm_eps",      "eos_token_id",
      "bos_token_id",      "pad_token_id",        "dropout",
      "attention_dropout", "pruned_heads",        "add_cross_attention",
      "is_decoder",        "is_encoder_decoder",  "projection_dim",
      "architectures"};
  for (const auto& [key, value] : json.items()) {
    if (!key.empty() && key[0] == '_') continue;
    if (model_keys.count(key) || ignored.count(key) || value.is_null()) continue;
    fail(kFunction, "unknown key ", key, " = ", io::json_excerpt(value),
         " (not a transformers CLIPTextConfig setting)");
  }
  c.validate();
  return c;
}

inline ClipTextConfig ClipTextConfig::from_file(const std::string& path) {
  const nlohmann::json json = io::read_json_file("ClipTextConfig::from_file", path);
  try {
    return from_json(json);
  } catch (const Error& e) {
    throw Error(message(e.what(), " (in '", path, "')"));
  }
}

inline ClipTextConfig ClipTextConfig::sd15() {
  ClipTextConfig c;
  c.vocab_size = 49408;
  c.hidden_size = 768;
  c.intermediate_size = 3072;
  c.num_hidden_layers = 12;
  c.num_attention_heads = 12;
  c.max_position_embeddings = 77;
  c.hidden_act = ClipActivation::quick_gelu;
  c.layer_norm_eps = 1e-5;
  c.bos_token_id = 0;
  c.eos_token_id = 2;
  c.pad_token_id = 1;
  c.architecture = ClipTextArchitecture::clip_text_model;
  return c;
}

inline ClipTextConfig ClipTextConfig::sd21() {
  ClipTextConfig c = sd15();
  c.hidden_size = 1024;
  c.intermediate_size = 4096;
  c.num_hidden_layers = 23;
  c.num_attention_heads = 16;
  c.hidden_act = ClipActivation::gelu;
  return c;
}

inline ClipTextConfig ClipTextConfig::sdxl_text_encoder_2() {
  ClipTextConfig c = sd15();
  c.hidden_size = 1280;
  c.intermediate_size = 5120;
  c.num_hidden_layers = 32;
  c.num_attention_heads = 20;
  c.hidden_act = ClipActivation::gelu;
  c.projection_dim = 1280;
  c.architecture = ClipTextArchitecture::clip_text_model_with_projection;
  return c;
}

}  // namespace difftrain::models
