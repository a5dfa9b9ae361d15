#pragma once
// SamplingConfig: a diffusers `scheduler_config.json` with the keys that steer sampling (the
// inference side), and the timestep grid diffusers' DDIM and Euler schedulers derive from it.
//
// Timestep grids for T training steps and n inference steps (diffusers' set_timesteps):
//   leading:  t_i = i·(T div n) + steps_offset,            i = n−1 … 0
//   trailing: t_i = round(T − i·T/n) − 1,                   i = 0 … n−1   (np.arange, np.round)
//   linspace: t_i = (T − 1)·i/(n − 1),                      i = n−1 … 0   (np.linspace)
// np.round rounds halves to even; steps_offset applies to `leading` only, as in diffusers.

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "difftrain/core/choice.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/io/json_file.hpp"
#include "difftrain/schedule/ddpm_scheduler.hpp"
#include "difftrain/schedule/flow_match.hpp"

namespace difftrain {

/// How inference timesteps are spread over [0, T) (diffusers' `timestep_spacing`).
enum class TimestepSpacing { leading, trailing, linspace };

/// diffusers' names.
inline constexpr std::array<Choice<TimestepSpacing>, 3> kTimestepSpacings{{
    {"leading", TimestepSpacing::leading},
    {"trailing", TimestepSpacing::trailing},
    {"linspace", TimestepSpacing::linspace},
}};

inline std::string_view to_string(TimestepSpacing spacing) {
  return choice_name(spacing, kTimestepSpacings);
}

/// Parses diffusers' names: "leading", "trailing", "linspace".
inline TimestepSpacing parse_timestep_spacing(std::string_view name) {
  return parse_choice("timestep_spacing", name, kTimestepSpacings);
}

/// A diffusers scheduler config, inference keys included. Defaults: diffusers' DDIM/Euler ones
/// except clip_sample (false here, true in DDIMScheduler's constructor; SD checkpoints set false).
struct SamplingConfig {
  DdpmSchedulerConfig train;  // betas, T, prediction_type, rescale_betas_zero_snr
  // Unset (no key in the file): the scheduler's own default, as diffusers' constructors have it:
  // DDIM leading, Euler linspace.
  std::optional<TimestepSpacing> timestep_spacing;
  std::int64_t steps_offset = 0;
  bool set_alpha_to_one = true;  // DDIM: ᾱ after the last step is 1 (else ᾱ_0)
  bool clip_sample = false;      // DDIM: clamp the predicted x0 to ±clip_sample_range
  double clip_sample_range = 1.0;
  // Set for a FlowMatchEulerDiscreteScheduler config: the model is trained and sampled with flow
  // matching (`train` then only carries its num_train_timesteps).
  std::optional<FlowMatchEulerDiscreteSchedulerConfig> flow;

  /// Reads a parsed `scheduler_config.json`: a FlowMatchEulerDiscreteScheduler's (`_class_name`)
  /// into `flow`; otherwise timestep_spacing, steps_offset, set_alpha_to_one, clip_sample and
  /// clip_sample_range here, every other key as DdpmSchedulerConfig::from_json does (other
  /// sampler-specific keys such as use_karras_sigmas are accepted and ignored).
  /// Throws Error naming the key, its value and what was expected.
  static SamplingConfig from_json(const nlohmann::json& json);

  /// from_json of the file at `path`; throws Error naming the path if it is missing or invalid.
  static SamplingConfig from_file(const std::string& path);
};

inline SamplingConfig SamplingConfig::from_json(const nlohmann::json& json) {
  constexpr std::string_view fn = "SamplingConfig::from_json";
  require(json.is_object(), fn, "expected a JSON object, got ", json.type_name());
  SamplingConfig config;
  if (is_flow_match_scheduler_config(json)) {
    config.flow = FlowMatchEulerDiscreteSchedulerConfig::from_json(json);
    config.train.num_train_timesteps = config.flow->num_train_timesteps;
    return config;
  }
  const auto bad = [&](std::string_view key, const nlohmann::json& value,
                       std::string_view expected) {
    fail(fn, "key '", key, "' has value ", io::json_excerpt(value), ", expected ", expected);
  };
  if (const auto it = json.find("timestep_spacing"); it != json.end()) {
    if (!it->is_string()) bad("timestep_spacing", *it, "one of leading, trailing, linspace");
    try {
      config.timestep_spacing = parse_timestep_spacing(it->get<std::string>());
    } catch (const Error& e) {
      fail(fn, e.what());
    }
  }
  if (const auto it = json.find("steps_offset"); it != json.end()) {
    if (!it->is_number_integer() || it->get<std::int64_t>() < 0)
      bad("steps_offset", *it, "a non-negative integer");
    config.steps_offset = it->get<std::int64_t>();
  }
  if (const auto it = json.find("set_alpha_to_one"); it != json.end()) {
    if (!it->is_boolean()) bad("set_alpha_to_one", *it, "true or false");
    config.set_alpha_to_one = it->get<bool>();
  }
  if (const auto it = json.find("clip_sample"); it != json.end()) {
    if (!it->is_boolean()) bad("clip_sample", *it, "true or false");
    config.clip_sample = it->get<bool>();
  }
  if (const auto it = json.find("clip_sample_range"); it != json.end()) {
    if (!it->is_number() || !(it->get<double>() > 0.0) || !std::isfinite(it->get<double>()))
      bad("clip_sample_range", *it, "a positive number");
    config.clip_sample_range = it->get<double>();
  }
  config.train = DdpmSchedulerConfig::from_json(json);
  return config;
}

inline SamplingConfig SamplingConfig::from_file(const std::string& path) {
  constexpr std::string_view fn = "SamplingConfig::from_file";
  const nlohmann::json json = io::read_json_file(fn, path);
  try {
    return from_json(json);
  } catch (const Error& e) {
    fail(fn, "'", path, "': ", e.what());
  }
}

namespace detail {

/// A DDPM sampler (DDIM, Euler) cannot sample a flow-matching model: refuse its config.
inline void require_ddpm_config(std::string_view sampler, const SamplingConfig& config) {
  require(!config.flow, sampler, "the scheduler config is a FlowMatchEulerDiscreteScheduler's: ",
          "the model predicts a flow velocity, sample it with FlowMatchEulerDiscreteScheduler "
          "(--sampler flow_euler)");
}

/// The inference timesteps of `config` for n steps, descending, before diffusers' final
/// rounding for `linspace` (DDIM rounds it, Euler keeps it fractional); leading and trailing are
/// integers already. Throws unless 1 <= n <= T and every timestep lies in [0, T).
inline std::vector<double> inference_timesteps(std::string_view fn, const SamplingConfig& config,
                                               std::int64_t num_inference_steps) {
  const std::int64_t T = config.train.num_train_timesteps;
  const std::int64_t n = num_inference_steps;
  require(n >= 1 && n <= T, fn, "num_inference_steps is ", n, ", expected 1 to ",
          "num_train_timesteps = ", T);
  std::vector<double> t(static_cast<std::size_t>(n));
  require(config.timestep_spacing.has_value(), fn, "timestep_spacing is unset");
  const TimestepSpacing spacing = *config.timestep_spacing;
  switch (spacing) {
    case TimestepSpacing::leading: {
      const std::int64_t step_ratio = T / n;
      for (std::int64_t i = 0; i < n; ++i)
        t[static_cast<std::size_t>(n - 1 - i)] =
            static_cast<double>(i * step_ratio + config.steps_offset);
      break;
    }
    case TimestepSpacing::trailing: {
      // np.arange(T, 0, -T/n): start + i·delta with delta = (start + step) − start.
      const double start = static_cast<double>(T);
      const double delta = (start - start / static_cast<double>(n)) - start;
      const auto count =
          static_cast<std::int64_t>(std::ceil(start / (start / static_cast<double>(n))));
      require(count == n, fn, "trailing spacing gives ", count, " timesteps for ", n,
              " steps (floating-point edge case)");
      for (std::int64_t i = 0; i < n; ++i)
        t[static_cast<std::size_t>(i)] = std::nearbyint(start + static_cast<double>(i) * delta) - 1;
      break;
    }
    case TimestepSpacing::linspace: {
      // np.linspace(0, T − 1, n): i·step, the last one exactly T − 1.
      const double stop = static_cast<double>(T - 1);
      const double step = n > 1 ? stop / static_cast<double>(n - 1) : 0.0;
      for (std::int64_t i = 0; i < n; ++i)
        t[static_cast<std::size_t>(n - 1 - i)] = static_cast<double>(i) * step;
      if (n > 1) t[0] = stop;
      break;
    }
  }
  for (double v : t) {
    require(v >= 0.0 && v <= static_cast<double>(T - 1), fn, "timestep ", v, " (",
            to_string(spacing), " spacing, steps_offset ", config.steps_offset,
            ") is out of range [0, ", T, ")");
  }
  return t;
}

}  // namespace detail

}  // namespace difftrain
