#pragma once
// Flow matching (rectified flow), the objective of SD3/3.5, Flux, Chroma, Qwen-Image, Z-Image:
//
//   x_σ    = (1 − σ)·x0 + σ·eps                 σ ∈ (0, 1], σ = 1 is pure noise
//   target = eps − x0                           (the velocity dx_σ/dσ)
//   model timestep = σ·T                        (T = num_train_timesteps, 1000)
//   SNR(σ) = ((1 − σ)/σ)²                       (for SNR-based loss weightings)
//
// What it holds, each following its source:
// - FlowMatchEulerDiscreteScheduler: diffusers' class of that name
//   (src/diffusers/schedulers/scheduling_flow_match_euler_discrete.py, the 2025 version with
//   `time_shift_type`, `shift_terminal` and `stochastic_sampling`, i.e. diffusers ≥ 0.33): the
//   training sigmas σ_i = shift(s_i), s_i = (T − i)/T, i = 0..T−1 (unshifted with
//   use_dynamic_shifting), timesteps σ_i·T; set_timesteps(n, mu) for inference:
//   s = linspace(σ_max, σ_min, n), shifted again (shift, or time_shift(mu, 1, s) with dynamic
//   shifting), stretched to shift_terminal if set, then a final σ = 0; and the Euler step
//   x ← x + (σ_next − σ)·v. calculate_shift is diffusers' pipelines' (pipeline_flux.py), the same
//   line as kohya's get_lin_function.
// - FlowMatchTimesteps: the training σ per sample from a RandomStream: kohya sd-scripts
//   (library/flux_train_utils.py get_noisy_model_input_and_timesteps, commit 5dff02a6)
//   `--timestep_sampling` uniform / sigmoid / shift / flux_shift and its fallback `sigma`, which
//   is diffusers' (training_utils.py compute_density_for_timestep_sampling, and
//   examples/dreambooth/train_dreambooth_lora_sd3.py / _flux.py) density chosen by
//   `--weighting_scheme` (logit_normal, mode; any other draws uniformly) followed by the index
//   map i = ⌊u·T⌋, σ = sigmas[i]; OneTrainer's (Nerogar/OneTrainer commit 0ad27688,
//   modules/modelSetup/mixin/ModelSetupNoiseMixin.py _get_timestep_discrete)
//   inverted_parabola / heavy_tail, whose integer timestep t maps to σ = (t + 1)/T
//   (ModelSetupFlowMatchingMixin._add_noise_discrete, commit a44df08f).
// - compute_loss_weighting_for_sd3 (diffusers training_utils.py): none, sigma_sqrt, cosmap.
//
// Differences from the sources: tables and σ are computed in double (diffusers and kohya hold
// float32, so values agree to float32 rounding, ~6e-8 relative); uniforms are drawn on the open
// interval (0, 1) ((k + ½)·2^-32 from 32 random bits) where torch.rand gives [0, 1), so that σ is
// never 0 (kohya `uniform`) and no index reaches T (u = 0 under `mode` maps to 1).

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <numbers>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "difftrain/concepts.hpp"
#include "difftrain/core/choice.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/parallel.hpp"
#include "difftrain/core/prediction_type.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/io/json_file.hpp"
#include "difftrain/schedule/betas.hpp"

namespace difftrain {

// ---------------------------------------------------------------------------------------------
// The formulas
// ---------------------------------------------------------------------------------------------

/// SNR(σ) = ((1 − σ)/σ)²: the ratio of the signal and noise variances in x_σ (0 at σ = 1).
inline double flow_match_snr(double sigma) {
  require(sigma > 0.0 && sigma <= 1.0, "flow_match_snr", "sigma is ", sigma,
          ", expected a value in (0, 1]");
  const double r = (1.0 - sigma) / sigma;
  return r * r;
}

/// The coefficients for σ ∈ (0, 1]: x_t = (1 − σ)·x0 + σ·eps, target eps − x0, model timestep
/// σ·num_train_timesteps (as diffusers' and kohya's scripts pass it: σ·1000 for every released
/// model), SNR(σ).
inline TrainingCoefficients flow_match_coefficients(double sigma,
                                                    std::int64_t num_train_timesteps = 1000) {
  constexpr const char* fn = "flow_match_coefficients";
  require(sigma > 0.0 && sigma <= 1.0, fn, "sigma is ", sigma, ", expected a value in (0, 1]");
  require(num_train_timesteps > 0, fn, "num_train_timesteps is ", num_train_timesteps,
          ", expected > 0");
  TrainingCoefficients c;
  c.x0_coef = 1.0 - sigma;
  c.eps_coef = sigma;
  c.target_x0_coef = -1.0;
  c.target_eps_coef = 1.0;
  c.model_timestep = sigma * static_cast<double>(num_train_timesteps);
  c.snr = flow_match_snr(sigma);
  return c;
}

/// The shift of SD3 (kohya's discrete_flow_shift): shift·σ/(1 + (shift − 1)·σ). Maps [0, 1] onto
/// itself; shift > 1 moves σ towards 1 (more noise).
inline double flow_shift(double shift, double sigma) {
  return shift * sigma / (1.0 + (shift - 1.0) * sigma);
}

/// How set_timesteps shifts the sigmas with use_dynamic_shifting (diffusers' `time_shift_type`).
enum class TimeShiftType : std::uint8_t { exponential, linear };

inline constexpr std::array<Choice<TimeShiftType>, 2> kTimeShiftTypes{{
    {"exponential", TimeShiftType::exponential},
    {"linear", TimeShiftType::linear},
}};

inline TimeShiftType parse_time_shift_type(std::string_view name) {
  return parse_choice("time_shift_type", name, kTimeShiftTypes);
}
inline std::string_view to_string(TimeShiftType type) { return choice_name(type, kTimeShiftTypes); }

/// diffusers' time_shift(mu, sigma, t): exponential e^mu/(e^mu + (1/t − 1)^sigma), linear
/// mu/(mu + (1/t − 1)^sigma) (mu > 0). t ∈ [0, 1]; 0 and 1 are fixed points. (Here `sigma` is the
/// exponent, 1 in every caller, as in diffusers and kohya's flux_shift.)
inline double time_shift(TimeShiftType type, double mu, double sigma, double t) {
  constexpr const char* fn = "time_shift";
  require(t >= 0.0 && t <= 1.0, fn, "t is ", t, ", expected a value in [0, 1]");
  require(std::isfinite(sigma) && sigma > 0.0, fn, "sigma (the exponent) is ", sigma,
          ", expected a positive number");
  require(std::isfinite(mu), fn, "mu is ", mu, ", expected a finite number");
  const double odds = std::pow(1.0 / t - 1.0, sigma);  // +inf at t = 0: the result is 0
  if (type == TimeShiftType::linear) {
    require(mu > 0.0, fn, "mu is ", mu, ", expected > 0 for time_shift_type linear");
    return mu / (mu + odds);
  }
  const double e = std::exp(mu);
  return e / (e + odds);
}

/// The mu of dynamic shifting for an image of `image_seq_len` tokens (Flux: (H/16)·(W/16) for an
/// H×W image, i.e. (h/2)·(w/2) latent pixels): the line through (base_seq_len, base_shift) and
/// (max_seq_len, max_shift) (diffusers' pipelines' calculate_shift; kohya's get_lin_function).
inline double calculate_shift(double image_seq_len, double base_seq_len = 256,
                              double max_seq_len = 4096, double base_shift = 0.5,
                              double max_shift = 1.15) {
  require(max_seq_len != base_seq_len, "calculate_shift", "base_seq_len and max_seq_len are both ",
          base_seq_len, ", expected different values");
  const double m = (max_shift - base_shift) / (max_seq_len - base_seq_len);
  const double b = base_shift - m * base_seq_len;
  return image_seq_len * m + b;
}

/// diffusers' and kohya's `--weighting_scheme`: it picks both the density of u in the `sigma`
/// timestep sampling (logit_normal, mode; the others draw u uniformly) and the loss weighting
/// (sigma_sqrt, cosmap; the others weigh 1).
enum class FlowWeightingScheme : std::uint8_t { none, sigma_sqrt, logit_normal, mode, cosmap };

inline constexpr std::array<Choice<FlowWeightingScheme>, 5> kFlowWeightingSchemes{{
    {"none", FlowWeightingScheme::none},
    {"sigma_sqrt", FlowWeightingScheme::sigma_sqrt},
    {"logit_normal", FlowWeightingScheme::logit_normal},
    {"mode", FlowWeightingScheme::mode},
    {"cosmap", FlowWeightingScheme::cosmap},
}};

inline FlowWeightingScheme parse_flow_weighting_scheme(std::string_view name) {
  return parse_choice("weighting_scheme", name, kFlowWeightingSchemes);
}
inline std::string_view to_string(FlowWeightingScheme scheme) {
  return choice_name(scheme, kFlowWeightingSchemes);
}

/// diffusers' compute_loss_weighting_for_sd3: sigma_sqrt σ^-2, cosmap 2/(π(1 − 2σ + 2σ²)),
/// otherwise 1.
inline double compute_loss_weighting_for_sd3(FlowWeightingScheme scheme, double sigma) {
  require(sigma > 0.0 && sigma <= 1.0, "compute_loss_weighting_for_sd3", "sigma is ", sigma,
          ", expected a value in (0, 1]");
  switch (scheme) {
    case FlowWeightingScheme::sigma_sqrt:
      return 1.0 / (sigma * sigma);
    case FlowWeightingScheme::cosmap:
      return 2.0 / (std::numbers::pi * (1.0 - 2.0 * sigma + 2.0 * sigma * sigma));
    default:
      return 1.0;
  }
}

/// The same as a loss-weighting policy: weight_for_sigma(σ), and weight(snr, type) for callers
/// that know the SNR (σ = 1/(1 + √snr) inverts SNR(σ); the prediction type plays no part).
struct FlowMatchLossWeighting {
  FlowWeightingScheme weighting_scheme = FlowWeightingScheme::none;

  double weight_for_sigma(double sigma) const {
    return compute_loss_weighting_for_sd3(weighting_scheme, sigma);
  }
  /// σ is the coefficient of eps in x_t (TrainingCoefficients of flow matching).
  double weight(const TrainingCoefficients& c) const { return weight_for_sigma(c.eps_coef); }
  double weight(double snr, PredictionType /*type*/) const {
    require(snr >= 0.0 && std::isfinite(snr), "FlowMatchLossWeighting::weight", "snr is ", snr,
            ", expected a finite value >= 0");
    return weight_for_sigma(1.0 / (1.0 + std::sqrt(snr)));
  }
};

/// The SD3 paper's mode density (diffusers' `mode`, OneTrainer's heavy_tail):
/// f(u) = 1 − u − s·(cos²(πu/2) − 1 + u), decreasing from f(0) = 1 to f(1) = 0 for
/// s ∈ [−1, 2/(π − 2)] (kMaxModeScale).
inline double mode_transform(double u, double mode_scale) {
  const double c = std::cos(std::numbers::pi * u / 2.0);
  return 1.0 - u - mode_scale * (c * c - 1.0 + u);
}

/// The largest scale for which mode_transform is monotone: f'(u) = −1 − s + s·(π/2)·sin(πu) ≤ 0.
inline constexpr double kMaxModeScale = 2.0 / (std::numbers::pi - 2.0);

namespace flow_detail {
// The logistic function 1/(1 + e^−x).
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
}  // namespace flow_detail

// ---------------------------------------------------------------------------------------------
// FlowMatchEulerDiscreteScheduler
// ---------------------------------------------------------------------------------------------

/// Keys of a diffusers FlowMatchEulerDiscreteScheduler config with the default they must have
/// here: options difftrain does not implement (Karras/exponential/beta sigmas, Mochi's inverted
/// sigmas, stochastic sampling). from_json accepts them only as false or null.
inline constexpr std::array<std::string_view, 5> kFlowMatchUnsupportedKeys = {
    "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
    "stochastic_sampling"};

/// The config of diffusers' FlowMatchEulerDiscreteScheduler (its names and defaults).
struct FlowMatchEulerDiscreteSchedulerConfig {
  std::int64_t num_train_timesteps = 1000;
  double shift = 1.0;  // SD3 and Flux ship 3.0
  bool use_dynamic_shifting = false;
  double base_shift = 0.5;
  double max_shift = 1.15;
  std::int64_t base_image_seq_len = 256;
  std::int64_t max_image_seq_len = 4096;
  std::optional<double> shift_terminal;  // null (or 0): none. Qwen-Image ships 0.02
  TimeShiftType time_shift_type = TimeShiftType::exponential;

  /// Throws Error(fn + ": ...") naming the key unless 2 <= T <= max_train_timesteps, shift > 0,
  /// base_shift and max_shift are finite, 1 <= base_image_seq_len < max_image_seq_len, and
  /// shift_terminal is none or in [0, 1).
  void validate(std::string_view fn = "FlowMatchEulerDiscreteSchedulerConfig::validate") const {
    detail::check_num_train_timesteps(fn, num_train_timesteps);
    require(std::isfinite(shift) && shift > 0.0, fn, "shift is ", shift,
            ", expected a positive number");
    require(std::isfinite(base_shift), fn, "base_shift is ", base_shift,
            ", expected a finite number");
    require(std::isfinite(max_shift), fn, "max_shift is ", max_shift, ", expected a finite number");
    require(base_image_seq_len >= 1 && base_image_seq_len < max_image_seq_len, fn,
            "base_image_seq_len is ", base_image_seq_len, " and max_image_seq_len is ",
            max_image_seq_len, ", expected 1 <= base_image_seq_len < max_image_seq_len");
    if (shift_terminal) {
      require(*shift_terminal >= 0.0 && *shift_terminal < 1.0, fn, "shift_terminal is ",
              *shift_terminal, ", expected null or a value in [0, 1)");
    }
  }

  /// Reads a parsed diffusers `scheduler_config.json`. Keys starting with '_' (`_class_name`,
  /// `_diffusers_version`) are ignored; a missing key keeps its default; kFlowMatchUnsupportedKeys
  /// and any other unknown key are accepted only as null or false. Throws Error naming the key,
  /// its value and what was expected.
  static FlowMatchEulerDiscreteSchedulerConfig from_json(const nlohmann::json& json);

  /// from_json of the file at `path`; throws Error naming the path if it is missing or invalid.
  static FlowMatchEulerDiscreteSchedulerConfig from_file(const std::string& path);

  /// The diffusers `scheduler_config.json` of this config (from_json reads it back).
  nlohmann::json to_json() const {
    return {{"_class_name", "FlowMatchEulerDiscreteScheduler"},
            {"num_train_timesteps", num_train_timesteps},
            {"shift", shift},
            {"use_dynamic_shifting", use_dynamic_shifting},
            {"base_shift", base_shift},
            {"max_shift", max_shift},
            {"base_image_seq_len", base_image_seq_len},
            {"max_image_seq_len", max_image_seq_len},
            {"shift_terminal", shift_terminal ? nlohmann::json(*shift_terminal) : nullptr},
            {"time_shift_type", std::string(to_string(time_shift_type))}};
  }
};

/// True when a parsed scheduler config names diffusers' FlowMatchEulerDiscreteScheduler
/// (`"_class_name": "FlowMatchEulerDiscreteScheduler"`).
inline bool is_flow_match_scheduler_config(const nlohmann::json& json) {
  if (!json.is_object()) return false;
  const auto it = json.find("_class_name");
  return it != json.end() && it->is_string() &&
         it->get<std::string>() == "FlowMatchEulerDiscreteScheduler";
}

inline FlowMatchEulerDiscreteSchedulerConfig FlowMatchEulerDiscreteSchedulerConfig::from_json(
    const nlohmann::json& json) {
  constexpr std::string_view fn = "FlowMatchEulerDiscreteSchedulerConfig::from_json";
  require(json.is_object(), fn, "expected a JSON object, got ", json.type_name());
  const auto bad = [&](std::string_view key, const nlohmann::json& value,
                       std::string_view expected) {
    fail(fn, "key '", key, "' has value ", io::json_excerpt(value), ", expected ", expected);
  };
  const auto number = [&](std::string_view key, const nlohmann::json& value) {
    if (!value.is_number() || !std::isfinite(value.get<double>()))
      bad(key, value, "a finite number");
    return value.get<double>();
  };
  // Integers only (1000.0 is refused, as torch.linspace(steps=1000.0) would be); nlohmann stores
  // non-negative integers as unsigned.
  const auto integer = [&](std::string_view key, const nlohmann::json& value, std::int64_t lo,
                           std::int64_t hi) {
    std::int64_t v = lo - 1;
    if (value.is_number_unsigned()) {
      const auto u = value.get<std::uint64_t>();
      if (u <= static_cast<std::uint64_t>(hi)) v = static_cast<std::int64_t>(u);
    } else if (value.is_number_integer()) {
      v = value.get<std::int64_t>();
    }
    if (!value.is_number_integer() || v < lo || v > hi)
      bad(key, value, message("an integer in [", lo, ", ", hi, "]"));
    return v;
  };
  constexpr std::int64_t kMaxSeqLen = std::int64_t{1} << 40;
  FlowMatchEulerDiscreteSchedulerConfig config;
  for (const auto& [key, value] : json.items()) {
    if (key.starts_with('_')) continue;
    if (key == "num_train_timesteps") {
      config.num_train_timesteps = integer(key, value, 2, max_train_timesteps);
    } else if (key == "shift") {
      const double s = number(key, value);
      if (!(s > 0.0)) bad(key, value, "a positive number");
      config.shift = s;
    } else if (key == "use_dynamic_shifting") {
      if (!value.is_boolean()) bad(key, value, "true or false");
      config.use_dynamic_shifting = value.get<bool>();
    } else if (key == "base_shift") {
      config.base_shift = number(key, value);
    } else if (key == "max_shift") {
      config.max_shift = number(key, value);
    } else if (key == "base_image_seq_len") {
      config.base_image_seq_len = integer(key, value, 1, kMaxSeqLen);
    } else if (key == "max_image_seq_len") {
      config.max_image_seq_len = integer(key, value, 1, kMaxSeqLen);
    } else if (key == "shift_terminal") {
      if (value.is_null()) {
        config.shift_terminal.reset();
        continue;
      }
      const double s = value.is_number() ? value.get<double>() : -1.0;
      if (!(s >= 0.0 && s < 1.0)) bad(key, value, "null or a number in [0, 1)");
      config.shift_terminal = s;
    } else if (key == "time_shift_type") {
      if (!value.is_string()) bad(key, value, "exponential or linear");
      try {
        config.time_shift_type = parse_time_shift_type(value.get<std::string>());
      } catch (const Error& e) {
        fail(fn, e.what());
      }
    } else if (!(value.is_null() || (value.is_boolean() && !value.get<bool>()))) {
      const bool known =
          std::find(kFlowMatchUnsupportedKeys.begin(), kFlowMatchUnsupportedKeys.end(), key) !=
          kFlowMatchUnsupportedKeys.end();
      if (known) {
        fail(fn, "key '", key, "' has value ", io::json_excerpt(value),
             ", expected false or null (difftrain does not implement it)");
      }
      fail(fn, "unknown key '", key, "' with value ", io::json_excerpt(value),
           " (not a FlowMatchEulerDiscreteScheduler key; an unknown key is accepted only as null "
           "or false)");
    }
  }
  config.validate(fn);
  return config;
}

inline FlowMatchEulerDiscreteSchedulerConfig FlowMatchEulerDiscreteSchedulerConfig::from_file(
    const std::string& path) {
  constexpr std::string_view fn = "FlowMatchEulerDiscreteSchedulerConfig::from_file";
  const nlohmann::json json = io::read_json_file(fn, path);
  try {
    return from_json(json);
  } catch (const Error& e) {
    fail(fn, "'", path, "': ", e.what());
  }
}

/// diffusers' FlowMatchEulerDiscreteScheduler: the training sigmas, and the Euler sampler over
/// the inference sigmas set by set_timesteps. The model predicts the velocity v = eps − x0.
class FlowMatchEulerDiscreteScheduler {
 public:
  explicit FlowMatchEulerDiscreteScheduler(FlowMatchEulerDiscreteSchedulerConfig config = {})
      : config_(std::move(config)) {
    config_.validate("FlowMatchEulerDiscreteScheduler");
    const std::int64_t T = config_.num_train_timesteps;
    train_sigmas_.resize(static_cast<std::size_t>(T));
    train_timesteps_.resize(static_cast<std::size_t>(T));
    for (std::int64_t i = 0; i < T; ++i) {
      // timesteps = linspace(1, T, T)[::-1] = T − i; sigmas = timesteps / T, shifted unless
      // use_dynamic_shifting (then the pipeline shifts at inference, by resolution).
      double s = static_cast<double>(T - i) / static_cast<double>(T);
      if (!config_.use_dynamic_shifting) s = flow_shift(config_.shift, s);
      train_sigmas_[static_cast<std::size_t>(i)] = s;
      train_timesteps_[static_cast<std::size_t>(i)] = s * static_cast<double>(T);
    }
    // Before set_timesteps diffusers holds the training sigmas (without a final 0).
    sigmas_ = train_sigmas_;
    timesteps_ = train_timesteps_;
  }

  /// SD3 / SD3.5 / Z-Image: shift 3.
  static FlowMatchEulerDiscreteScheduler sd3() {
    FlowMatchEulerDiscreteSchedulerConfig config;
    config.shift = 3.0;
    return FlowMatchEulerDiscreteScheduler(std::move(config));
  }
  /// Flux.1-dev: shift 3, dynamic shifting 0.5 → 1.15 over 256 → 4096 tokens.
  static FlowMatchEulerDiscreteScheduler flux() {
    FlowMatchEulerDiscreteSchedulerConfig config;
    config.shift = 3.0;
    config.use_dynamic_shifting = true;
    return FlowMatchEulerDiscreteScheduler(std::move(config));
  }

  const FlowMatchEulerDiscreteSchedulerConfig& config() const { return config_; }
  std::int64_t num_train_timesteps() const { return config_.num_train_timesteps; }
  /// The model is trained to predict the flow's velocity eps − x0 (no diffusers prediction_type).
  double init_noise_sigma() const { return 1.0; }

  /// Training times are sigmas σ ∈ (0, 1] (TrainingSchedule; FlowMatchTimesteps draws them).
  using time_type = double;
  TrainingCoefficients training_coefficients(double sigma) const {
    return flow_match_coefficients(sigma, config_.num_train_timesteps);
  }

  /// The T training sigmas, descending from σ_max = 1: σ_i = shift((T − i)/T).
  std::span<const double> train_sigmas() const { return train_sigmas_; }
  /// σ_i·T, the timesteps the model sees for train_sigmas().
  std::span<const double> train_timesteps() const { return train_timesteps_; }
  double sigma_max() const { return train_sigmas_.front(); }
  double sigma_min() const { return train_sigmas_.back(); }

  /// mu for an image of image_seq_len tokens from this config's base/max shift and seq len.
  double calculate_shift(double image_seq_len) const {
    return difftrain::calculate_shift(
        image_seq_len, static_cast<double>(config_.base_image_seq_len),
        static_cast<double>(config_.max_image_seq_len), config_.base_shift, config_.max_shift);
  }
  /// time_shift with this config's time_shift_type.
  double time_shift(double mu, double sigma, double t) const {
    return difftrain::time_shift(config_.time_shift_type, mu, sigma, t);
  }

  /// n inference steps: s_k = linspace(σ_max, σ_min, n) (via timesteps σ·T, as diffusers), then
  /// shifted — time_shift(mu, 1, s) with use_dynamic_shifting (mu required), otherwise
  /// flow_shift(shift, s) (applied on top of the training sigmas' shift, as diffusers does) —
  /// stretched so the last is shift_terminal if set, and a final σ = 0 appended.
  void set_timesteps(std::int64_t num_inference_steps, std::optional<double> mu = std::nullopt) {
    constexpr const char* fn = "FlowMatchEulerDiscreteScheduler::set_timesteps";
    require(num_inference_steps >= 1 && num_inference_steps <= config_.num_train_timesteps, fn,
            "num_inference_steps is ", num_inference_steps, ", expected 1 to ",
            config_.num_train_timesteps);
    const std::size_t n = static_cast<std::size_t>(num_inference_steps);
    const double T = static_cast<double>(config_.num_train_timesteps);
    const double hi = sigma_max() * T, lo = sigma_min() * T;
    std::vector<double> s(n);
    // np.linspace(hi, lo, n): hi + k·step, the last exactly lo.
    const double step = n == 1 ? 0.0 : (lo - hi) / static_cast<double>(n - 1);
    for (std::size_t k = 0; k < n; ++k)
      s[k] = (k + 1 == n && n > 1 ? lo : hi + static_cast<double>(k) * step) / T;
    apply_shifts(fn, s, mu);
  }

  /// Custom sigmas (diffusers' set_timesteps(sigmas=...), e.g. the Flux pipeline's
  /// linspace(1, 1/n, n)): each in (0, 1], shifted and stretched as by set_timesteps(n, mu).
  void set_timesteps(std::span<const double> sigmas, std::optional<double> mu = std::nullopt) {
    constexpr const char* fn = "FlowMatchEulerDiscreteScheduler::set_timesteps";
    require(!sigmas.empty(), fn, "sigmas is empty, expected at least one value");
    for (std::size_t k = 0; k < sigmas.size(); ++k) {
      require(sigmas[k] > 0.0 && sigmas[k] <= 1.0, fn, "sigmas[", k, "] is ", sigmas[k],
              ", expected a value in (0, 1]");
    }
    apply_shifts(fn, std::vector<double>(sigmas.begin(), sigmas.end()), mu);
  }

  std::int64_t num_inference_steps() const { return num_inference_steps_; }
  /// The inference sigmas followed by the final 0: n + 1 values.
  std::span<const double> sigmas() const { return sigmas_; }
  /// σ_k·T for the n inference steps (what the model sees; fractional).
  std::span<const double> timesteps() const { return timesteps_; }

  /// Euler step k (0 ≤ k < n), in place: x ← x + (σ_{k+1} − σ_k)·v, v the model's velocity.
  void step(const Tensor4<float>& model_output, std::int64_t step_index,
            Tensor4<float>& sample) const {
    constexpr const char* fn = "FlowMatchEulerDiscreteScheduler::step";
    check_same_shape(fn, "model_output", model_output.shape(), sample.shape());
    require(num_inference_steps_ > 0, fn, "set_timesteps was not called");
    require(step_index >= 0 && step_index < num_inference_steps_, fn, "step_index is ", step_index,
            ", expected 0 to ", num_inference_steps_ - 1);
    const auto k = static_cast<std::size_t>(step_index);
    const double dt = sigmas_[k + 1] - sigmas_[k];
    const float* v = model_output.data();
    float* x = sample.data();
    const auto size = static_cast<std::ptrdiff_t>(sample.size());
#pragma omp parallel for schedule(static) if (parallel::exceeds(size, parallel::kElementwiseSize))
    for (std::ptrdiff_t i = 0; i < size; ++i)
      x[i] = static_cast<float>(static_cast<double>(x[i]) + dt * static_cast<double>(v[i]));
  }

 private:
  void apply_shifts(std::string_view fn, std::vector<double> s, std::optional<double> mu) {
    if (config_.use_dynamic_shifting) {
      require(mu.has_value(), fn, "mu is required with use_dynamic_shifting (see calculate_shift)");
      for (double& v : s) v = time_shift(*mu, 1.0, v);
    } else {
      for (double& v : s) v = flow_shift(config_.shift, v);
    }
    // diffusers: `if self.config.shift_terminal:` — 0 means none.
    if (config_.shift_terminal && *config_.shift_terminal != 0.0) {
      // stretch_shift_to_terminal: 1 − (1 − s)·(1 − shift_terminal)/(1 − s_last).
      const double scale = (1.0 - s.back()) / (1.0 - *config_.shift_terminal);
      require(scale > 0.0, fn, "the last sigma is 1, which shift_terminal cannot stretch");
      for (double& v : s) v = 1.0 - (1.0 - v) / scale;
    }
    const double T = static_cast<double>(config_.num_train_timesteps);
    timesteps_.resize(s.size());
    for (std::size_t k = 0; k < s.size(); ++k) timesteps_[k] = s[k] * T;
    s.push_back(0.0);
    sigmas_ = std::move(s);
    num_inference_steps_ = static_cast<std::int64_t>(timesteps_.size());
  }

  FlowMatchEulerDiscreteSchedulerConfig config_;
  std::vector<double> train_sigmas_, train_timesteps_;
  std::vector<double> sigmas_, timesteps_;
  std::int64_t num_inference_steps_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Training-time densities
// ---------------------------------------------------------------------------------------------

/// A uniform number on (0, 1) from element i of the stream: (k + ½)·2^-32 for its 32-bit word k.
inline double uniform_open(RandomStream rs, std::uint64_t index) {
  return (static_cast<double>(random_bits(rs, index)) + 0.5) * 0x1p-32;
}

/// diffusers' compute_density_for_timestep_sampling: u[b] ∈ (0, 1) for sample b —
/// logit_normal sigmoid(N(logit_mean, logit_std²)), mode mode_transform(U, mode_scale), any other
/// scheme U(0, 1). Element b of the stream (a normal for logit_normal, the uniform otherwise).
inline void compute_density_for_timestep_sampling(FlowWeightingScheme weighting_scheme,
                                                  std::span<double> u, RandomStream rs,
                                                  double logit_mean = 0.0, double logit_std = 1.0,
                                                  double mode_scale = 1.29) {
  constexpr const char* fn = "compute_density_for_timestep_sampling";
  if (weighting_scheme == FlowWeightingScheme::logit_normal) {
    require(std::isfinite(logit_mean), fn, "--logit_mean is ", logit_mean,
            ", expected a finite number");
    require(std::isfinite(logit_std) && logit_std > 0.0, fn, "--logit_std is ", logit_std,
            ", expected a positive number");
    std::vector<float> normal(u.size());
    fill_normal(std::span<float>(normal), rs);
    for (std::size_t b = 0; b < u.size(); ++b)
      u[b] = flow_detail::sigmoid(logit_mean + logit_std * static_cast<double>(normal[b]));
  } else if (weighting_scheme == FlowWeightingScheme::mode) {
    require(mode_scale >= -1.0 && mode_scale <= kMaxModeScale, fn, "--mode_scale is ", mode_scale,
            ", expected a value in [-1, 2/(pi - 2) = ", kMaxModeScale,
            "] (where the mode density is monotone)");
    for (std::size_t b = 0; b < u.size(); ++b)
      u[b] = mode_transform(uniform_open(rs, b), mode_scale);
  } else {
    for (std::size_t b = 0; b < u.size(); ++b) u[b] = uniform_open(rs, b);
  }
}

/// kohya's `--timestep_sampling` (sigma, uniform, sigmoid, shift, flux_shift) and OneTrainer's
/// timestep distributions inverted_parabola and heavy_tail.
enum class FlowTimestepSampling : std::uint8_t {
  sigma,              // kohya's default: diffusers' density by --weighting_scheme, index map
  uniform,            // σ ~ U(0, 1)
  sigmoid,            // σ = sigmoid(sigmoid_scale·n), n ~ N(0, 1)
  shift,              // flow_shift(discrete_flow_shift, sigmoid(sigmoid_scale·n))
  flux_shift,         // time_shift(mu(h, w), 1, sigmoid(sigmoid_scale·n))
  inverted_parabola,  // OneTrainer, discrete
  heavy_tail,         // OneTrainer, mode_transform with noising_weight
};

inline constexpr std::array<Choice<FlowTimestepSampling>, 7> kFlowTimestepSamplings{{
    {"sigma", FlowTimestepSampling::sigma},
    {"uniform", FlowTimestepSampling::uniform},
    {"sigmoid", FlowTimestepSampling::sigmoid},
    {"shift", FlowTimestepSampling::shift},
    {"flux_shift", FlowTimestepSampling::flux_shift},
    {"inverted_parabola", FlowTimestepSampling::inverted_parabola},
    {"heavy_tail", FlowTimestepSampling::heavy_tail},
}};

inline FlowTimestepSampling parse_flow_timestep_sampling(std::string_view name) {
  return parse_choice("timestep_sampling", name, kFlowTimestepSamplings);
}
inline std::string_view to_string(FlowTimestepSampling sampling) {
  return choice_name(sampling, kFlowTimestepSamplings);
}

/// The options of the training σ density, under kohya's / diffusers' flag names (OneTrainer's
/// config names for its two distributions). Defaults are kohya's.
struct FlowMatchTimestepOptions {
  FlowTimestepSampling timestep_sampling = FlowTimestepSampling::sigma;  // --timestep_sampling
  FlowWeightingScheme weighting_scheme = FlowWeightingScheme::none;      // --weighting_scheme
  double logit_mean = 0.0;           // --logit_mean (logit_normal)
  double logit_std = 1.0;            // --logit_std (logit_normal)
  double mode_scale = 1.29;          // --mode_scale (mode)
  double sigmoid_scale = 1.0;        // --sigmoid_scale (sigmoid, shift, flux_shift)
  double discrete_flow_shift = 3.0;  // --discrete_flow_shift (shift)
  // OneTrainer (inverted_parabola, heavy_tail): its timestep t ∈ [⌊T·min⌋, ⌊T·max⌋) before the
  // shift, σ = (t + 1)/T.
  double noising_weight = 0.0;
  double noising_bias = 0.0;
  double timestep_shift = 1.0;
  double min_noising_strength = 0.0;
  double max_noising_strength = 1.0;
};

/// The σ of each training sample. For `sigma` the sigmas are the scheduler's training sigmas
/// (kohya builds its scheduler with shift = --discrete_flow_shift; diffusers' scripts use the
/// model's scheduler_config.json): σ = train_sigmas[min(⌊u·T⌋, T − 1)] (the min only matters
/// where u rounds to 1, logit_mean + logit_std·n > 36, where diffusers would index out of range).
class FlowMatchTimesteps {
 public:
  FlowMatchTimesteps(const FlowMatchEulerDiscreteScheduler& scheduler,
                     FlowMatchTimestepOptions options)
      : options_(options),
        train_sigmas_(scheduler.train_sigmas().begin(), scheduler.train_sigmas().end()),
        T_(scheduler.num_train_timesteps()) {
    constexpr const char* fn = "FlowMatchTimesteps";
    const auto positive = [&](const char* flag, double v) {
      require(std::isfinite(v) && v > 0.0, fn, flag, " is ", v, ", expected a positive number");
    };
    const auto finite = [&](const char* flag, double v) {
      require(std::isfinite(v), fn, flag, " is ", v, ", expected a finite number");
    };
    switch (options_.timestep_sampling) {
      case FlowTimestepSampling::sigma:
        if (options_.weighting_scheme == FlowWeightingScheme::logit_normal) {
          finite("--logit_mean", options_.logit_mean);
          positive("--logit_std", options_.logit_std);
        } else if (options_.weighting_scheme == FlowWeightingScheme::mode) {
          require(options_.mode_scale >= -1.0 && options_.mode_scale <= kMaxModeScale, fn,
                  "--mode_scale is ", options_.mode_scale, ", expected a value in [-1, ",
                  kMaxModeScale, "] (where the mode density is monotone)");
        }
        break;
      case FlowTimestepSampling::uniform:
        break;
      case FlowTimestepSampling::shift:
        positive("--discrete_flow_shift", options_.discrete_flow_shift);
        [[fallthrough]];
      case FlowTimestepSampling::sigmoid:
      case FlowTimestepSampling::flux_shift:
        positive("--sigmoid_scale", options_.sigmoid_scale);
        break;
      case FlowTimestepSampling::inverted_parabola:
      case FlowTimestepSampling::heavy_tail: {
        finite("noising_weight", options_.noising_weight);
        finite("noising_bias", options_.noising_bias);
        positive("timestep_shift", options_.timestep_shift);
        const double lo = options_.min_noising_strength, hi = options_.max_noising_strength;
        require(lo >= 0.0 && lo < hi && hi <= 1.0, fn, "min_noising_strength is ", lo,
                " and max_noising_strength is ", hi, ", expected 0 <= min < max <= 1");
        // int(T·strength) in OneTrainer.
        min_timestep_ = static_cast<std::int64_t>(static_cast<double>(T_) * lo);
        max_timestep_ = static_cast<std::int64_t>(static_cast<double>(T_) * hi);
        require(max_timestep_ > min_timestep_, fn, "the noising strengths [", lo, ", ", hi,
                "] hold no timestep of ", T_);
        if (options_.timestep_sampling == FlowTimestepSampling::heavy_tail) {
          require(options_.noising_weight >= -1.0 && options_.noising_weight <= kMaxModeScale, fn,
                  "noising_weight is ", options_.noising_weight, ", expected a value in [-1, ",
                  kMaxModeScale, "] for heavy_tail (where its density is monotone)");
        } else {
          make_parabola_weights(fn);
        }
        break;
      }
    }
  }

  const FlowMatchTimestepOptions& options() const { return options_; }
  std::int64_t num_train_timesteps() const { return T_; }

  /// inverted_parabola's P(t = min_timestep + k), k = 0 .. max − min − 1 (empty otherwise).
  std::span<const double> probabilities() const { return probabilities_; }
  /// OneTrainer's timestep range [⌊T·min_noising_strength⌋, ⌊T·max_noising_strength⌋).
  std::int64_t min_timestep() const { return min_timestep_; }
  std::int64_t max_timestep() const { return max_timestep_; }

  /// mu of kohya's flux_shift for latents of height h and width w: calculate_shift of
  /// (h/2)·(w/2) tokens with Flux's 256 → 0.5, 4096 → 1.15.
  static double flux_shift_mu(std::int64_t latent_height, std::int64_t latent_width) {
    require(latent_height > 0 && latent_width > 0, "FlowMatchTimesteps::flux_shift_mu",
            "latent size is ", latent_height, "x", latent_width,
            ", expected positive sizes (flux_shift needs the latent height and width)");
    return calculate_shift(static_cast<double>((latent_height / 2) * (latent_width / 2)));
  }

  /// σ_b for each sample b, from element b of `rs` (so sample b's σ does not depend on the batch
  /// size). The latent height and width are needed by flux_shift only.
  void sample(std::span<double> sigmas, RandomStream rs, std::int64_t latent_height = 0,
              std::int64_t latent_width = 0) const {
    const std::size_t B = sigmas.size();
    const auto sigmoid_of_normal = [&] {
      std::vector<float> normal(B);
      fill_normal(std::span<float>(normal), rs);
      for (std::size_t b = 0; b < B; ++b)
        sigmas[b] = flow_detail::sigmoid(options_.sigmoid_scale * static_cast<double>(normal[b]));
    };
    switch (options_.timestep_sampling) {
      case FlowTimestepSampling::sigma: {
        compute_density_for_timestep_sampling(options_.weighting_scheme, sigmas, rs,
                                              options_.logit_mean, options_.logit_std,
                                              options_.mode_scale);
        for (double& s : sigmas) {
          const auto index =
              std::min(static_cast<std::int64_t>(s * static_cast<double>(T_)), T_ - 1);  // .long()
          s = train_sigmas_[static_cast<std::size_t>(index)];
        }
        break;
      }
      case FlowTimestepSampling::uniform:
        for (std::size_t b = 0; b < B; ++b) sigmas[b] = uniform_open(rs, b);
        break;
      case FlowTimestepSampling::sigmoid:
        sigmoid_of_normal();
        break;
      case FlowTimestepSampling::shift:
        sigmoid_of_normal();
        for (double& s : sigmas) s = flow_shift(options_.discrete_flow_shift, s);
        break;
      case FlowTimestepSampling::flux_shift: {
        const double mu = flux_shift_mu(latent_height, latent_width);
        sigmoid_of_normal();
        for (double& s : sigmas) s = difftrain::time_shift(TimeShiftType::exponential, mu, 1.0, s);
        break;
      }
      case FlowTimestepSampling::inverted_parabola:
        for (std::size_t b = 0; b < B; ++b) {
          const double u = uniform_double(rs, b);
          const auto it = std::upper_bound(cumulative_.begin(), cumulative_.end(), u);
          const auto k = std::min<std::int64_t>(it - cumulative_.begin(),
                                                static_cast<std::int64_t>(cumulative_.size()) - 1);
          sigmas[b] = one_trainer_sigma(min_timestep_ + k);
        }
        break;
      case FlowTimestepSampling::heavy_tail: {
        const double M = static_cast<double>(max_timestep_ - min_timestep_);
        const double T = static_cast<double>(T_), shift = options_.timestep_shift;
        for (std::size_t b = 0; b < B; ++b) {
          double t = mode_transform(uniform_open(rs, b), options_.noising_weight) * M +
                     static_cast<double>(min_timestep_);
          t = T * shift * t / ((shift - 1.0) * t + T);
          sigmas[b] = one_trainer_sigma(static_cast<std::int64_t>(t));  // .int(): truncation
        }
        break;
      }
    }
  }

 private:
  // OneTrainer's flow σ of integer timestep t: (t + 1)/T (t clamped to [0, T − 1] against
  // rounding at the ends).
  double one_trainer_sigma(std::int64_t t) const {
    t = std::clamp<std::int64_t>(t, 0, T_ - 1);
    return static_cast<double>(t + 1) / static_cast<double>(T_);
  }

  // OneTrainer: x_k = linspace(0, 1, M)[k]; the inverse shift x/(s − s·x + x) moves the points,
  // its derivative s/(s + x − s·x)² sizes their buckets; w_k = max(0, 2 − weight·(x'_k − bias −
  // ½)²)·derivative.
  void make_parabola_weights(std::string_view fn) {
    const auto M = static_cast<std::size_t>(max_timestep_ - min_timestep_);
    const double s = options_.timestep_shift;
    const double bias = options_.noising_bias + 0.5, weight = options_.noising_weight;
    probabilities_.resize(M);
    double total = 0;
    for (std::size_t k = 0; k < M; ++k) {
      const double x = M == 1 ? 0.0 : static_cast<double>(k) / static_cast<double>(M - 1);
      const double shifted = x / (s - s * x + x);
      const double derivative = s / ((s + x - x * s) * (s + x - x * s));
      const double d = shifted - bias;
      probabilities_[k] = std::max(0.0, -weight * d * d + 2.0) * derivative;
      total += probabilities_[k];
    }
    require(total > 0.0 && std::isfinite(total), fn, "inverted_parabola with noising_weight ",
            weight, " and noising_bias ", options_.noising_bias,
            " gives every timestep weight 0, expected some positive weight");
    cumulative_.resize(M);
    double c = 0;
    for (std::size_t k = 0; k < M; ++k) {
      probabilities_[k] /= total;
      cumulative_[k] = (c += probabilities_[k]);
    }
  }

  FlowMatchTimestepOptions options_;
  std::vector<double> train_sigmas_;
  std::int64_t T_ = 1000;
  std::int64_t min_timestep_ = 0, max_timestep_ = 0;
  std::vector<double> probabilities_, cumulative_;
};

}  // namespace difftrain
