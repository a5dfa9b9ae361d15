#pragma once
// The per-timestep c of the huber / smooth_l1 losses (kohya --huber_schedule, diffusers'
// scheduled-Huber research script).

#include <cmath>
#include <cstdint>
#include <string_view>

#include "difftrain/concepts.hpp"
#include "difftrain/core/choice.hpp"
#include "difftrain/core/error.hpp"

namespace difftrain::loss {

enum class HuberSchedule : std::uint8_t { constant, exponential, snr };

/// kohya's names.
inline constexpr std::array<Choice<HuberSchedule>, 3> kHuberSchedules{{
    {"constant", HuberSchedule::constant},
    {"exponential", HuberSchedule::exponential},
    {"snr", HuberSchedule::snr},
}};

inline HuberSchedule parse_huber_schedule(std::string_view name) {
  return parse_choice("huber_schedule", name, kHuberSchedules);
}

struct HuberOptions {
  HuberSchedule schedule = HuberSchedule::snr;  // kohya's default
  double huber_c = 0.1;
  double huber_scale = 1.0;

  void validate() const {
    require(std::isfinite(huber_c) && huber_c > 0 && huber_c <= 1, "HuberOptions", "huber_c is ",
            huber_c, ", expected a value in (0, 1]");
    require(std::isfinite(huber_scale) && huber_scale > 0, "HuberOptions", "huber_scale is ",
            huber_scale, ", expected > 0");
  }
};

/// c_t: constant c·scale; exponential exp(−α·τ)·scale with α = −ln(c)/T and τ the model timestep
/// (t for DDPM, σ·T for flow matching, as kohya passes it); snr (1−c)/(1+σ_t)² + c with
/// σ_t = s/a, the noise-to-signal ratio of x_t = a·x0 + s·eps (√((1−ᾱ_t)/ᾱ_t) for DDPM; kohya
/// ignores the scale there, and so do we; for flow matching, where kohya has no snr schedule, it
/// is σ/(1 − σ)). At a = 0 (zero terminal SNR, σ = 1) σ_t = ∞ and c_t = c.
inline double huber_c(const HuberOptions& options, std::int64_t num_train_timesteps,
                      const TrainingCoefficients& c) {
  switch (options.schedule) {
    case HuberSchedule::constant:
      return options.huber_c * options.huber_scale;
    case HuberSchedule::exponential: {
      const double alpha = -std::log(options.huber_c) / static_cast<double>(num_train_timesteps);
      return std::exp(-alpha * c.model_timestep) * options.huber_scale;
    }
    case HuberSchedule::snr: {
      if (c.x0_coef == 0) return options.huber_c;
      const double sigma = c.eps_coef / c.x0_coef;
      return (1 - options.huber_c) / ((1 + sigma) * (1 + sigma)) + options.huber_c;
    }
  }
  return options.huber_c;
}

/// The same at training time `time` of a schedule.
template <TrainingSchedule S>
double huber_c(const HuberOptions& options, const S& scheduler, typename S::time_type time) {
  return huber_c(options, scheduler.num_train_timesteps(), scheduler.training_coefficients(time));
}

}  // namespace difftrain::loss
