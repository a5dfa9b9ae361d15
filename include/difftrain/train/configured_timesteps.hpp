#pragma once
// ConfiguredTimesteps: the TimestepSampler chosen at run time from flags — kohya's uniform
// [min_timestep, max_timestep) or diffusers' timestep bias — for a step type fixed at compile time.
//
//   t ~ U{min_timestep .. max_timestep − 1}     (timestep_bias_strategy none; defaults [0, T))
//   t ~ P(t) ∝ w_t, w = multiplier on the biased slice, 1 elsewhere   (earlier / later / range)
//
// diffusers' bias has no range limits and kohya's range has no bias, so combining the two is
// refused rather than given a meaning neither upstream has.

#include <cstdint>
#include <optional>
#include <span>
#include <variant>

#include "difftrain/concepts.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/schedule/timestep_sampler.hpp"

namespace difftrain::train {

class ConfiguredTimesteps {
 public:
  /// kohya's min_timestep / max_timestep (unset: 0 / T) and diffusers' timestep bias. Throws
  /// difftrain::Error for an empty or out-of-range [min, max), a bad bias setting, or a bias
  /// combined with min/max_timestep.
  ConfiguredTimesteps(std::int64_t num_train_timesteps, std::optional<std::int64_t> min_timestep,
                      std::optional<std::int64_t> max_timestep,
                      const TimestepBiasOptions& bias = {})
      : sampler_(make(num_train_timesteps, min_timestep, max_timestep, bias)) {}
  /// Uniform on [0, T) (diffusers' default).
  explicit ConfiguredTimesteps(std::int64_t num_train_timesteps = 1000)
      : ConfiguredTimesteps(num_train_timesteps, std::nullopt, std::nullopt) {}

  void sample(std::span<std::int64_t> out, RandomStream rs) const {
    std::visit([&](const auto& s) { s.sample(out, rs); }, sampler_);
  }

  const std::variant<UniformTimesteps, BiasedTimesteps>& sampler() const { return sampler_; }

 private:
  static std::variant<UniformTimesteps, BiasedTimesteps> make(
      std::int64_t T, std::optional<std::int64_t> min_timestep,
      std::optional<std::int64_t> max_timestep, const TimestepBiasOptions& bias) {
    if (bias.strategy == TimestepBiasStrategy::none)
      return UniformTimesteps(T, min_timestep.value_or(0), max_timestep.value_or(T));
    require(!min_timestep && !max_timestep, "ConfiguredTimesteps",
            "min_timestep / max_timestep cannot be combined with timestep_bias_strategy ",
            "(use strategy range with timestep_bias_begin / timestep_bias_end)");
    return BiasedTimesteps(T, bias);
  }

  std::variant<UniformTimesteps, BiasedTimesteps> sampler_;
};
static_assert(TimestepSampler<ConfiguredTimesteps>);

}  // namespace difftrain::train
