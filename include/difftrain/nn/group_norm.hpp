#pragma once
// Group normalization (PyTorch nn.GroupNorm(num_groups, num_channels, eps, affine)).
//
// Dims legend: B batch, C channels, G groups (C % G == 0), S spatial size (H·W, or any trailing
// dims flattened), M = (C/G)·S elements per (b, g). Input [B, C, ...] (NCHW), contiguous.
// weight (γ) [C], bias (β) [C] when affine.
//   forward:  per (b, g): μ, rstd = 1/√(var + eps) (biased var), x̂ = (x − μ)·rstd,
//             y[b, c] = x̂[b, c]·γ[c] + β[c]
//   backward: per (b, g): g = dy·γ[c], dx = rstd·(g − mean(g) − x̂·mean(g·x̂));
//             dγ[c] += Σ_{b,s} dy·x̂;  dβ[c] += Σ_{b,s} dy
// forward saves x̂ and rstd per (b, g); OpenMP over the B·G groups (and over C for dγ, dβ).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>
#include <xtensor/xtensor.hpp>

#include "difftrain/core/error.hpp"
#include "difftrain/core/parallel.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/nn/layer_norm.hpp"  // norm_detail row kernels
#include "difftrain/nn/parameter.hpp"

namespace difftrain::nn {

struct GroupNormConfig {
  std::size_t num_groups = 32;
  std::size_t num_channels = 0;
  double eps = 1e-5;
  bool affine = true;
};

template <class T = float>
class GroupNorm {
 public:
  using Scalar = T;

  Parameter<T> weight;  // γ [C] (ones), shape [0] without affine
  Parameter<T> bias;    // β [C] (zeros), shape [0] without affine

  GroupNorm() = default;
  explicit GroupNorm(GroupNormConfig config)
      : weight({config.affine ? config.num_channels : 0}),
        bias({config.affine ? config.num_channels : 0}),
        config_(config) {
    require(config.num_groups > 0 && config.num_channels > 0, "GroupNorm",
            "num_groups and num_channels must be positive, got ", config.num_groups, " and ",
            config.num_channels);
    require(config.num_channels % config.num_groups == 0, "GroupNorm", "num_channels ",
            config.num_channels, " is not divisible by num_groups ", config.num_groups);
    require(config.eps > 0, "GroupNorm", "eps must be positive, got ", config.eps);
    weight.value.fill(T(1));
  }
  GroupNorm(std::size_t num_groups, std::size_t num_channels, double eps = 1e-5, bool affine = true)
      : GroupNorm(GroupNormConfig{num_groups, num_channels, eps, affine}) {}

  const GroupNormConfig& config() const { return config_; }
  std::size_t num_groups() const { return config_.num_groups; }
  std::size_t num_channels() const { return config_.num_channels; }

  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    if (!config_.affine) return;
    visit(join_name(prefix, "weight"), weight);
    visit(join_name(prefix, "bias"), bias);
  }
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) const {
    if (!config_.affine) return;
    visit(join_name(prefix, "weight"), weight);
    visit(join_name(prefix, "bias"), bias);
  }

  // y = (x − μ_{b,g})/√(σ²_{b,g} + eps)·γ[c] + β[c], saving x̂ and rstd
  template <std::size_t N>
  Tensor<T, N> forward(const Tensor<T, N>& x) {
    Tensor<T, N> y = run<N>(x, &x_hat_, &rstd_);
    saved_shape_.assign(x.shape().begin(), x.shape().end());
    return y;
  }
  template <std::size_t N>
  Tensor<T, N> forward_inference(const Tensor<T, N>& x) const {
    return run<N>(x, nullptr, nullptr);
  }

  /// dx for the saved forward; accumulates dγ, dβ unless frozen.
  template <std::size_t N>
  Tensor<T, N> backward(const Tensor<T, N>& dy) {
    require(saved_shape_.size() == N, "GroupNorm::backward", "no saved forward of rank ", N,
            " (call forward first)");
    auto expected = dy.shape();
    std::copy(saved_shape_.begin(), saved_shape_.end(), expected.begin());
    check_same_shape("GroupNorm::backward", "dy", dy.shape(), expected);
    const std::size_t B = expected[0], C = num_channels(), G = num_groups(), Cg = C / G;
    const std::size_t S = dy.size() / (B * C), M = Cg * S;
    const bool affine = config_.affine;
    Tensor<T, N> dx(expected);
    const auto groups = static_cast<std::int64_t>(B * G);
#pragma omp parallel for schedule(static) if (parallel::exceeds(dy.size(), parallel::kNormSize))
    for (std::int64_t bg = 0; bg < groups; ++bg) {
      const T* dyg = dy.data() + bg * M;
      const T* gamma = affine ? weight.value.data() + (bg % G) * Cg : nullptr;
      norm_detail::normalize_row_backward(
          [&](std::size_t i) { return gamma ? dyg[i] * gamma[i / S] : dyg[i]; },
          x_hat_.data() + bg * M, M, rstd_[bg], dx.data() + bg * M);
    }
    if (affine && (weight.trainable || bias.trainable)) {
      if (weight.trainable)
        check_shape("GroupNorm::backward", "weight.grad", weight.grad.shape(), {C});
      if (bias.trainable) check_shape("GroupNorm::backward", "bias.grad", bias.grad.shape(), {C});
      const auto channels = static_cast<std::int64_t>(C);
#pragma omp parallel for schedule(static) if (parallel::exceeds(dy.size(), parallel::kNormSize))
      for (std::int64_t c = 0; c < channels; ++c) {
        double dgamma = 0, dbeta = 0;
        for (std::size_t b = 0; b < B; ++b) {
          const std::size_t base = (b * C + c) * S;
          for (std::size_t s = 0; s < S; ++s) {
            const double d = static_cast<double>(dy.data()[base + s]);
            dgamma += d * static_cast<double>(x_hat_[base + s]);
            dbeta += d;
          }
        }
        if (weight.trainable) weight.grad(c) += static_cast<T>(dgamma);
        if (bias.trainable) bias.grad(c) += static_cast<T>(dbeta);
      }
    }
    return dx;
  }

  /// Drops the saved forward context (frees its memory).
  void clear_saved() {
    x_hat_ = std::vector<T>();  // (= {} would keep the capacity)
    rstd_ = std::vector<T>();
    saved_shape_ = std::vector<std::size_t>();
  }

 private:
  template <std::size_t N>
  Tensor<T, N> run(const Tensor<T, N>& x, std::vector<T>* x_hat_out,
                   std::vector<T>* rstd_out) const {
    static_assert(N >= 2, "GroupNorm needs an input [B, C, ...]");
    require(x.shape()[1] == num_channels(), "GroupNorm::forward", "x has shape ",
            shape_string(x.shape()), ", expected [B,", num_channels(), ",...]");
    if (config_.affine) {
      check_shape("GroupNorm::forward", "weight", weight.value.shape(), {num_channels()});
      check_shape("GroupNorm::forward", "bias", bias.value.shape(), {num_channels()});
    }
    const std::size_t B = x.shape()[0], C = num_channels(), G = num_groups(), Cg = C / G;
    const std::size_t S = B == 0 ? 0 : x.size() / (B * C), M = Cg * S;
    require(M > 0, "GroupNorm::forward", "x has shape ", shape_string(x.shape()),
            ", expected a non-empty spatial size");
    Tensor<T, N> y(x.shape());
    const bool save = x_hat_out != nullptr;
    if (save) {
      x_hat_out->resize(x.size());
      rstd_out->resize(B * G);
    }
    const auto groups = static_cast<std::int64_t>(B * G);
#pragma omp parallel for schedule(static) if (parallel::exceeds(x.size(), parallel::kNormSize))
    for (std::int64_t bg = 0; bg < groups; ++bg) {
      T* yg = y.data() + bg * M;
      T* xh = save ? x_hat_out->data() + bg * M : yg;
      const T s = norm_detail::normalize_row(x.data() + bg * M, M, config_.eps, xh);
      if (save) (*rstd_out)[bg] = s;
      if (config_.affine) {
        const std::size_t c0 = (bg % G) * Cg;
        for (std::size_t cc = 0; cc < Cg; ++cc) {
          const T gamma = weight.value(c0 + cc), beta = bias.value(c0 + cc);
          for (std::size_t s = 0; s < S; ++s) yg[cc * S + s] = xh[cc * S + s] * gamma + beta;
        }
      } else if (save) {
        std::copy(xh, xh + M, yg);
      }
    }
    return y;
  }

  GroupNormConfig config_{};
  std::vector<T> x_hat_, rstd_;
  std::vector<std::size_t> saved_shape_;
};

}  // namespace difftrain::nn
