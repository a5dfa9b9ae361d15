#pragma once
// EulerDiscreteScheduler: diffusers' EulerDiscreteScheduler (s_churn = 0, linear interpolation,
// final sigma 0), for sampling. It works on x = x_t·√(σ²+1), the variance-exploding view:
//   σ(t) = √((1 − ᾱ_t)/ᾱ_t), interpolated linearly at fractional timesteps (linspace spacing),
//   the model sees x/√(σ²+1) (scale_model_input),
//   x̂0 = x − σ·ε̂ (epsilon) | −σ/√(σ²+1)·v̂ + x/(σ²+1) (v) | model output (sample),
//   x ← x + (σ_next − σ)·(x − x̂0)/σ,
//   init_noise_sigma = σ_max (trailing, linspace) or √(σ_max² + 1) (leading).
// With rescale_betas_zero_snr, ᾱ_{T−1} = 2^-24 instead of 0 so that σ_max is finite (as diffusers).
//
// Difference from diffusers: with linspace spacing the timesteps are fractional; σ uses the
// fractional value as diffusers does, but timesteps() rounds it (half to even) for the model,
// whose Denoiser interface takes integer timesteps (diffusers passes the fraction to the UNet).

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

class EulerDiscreteScheduler {
 public:
  explicit EulerDiscreteScheduler(SamplingConfig config) : config_(std::move(config)) {
    detail::require_ddpm_config("EulerDiscreteScheduler", config_);
    if (!config_.timestep_spacing) config_.timestep_spacing = TimestepSpacing::linspace;
    const DdpmScheduler ddpm(config_.train);
    const auto alphas_cumprod = ddpm.alphas_cumprod();
    train_sigmas_.resize(alphas_cumprod.size());
    for (std::size_t t = 0; t < alphas_cumprod.size(); ++t) {
      double alpha_prod = alphas_cumprod[t];
      // Zero terminal SNR: diffusers' float16 subnormal keeps the first σ finite (≈ 4096).
      if (config_.train.rescale_betas_zero_snr && t + 1 == alphas_cumprod.size())
        alpha_prod = 0x1p-24;
      train_sigmas_[t] = std::sqrt((1.0 - alpha_prod) / alpha_prod);  // σ(t)
    }
    // Before set_timesteps diffusers holds every training timestep.
    const std::size_t T = train_sigmas_.size();
    timesteps_.resize(T);
    sigmas_.resize(T + 1);
    for (std::size_t i = 0; i < T; ++i) {
      timesteps_[i] = static_cast<std::int64_t>(T - 1 - i);
      sigmas_[i] = train_sigmas_[T - 1 - i];
    }
    sigmas_[T] = 0.0;
  }

  const SamplingConfig& config() const { return config_; }
  PredictionType prediction_type() const { return config_.train.prediction_type; }
  std::int64_t num_inference_steps() const { return num_inference_steps_; }

  /// σ at each inference timestep followed by the final 0: n + 1 values, descending.
  std::span<const double> sigmas() const { return sigmas_; }
  /// σ(t) = √((1 − ᾱ_t)/ᾱ_t) at the T training timesteps.
  std::span<const double> train_sigmas() const { return train_sigmas_; }

  void set_timesteps(std::int64_t num_inference_steps) {
    auto t = detail::inference_timesteps("EulerDiscreteScheduler::set_timesteps", config_,
                                         num_inference_steps);
    const std::size_t n = t.size();
    timesteps_.resize(n);
    sigmas_.resize(n + 1);
    for (std::size_t i = 0; i < n; ++i) {
      // diffusers keeps these timesteps in float32 (np.linspace(..., dtype=np.float32)).
      const double ti = static_cast<float>(t[i]);
      // np.interp on the integer grid 0..T−1.
      const auto lo = static_cast<std::size_t>(std::floor(ti));
      const std::size_t hi = std::min(lo + 1, train_sigmas_.size() - 1);
      const double frac = ti - static_cast<double>(lo);
      sigmas_[i] = train_sigmas_[lo] + frac * (train_sigmas_[hi] - train_sigmas_[lo]);
      timesteps_[i] = static_cast<std::int64_t>(std::nearbyint(ti));
    }
    sigmas_[n] = 0.0;
    num_inference_steps_ = num_inference_steps;
  }

  /// Descending (rounded for linspace spacing; see the header comment).
  std::span<const std::int64_t> timesteps() const { return timesteps_; }

  double init_noise_sigma() const {
    const double max_sigma = *std::max_element(sigmas_.begin(), sigmas_.end());
    return config_.timestep_spacing == TimestepSpacing::leading
               ? std::sqrt(max_sigma * max_sigma + 1.0)
               : max_sigma;
  }

  /// σ at inference timestep t (one of timesteps()).
  double sigma(std::int64_t t) const { return sigmas_[index("EulerDiscreteScheduler::sigma", t)]; }

  /// x / √(σ² + 1): the model input x_t for the sample x at timestep t.
  void scale_model_input(Tensor4<float>& sample, std::int64_t t) const {
    const double sigma = sigmas_[index("EulerDiscreteScheduler::scale_model_input", t)];
    const auto scale = static_cast<float>(1.0 / std::sqrt(sigma * sigma + 1.0));
    sample *= scale;
  }

  /// One Euler step from timestep t to the next inference timestep, in place.
  void step(const Tensor4<float>& model_output, std::int64_t t, Tensor4<float>& sample) const {
    constexpr const char* fn = "EulerDiscreteScheduler::step";
    check_same_shape(fn, "model_output", model_output.shape(), sample.shape());
    const std::size_t k = index(fn, t);
    const double sigma = sigmas_[k];
    const double dt = sigmas_[k + 1] - sigma;
    const double c_out = -sigma / std::sqrt(sigma * sigma + 1.0);  // v: x̂0 = c_out·v̂ + c_skip·x
    const double c_skip = 1.0 / (sigma * sigma + 1.0);
    const PredictionType type = prediction_type();
    const float* out = model_output.data();
    float* x = sample.data();
    const auto n = static_cast<std::ptrdiff_t>(sample.size());
#pragma omp parallel for schedule(static) if (parallel::exceeds(n, parallel::kElementwiseSize))
    for (std::ptrdiff_t i = 0; i < n; ++i) {
      const double xi = x[i], m = out[i];
      double x0 = 0.0;
      switch (type) {
        case PredictionType::epsilon:
          x0 = xi - sigma * m;
          break;
        case PredictionType::v_prediction:
          x0 = c_out * m + c_skip * xi;
          break;
        case PredictionType::sample:
          x0 = m;
          break;
      }
      x[i] = static_cast<float>(xi + (xi - x0) / sigma * dt);
    }
  }

 private:
  // Position of t in timesteps() (diffusers' index_for_timestep).
  std::size_t index(std::string_view fn, std::int64_t t) const {
    const auto it = std::find(timesteps_.begin(), timesteps_.end(), t);
    require(it != timesteps_.end(), fn, "timestep ", t,
            " is not one of the inference timesteps (call set_timesteps and use timesteps())");
    return static_cast<std::size_t>(it - timesteps_.begin());
  }

  SamplingConfig config_;
  std::vector<double> train_sigmas_;
  std::vector<std::int64_t> timesteps_;
  std::vector<double> sigmas_;
  std::int64_t num_inference_steps_ = 0;
};

}  // namespace difftrain
