#pragma once
// Your own denoiser and your own schedule, trained by difftrain's Trainer: an unconditional
// per-pixel linear denoiser (weights in std::vector, no difftrain types) and the cosine flow
// x_t = cos(πσ/2)·x0 + sin(πσ/2)·eps with the velocity target cos·eps − sin·x0.
#include <cmath>
#include <numbers>
#include <span>
#include <vector>

#include "toy_model.hpp"  // synthetic_batch

namespace custom {
using namespace difftrain;

// pred[b,c,p] = Σ_k W[c,k]·f_k + bias[c], f = [x_t[b,:,p]; sin(πσ_b), cos(πσ_b)], σ_b = t_b/1000.
struct LinearDenoiser {
  std::size_t C;
  std::vector<float> w, bias, w_grad, bias_grad, features;  // features: saved for backward
  explicit LinearDenoiser(std::size_t channels)
      : C(channels), w(C * (C + 2)), bias(C), w_grad(w.size()), bias_grad(C) {}

  Tensor4<float> forward(const Tensor4<float>& x, std::span<const float> t, const Tensor3<float>&) {
    const std::size_t B = x.shape()[0], P = x.shape()[2] * x.shape()[3], F = C + 2;
    features.assign(B * P * F, 0.0f);
    Tensor4<float> out(x.shape());
    for (std::size_t b = 0; b < B; ++b)
      for (std::size_t p = 0; p < P; ++p) {
        float* f = &features[(b * P + p) * F];
        for (std::size_t c = 0; c < C; ++c) f[c] = x.data()[(b * C + c) * P + p];
        const float phase = std::numbers::pi_v<float> * t[b] / 1000;
        f[C] = std::sin(phase), f[C + 1] = std::cos(phase);
        for (std::size_t c = 0; c < C; ++c) {
          float acc = bias[c];
          for (std::size_t k = 0; k < F; ++k) acc += w[c * F + k] * f[k];
          out.data()[(b * C + c) * P + p] = acc;
        }
      }
    return out;
  }
  void backward(const Tensor4<float>& g) {  // dL/dW += g·fᵀ, dL/dbias += g
    const std::size_t B = g.shape()[0], P = g.shape()[2] * g.shape()[3], F = C + 2;
    for (std::size_t b = 0; b < B; ++b)
      for (std::size_t p = 0; p < P; ++p)
        for (std::size_t c = 0; c < C; ++c) {
          const float d = g.data()[(b * C + c) * P + p];
          bias_grad[c] += d;
          for (std::size_t k = 0; k < F; ++k)
            w_grad[c * F + k] += d * features[(b * P + p) * F + k];
        }
  }
  // What the Trainer trains (train::TrainableModel): names, values, gradients, shapes.
  std::vector<train::ParameterView> trainable_parameters() {
    return {{"w", w, w_grad, {C, C + 2}}, {"bias", bias, bias_grad, {C}}};
  }
};

// The schedule: what the step needs at a training time σ (TrainingSchedule).
struct CosineFlow {
  using time_type = double;
  std::int64_t num_train_timesteps() const { return 1000; }
  TrainingCoefficients training_coefficients(double sigma) const {
    const double a = std::cos(std::numbers::pi / 2 * sigma),
                 s = std::sin(std::numbers::pi / 2 * sigma);
    // x_t = a·x0 + s·eps; target = −s·x0 + a·eps; the model sees 1000σ; SNR = a²/s².
    return {a, s, -s, a, 1000 * sigma, a * a / (s * s)};
  }
};

// σ ~ U(0, 1), one per sample, from the step's random stream (TimestepSamplerOf<double>).
struct UniformSigma {
  void sample(std::span<double> out, RandomStream rs) const {
    for (std::size_t b = 0; b < out.size(); ++b) out[b] = uniform_open(rs, b);
  }
};

// Trains for `steps` steps (AdamW, lr 1e-2, batch 8 of 4×8×8 images); returns the losses.
inline std::vector<double> train(std::int64_t steps, std::uint64_t seed = 0) {
  LinearDenoiser model(4);
  IdentityEncoder pixels;
  NoTextEncoder none;  // unconditional
  TrainStepOptions step_options;
  step_options.seed = seed;
  DiffusionTrainStep step(CosineFlow{}, model, pixels, none, loss::Uniform{}, step_options,
                          UniformSigma{});
  train::TrainerOptions o;
  o.learning_rate = 1e-2;
  o.lr_warmup_steps = 0;
  o.max_train_steps = steps;
  train::Trainer trainer(step, model, o);
  std::vector<double> losses;
  trainer.fit(
      [&](std::uint64_t m) { return train::TrainBatch{toy::synthetic_batch(8, 4, 8, seed, m)}; },
      [&](const train::StepLog& log) { losses.push_back(log.loss); });
  return losses;
}

}  // namespace custom
