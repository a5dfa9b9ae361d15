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
#include "difftrain/nn/activations.hpp"
#include "difftrain/nn/linear.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::nn {

// f_k = exp(−ln(max_period)·k / (half − shift)), k < half = D/2; emb = [sin(s·t·f), cos(s·t·f)]
// ([cos, sin] when flipped), zero-padded by one column when D is odd. timesteps: any range of
// numbers (int64 or floating), one per sample → [B, D]. Defaults are diffusers'.
template <class T, std::ranges::forward_range R>
Tensor<T, 2> get_timestep_embedding(const R& timesteps, std::size_t embedding_dim,
                                    bool flip_sin_to_cos = false, double downscale_freq_shift = 1.0,
                                    double scale = 1.0, double max_period = 10000.0) {
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

struct TimestepEmbeddingConfig {
  std::size_t in_channels = 320;      // D (the sinusoid width)
  std::size_t time_embed_dim = 1280;  // E (SD1.x: 4 · block_out_channels[0])
  std::size_t out_dim = 0;            // 0: time_embed_dim (diffusers' out_dim=None)
  bool sample_proj_bias = true;       // biases of linear_1 and linear_2
};

/// diffusers' TimestepEmbedding with act_fn "silu" (the UNet's `time_embedding`):
/// y = linear_2(silu(linear_1(sample))), sample [B, D] → [B, out_dim or E].
template <class T = float>
class TimestepEmbedding {
 public:
  using Scalar = T;

  TimestepEmbeddingConfig config;
  Linear<T> linear_1;  // D → E
  SiLU<T> act;
  Linear<T> linear_2;  // E → out_dim or E

  TimestepEmbedding() = default;
  explicit TimestepEmbedding(const TimestepEmbeddingConfig& c)
      : config(c),
        linear_1(c.in_channels, c.time_embed_dim, c.sample_proj_bias),
        linear_2(c.time_embed_dim, c.out_dim != 0 ? c.out_dim : c.time_embed_dim,
                 c.sample_proj_bias) {}

  std::size_t out_features() const { return linear_2.out_features(); }

  /// Visits linear_1 and linear_2 as (full module name, Linear&).
  template <class F>
  void for_each_linear(const std::string& prefix, F&& visit) {
    visit(join_name(prefix, "linear_1"), linear_1);
    visit(join_name(prefix, "linear_2"), linear_2);
  }
  template <class F>
  void for_each_linear(const std::string& prefix, F&& visit) const {
    visit(join_name(prefix, "linear_1"), linear_1);
    visit(join_name(prefix, "linear_2"), linear_2);
  }

  /// linear_1.weight, linear_1.bias, linear_2.weight, linear_2.bias.
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) {
    linear_1.for_each_parameter(join_name(prefix, "linear_1"), visit);
    linear_2.for_each_parameter(join_name(prefix, "linear_2"), visit);
  }
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) const {
    linear_1.for_each_parameter(join_name(prefix, "linear_1"), visit);
    linear_2.for_each_parameter(join_name(prefix, "linear_2"), visit);
  }

  // y = W2 · silu(W1 · sample + b1) + b2, saving what backward needs.
  Tensor<T, 2> forward(const Tensor<T, 2>& sample) {
    check_input(sample);
    return linear_2.forward(act.forward(linear_1.forward(sample)));
  }
  /// The same without saving anything.
  Tensor<T, 2> forward_inference(const Tensor<T, 2>& sample) const {
    check_input(sample);
    return linear_2.forward_inference(act.forward_inference(linear_1.forward_inference(sample)));
  }

  /// dy [B, out] → d sample [B, D] (empty when !input_grad: the sinusoids need none);
  /// accumulates (+=) the gradients of the trainable linear_1 / linear_2 parameters.
  Tensor<T, 2> backward(const Tensor<T, 2>& dy, bool input_grad = true) {
    return linear_1.backward(act.backward(linear_2.backward(dy)), input_grad);
  }

 private:
  void check_input(const Tensor<T, 2>& sample) const {
    check_shape("TimestepEmbedding::forward", "sample", sample.shape(),
                {sample.shape()[0], config.in_channels});
  }
};

}  // namespace difftrain::nn
