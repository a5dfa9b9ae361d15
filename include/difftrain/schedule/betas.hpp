#pragma once
// Beta schedules β_i (i = 0..T-1) of discrete-time diffusion and the zero-terminal-SNR rescale
// of Lin et al. 2023. Everything is computed in double: diffusers computes in float32, which
// differs from these values in the ~7th digit (more where 1 − ᾱ cancels, see the tests).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numbers>
#include <span>
#include <string_view>
#include <vector>

#include "difftrain/core/choice.hpp"
#include "difftrain/core/error.hpp"

namespace difftrain {

/// diffusers' `beta_schedule` values understood by the DDPM scheduler.
enum class BetaSchedule : std::uint8_t {
  linear,             // β_i = b0 + (b1 − b0)·i/(T−1)
  scaled_linear,      // β_i = (√b0 + (√b1 − √b0)·i/(T−1))²   (Stable Diffusion)
  squaredcos_cap_v2,  // GLIDE cosine: β_i = min(1 − f((i+1)/T)/f(i/T), 0.999)
  sigmoid,            // GeoDiff: β_i = sigmoid(−6 + 12·i/(T−1))·(b1 − b0) + b0
};

/// diffusers' names.
inline constexpr std::array<Choice<BetaSchedule>, 4> kBetaSchedules{{
    {"linear", BetaSchedule::linear},
    {"scaled_linear", BetaSchedule::scaled_linear},
    {"squaredcos_cap_v2", BetaSchedule::squaredcos_cap_v2},
    {"sigmoid", BetaSchedule::sigmoid},
}};

inline std::string_view to_string(BetaSchedule schedule) {
  return choice_name(schedule, kBetaSchedules);
}

/// Parses diffusers' names: "linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid".
inline BetaSchedule parse_beta_schedule(std::string_view name) {
  return parse_choice("beta_schedule", name, kBetaSchedules);
}

/// Largest accepted number of train timesteps: the UNet embeds timesteps in float32, which holds
/// every integer exactly only up to 2^24 (and this bounds the tables' memory).
inline constexpr std::int64_t max_train_timesteps = std::int64_t{1} << 24;

/// The cap diffusers' `betas_for_alpha_bar` puts on the cosine betas (the last would be 1).
inline constexpr double cosine_max_beta = 0.999;

namespace detail {

/// Throws unless 2 <= T <= max_train_timesteps.
inline void check_num_train_timesteps(std::string_view function, std::int64_t num_train_timesteps) {
  require(num_train_timesteps >= 2 && num_train_timesteps <= max_train_timesteps, function,
          "num_train_timesteps is ", num_train_timesteps,
          ", expected 2 <= T <= ", max_train_timesteps);
}

/// Throws unless every β is in (0, 1] (NaN fails too).
inline void check_betas_range(std::string_view function, std::string_view what,
                              std::span<const double> betas) {
  for (std::size_t i = 0; i < betas.size(); ++i) {
    require(betas[i] > 0.0 && betas[i] <= 1.0, function, what, "[", i, "] = ", betas[i],
            ", expected a value in (0, 1]");
  }
}

/// The cosine ᾱ(t) of the GLIDE schedule (not normalised by ᾱ(0)): cos²((t + 0.008)/1.008 · π/2).
inline double cosine_alpha_bar(double t) {
  const double c = std::cos((t + 0.008) / 1.008 * std::numbers::pi / 2.0);
  return c * c;
}

}  // namespace detail

/// β_0..β_{T−1} of `schedule` (beta_start b0 and beta_end b1 are ignored by squaredcos_cap_v2).
/// Throws if T < 2, b0 or b1 is not positive and finite, or a β falls outside (0, 1].
inline std::vector<double> make_betas(BetaSchedule schedule, std::int64_t num_train_timesteps,
                                      double beta_start, double beta_end) {
  constexpr std::string_view fn = "make_betas";
  detail::check_num_train_timesteps(fn, num_train_timesteps);
  require(std::isfinite(beta_start) && beta_start > 0.0, fn, "beta_start is ", beta_start,
          ", expected a positive finite number");
  require(std::isfinite(beta_end) && beta_end > 0.0, fn, "beta_end is ", beta_end,
          ", expected a positive finite number");

  const auto n = static_cast<std::size_t>(num_train_timesteps);
  const double last = static_cast<double>(num_train_timesteps - 1);
  std::vector<double> betas(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double s = static_cast<double>(i) / last;  // i/(T−1) ∈ [0, 1], exactly 1 at i = T−1
    switch (schedule) {
      case BetaSchedule::linear:
        // std::lerp is exact at both ends: β_0 = b0, β_{T−1} = b1.
        betas[i] = std::lerp(beta_start, beta_end, s);
        break;
      case BetaSchedule::scaled_linear: {
        const double root = std::lerp(std::sqrt(beta_start), std::sqrt(beta_end), s);
        betas[i] = root * root;
        break;
      }
      case BetaSchedule::squaredcos_cap_v2: {
        const double t = static_cast<double>(num_train_timesteps);
        const double ratio = detail::cosine_alpha_bar(static_cast<double>(i + 1) / t) /
                             detail::cosine_alpha_bar(static_cast<double>(i) / t);
        betas[i] = std::min(1.0 - ratio, cosine_max_beta);
        break;
      }
      case BetaSchedule::sigmoid: {
        const double x = -6.0 + 12.0 * s;
        betas[i] = 1.0 / (1.0 + std::exp(-x)) * (beta_end - beta_start) + beta_start;
        break;
      }
      default:
        fail(fn, "unknown BetaSchedule value ", static_cast<int>(schedule));
    }
  }
  detail::check_betas_range(fn, message(to_string(schedule), " betas"), betas);
  return betas;
}

/// Lin et al. 2023, Alg. 1: r = √cumprod(1−β); r ← (r − r_{T−1})·r_0/(r_0 − r_{T−1}); ᾱ = r²;
/// α_0 = ᾱ_0, α_i = ᾱ_i/ᾱ_{i−1}; β = 1 − α. The result has ᾱ_{T−1} = 0 and β_{T−1} = 1 exactly,
/// and keeps ᾱ_0. Throws unless T >= 2, every β is in (0, 1], and only the last β may be 1 (an
/// earlier β = 1 makes ᾱ vanish before T−1 and the ratios 0/0).
inline std::vector<double> rescale_zero_terminal_snr(std::span<const double> betas) {
  constexpr std::string_view fn = "rescale_zero_terminal_snr";
  require(betas.size() >= 2, fn, "betas has ", betas.size(), " values, expected at least 2");
  detail::check_betas_range(fn, "betas", betas);
  const std::size_t n = betas.size();
  for (std::size_t i = 0; i + 1 < n; ++i) {
    require(betas[i] < 1.0, fn, "betas[", i, "] = 1 before the last timestep ", n - 1,
            ": alphas_cumprod would reach 0 early");
  }

  std::vector<double> r(n);
  double alpha_prod = 1.0;
  for (std::size_t i = 0; i < n; ++i) {
    alpha_prod *= 1.0 - betas[i];
    r[i] = std::sqrt(alpha_prod);
  }
  const double r_first = r.front(), r_last = r.back();
  // r_first > r_last >= 0 because β_0 > 0 and every earlier β < 1.
  const double scale = r_first / (r_first - r_last);
  std::vector<double> alphas_cumprod(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double shifted = (r[i] - r_last) * scale;  // exactly 0 at i = T−1
    alphas_cumprod[i] = shifted * shifted;
  }
  std::vector<double> out(n);
  out[0] = 1.0 - alphas_cumprod[0];
  for (std::size_t i = 1; i < n; ++i) out[i] = 1.0 - alphas_cumprod[i] / alphas_cumprod[i - 1];
  return out;
}

}  // namespace difftrain
