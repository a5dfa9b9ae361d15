#pragma once
// DdimScheduler: diffusers' DDIMScheduler with eta = 0 (deterministic), for sampling.
//
// One step from t to t' = t − T div n (diffusers' prev_timestep, whatever the spacing):
//   x̂0 = (x − √(1−ᾱ_t)·ε̂)/√ᾱ_t  (epsilon) | √ᾱ_t·x − √(1−ᾱ_t)·v̂  (v) | model output  (sample)
//   ε̂  = model output (epsilon) | √ᾱ_t·v̂ + √(1−ᾱ_t)·x  (v) | (x − √ᾱ_t·x̂0)/√(1−ᾱ_t)  (sample)
//   x_{t'} = √ᾱ_{t'}·x̂0 + √(1−ᾱ_{t'})·ε̂,   ᾱ_{t'} = 1 (set_alpha_to_one) or ᾱ_0 when t' < 0.
// x̂0 is clamped to ±clip_sample_range first when clip_sample is set. Tables are in double.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/parallel.hpp"
#include "difftrain/core/prediction_type.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/schedule/ddpm_scheduler.hpp"
#include "difftrain/schedule/sampling_config.hpp"

namespace difftrain {

class DdimScheduler {
 public:
  explicit DdimScheduler(SamplingConfig config)
      : config_(std::move(config)), ddpm_(checked(config_).train) {
    if (!config_.timestep_spacing) config_.timestep_spacing = TimestepSpacing::leading;
    final_alpha_cumprod_ = config_.set_alpha_to_one ? 1.0 : ddpm_.alphas_cumprod()[0];
  }

  const SamplingConfig& config() const { return config_; }
  PredictionType prediction_type() const { return config_.train.prediction_type; }
  std::int64_t num_inference_steps() const { return num_inference_steps_; }
  /// ᾱ_t of the training schedule (after any zero-terminal-SNR rescale).
  std::span<const double> alphas_cumprod() const { return ddpm_.alphas_cumprod(); }

  /// The n timesteps of the configured spacing, descending (linspace rounded half to even).
  void set_timesteps(std::int64_t num_inference_steps) {
    const auto t =
        detail::inference_timesteps("DdimScheduler::set_timesteps", config_, num_inference_steps);
    timesteps_.resize(t.size());
    for (std::size_t i = 0; i < t.size(); ++i)
      timesteps_[i] = static_cast<std::int64_t>(std::nearbyint(t[i]));
    num_inference_steps_ = num_inference_steps;
  }

  /// Descending; empty before set_timesteps.
  std::span<const std::int64_t> timesteps() const { return timesteps_; }

  double init_noise_sigma() const { return 1.0; }

  /// DDIM feeds the model x_t unscaled.
  void scale_model_input(Tensor4<float>& /*sample*/, std::int64_t /*t*/) const {}

  /// The timestep the step from t lands on (negative after the last one).
  std::int64_t prev_timestep(std::int64_t t) const {
    require(num_inference_steps_ > 0, "DdimScheduler::prev_timestep",
            "set_timesteps was not called");
    return t - config_.train.num_train_timesteps / num_inference_steps_;
  }

  /// x_t → x_{t'} in place (eta = 0), given the model output at (x_t, t); see the header comment.
  void step(const Tensor4<float>& model_output, std::int64_t t, Tensor4<float>& sample) const {
    constexpr const char* fn = "DdimScheduler::step";
    require(num_inference_steps_ > 0, fn, "set_timesteps was not called");
    require(t >= 0 && t < config_.train.num_train_timesteps, fn, "timestep ", t,
            " out of range [0, ", config_.train.num_train_timesteps, ")");
    check_same_shape(fn, "model_output", model_output.shape(), sample.shape());
    const double alpha_prod_t = ddpm_.alphas_cumprod()[static_cast<std::size_t>(t)];
    const std::int64_t prev = prev_timestep(t);
    const double alpha_prod_prev =
        prev >= 0 ? ddpm_.alphas_cumprod()[static_cast<std::size_t>(prev)] : final_alpha_cumprod_;
    const PredictionType type = prediction_type();
    require(alpha_prod_t > 0.0 || type != PredictionType::epsilon, fn, "timestep ", t,
            " has alphas_cumprod 0 (zero terminal SNR): an epsilon prediction does not determine "
            "x0 there; use v_prediction or sample");
    require(alpha_prod_t < 1.0 || type != PredictionType::sample, fn, "timestep ", t,
            " has alphas_cumprod 1: a sample prediction does not determine the noise there");
    const double a = std::sqrt(alpha_prod_t), s = std::sqrt(1.0 - alpha_prod_t);
    const double a_prev = std::sqrt(alpha_prod_prev), s_prev = std::sqrt(1.0 - alpha_prod_prev);
    const bool clip = config_.clip_sample;
    const double range = config_.clip_sample_range;
    const float* out = model_output.data();
    float* x = sample.data();
    const auto n = static_cast<std::ptrdiff_t>(sample.size());
#pragma omp parallel for schedule(static) if (parallel::exceeds(n, parallel::kElementwiseSize))
    for (std::ptrdiff_t i = 0; i < n; ++i) {
      const double xi = x[i], m = out[i];
      double x0 = 0.0, eps = 0.0;
      switch (type) {
        case PredictionType::epsilon:
          x0 = (xi - s * m) / a;
          eps = m;
          break;
        case PredictionType::v_prediction:
          x0 = a * xi - s * m;
          eps = a * m + s * xi;
          break;
        case PredictionType::sample:
          x0 = m;
          eps = (xi - a * m) / s;
          break;
      }
      if (clip) x0 = std::clamp(x0, -range, range);
      x[i] = static_cast<float>(a_prev * x0 + s_prev * eps);
    }
  }

 private:
  static const SamplingConfig& checked(const SamplingConfig& c) {
    detail::require_ddpm_config("DdimScheduler", c);
    return c;
  }

  SamplingConfig config_;
  DdpmScheduler ddpm_;
  double final_alpha_cumprod_ = 1.0;
  std::vector<std::int64_t> timesteps_;
  std::int64_t num_inference_steps_ = 0;
};

}  // namespace difftrain
