#pragma once
// DdpmScheduler: the training side of diffusers' DDPMScheduler. T discrete timesteps t ∈ [0, T)
// with β_t, ᾱ_t = Π_{s≤t}(1 − β_s), the forward-diffusion coefficients √ᾱ_t, √(1 − ᾱ_t) and
// SNR(t) = ᾱ_t/(1 − ᾱ_t), all tabulated in double once at construction. DdpmSchedulerConfig reads
// a diffusers `scheduler_config.json` (DDPM, or the PNDM/DDIM/Euler configs SD checkpoints ship).

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "difftrain/concepts.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/prediction_type.hpp"
#include "difftrain/io/json_file.hpp"
#include "difftrain/schedule/betas.hpp"

namespace difftrain {

/// Keys of diffusers scheduler configs that only steer sampling (inference), accepted by
/// DdpmSchedulerConfig::from_json whatever their value because they do not change β, ᾱ or the
/// training target:
/// - DDPM / DDIM / PNDM: variance_type, clip_sample, clip_sample_range, thresholding,
///   dynamic_thresholding_ratio, sample_max_value, timestep_spacing, steps_offset,
///   skip_prk_steps, set_alpha_to_one;
/// - Euler / Euler-ancestral / LMS / Heun: interpolation_type, use_karras_sigmas,
///   use_exponential_sigmas, use_beta_sigmas, sigma_min, sigma_max, timestep_type,
///   final_sigmas_type;
/// - DPM-Solver / UniPC: solver_order, algorithm_type, solver_type, lower_order_final,
///   euler_at_final, use_lu_lambdas, lambda_min_clipped, predict_x0, disable_corrector,
///   solver_p;
/// - LCM / TCD: original_inference_steps, timestep_scaling.
/// Any other unknown key is accepted only with a value that changes nothing (null or false).
inline constexpr std::array<std::string_view, 30> scheduler_inference_only_keys = {
    "variance_type",
    "clip_sample",
    "clip_sample_range",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "timestep_spacing",
    "steps_offset",
    "skip_prk_steps",
    "set_alpha_to_one",
    "interpolation_type",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "sigma_min",
    "sigma_max",
    "timestep_type",
    "final_sigmas_type",
    "solver_order",
    "algorithm_type",
    "solver_type",
    "lower_order_final",
    "euler_at_final",
    "use_lu_lambdas",
    "lambda_min_clipped",
    "predict_x0",
    "disable_corrector",
    "solver_p",
    "original_inference_steps",
    "timestep_scaling",
};

/// The training-relevant part of a diffusers scheduler config (names and defaults of
/// DDPMScheduler).
struct DdpmSchedulerConfig {
  std::int64_t num_train_timesteps = 1000;
  double beta_start = 1e-4;
  double beta_end = 0.02;
  BetaSchedule beta_schedule = BetaSchedule::linear;
  std::vector<double> trained_betas;  // empty = none; otherwise replaces beta_schedule
  PredictionType prediction_type = PredictionType::epsilon;
  bool rescale_betas_zero_snr = false;

  /// Throws Error(fn + ": ...") unless 2 <= T <= max_train_timesteps, beta_start and beta_end are
  /// positive and finite, and trained_betas is empty or holds T values in (0, 1].
  void validate(std::string_view fn = "DdpmSchedulerConfig::validate") const {
    detail::check_num_train_timesteps(fn, num_train_timesteps);
    require(std::isfinite(beta_start) && beta_start > 0.0, fn, "beta_start is ", beta_start,
            ", expected a positive finite number");
    require(std::isfinite(beta_end) && beta_end > 0.0, fn, "beta_end is ", beta_end,
            ", expected a positive finite number");
    if (!trained_betas.empty()) {
      require(trained_betas.size() == static_cast<std::size_t>(num_train_timesteps), fn,
              "trained_betas has ", trained_betas.size(),
              " values, expected num_train_timesteps = ", num_train_timesteps);
      detail::check_betas_range(fn, "trained_betas", trained_betas);
    }
  }

  /// Reads a parsed diffusers `scheduler_config.json`. Keys starting with '_' (`_class_name`,
  /// `_diffusers_version`) are ignored, as are scheduler_inference_only_keys; a missing key keeps
  /// its default. Throws Error naming the key and its value for a wrong type, an invalid value,
  /// or an unknown key whose value is neither null nor false.
  static DdpmSchedulerConfig from_json(const nlohmann::json& json);

  /// from_json of the file at `path`; throws Error naming the path if it does not exist or is
  /// not valid JSON.
  static DdpmSchedulerConfig from_file(const std::string& path);
};

namespace detail {

inline bool is_inference_only_scheduler_key(std::string_view key) {
  for (auto known : scheduler_inference_only_keys) {
    if (key == known) return true;
  }
  return false;
}

/// "key 'beta_start' has value "0.1", expected a positive number" (with the function prefix).
[[noreturn]] inline void throw_bad_config_value(std::string_view key, const nlohmann::json& value,
                                                std::string_view expected) {
  throw Error(message("DdpmSchedulerConfig::from_json: key '", key, "' has value ",
                      io::json_excerpt(value), ", expected ", expected));
}

inline double config_positive_number(std::string_view key, const nlohmann::json& value) {
  if (!value.is_number()) throw_bad_config_value(key, value, "a positive number");
  const double x = value.get<double>();
  if (!(std::isfinite(x) && x > 0.0)) throw_bad_config_value(key, value, "a positive number");
  return x;
}

}  // namespace detail

inline DdpmSchedulerConfig DdpmSchedulerConfig::from_json(const nlohmann::json& json) {
  constexpr std::string_view fn = "DdpmSchedulerConfig::from_json";
  require(json.is_object(), fn, "expected a JSON object, got ", json.type_name());
  DdpmSchedulerConfig config;
  for (const auto& [key, value] : json.items()) {
    if (key.starts_with('_') || detail::is_inference_only_scheduler_key(key)) continue;
    if (key == "num_train_timesteps") {
      // Integers only: 1000.0 is refused as diffusers' torch.linspace(steps=1000.0) would be.
      // (nlohmann stores non-negative integers as unsigned, negative ones as signed.)
      std::int64_t steps = 0;
      if (value.is_number_unsigned()) {
        const auto u = value.get<std::uint64_t>();
        if (u <= static_cast<std::uint64_t>(max_train_timesteps))
          steps = static_cast<std::int64_t>(u);
      } else if (value.is_number_integer()) {
        steps = value.get<std::int64_t>();
      }
      if (!value.is_number_integer() || steps < 2 || steps > max_train_timesteps) {
        detail::throw_bad_config_value(key, value,
                                       message("an integer in [2, ", max_train_timesteps, "]"));
      }
      config.num_train_timesteps = steps;
    } else if (key == "beta_start") {
      config.beta_start = detail::config_positive_number(key, value);
    } else if (key == "beta_end") {
      config.beta_end = detail::config_positive_number(key, value);
    } else if (key == "beta_schedule") {
      if (!value.is_string()) {
        detail::throw_bad_config_value(key, value,
                                       "one of linear, scaled_linear, squaredcos_cap_v2, sigmoid");
      }
      try {
        config.beta_schedule = parse_beta_schedule(value.get<std::string>());
      } catch (const Error& e) {
        fail(fn, e.what());
      }
    } else if (key == "prediction_type") {
      if (!value.is_string()) {
        detail::throw_bad_config_value(key, value, "one of epsilon, v_prediction, sample");
      }
      try {
        config.prediction_type = parse_prediction_type(value.get<std::string>());
      } catch (const Error& e) {
        fail(fn, e.what());
      }
    } else if (key == "rescale_betas_zero_snr") {
      if (!value.is_boolean()) detail::throw_bad_config_value(key, value, "true or false");
      config.rescale_betas_zero_snr = value.get<bool>();
    } else if (key == "trained_betas") {
      if (value.is_null()) {
        config.trained_betas.clear();
        continue;
      }
      if (!value.is_array() || value.empty()) {
        detail::throw_bad_config_value(key, value, "null or a non-empty array of numbers");
      }
      config.trained_betas.clear();
      config.trained_betas.reserve(value.size());
      for (std::size_t i = 0; i < value.size(); ++i) {
        const auto& beta = value[i];
        if (!beta.is_number() || !(beta.get<double>() > 0.0 && beta.get<double>() <= 1.0)) {
          fail(fn, "key 'trained_betas' has value ", io::json_excerpt(beta), " at index ", i,
               ", expected a number in (0, 1]");
        }
        config.trained_betas.push_back(beta.get<double>());
      }
    } else if (!(value.is_null() || (value.is_boolean() && !value.get<bool>()))) {
      fail(fn, "unknown key '", key, "' with value ", io::json_excerpt(value),
           " (neither a DDPM training key nor an inference-only key; an unknown key "
           "is accepted only as null or false)");
    }
  }
  config.validate(fn);
  return config;
}

inline DdpmSchedulerConfig DdpmSchedulerConfig::from_file(const std::string& path) {
  constexpr std::string_view fn = "DdpmSchedulerConfig::from_file";
  const nlohmann::json json = io::read_json_file(fn, path);
  try {
    return from_json(json);
  } catch (const Error& e) {
    fail(fn, "'", path, "': ", e.what());
  }
}

/// Training-side DDPM noise schedule; satisfies the Scheduler concept (concepts.hpp).
class DdpmScheduler {
 public:
  explicit DdpmScheduler(DdpmSchedulerConfig config = {}) : config_(std::move(config)) {
    config_.validate("DdpmScheduler");
    betas_ = config_.trained_betas.empty()
                 ? make_betas(config_.beta_schedule, config_.num_train_timesteps,
                              config_.beta_start, config_.beta_end)
                 : config_.trained_betas;
    if (config_.rescale_betas_zero_snr) betas_ = rescale_zero_terminal_snr(betas_);

    const std::size_t n = betas_.size();
    alphas_cumprod_.resize(n);
    sqrt_alpha_prod_.resize(n);
    sqrt_one_minus_alpha_prod_.resize(n);
    snr_.resize(n);
    double alpha_prod = 1.0;
    for (std::size_t t = 0; t < n; ++t) {
      alpha_prod *= 1.0 - betas_[t];  // ᾱ_t = Π_{s≤t} (1 − β_s)
      alphas_cumprod_[t] = alpha_prod;
      sqrt_alpha_prod_[t] = std::sqrt(alpha_prod);
      sqrt_one_minus_alpha_prod_[t] = std::sqrt(1.0 - alpha_prod);
      snr_[t] = alpha_prod / (1.0 - alpha_prod);  // 0 exactly where ᾱ_t = 0 (zero terminal SNR)
    }
  }

  /// Stable Diffusion 1.x / 2.x-base / XL: scaled_linear 0.00085..0.012, T = 1000, epsilon.
  static DdpmScheduler sd15() {
    DdpmSchedulerConfig config;
    config.beta_schedule = BetaSchedule::scaled_linear;
    config.beta_start = 0.00085;
    config.beta_end = 0.012;
    return DdpmScheduler(std::move(config));
  }

  /// Stable Diffusion 2.x-768: the SD betas with v_prediction.
  static DdpmScheduler sd21_v() {
    DdpmSchedulerConfig config;
    config.beta_schedule = BetaSchedule::scaled_linear;
    config.beta_start = 0.00085;
    config.beta_end = 0.012;
    config.prediction_type = PredictionType::v_prediction;
    return DdpmScheduler(std::move(config));
  }

  const DdpmSchedulerConfig& config() const { return config_; }
  std::int64_t num_train_timesteps() const { return config_.num_train_timesteps; }
  PredictionType prediction_type() const { return config_.prediction_type; }

  /// β_t after any zero-terminal-SNR rescale, t = 0..T−1.
  std::span<const double> betas() const { return betas_; }
  /// ᾱ_t = Π_{s≤t} (1 − β_s).
  std::span<const double> alphas_cumprod() const { return alphas_cumprod_; }

  /// √ᾱ_t, the coefficient of x0 in x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε.
  double sqrt_alpha_prod(std::int64_t t) const {
    return sqrt_alpha_prod_[index("DdpmScheduler::sqrt_alpha_prod", t)];
  }
  /// √(1 − ᾱ_t), the coefficient of ε.
  double sqrt_one_minus_alpha_prod(std::int64_t t) const {
    return sqrt_one_minus_alpha_prod_[index("DdpmScheduler::sqrt_one_minus_alpha_prod", t)];
  }
  /// SNR(t) = ᾱ_t/(1 − ᾱ_t) (diffusers' compute_snr); 0 at t = T−1 with zero terminal SNR.
  double snr(std::int64_t t) const { return snr_[index("DdpmScheduler::snr", t)]; }

  /// Training times are the integer timesteps t ∈ [0, T) (TrainingSchedule).
  using time_type = std::int64_t;
  /// x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·eps, the prediction type's target, model timestep t, SNR(t).
  TrainingCoefficients training_coefficients(std::int64_t t) const {
    const std::size_t i = index("DdpmScheduler::training_coefficients", t);
    const double a = sqrt_alpha_prod_[i], s = sqrt_one_minus_alpha_prod_[i];
    const TargetCoefficients target = prediction_target(config_.prediction_type, a, s);
    return {a, s, target.x0, target.eps, static_cast<double>(t), snr_[i]};
  }

 private:
  std::size_t index(std::string_view function, std::int64_t t) const {
    require(t >= 0 && t < config_.num_train_timesteps, function, "timestep ", t,
            " out of range [0, ", config_.num_train_timesteps, ")");
    return static_cast<std::size_t>(t);
  }

  DdpmSchedulerConfig config_;
  std::vector<double> betas_;
  std::vector<double> alphas_cumprod_;
  std::vector<double> sqrt_alpha_prod_;
  std::vector<double> sqrt_one_minus_alpha_prod_;
  std::vector<double> snr_;
};

}  // namespace difftrain
