#pragma once
// Timestep embeddings as diffusers builds them: the sinusoidal projection
// get_timestep_embedding (the UNet's `time_proj`, no parameters) and TimestepEmbedding
// (the UNet's `time_embedding`: linear_1 → SiLU → linear_2, with backward to its parameters).
//
// Dims legend: B batch (one timestep per sample), D embedding_dim of the sinusoids,
// E time_embed_dim (hidden and, by default, output width of TimestepEmbedding).
//
// Precision: the sinusoids are computed in double and rounded to T at the end. The argument
// t·f_k reaches 999 (SD's largest timestep), where one float ulp is 6e-5, so computing the
// argument or the sine in float would give errors of that size in the embedding; in double they
// are ~1e-13 and the result is the float rounding of the exact value (what diffusers' own
// float64 reference gives). diffusers itself computes in float32 and differs from this by up to
// ~1e-4 at large t.

#include <cmath>
#include <cstddef>
#include <iterator>
#include <ranges>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"

namespace difftrain::nn {

// f_k = exp(−ln(max_period)·k / (half − shift)), k < half = D/2; emb = [sin(s·t·f), cos(s·t·f)]
// ([cos, sin] when flipped), zero-padded by one column when D is odd. timesteps: any range of
// numbers (int64 or floating), one per sample → [B, D]. Defaults are diffusers'.
template <class T, std::ranges::forward_range R>
Tensor<T, 2> get_timestep_embedding(const R& timesteps, std::size_t embedding_dim,
                                    bool flip_sin_to_cos = false,
                                    double downscale_freq_shift = 1.0, double scale = 1.0,
                                    double max_period = 10000.0) {
  constexpr const char* fn = "get_timestep_embedding";
  const std::size_t dim = embedding_dim, half = dim / 2;
  require(dim > 0, fn, "embedding_dim is 0, expected at least 1");
  require(half == 0 || static_cast<double>(half) != downscale_freq_shift, fn,
          "downscale_freq_shift is ", downscale_freq_shift,
          ", must differ from embedding_dim / 2 = ", half, " (it divides by their difference)");
  require(max_period > 0, fn, "max_period is ", max_period, ", expected > 0");
  const std::size_t batch = static_cast<std::size_t>(std::ranges::distance(timesteps));
  Tensor<T, 2> emb = xt::zeros<T>(std::array<std::size_t, 2>{batch, dim});
  const double log_period = std::log(max_period);
  const double denominator = static_cast<double>(half) - downscale_freq_shift;
  const std::size_t sin_offset = flip_sin_to_cos ? half : 0;
  const std::size_t cos_offset = flip_sin_to_cos ? 0 : half;
  std::vector<double> frequency(half);
  for (std::size_t k = 0; k < half; ++k)
    frequency[k] = std::exp(-log_period * static_cast<double>(k) / denominator);
  std::size_t b = 0;
  for (const auto& t : timesteps) {
    const double time = static_cast<double>(t);
    require(std::isfinite(time), fn, "timestep ", b, " is ", time, ", expected a finite number");
    T* row = emb.data() + b * dim;
    for (std::size_t k = 0; k < half; ++k) {
      const double angle = scale * time * frequency[k];
      row[sin_offset + k] = static_cast<T>(std::sin(angle));
      row[cos_offset + k] = static_cast<T>(std::cos(angle));
    }
    ++b;
  }
  return emb;
}

struct TimestepsConfig {
  std::size_t num_channels = 320;     // D (the UNet: block_out_channels[0])
  bool flip_sin_to_cos = true;        // SD: [cos, sin]
  double downscale_freq_shift = 0.0;  // SD UNet: freq_shift = 0
  double scale = 1.0;
};

/// diffusers' `Timesteps` module (the UNet's `time_proj`): get_timestep_embedding with a fixed
/// configuration. No parameters and no backward (timesteps are not differentiated).
struct Timesteps {
  TimestepsConfig config;

  template <class T, std::ranges::forward_range R>
  Tensor<T, 2> forward(const R& timesteps) const {
    return get_timestep_embedding<T>(timesteps, config.num_channels, config.flip_sin_to_cos,
                                     config.downscale_freq_shift, config.scale);
  }
};

}  // namespace difftrain::nn
