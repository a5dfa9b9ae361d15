#pragma once
// A small denoiser for the examples and their tests: a per-pixel MLP on (x_t[:, h, w], time
// features) with one SiLU hidden layer, trained with plain SGD. It ignores the text context.
// Dims: B batch, C channels, P = H·W pixels, F = C + 2·kFreqs inputs, Hd hidden units.

#include <cmath>
#include <cstdint>
#include <difftrain/difftrain.hpp>
#include <numbers>
#include <span>
#include <vector>

namespace toy {

using difftrain::Tensor3;
using difftrain::Tensor4;

class PixelMlp {
 public:
  static constexpr std::size_t kFreqs = 4;

  PixelMlp(std::size_t channels, std::size_t hidden, std::int64_t num_train_timesteps,
           std::uint64_t seed)
      : C_(channels),
        Hd_(hidden),
        F_(channels + 2 * kFreqs),
        T_(num_train_timesteps),
        w1_(Hd_ * F_),
        b1_(Hd_, 0.0f),
        w2_(C_ * Hd_),
        b2_(C_, 0.0f) {
    // PyTorch-like init: U(−1/√fan_in, 1/√fan_in) for the weights.
    difftrain::fill_uniform(w1_, {seed, 1});
    difftrain::fill_uniform(w2_, {seed, 2});
    for (float& w : w1_) w = (2 * w - 1) / std::sqrt(float(F_));
    for (float& w : w2_) w = (2 * w - 1) / std::sqrt(float(Hd_));
    zero_grad();
  }

  // pred[b,:,p] = W2·silu(W1·[x_t[b,:,p]; τ(t_b)] + b1) + b2, τ(t) = sin/cos(2^k·π·t/T); t may be
  // fractional (flow matching: σ·T).
  Tensor4<float> forward(const Tensor4<float>& x_t, std::span<const float> timesteps,
                         const Tensor3<float>& /*context*/) {
    const auto& sh = x_t.shape();
    B_ = sh[0];
    P_ = sh[2] * sh[3];
    inputs_.assign(B_ * P_ * F_, 0.0f);
    pre_.assign(B_ * P_ * Hd_, 0.0f);
    Tensor4<float> pred = xt::zeros<float>(sh);
    for (std::size_t b = 0; b < B_; ++b) {
      const double phase = std::numbers::pi * double(timesteps[b]) / double(T_);
      for (std::size_t p = 0; p < P_; ++p) {
        float* in = &inputs_[(b * P_ + p) * F_];
        for (std::size_t c = 0; c < C_; ++c) in[c] = x_t.data()[(b * C_ + c) * P_ + p];
        for (std::size_t k = 0; k < kFreqs; ++k) {
          in[C_ + 2 * k] = float(std::sin(phase * double(1 << k)));
          in[C_ + 2 * k + 1] = float(std::cos(phase * double(1 << k)));
        }
        float* z = &pre_[(b * P_ + p) * Hd_];
        for (std::size_t j = 0; j < Hd_; ++j) {
          float acc = b1_[j];
          for (std::size_t f = 0; f < F_; ++f) acc += w1_[j * F_ + f] * in[f];
          z[j] = acc;
        }
        for (std::size_t c = 0; c < C_; ++c) {
          float acc = b2_[c];
          for (std::size_t j = 0; j < Hd_; ++j) acc += w2_[c * Hd_ + j] * silu(z[j]);
          pred.data()[(b * C_ + c) * P_ + p] = acc;
        }
      }
    }
    return pred;
  }

  // Accumulates dL/dW into the gradients (+=), from dL/dpred.
  void backward(const Tensor4<float>& grad_pred) {
    std::vector<float> dz(Hd_);
    for (std::size_t b = 0; b < B_; ++b)
      for (std::size_t p = 0; p < P_; ++p) {
        const float* in = &inputs_[(b * P_ + p) * F_];
        const float* z = &pre_[(b * P_ + p) * Hd_];
        std::fill(dz.begin(), dz.end(), 0.0f);
        for (std::size_t c = 0; c < C_; ++c) {
          const float g = grad_pred.data()[(b * C_ + c) * P_ + p];
          gb2_[c] += g;
          for (std::size_t j = 0; j < Hd_; ++j) {
            gw2_[c * Hd_ + j] += g * silu(z[j]);
            dz[j] += g * w2_[c * Hd_ + j];
          }
        }
        for (std::size_t j = 0; j < Hd_; ++j) {
          const float s = 1.0f / (1.0f + std::exp(-z[j]));
          const float d = dz[j] * s * (1.0f + z[j] * (1.0f - s));  // silu'(z)
          gb1_[j] += d;
          for (std::size_t f = 0; f < F_; ++f) gw1_[j * F_ + f] += d * in[f];
        }
      }
  }

  // θ ← θ − lr·∇θ, then clears the gradients.
  void sgd_step(float lr) {
    auto update = [lr](std::vector<float>& w, const std::vector<float>& g) {
      for (std::size_t i = 0; i < w.size(); ++i) w[i] -= lr * g[i];
    };
    update(w1_, gw1_);
    update(b1_, gb1_);
    update(w2_, gw2_);
    update(b2_, gb2_);
    zero_grad();
  }

  // What train::Trainer trains (a train::TrainableModel): names, values, gradients, shapes.
  std::vector<difftrain::train::ParameterView> trainable_parameters() {
    return {{"w1", w1_, gw1_, {Hd_, F_}},
            {"b1", b1_, gb1_, {Hd_}},
            {"w2", w2_, gw2_, {C_, Hd_}},
            {"b2", b2_, gb2_, {C_}}};
  }

  void zero_grad() {
    gw1_.assign(w1_.size(), 0.0f);
    gb1_.assign(b1_.size(), 0.0f);
    gw2_.assign(w2_.size(), 0.0f);
    gb2_.assign(b2_.size(), 0.0f);
  }

 private:
  static float silu(float z) { return z / (1.0f + std::exp(-z)); }

  std::size_t C_, Hd_, F_;
  std::int64_t T_;
  std::vector<float> w1_, b1_, w2_, b2_;
  std::vector<float> gw1_, gb1_, gw2_, gb2_;
  std::size_t B_ = 0, P_ = 0;
  std::vector<float> inputs_, pre_;  // saved by forward for backward
};
static_assert(difftrain::Denoiser<PixelMlp> && difftrain::train::TrainableModel<PixelMlp>);

/// Text "encoder" of the toy: a context of zeros [B, L, 1] (the toy model ignores it).
struct ZeroContext {
  using input_type = difftrain::TokenIds;
  using output_type = Tensor3<float>;
  Tensor3<float> encode(const difftrain::TokenIds& ids) const {
    return xt::zeros<float>({ids.shape()[0], ids.shape()[1], std::size_t{1}});
  }
};
static_assert(difftrain::TextEncoder<ZeroContext>);

/// Synthetic images [B, C, S, S]: each sample is one of two colours (±0.8 per channel, the
/// pattern chosen per sample) plus a little pixel noise: a two-point-ish distribution a
/// per-pixel denoiser can learn.
inline Tensor4<float> synthetic_batch(std::size_t batch, std::size_t channels, std::size_t size,
                                      std::uint64_t seed, std::uint64_t step) {
  Tensor4<float> x = xt::zeros<float>({batch, channels, size, size});
  const difftrain::RandomStream rs{seed, 1000 + step};
  difftrain::fill_normal(std::span<float>(x.data(), x.size()), rs);
  const std::size_t plane = size * size;
  for (std::size_t b = 0; b < batch; ++b) {
    const bool first =
        difftrain::uniform_double(rs.derive(0, difftrain::StreamPurpose::toy_pattern), b) < 0.5;
    for (std::size_t c = 0; c < channels; ++c) {
      const float colour = ((c % 2 == 0) == first) ? 0.8f : -0.8f;
      for (std::size_t p = 0; p < plane; ++p) {
        float& v = x.data()[(b * channels + c) * plane + p];
        v = colour + 0.05f * v;
      }
    }
  }
  return x;
}

struct ToyRun {
  std::vector<double> losses;
  double first_mean = 0, last_mean = 0;  // mean loss of the first and last `window` steps
};

/// Trains the toy model for `steps` steps and reports the losses.
inline ToyRun train_toy(int steps, int window, std::uint64_t seed = 0) {
  using namespace difftrain;
  const DdpmScheduler scheduler = DdpmScheduler::sd15();
  PixelMlp model(4, 64, scheduler.num_train_timesteps(), seed);
  IdentityEncoder images_to_latents;
  ZeroContext text;
  TrainStepOptions options;
  options.seed = seed;
  options.noise.noise_offset = 0.05f;
  DiffusionTrainStep step(scheduler, model, images_to_latents, text, loss::MinSnr(5.0), options);
  ToyRun run;
  const TokenIds tokens = xt::zeros<std::int64_t>({std::size_t{8}, std::size_t{4}});
  for (int s = 0; s < steps; ++s) {
    const Tensor4<float> images = synthetic_batch(8, 4, 8, seed, std::uint64_t(s));
    const TrainStepResult r = step.step(images, tokens, std::uint64_t(s));
    model.sgd_step(0.5f);
    run.losses.push_back(r.loss);
  }
  for (int i = 0; i < window; ++i) {
    run.first_mean += run.losses[std::size_t(i)] / window;
    run.last_mean += run.losses[run.losses.size() - 1 - std::size_t(i)] / window;
  }
  return run;
}

}  // namespace toy
