#pragma once
// kohya sd-scripts' LoRA metadata: the ss_* training keys, the modelspec.* keys (Stability AI's
// ModelSpec 1.0.1) and the sshs_* hashes, spelled and formatted as train_network.py writes them,
// so A1111 / Forge, sd-webui-additional-networks and model sites read difftrain's files as
// kohya's.
//
//   KohyaRunInfo run;  run.learning_rate = 1e-4;  run.network_dim = 4;  …
//   std::map<std::string, std::string> metadata = kohya_metadata(run);
//   add_kohya_hashes(tensors, metadata);           // the TensorToWrite list that is then saved
//   io::save_safetensors(path, tensors, metadata);
//
// Sources (kohya-ss/sd-scripts): train_network.py NetworkTrainer.train (the `metadata` dict,
// its `metadata.update({...})` for a train_data_dir run, ss_network_args, ss_sd_model_name,
// `{k: str(v)}`; save_model: ss_training_finished_at, ss_steps, ss_epoch, then the sai spec);
// networks/lora.py LoRANetwork.save_weights + library/train_util.py
// precalculate_safetensors_hashes / addnet_hash_safetensors / addnet_hash_legacy (sshs_*);
// library/train_util.py get_sai_model_spec + library/sai_model_spec.py build_metadata
// (modelspec.*); library/model_util.py get_model_version_str_for_sd1_sd2 and
// library/sdxl_model_util.py MODEL_VERSION_SDXL_BASE_V1_0 (ss_base_model_version).
//
// Formatting: every value is Python's str() of what kohya stores: floats as repr (0.0001,
// 1e-05, 1.0), bools "True"/"False", None "None", ints in decimal, tuples "(512, 512)", JSON
// values (ss_network_args, ss_dataset_dirs, ss_tag_frequency, ss_bucket_info) as json.dumps
// writes them (", " and ": " separators, non-ASCII escaped as \uXXXX).
//
// Written: every key train_network.py writes for a --train_data_dir run (no --dataset_config),
// with kohya's default value for the features difftrain does not have (ss_lowram "False",
// ss_full_fp16 "False", ss_fp8_base "False", ss_fp8_base_unet "False",
// ss_face_crop_aug_range "None", ss_color_aug "False", kohya's validation
// loss off: ss_num_validation_images "0", ss_validation_seed "None", ss_validation_split "0.0",
// ss_max_validation_steps / ss_validate_every_n_epochs / ss_validate_every_n_steps "None",
// ss_resize_interpolation "None").
// Omitted: ss_sd_scripts_commit_hash (difftrain is not an sd-scripts checkout), ss_datasets
// (only with --dataset_config), ss_vae_name / ss_vae_hash / ss_new_vae_hash (no --vae),
// ss_sd_model_hash / ss_new_sd_model_hash unless given (kohya hashes a single-file checkpoint;
// for a diffusers folder it writes "IsADirectory"), modelspec.implementation_version unless
// given (kohya writes "sd-scripts/<commit>"), modelspec.thumbnail / merged_from / preprocessor /
// is_negative_embedding (no such options), and ss_* keys that only other trainers write
// (SDXL-specific, flux, sd3, …).

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <ctime>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/io/sha256.hpp"

namespace difftrain::lora {

// ---------------------------------------------------------------------------------------------
// Python's str() of values

/// Python's str(float) (repr: the shortest digits that round-trip, fixed notation when the
/// decimal exponent is in [-4, 16), else d.ddde±XX): 0.0001, 1e-05, 1.0, 1e+16, inf, nan, -0.0.
inline std::string python_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v < 0 ? "-inf" : "inf";
  if (v == 0) return std::signbit(v) ? "-0.0" : "0.0";
  char buffer[64];
  const auto result =
      std::to_chars(buffer, buffer + sizeof buffer, v, std::chars_format::scientific);
  std::string_view s(buffer, static_cast<std::size_t>(result.ptr - buffer));
  std::string out;
  if (s.front() == '-') {
    out = "-";
    s.remove_prefix(1);
  }
  const std::size_t e = s.find('e');
  std::string digits(s.substr(0, e));
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  int exponent = 0;
  const std::string_view exponent_text = s.substr(e + 1);
  std::from_chars(exponent_text.data() + (exponent_text.front() == '+'),
                  exponent_text.data() + exponent_text.size(), exponent);
  const int point = exponent + 1;  // CPython's decpt: value = 0.digits × 10^point
  const auto n = static_cast<int>(digits.size());
  if (point <= -4 || point > 16) {  // CPython float_repr_style 'short', mode 'r'
    out += digits.substr(0, 1);
    if (n > 1) out += "." + digits.substr(1);
    out += exponent < 0 ? "e-" : "e+";
    const std::string magnitude = std::to_string(std::abs(exponent));
    out += (magnitude.size() < 2 ? "0" : "") + magnitude;
  } else if (point <= 0) {
    out += "0." + std::string(static_cast<std::size_t>(-point), '0') + digits;
  } else if (point >= n) {
    out += digits + std::string(static_cast<std::size_t>(point - n), '0') + ".0";
  } else {
    out += digits.substr(0, point) + "." + digits.substr(point);
  }
  return out;
}

/// The double a user meant when a flag was stored as float: the shortest decimal that
/// round-trips `v` (0.1f → 0.1, not 0.10000000149011612), read back as a double.
inline double decimal_double(float v) {
  if (!std::isfinite(v)) return v;
  char buffer[32];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, v);
  double out = 0;
  std::from_chars(buffer, result.ptr, out);
  return out;
}

/// Python's str(bool).
inline std::string python_bool(bool v) { return v ? "True" : "False"; }

/// Python's str() of an optional value: "None" when unset.
inline std::string python_optional(const std::optional<double>& v) {
  return v ? python_float(*v) : "None";
}
inline std::string python_optional(const std::optional<std::int64_t>& v) {
  return v ? std::to_string(*v) : "None";
}
inline std::string python_optional(const std::optional<std::string>& v) { return v ? *v : "None"; }

/// json.dumps of a str (ensure_ascii): quotes; \" \\ \n \r \t \b \f; other characters outside
/// ' '…'~' as \u00xx, non-ASCII as \uxxxx (UTF-16 surrogate pairs above U+FFFF).
/// Error when `text` is not valid UTF-8 (Python strings cannot hold it).
inline std::string python_json_string(std::string_view text) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "\"";
  auto escape_unit = [&](std::uint32_t unit) {
    out += "\\u";
    for (int shift = 12; shift >= 0; shift -= 4) out += kHex[(unit >> shift) & 15];
  };
  for (std::size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c < 0x80) {
      ++i;
      switch (c) {
        case '"':
          out += "\\\"";
          break;
        case '\\':
          out += "\\\\";
          break;
        case '\n':
          out += "\\n";
          break;
        case '\r':
          out += "\\r";
          break;
        case '\t':
          out += "\\t";
          break;
        case '\b':
          out += "\\b";
          break;
        case '\f':
          out += "\\f";
          break;
        default:
          if (c < 0x20 || c == 0x7f)
            escape_unit(c);
          else
            out += static_cast<char>(c);
      }
      continue;
    }
    // A UTF-8 sequence: its length from the lead byte, then continuation bytes 10xxxxxx.
    const int length = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 0;
    require(length > 0 && c < 0xf5 && i + length <= text.size(), "python_json_string", "byte ", i,
            " does not start a UTF-8 sequence");
    std::uint32_t code = c & (0x7f >> length);
    for (int k = 1; k < length; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      require((next & 0xc0) == 0x80, "python_json_string", "byte ", i + k,
              " is not a UTF-8 continuation byte");
      code = code << 6 | (next & 0x3f);
    }
    static constexpr std::uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
    require(code >= kMin[length] && code <= 0x10ffff && (code < 0xd800 || code > 0xdfff),
            "python_json_string", "byte ", i, " starts an overlong or invalid UTF-8 sequence");
    i += length;
    if (code >= 0x10000) {
      code -= 0x10000;
      escape_unit(0xd800 | (code >> 10));
      escape_unit(0xdc00 | (code & 0x3ff));
    } else {
      escape_unit(code);
    }
  }
  return out + "\"";
}

// ---------------------------------------------------------------------------------------------
// The run

/// The base model family (kohya: --v2, sdxl_train_network.py).
enum class KohyaBaseModel : std::uint8_t { sd_v1, sd_v2, sdxl };

/// ss_base_model_version: model_util.get_model_version_str_for_sd1_sd2 ("sd_v1", "sd_v1_v",
/// "sd_v2", "sd_v2_v"), or sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0 ("sdxl_base_v1-0").
inline std::string kohya_base_model_version(KohyaBaseModel base, bool v_parameterization) {
  if (base == KohyaBaseModel::sdxl) return "sdxl_base_v1-0";
  return std::string(base == KohyaBaseModel::sd_v2 ? "sd_v2" : "sd_v1") +
         (v_parameterization ? "_v" : "");
}

/// modelspec.architecture of a LoRA (sai_model_spec.determine_architecture):
/// "stable-diffusion-v1/lora", "stable-diffusion-v2-512/lora", "stable-diffusion-v2-768-v/lora"
/// (v2 with v_parameterization), "stable-diffusion-xl-v1-base/lora".
inline std::string modelspec_lora_architecture(KohyaBaseModel base, bool v_parameterization) {
  switch (base) {
    case KohyaBaseModel::sdxl:
      return "stable-diffusion-xl-v1-base/lora";
    case KohyaBaseModel::sd_v2:
      return v_parameterization ? "stable-diffusion-v2-768-v/lora" : "stable-diffusion-v2-512/lora";
    case KohyaBaseModel::sd_v1:
      break;
  }
  return "stable-diffusion-v1/lora";
}

/// modelspec.date: datetime.fromtimestamp(int(timestamp)).isoformat(), "2023-11-14T22:13:20",
/// in the machine's time zone (as kohya) or, given `utc_offset_seconds`, at that offset.
inline std::string modelspec_date(double timestamp, std::optional<int> utc_offset_seconds = {}) {
  std::time_t t = static_cast<std::time_t>(std::trunc(timestamp));
  std::tm tm{};
  if (utc_offset_seconds) {
    t += *utc_offset_seconds;
    ::gmtime_r(&t, &tm);
  } else {
    ::localtime_r(&t, &tm);
  }
  char buffer[32];
  const std::size_t n = std::strftime(buffer, sizeof buffer, "%Y-%m-%dT%H:%M:%S", &tm);
  return std::string(buffer, n);
}

/// One image folder in ss_dataset_dirs / ss_reg_dataset_dirs: {name: {"n_repeats", "img_count"}}
/// (kohya: the folder's basename, "10_sks dog"; for a metadata file, its basename).
struct KohyaDatasetDir {
  std::string name;
  std::int64_t n_repeats = 1;
  std::int64_t img_count = 0;
};

/// One bucket of ss_bucket_info.
struct KohyaBucket {
  std::int64_t index = 0, width = 0, height = 0, count = 0;
};

/// One folder's tag counts in ss_tag_frequency, in first-seen order (a Python dict's order).
struct KohyaTagFrequency {
  std::string dir;  // the folder's basename, as in KohyaDatasetDir
  std::vector<std::pair<std::string, std::int64_t>> counts;

  /// Counts the caption's tags as BaseDataset.set_tag_frequency does: split at ",", strip,
  /// skip empty, lower-case. (Python strips Unicode whitespace and lower-cases every script;
  /// this strips ASCII whitespace and lower-cases A–Z.)
  void add_caption(std::string_view caption) {
    while (true) {
      const std::size_t comma = caption.find(',');
      std::string_view tag = caption.substr(0, comma);
      constexpr std::string_view kSpace = " \t\n\r\f\v";
      const std::size_t first = tag.find_first_not_of(kSpace);
      tag = first == std::string_view::npos
                ? std::string_view()
                : tag.substr(first, tag.find_last_not_of(kSpace) - first + 1);
      if (!tag.empty()) {
        std::string lower(tag);
        for (char& ch : lower)
          if (ch >= 'A' && ch <= 'Z') ch = static_cast<char>(ch - 'A' + 'a');
        auto it = std::find_if(counts.begin(), counts.end(),
                               [&](const auto& entry) { return entry.first == lower; });
        if (it == counts.end())
          counts.emplace_back(std::move(lower), 1);
        else
          ++it->second;
      }
      if (comma == std::string_view::npos) break;
      caption.remove_prefix(comma + 1);
    }
  }
};

/// Everything kohya's LoRA metadata records about a run. Optional members are kohya's
/// `None` when unset (the flag not given / the feature off); each comment names the key and
/// kohya's argument. Values are as kohya stores them (alpha is the plain one: for rsLoRA pass
/// alpha·√r, which save_lora writes). Float flags stored as float in difftrain: decimal_double.
struct KohyaRunInfo {
  // Base model.
  KohyaBaseModel base = KohyaBaseModel::sd_v1;  // ss_v2, ss_base_model_version, architecture
  bool v_parameterization = false;              // --v_parameterization: ss_base_model_version "_v",
                                                // modelspec.prediction_type "v" (else "epsilon")
  std::optional<std::string> sd_model_name;     // ss_sd_model_name: basename of the model path
  std::optional<std::string> sd_model_hash;     // ss_sd_model_hash (A1111's old 8-digit hash)
  std::optional<std::string> new_sd_model_hash;  // ss_new_sd_model_hash (SHA-256 of the file)
  std::int64_t resolution_width = 512;           // --resolution "W,H": ss_resolution "(W, H)",
  std::int64_t resolution_height = 512;          // modelspec.resolution "WxH"

  // Network (networks.lora).
  std::string network_module = "networks.lora";  // ss_network_module
  std::optional<std::int64_t> network_dim;       // ss_network_dim (--network_dim)
  std::optional<double> network_alpha = 1.0;     // ss_network_alpha (--network_alpha, default 1)
  std::optional<double> network_dropout;         // ss_network_dropout (--network_dropout)
  // --network_args key=value in order (conv_dim, conv_alpha, rank_dropout, module_dropout,
  // loraplus_lr_ratio, …), values as typed. Non-empty: ss_network_args = json.dumps of them plus
  // "dropout": network_dropout (kohya adds it), e.g. {"rank_dropout": "0.1", "dropout": null}.
  std::vector<std::pair<std::string, std::string>> network_args;

  // Optimizer and schedule.
  std::string optimizer = "torch.optim.adamw.AdamW";  // class __module__ + "." + __name__
  // --optimizer_args key=value as given (Python str of the value: "(0.9, 0.99)" for betas);
  // ss_optimizer = optimizer + "(k=v,k=v)" when any. See torch_adamw_args / torch_sgd_args.
  std::vector<std::pair<std::string, std::string>> optimizer_args;
  double learning_rate = 2e-6;            // ss_learning_rate (--learning_rate)
  std::optional<double> unet_lr;          // ss_unet_lr (--unet_lr)
  std::optional<double> text_encoder_lr;  // ss_text_encoder_lr (--text_encoder_lr, first)
  std::string lr_scheduler = "constant";  // ss_lr_scheduler
  double lr_warmup_steps = 0;             // ss_lr_warmup_steps: steps (int) when >= 1, else a ratio
  double max_grad_norm = 1.0;             // ss_max_grad_norm
  std::optional<double> scale_weight_norms;  // ss_scale_weight_norms

  // Loop.
  std::int64_t max_train_steps = 1600;           // ss_max_train_steps
  std::int64_t num_epochs = 1;                   // ss_num_epochs (ceil(steps / updates per epoch))
  std::int64_t num_batches_per_epoch = 0;        // ss_num_batches_per_epoch (len(dataloader))
  std::int64_t train_batch_size = 1;             // ss_batch_size_per_device
  std::int64_t gradient_accumulation_steps = 1;  // ss_gradient_accumulation_steps
  std::int64_t num_processes = 1;       // ss_total_batch_size = batch · processes · accum
  std::int64_t steps = 0;               // ss_steps: global steps at the save
  std::int64_t epoch = 0;               // ss_epoch: epochs at the save
  std::uint64_t seed = 0;               // ss_seed
  bool gradient_checkpointing = false;  // ss_gradient_checkpointing
  bool cache_latents = false;           // ss_cache_latents
  std::string mixed_precision = "no";   // ss_mixed_precision (no, fp16, bf16)

  // Loss and noise.
  double prior_loss_weight = 1.0;                          // ss_prior_loss_weight
  std::optional<double> min_snr_gamma;                     // ss_min_snr_gamma
  bool debiased_estimation = false;                        // ss_debiased_estimation
  std::optional<double> noise_offset;                      // ss_noise_offset
  bool noise_offset_random_strength = false;               // ss_noise_offset_random_strength
  std::optional<double> adaptive_noise_scale;              // ss_adaptive_noise_scale
  std::optional<std::int64_t> multires_noise_iterations;   // ss_multires_noise_iterations
  double multires_noise_discount = 0.3;                    // ss_multires_noise_discount
  std::optional<double> ip_noise_gamma;                    // ss_ip_noise_gamma
  bool ip_noise_gamma_random_strength = false;             // ss_ip_noise_gamma_random_strength
  bool zero_terminal_snr = false;                          // ss_zero_terminal_snr
  std::string loss_type = "l2";                            // ss_loss_type
  std::string huber_schedule = "snr";                      // ss_huber_schedule
  double huber_c = 0.1;                                    // ss_huber_c
  double huber_scale = 1.0;                                // ss_huber_scale
  std::optional<std::int64_t> min_timestep, max_timestep;  // modelspec.timestep_range
  // Flow matching (flux_train_network.py's update_metadata): set for a flow-matching run.
  struct Flow {
    std::string timestep_sampling = "sigma";                  // ss_timestep_sampling
    std::string weighting_scheme = "none";                    // ss_weighting_scheme
    double logit_mean = 0, logit_std = 1, mode_scale = 1.29;  // ss_logit_mean, _std, ss_mode_scale
    double sigmoid_scale = 1;                                 // ss_sigmoid_scale
    double discrete_flow_shift = 3;                           // ss_discrete_flow_shift
  };
  std::optional<Flow> flow;

  // Text encoder.
  std::optional<std::int64_t> clip_skip;         // ss_clip_skip, modelspec.encoder_layer
  std::optional<std::int64_t> max_token_length;  // ss_max_token_length (None: 75)

  // Data.
  std::int64_t num_train_images = 0;              // ss_num_train_images (images × repeats)
  std::int64_t num_reg_images = 0;                // ss_num_reg_images
  bool flip_aug = false;                          // ss_flip_aug
  bool random_crop = false;                       // ss_random_crop
  std::vector<KohyaDatasetDir> dataset_dirs;      // ss_dataset_dirs
  std::vector<KohyaDatasetDir> reg_dataset_dirs;  // ss_reg_dataset_dirs
  std::vector<KohyaTagFrequency> tag_frequency;   // ss_tag_frequency
  // Captions (the dataset's first subset, as kohya records them).
  bool shuffle_caption = false;                     // ss_shuffle_caption
  std::int64_t keep_tokens = 0;                     // ss_keep_tokens
  double caption_dropout_rate = 0;                  // ss_caption_dropout_rate
  std::int64_t caption_dropout_every_n_epochs = 0;  // ss_caption_dropout_every_n_epochs
  double caption_tag_dropout_rate = 0;              // ss_caption_tag_dropout_rate
  // Buckets (--enable_bucket): ss_enable_bucket, ss_bucket_no_upscale, ss_min/max_bucket_reso
  // and ss_bucket_info {"buckets": {index: {"resolution": [w, h], "count": n}},
  // "mean_img_ar_error"} with index the bucket's position among all of the run's buckets (sorted),
  // count with repeats.
  bool enable_bucket = false;
  bool bucket_no_upscale = false;
  std::int64_t min_bucket_reso = 256, max_bucket_reso = 1024;
  std::vector<KohyaBucket> buckets;  // the non-empty ones
  double mean_img_ar_error = 0;      // mean |aspect error| over the images (without repeats)

  // Names, comments, times (seconds since the epoch, Python's time.time()).
  std::optional<std::string> output_name;       // ss_output_name; modelspec.title fallback
  std::optional<std::string> training_comment;  // ss_training_comment
  std::int64_t session_id = 0;                  // ss_session_id (kohya: random in [0, 2^32])
  double training_started_at = 0;               // ss_training_started_at
  double saved_at = 0;  // ss_training_finished_at; modelspec.date (and the default title)
  std::optional<int> utc_offset_seconds;  // modelspec.date's zone; unset: the machine's (kohya)

  // ModelSpec (--metadata_title, --metadata_author, …).
  std::optional<std::string> title;  // modelspec.title; unset: output_name, else "LoRA@<saved_at>"
  std::optional<std::string> author, description, license, tags, usage_hint, trigger_phrase;
  std::optional<std::string> implementation_version;  // kohya: "sd-scripts/<commit>"
};

/// --optimizer_args for torch.optim.AdamW with these values: the ones that differ from
/// torch's defaults (betas (0.9, 0.999), eps 1e-08, weight_decay 0.01), so a default run
/// reads "torch.optim.adamw.AdamW" as kohya's does.
inline std::vector<std::pair<std::string, std::string>> torch_adamw_args(double beta1, double beta2,
                                                                         double weight_decay,
                                                                         double eps) {
  std::vector<std::pair<std::string, std::string>> args;
  if (beta1 != 0.9 || beta2 != 0.999)
    args.emplace_back("betas", "(" + python_float(beta1) + ", " + python_float(beta2) + ")");
  if (weight_decay != 0.01) args.emplace_back("weight_decay", python_float(weight_decay));
  if (eps != 1e-8) args.emplace_back("eps", python_float(eps));
  return args;
}

/// --optimizer_args for torch.optim.SGD (defaults momentum 0, weight_decay 0, nesterov False;
/// kohya's SGDNesterov passes nesterov=True outside the args and writes momentum).
inline std::vector<std::pair<std::string, std::string>> torch_sgd_args(double momentum,
                                                                       bool nesterov,
                                                                       double weight_decay) {
  std::vector<std::pair<std::string, std::string>> args;
  if (momentum != 0 || nesterov) args.emplace_back("momentum", python_float(momentum));
  if (nesterov) args.emplace_back("nesterov", "True");
  if (weight_decay != 0) args.emplace_back("weight_decay", python_float(weight_decay));
  return args;
}

namespace kohya_metadata_detail {
// json.dumps({name: {"n_repeats": r, "img_count": c}, …})
inline std::string dataset_dirs_json(const std::vector<KohyaDatasetDir>& dirs) {
  std::string out = "{";
  for (std::size_t i = 0; i < dirs.size(); ++i) {
    out += (i ? ", " : "") + python_json_string(dirs[i].name) +
           ": {\"n_repeats\": " + std::to_string(dirs[i].n_repeats) +
           ", \"img_count\": " + std::to_string(dirs[i].img_count) + "}";
  }
  return out + "}";
}

// json.dumps({dir: {tag: count, …}, …})
inline std::string tag_frequency_json(const std::vector<KohyaTagFrequency>& dirs) {
  std::string out = "{";
  for (std::size_t i = 0; i < dirs.size(); ++i) {
    out += (i ? ", " : "") + python_json_string(dirs[i].dir) + ": {";
    for (std::size_t j = 0; j < dirs[i].counts.size(); ++j) {
      out += (j ? ", " : "") + python_json_string(dirs[i].counts[j].first) + ": " +
             std::to_string(dirs[i].counts[j].second);
    }
    out += "}";
  }
  return out + "}";
}

// json.dumps of a float: repr, with Infinity / -Infinity / NaN for the non-finite ones.
inline std::string json_float(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v < 0 ? "-Infinity" : "Infinity";
  return python_float(v);
}

// json.dumps({"buckets": {i: {"resolution": [w, h], "count": n}, …}, "mean_img_ar_error": e})
inline std::string bucket_info_json(const KohyaRunInfo& run) {
  std::string out = "{\"buckets\": {";
  for (std::size_t i = 0; i < run.buckets.size(); ++i) {
    const KohyaBucket& b = run.buckets[i];
    out += (i ? ", \"" : "\"") + std::to_string(b.index) + "\": {\"resolution\": [" +
           std::to_string(b.width) + ", " + std::to_string(b.height) +
           "], \"count\": " + std::to_string(b.count) + "}";
  }
  return out + "}, \"mean_img_ar_error\": " + json_float(run.mean_img_ar_error) + "}";
}

// json.dumps(net_kwargs): the --network_args strings, then "dropout" unless given.
inline std::string network_args_json(const KohyaRunInfo& run) {
  std::string out = "{";
  bool has_dropout = false;
  for (std::size_t i = 0; i < run.network_args.size(); ++i) {
    const auto& [key, value] = run.network_args[i];
    has_dropout = has_dropout || key == "dropout";
    out += (i ? ", " : "") + python_json_string(key) + ": " + python_json_string(value);
  }
  if (!has_dropout) {
    out += std::string(run.network_args.empty() ? "" : ", ") +
           "\"dropout\": " + (run.network_dropout ? json_float(*run.network_dropout) : "null");
  }
  return out + "}";
}
}  // namespace kohya_metadata_detail

/// The ss_* and modelspec.* metadata of a LoRA saved at the end of `run` (see the top of the
/// file for what is written and what is left out). The sshs_* hashes need the tensors:
/// add_kohya_hashes.
inline std::map<std::string, std::string> kohya_metadata(const KohyaRunInfo& run) {
  using namespace kohya_metadata_detail;
  std::map<std::string, std::string> m;
  auto integer = [](std::int64_t v) { return std::to_string(v); };

  // train_network.py: the `metadata` dict, then `{k: str(v) for k, v in metadata.items()}`.
  m["ss_session_id"] = integer(run.session_id);
  m["ss_training_started_at"] = python_float(run.training_started_at);
  m["ss_output_name"] = python_optional(run.output_name);
  m["ss_learning_rate"] = python_float(run.learning_rate);
  m["ss_text_encoder_lr"] = python_optional(run.text_encoder_lr);
  m["ss_unet_lr"] = python_optional(run.unet_lr);
  m["ss_num_train_images"] = integer(run.num_train_images);
  m["ss_num_validation_images"] = "0";  // no validation split
  m["ss_num_reg_images"] = integer(run.num_reg_images);
  m["ss_num_batches_per_epoch"] = integer(run.num_batches_per_epoch);
  m["ss_num_epochs"] = integer(run.num_epochs);
  m["ss_gradient_checkpointing"] = python_bool(run.gradient_checkpointing);
  m["ss_gradient_accumulation_steps"] = integer(run.gradient_accumulation_steps);
  m["ss_max_train_steps"] = integer(run.max_train_steps);
  // --lr_warmup_steps is int_or_float: an int when >= 1, else the ratio as a float.
  m["ss_lr_warmup_steps"] = run.lr_warmup_steps >= 1
                                ? integer(static_cast<std::int64_t>(run.lr_warmup_steps))
                                : python_float(run.lr_warmup_steps);
  m["ss_lr_scheduler"] = run.lr_scheduler;
  m["ss_network_module"] = run.network_module;
  m["ss_network_dim"] = python_optional(run.network_dim);
  m["ss_network_alpha"] = python_optional(run.network_alpha);
  m["ss_network_dropout"] = python_optional(run.network_dropout);
  m["ss_mixed_precision"] = run.mixed_precision;
  m["ss_full_fp16"] = "False";
  m["ss_v2"] = python_bool(run.base == KohyaBaseModel::sd_v2);
  m["ss_base_model_version"] = kohya_base_model_version(run.base, run.v_parameterization);
  m["ss_clip_skip"] = python_optional(run.clip_skip);
  m["ss_max_token_length"] = python_optional(run.max_token_length);
  m["ss_cache_latents"] = python_bool(run.cache_latents);
  m["ss_seed"] = std::to_string(run.seed);
  m["ss_lowram"] = "False";
  m["ss_noise_offset"] = python_optional(run.noise_offset);
  m["ss_multires_noise_iterations"] = python_optional(run.multires_noise_iterations);
  m["ss_multires_noise_discount"] = python_float(run.multires_noise_discount);
  m["ss_adaptive_noise_scale"] = python_optional(run.adaptive_noise_scale);
  m["ss_zero_terminal_snr"] = python_bool(run.zero_terminal_snr);
  if (run.flow) {
    m["ss_timestep_sampling"] = run.flow->timestep_sampling;
    m["ss_weighting_scheme"] = run.flow->weighting_scheme;
    m["ss_logit_mean"] = python_float(run.flow->logit_mean);
    m["ss_logit_std"] = python_float(run.flow->logit_std);
    m["ss_mode_scale"] = python_float(run.flow->mode_scale);
    m["ss_sigmoid_scale"] = python_float(run.flow->sigmoid_scale);
    m["ss_discrete_flow_shift"] = python_float(run.flow->discrete_flow_shift);
    m["ss_model_prediction_type"] = "raw";  // the velocity as the model outputs it
  }
  m["ss_training_comment"] = python_optional(run.training_comment);
  std::string optimizer = run.optimizer;
  if (!run.optimizer_args.empty()) {
    optimizer += "(";
    for (std::size_t i = 0; i < run.optimizer_args.size(); ++i) {
      optimizer +=
          (i ? "," : "") + run.optimizer_args[i].first + "=" + run.optimizer_args[i].second;
    }
    optimizer += ")";
  }
  m["ss_optimizer"] = optimizer;
  m["ss_max_grad_norm"] = python_float(run.max_grad_norm);
  m["ss_caption_dropout_rate"] = python_float(run.caption_dropout_rate);
  m["ss_caption_dropout_every_n_epochs"] = integer(run.caption_dropout_every_n_epochs);
  m["ss_caption_tag_dropout_rate"] = python_float(run.caption_tag_dropout_rate);
  m["ss_face_crop_aug_range"] = "None";
  m["ss_prior_loss_weight"] = python_float(run.prior_loss_weight);
  m["ss_min_snr_gamma"] = python_optional(run.min_snr_gamma);
  m["ss_scale_weight_norms"] = python_optional(run.scale_weight_norms);
  m["ss_ip_noise_gamma"] = python_optional(run.ip_noise_gamma);
  m["ss_debiased_estimation"] = python_bool(run.debiased_estimation);
  m["ss_noise_offset_random_strength"] = python_bool(run.noise_offset_random_strength);
  m["ss_ip_noise_gamma_random_strength"] = python_bool(run.ip_noise_gamma_random_strength);
  m["ss_loss_type"] = run.loss_type;
  m["ss_huber_schedule"] = run.huber_schedule;
  m["ss_huber_scale"] = python_float(run.huber_scale);
  m["ss_huber_c"] = python_float(run.huber_c);
  m["ss_fp8_base"] = "False";
  m["ss_fp8_base_unet"] = "False";
  m["ss_validation_seed"] = "None";
  m["ss_validation_split"] = "0.0";
  m["ss_max_validation_steps"] = "None";
  m["ss_validate_every_n_epochs"] = "None";
  m["ss_validate_every_n_steps"] = "None";
  m["ss_resize_interpolation"] = "None";

  // train_network.py, the train_data_dir branch: metadata.update({...}).
  m["ss_batch_size_per_device"] = integer(run.train_batch_size);
  m["ss_total_batch_size"] =
      integer(run.train_batch_size * run.num_processes * run.gradient_accumulation_steps);
  m["ss_resolution"] =
      "(" + integer(run.resolution_width) + ", " + integer(run.resolution_height) + ")";
  m["ss_color_aug"] = "False";
  m["ss_flip_aug"] = python_bool(run.flip_aug);
  m["ss_random_crop"] = python_bool(run.random_crop);
  m["ss_shuffle_caption"] = python_bool(run.shuffle_caption);
  m["ss_enable_bucket"] = python_bool(run.enable_bucket);
  m["ss_bucket_no_upscale"] = python_bool(run.enable_bucket && run.bucket_no_upscale);
  // Buckets off: the dataset's min/max_bucket_reso are None.
  m["ss_min_bucket_reso"] = run.enable_bucket ? integer(run.min_bucket_reso) : "None";
  m["ss_max_bucket_reso"] = run.enable_bucket ? integer(run.max_bucket_reso) : "None";
  m["ss_keep_tokens"] = integer(run.keep_tokens);
  m["ss_dataset_dirs"] = dataset_dirs_json(run.dataset_dirs);
  m["ss_reg_dataset_dirs"] = dataset_dirs_json(run.reg_dataset_dirs);
  m["ss_tag_frequency"] = tag_frequency_json(run.tag_frequency);
  m["ss_bucket_info"] = run.enable_bucket ? bucket_info_json(run) : "null";  // json.dumps(None)

  if (!run.network_args.empty()) m["ss_network_args"] = network_args_json(run);
  if (run.sd_model_hash) m["ss_sd_model_hash"] = *run.sd_model_hash;
  if (run.new_sd_model_hash) m["ss_new_sd_model_hash"] = *run.new_sd_model_hash;
  if (run.sd_model_name) m["ss_sd_model_name"] = *run.sd_model_name;

  // save_model: set just before saving.
  m["ss_training_finished_at"] = python_float(run.saved_at);
  m["ss_steps"] = integer(run.steps);
  m["ss_epoch"] = integer(run.epoch);

  // get_sai_model_spec(None, args, is_sdxl, lora=True, textual_inversion=False) →
  // sai_model_spec.build_metadata (ModelSpec 1.0.1; None fields are left out).
  const bool sdxl = run.base == KohyaBaseModel::sdxl;
  m["modelspec.sai_model_spec"] = "1.0.1";
  m["modelspec.architecture"] = modelspec_lora_architecture(run.base, run.v_parameterization);
  m["modelspec.implementation"] =
      sdxl ? "https://github.com/Stability-AI/generative-models" : "diffusers";
  m["modelspec.title"] = run.title         ? *run.title
                         : run.output_name ? *run.output_name
                                           : "LoRA@" + python_float(run.saved_at);
  m["modelspec.resolution"] = integer(run.resolution_width) + "x" + integer(run.resolution_height);
  m["modelspec.date"] = modelspec_date(run.saved_at, run.utc_offset_seconds);
  m["modelspec.prediction_type"] = run.v_parameterization ? "v" : "epsilon";
  if (run.min_timestep || run.max_timestep) {
    m["modelspec.timestep_range"] =
        integer(run.min_timestep.value_or(0)) + "," + integer(run.max_timestep.value_or(1000));
  }
  if (run.clip_skip) m["modelspec.encoder_layer"] = integer(*run.clip_skip);
  const std::pair<const char*, const std::optional<std::string>*> optional_fields[] = {
      {"modelspec.author", &run.author},
      {"modelspec.description", &run.description},
      {"modelspec.license", &run.license},
      {"modelspec.tags", &run.tags},
      {"modelspec.usage_hint", &run.usage_hint},
      {"modelspec.trigger_phrase", &run.trigger_phrase},
      {"modelspec.implementation_version", &run.implementation_version}};
  for (const auto& [key, value] : optional_fields)
    if (*value) m[key] = **value;
  return m;
}

// ---------------------------------------------------------------------------------------------
// Hashes

/// sd-webui-additional-networks' hashes of a safetensors file, as kohya precomputes them.
struct KohyaHashes {
  std::string model_hash;   // sshs_model_hash: SHA-256 of the data buffer [8 + N, EOF)
  std::string legacy_hash;  // sshs_legacy_hash: first 8 hex digits of the SHA-256 of the file's
                            // bytes [0x100000, 0x110000) (fewer, or none, when it is shorter)
};

/// The hashes of the file save_safetensors(tensors, metadata restricted to its "ss_" keys)
/// would write (train_util.precalculate_safetensors_hashes: the hashes must not change when
/// other metadata is edited). Streams the serialization; no copy of the tensors is made.
inline KohyaHashes kohya_hashes(const std::vector<io::TensorToWrite>& tensors,
                                const std::map<std::string, std::string>& metadata) {
  std::map<std::string, std::string> training;
  for (const auto& [key, value] : metadata)
    if (key.starts_with("ss_")) training.emplace(key, value);
  const io::SafetensorsLayout layout =
      io::SafetensorsLayout::plan(tensors, training, "kohya_hashes");

  constexpr std::size_t kLegacyBegin = 0x100000, kLegacyEnd = 0x110000;  // addnet_hash_legacy
  const std::size_t data_begin = 8 + layout.header_size();
  io::Sha256 model, legacy;
  std::size_t offset = 0;  // of the chunk in the file
  layout.for_each_chunk([&](std::span<const std::byte> chunk) {
    const std::size_t begin = offset, end = offset + chunk.size();
    offset = end;
    auto part = [&](std::size_t from, std::size_t to) {  // [from, to) ∩ the chunk
      from = std::max(from, begin);
      to = std::min(to, end);
      return from < to ? chunk.subspan(from - begin, to - from) : std::span<const std::byte>();
    };
    model.update(part(data_begin, end));
    legacy.update(part(kLegacyBegin, kLegacyEnd));
    return true;
  });
  return {model.hexdigest(), legacy.hexdigest().substr(0, 8)};
}

/// Adds sshs_model_hash and sshs_legacy_hash (networks/lora.py save_weights) to `metadata`,
/// computed over `tensors` as they will be saved (see kohya_hashes).
inline void add_kohya_hashes(const std::vector<io::TensorToWrite>& tensors,
                             std::map<std::string, std::string>& metadata) {
  KohyaHashes hashes = kohya_hashes(tensors, metadata);
  metadata["sshs_model_hash"] = std::move(hashes.model_hash);
  metadata["sshs_legacy_hash"] = std::move(hashes.legacy_hash);
}

}  // namespace difftrain::lora
