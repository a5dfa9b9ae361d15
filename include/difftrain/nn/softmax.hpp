#pragma once
// Softmax over the last dimension, forward and backward.
//
// Dims legend: R rows (the product of all leading dims), N the last dim (the softmax axis).
// Forward subtracts the row maximum before exponentiating so that no logit overflows; backward
// needs only the forward output y (the input is not kept). The row kernels on raw memory are
// shared with attention, which calls them on blocks of its score matrix.

#include <algorithm>
#include <cmath>
#include <cstddef>

#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"

namespace difftrain::nn {

// y_j = exp(x_j − m) / Σ_k exp(x_k − m), m = max_k x_k; returns log Σ_k exp(x_k) (the log-sum-exp).
// `x` and `y` may alias. Requires n ≥ 1.
template <class T>
T softmax_row(const T* x, T* y, std::size_t n) {
  T m = x[0];
  for (std::size_t j = 1; j < n; ++j) m = std::max(m, x[j]);
  T sum = 0;
  for (std::size_t j = 0; j < n; ++j) {
    y[j] = std::exp(x[j] - m);
    sum += y[j];
  }
  const T inv = T(1) / sum;
  for (std::size_t j = 0; j < n; ++j) y[j] *= inv;
  return m + std::log(sum);
}

// dx_j = y_j · (dy_j − Σ_k dy_k y_k). `dx` may alias `dy`.
template <class T>
void softmax_row_backward(const T* y, const T* dy, T* dx, std::size_t n) {
  T dot = 0;
  for (std::size_t j = 0; j < n; ++j) dot += dy[j] * y[j];
  for (std::size_t j = 0; j < n; ++j) dx[j] = y[j] * (dy[j] - dot);
}

/// y = softmax(x) along the last dimension; any rank ≥ 1. An empty last dim gives an empty y.
template <class T, std::size_t N>
Tensor<T, N> softmax_forward(const Tensor<T, N>& x) {
  static_assert(N >= 1, "softmax_forward: rank must be at least 1");
  Tensor<T, N> y(x.shape());
  const std::size_t n = x.shape()[N - 1];
  if (n == 0) return y;
  const std::size_t rows = x.size() / n;
  for (std::size_t r = 0; r < rows; ++r) softmax_row(x.data() + r * n, y.data() + r * n, n);
  return y;
}

/// dL/dx from the forward output y and dL/dy (same shapes).
template <class T, std::size_t N>
Tensor<T, N> softmax_backward(const Tensor<T, N>& y, const Tensor<T, N>& dy) {
  static_assert(N >= 1, "softmax_backward: rank must be at least 1");
  check_same_shape("softmax_backward", "dy", dy.shape(), y.shape());
  Tensor<T, N> dx(y.shape());
  const std::size_t n = y.shape()[N - 1];
  if (n == 0) return dx;
  const std::size_t rows = y.size() / n;
  for (std::size_t r = 0; r < rows; ++r)
    softmax_row_backward(y.data() + r * n, dy.data() + r * n, dx.data() + r * n, n);
  return dx;
}

}  // namespace difftrain::nn
