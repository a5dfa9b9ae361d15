#pragma once
// Layer normalization over the last dim (PyTorch nn.LayerNorm(D, eps, elementwise_affine)).
//
// Dims legend: R rows (every leading dim flattened: B·L tokens), D normalized features.
// weight (γ) [D], bias (β) [D] when elementwise_affine.
//   forward:  μ = mean(x), rstd = 1/√(var(x) + eps) (biased var), x̂ = (x − μ)·rstd, y = x̂·γ + β
//   backward: g = dy·γ;  dx = rstd·(g − mean(g) − x̂·mean(g·x̂));  dγ += Σ_R dy·x̂;  dβ += Σ_R dy
// forward saves x̂ and rstd per row. Row statistics are accumulated in double for float inputs.
// The row kernels below are shared with GroupNorm (a group of a sample is one "row").

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>
#include <xtensor/xtensor.hpp>

#include "difftrain/core/error.hpp"
#include "difftrain/core/parallel.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::nn {

namespace norm_detail {

// x̂ = (x − mean)·rstd over one row of n elements; returns rstd (two-pass, double accumulators)
template <class T>
T normalize_row(const T* x, std::size_t n, double eps, T* x_hat) {
  double sum = 0;
  for (std::size_t i = 0; i < n; ++i) sum += static_cast<double>(x[i]);
  const double mean = sum / static_cast<double>(n);
  double squares = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(x[i]) - mean;
    squares += d * d;
  }
  const double rstd = 1.0 / std::sqrt(squares / static_cast<double>(n) + eps);
  for (std::size_t i = 0; i < n; ++i)
    x_hat[i] = static_cast<T>((static_cast<double>(x[i]) - mean) * rstd);
  return static_cast<T>(rstd);
}

// dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) over one row, g(i) = dL/dx̂_i given as a callable
template <class T, class G>
void normalize_row_backward(G&& g, const T* x_hat, std::size_t n, T rstd, T* dx) {
  double sum_g = 0, sum_gx = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double gi = static_cast<double>(g(i));
    sum_g += gi;
    sum_gx += gi * static_cast<double>(x_hat[i]);
  }
  const double mean_g = sum_g / static_cast<double>(n), mean_gx = sum_gx / static_cast<double>(n);
  for (std::size_t i = 0; i < n; ++i)
    dx[i] = static_cast<T>(static_cast<double>(rstd) * (static_cast<double>(g(i)) - mean_g -
                                                        static_cast<double>(x_hat[i]) * mean_gx));
}

}  // namespace norm_detail

struct LayerNormConfig {
  std::size_t normalized_shape = 0;  // D
  double eps = 1e-5;
  bool elementwise_affine = true;
};

template <class T = float>
class LayerNorm {
 public:
  using Scalar = T;

  Parameter<T> weight;  // γ [D] (ones), shape [0] without affine
  Parameter<T> bias;    // β [D] (zeros), shape [0] without affine

  LayerNorm() = default;
  explicit LayerNorm(LayerNormConfig config)
      : weight({config.elementwise_affine ? config.normalized_shape : 0}),
        bias({config.elementwise_affine ? config.normalized_shape : 0}),
        config_(config) {
    require(config.normalized_shape > 0, "LayerNorm", "normalized_shape must be positive");
    require(config.eps > 0, "LayerNorm", "eps must be positive, got ", config.eps);
    weight.value.fill(T(1));
  }
  explicit LayerNorm(std::size_t dim, double eps = 1e-5, bool affine = true)
      : LayerNorm(LayerNormConfig{dim, eps, affine}) {}

  const LayerNormConfig& config() const { return config_; }
  std::size_t dim() const { return config_.normalized_shape; }

  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    if (!config_.elementwise_affine) return;
    visit(join_name(prefix, "weight"), weight);
    visit(join_name(prefix, "bias"), bias);
  }
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) const {
    if (!config_.elementwise_affine) return;
    visit(join_name(prefix, "weight"), weight);
    visit(join_name(prefix, "bias"), bias);
  }

  // y = (x − μ)/√(σ² + eps)·γ + β over the last dim, saving x̂ and rstd
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
    require(saved_shape_.size() == N, "LayerNorm::backward", "no saved forward of rank ", N,
            " (call forward first)");
    auto expected = dy.shape();
    std::copy(saved_shape_.begin(), saved_shape_.end(), expected.begin());
    check_same_shape("LayerNorm::backward", "dy", dy.shape(), expected);
    const std::size_t D = dim(), rows = dy.size() / D;
    const bool affine = config_.elementwise_affine;
    Tensor<T, N> dx(expected);
    const auto R = static_cast<std::int64_t>(rows);
#pragma omp parallel for schedule(static) if (parallel::exceeds(rows * D, parallel::kNormSize))
    for (std::int64_t r = 0; r < R; ++r) {
      const T* dyr = dy.data() + r * D;
      const T* gamma = affine ? weight.value.data() : nullptr;
      norm_detail::normalize_row_backward(
          [&](std::size_t i) { return gamma ? dyr[i] * gamma[i] : dyr[i]; }, x_hat_.data() + r * D,
          D, rstd_[r], dx.data() + r * D);
    }
    if (affine) accumulate_affine_grads(dy.data(), rows);
    return dx;
  }

  /// Drops the saved forward context (frees its memory).
  void clear_saved() {
    x_hat_ = std::vector<T>();  // (= {} would keep the capacity)
    rstd_ = std::vector<T>();
    saved_shape_ = std::vector<std::size_t>();
  }

 private:
  // y, and x̂ and rstd when the outputs are given
  template <std::size_t N>
  Tensor<T, N> run(const Tensor<T, N>& x, std::vector<T>* x_hat_out,
                   std::vector<T>* rstd_out) const {
    static_assert(N >= 1);
    require(x.shape()[N - 1] == dim(), "LayerNorm::forward", "x has shape ",
            shape_string(x.shape()), ", expected last dim ", dim());
    if (config_.elementwise_affine) {
      check_shape("LayerNorm::forward", "weight", weight.value.shape(), {dim()});
      check_shape("LayerNorm::forward", "bias", bias.value.shape(), {dim()});
    }
    const std::size_t D = dim(), rows = x.size() / D;
    Tensor<T, N> y(x.shape());
    const bool save = x_hat_out != nullptr;
    if (save) {
      x_hat_out->resize(x.size());
      rstd_out->resize(rows);
    }
    const auto R = static_cast<std::int64_t>(rows);
#pragma omp parallel for schedule(static) if (parallel::exceeds(rows * D, parallel::kNormSize))
    for (std::int64_t r = 0; r < R; ++r) {
      T* xh = save ? x_hat_out->data() + r * D : y.data() + r * D;
      const T s = norm_detail::normalize_row(x.data() + r * D, D, config_.eps, xh);
      if (save) (*rstd_out)[r] = s;
      T* yr = y.data() + r * D;
      for (std::size_t i = 0; i < D; ++i)
        yr[i] = config_.elementwise_affine ? xh[i] * weight.value(i) + bias.value(i) : xh[i];
    }
    return y;
  }

  void accumulate_affine_grads(const T* dy, std::size_t rows) {
    const std::size_t D = dim();
    if (weight.trainable)
      check_shape("LayerNorm::backward", "weight.grad", weight.grad.shape(), {D});
    if (bias.trainable) check_shape("LayerNorm::backward", "bias.grad", bias.grad.shape(), {D});
    const auto Dn = static_cast<std::int64_t>(D);
#pragma omp parallel for schedule(static) if (parallel::exceeds(rows * D, parallel::kNormSize))
    for (std::int64_t i = 0; i < Dn; ++i) {
      double dgamma = 0, dbeta = 0;
      for (std::size_t r = 0; r < rows; ++r) {
        const double d = static_cast<double>(dy[r * D + i]);
        dgamma += d * static_cast<double>(x_hat_[r * D + i]);
        dbeta += d;
      }
      if (weight.trainable) weight.grad(i) += static_cast<T>(dgamma);
      if (bias.trainable) bias.grad(i) += static_cast<T>(dbeta);
    }
  }

  LayerNormConfig config_{};
  std::vector<T> x_hat_, rstd_;
  std::vector<std::size_t> saved_shape_;
};

}  // namespace difftrain::nn
