#pragma once
// Timestep samplers (TimestepSampler concept): integer t ∈ [0, T) per sample, drawn from a random
// stream so that a step's timesteps depend only on (seed, step).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "difftrain/core/choice.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/random.hpp"

namespace difftrain {

/// Uniform integers in [min_timestep, max_timestep) (diffusers: [0, T); kohya --min_timestep,
/// --max_timestep). kohya gives every sample max_timestep when min ≥ max; we reject that range.
struct UniformTimesteps {
  std::int64_t min_timestep = 0;
  std::int64_t max_timestep = 1000;

  UniformTimesteps(std::int64_t num_train_timesteps, std::int64_t min_t, std::int64_t max_t)
      : min_timestep(min_t), max_timestep(max_t) {
    require(0 <= min_t && min_t < max_t && max_t <= num_train_timesteps, "UniformTimesteps",
            "range [", min_t, ", ", max_t, ") is not inside [0, ", num_train_timesteps,
            ") or is empty");
  }
  explicit UniformTimesteps(std::int64_t num_train_timesteps = 1000)
      : UniformTimesteps(num_train_timesteps, 0, num_train_timesteps) {}

  void sample(std::span<std::int64_t> out, RandomStream rs) const {
    for (std::size_t b = 0; b < out.size(); ++b)
      out[b] = uniform_int(rs, b, min_timestep, max_timestep);
  }
};

enum class TimestepBiasStrategy : std::uint8_t { none, earlier, later, range };

/// diffusers' names.
inline constexpr std::array<Choice<TimestepBiasStrategy>, 4> kTimestepBiasStrategies{{
    {"none", TimestepBiasStrategy::none},
    {"earlier", TimestepBiasStrategy::earlier},
    {"later", TimestepBiasStrategy::later},
    {"range", TimestepBiasStrategy::range},
}};

inline TimestepBiasStrategy parse_timestep_bias_strategy(std::string_view name) {
  return parse_choice("timestep_bias_strategy", name, kTimestepBiasStrategies);
}

struct TimestepBiasOptions {
  TimestepBiasStrategy strategy = TimestepBiasStrategy::none;
  double multiplier = 1.0;  // diffusers --timestep_bias_multiplier
  double portion = 0.25;    // --timestep_bias_portion (earlier / later)
  std::int64_t begin = 0;   // --timestep_bias_begin (range)
  std::int64_t end = 1000;  // --timestep_bias_end (range, exclusive)
};

/// diffusers' timestep bias (train_text_to_image_sdxl.py): w = 1 for every t; the biased slice —
/// the first n = ⌊portion·T⌋ (earlier), the last n (later) or [begin, end) (range) — is
/// multiplied by `multiplier`; t is drawn with probability w_t / Σw (inverse CDF of a uniform).
class BiasedTimesteps {
 public:
  BiasedTimesteps(std::int64_t num_train_timesteps, const TimestepBiasOptions& options)
      : weights_(static_cast<std::size_t>(std::max<std::int64_t>(num_train_timesteps, 0)), 1.0) {
    constexpr const char* fn = "BiasedTimesteps";
    const std::int64_t T = num_train_timesteps;
    require(T > 0, fn, "num_train_timesteps is ", T, ", expected > 0");
    require(std::isfinite(options.multiplier) && options.multiplier > 0, fn, "multiplier is ",
            options.multiplier, ", expected > 0");
    std::int64_t lo = 0, hi = 0;
    switch (options.strategy) {
      case TimestepBiasStrategy::none:
        break;
      case TimestepBiasStrategy::earlier:
      case TimestepBiasStrategy::later: {
        require(options.portion > 0 && options.portion <= 1, fn, "portion is ", options.portion,
                ", expected a value in (0, 1]");
        const auto n = static_cast<std::int64_t>(options.portion * static_cast<double>(T));
        lo = options.strategy == TimestepBiasStrategy::earlier ? 0 : T - n;
        hi = options.strategy == TimestepBiasStrategy::earlier ? n : T;
        break;
      }
      case TimestepBiasStrategy::range:
        require(0 <= options.begin && options.begin < options.end && options.end <= T, fn,
                "range [", options.begin, ", ", options.end, ") is not inside [0, ", T,
                ") or is empty");
        lo = options.begin;
        hi = options.end;
        break;
    }
    for (std::int64_t t = lo; t < hi; ++t)
      weights_[static_cast<std::size_t>(t)] *= options.multiplier;
    cumulative_.resize(weights_.size());
    double total = 0;
    for (std::size_t t = 0; t < weights_.size(); ++t) cumulative_[t] = (total += weights_[t]);
    for (double& c : cumulative_) c /= total;
    for (double& w : weights_) w /= total;
  }

  /// P(t) for each t (sums to 1).
  std::span<const double> probabilities() const { return weights_; }

  void sample(std::span<std::int64_t> out, RandomStream rs) const {
    for (std::size_t b = 0; b < out.size(); ++b) {
      const double u = uniform_double(rs, b);
      const auto it = std::upper_bound(cumulative_.begin(), cumulative_.end(), u);
      out[b] = std::min<std::int64_t>(it - cumulative_.begin(),
                                      static_cast<std::int64_t>(cumulative_.size()) - 1);
    }
  }

 private:
  std::vector<double> weights_;
  std::vector<double> cumulative_;
};

}  // namespace difftrain
