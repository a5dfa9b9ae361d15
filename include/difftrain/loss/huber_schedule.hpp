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

/// c_t: constant c·scale; exponential exp(−α t)·scale with α = −ln(c)/T; snr (1−c)/(1+σ_t)² + c
/// with σ_t = √((1−ᾱ_t)/ᾱ_t) (kohya ignores the scale there, and so do we). At ᾱ_t = 0 (zero
/// terminal SNR) σ_t = ∞ and c_t = c.
template <Scheduler S>
double huber_c(const HuberOptions& options, const S& scheduler, std::int64_t t) {
  switch (options.schedule) {
    case HuberSchedule::constant:
      return options.huber_c * options.huber_scale;
    case HuberSchedule::exponential: {
      const double alpha =
          -std::log(options.huber_c) / static_cast<double>(scheduler.num_train_timesteps());
      return std::exp(-alpha * static_cast<double>(t)) * options.huber_scale;
    }
    case HuberSchedule::snr: {
      const double a = scheduler.sqrt_alpha_prod(t);
      if (a == 0) return options.huber_c;
      const double sigma = scheduler.sqrt_one_minus_alpha_prod(t) / a;
      return (1 - options.huber_c) / ((1 + sigma) * (1 + sigma)) + options.huber_c;
    }
  }
  return options.huber_c;
}

}  // namespace difftrain::loss
