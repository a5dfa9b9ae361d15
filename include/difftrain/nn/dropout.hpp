#pragma once
// Dropout, deterministic from a counter-based RandomStream.
//
// Dims legend: any shape, elementwise over the flat index i.
//   training: y_i = x_i · m_i,  m_i = 1/(1 − p) if u_i ≥ p else 0,  u_i = uniform number i of the
//             stream (difftrain::fill_uniform), so the mask depends only on (seed, stream, i);
//   eval, or p = 0: y = x (identity, nothing drawn). p = 1 drops everything (y = 0).
// forward saves the mask m; backward is dx = dy ⊙ m.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>
#include <xtensor/xtensor.hpp>

#include "difftrain/core/error.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/core/tensor.hpp"

namespace difftrain::nn {

/// m_i = [u_i ≥ p]/(1 − p) for i in [offset, offset + mask.size()) of the stream (m = 0 if p = 1).
template <class T>
void dropout_mask(std::span<T> mask, RandomStream rs, double p, std::uint64_t offset = 0) {
  require(p >= 0 && p <= 1, "dropout_mask", "p is ", p, ", expected in [0, 1]");
  const T keep_scale = p < 1 ? static_cast<T>(1.0 / (1.0 - p)) : T(0);
  constexpr std::size_t kChunk = 4096;
  std::vector<float> u(std::min(kChunk, mask.size()));
  for (std::size_t start = 0; start < mask.size(); start += kChunk) {
    const std::size_t n = std::min(kChunk, mask.size() - start);
    fill_uniform(std::span<float>(u.data(), n), rs, offset + start);
    for (std::size_t i = 0; i < n; ++i)
      mask[start + i] = static_cast<double>(u[i]) >= p ? keep_scale : T(0);
  }
}

/// The same for a batch-major mask whose rows b are rows rows[b] of a larger batch (a
/// data-parallel shard): m[b·R + i] = m_{rows[b]·R + i}, R = mask.size()/rows.size(); rows empty:
/// the mask above.
template <class T>
void dropout_mask(std::span<T> mask, RandomStream rs, double p,
                  std::span<const std::uint64_t> rows) {
  for_each_global_row(mask.size(), rows,
                      [&](std::size_t local, std::uint64_t global, std::size_t n) {
                        dropout_mask(mask.subspan(local, n), rs, p, global);
                      });
}

struct DropoutConfig {
  double p = 0.0;
};

template <class T = float>
class Dropout {
 public:
  using Scalar = T;
  bool training = true;  // eval mode (false) is the identity

  Dropout() = default;
  explicit Dropout(DropoutConfig config) : config_(config) {
    require(config.p >= 0 && config.p <= 1, "Dropout", "p is ", config.p, ", expected in [0, 1]");
  }
  explicit Dropout(double p) : Dropout(DropoutConfig{p}) {}

  double p() const { return config_.p; }
  /// True when forward is the identity (eval mode or p = 0).
  bool is_identity() const { return !training || config_.p == 0; }

  template <class Visitor>
  void for_each_parameter(const std::string&, Visitor&&) const {}

  // y = x ⊙ m (training, p > 0) or y = x; saves m. With `rows`, x's leading rows are rows
  // rows[b] of a larger batch and draw its mask elements (dropout_mask above).
  template <std::size_t N>
  Tensor<T, N> forward(const Tensor<T, N>& x, RandomStream rs,
                       std::span<const std::uint64_t> rows = {}) {
    saved_shape_.assign(x.shape().begin(), x.shape().end());
    identity_ = is_identity();
    if (identity_) {
      mask_.clear();
      return x;
    }
    mask_.resize(x.size());
    dropout_mask(std::span<T>(mask_), rs, config_.p, rows);
    Tensor<T, N> y(x.shape());
    for (std::size_t i = 0; i < x.size(); ++i) y.data()[i] = x.data()[i] * mask_[i];
    return y;
  }

  // dx = dy ⊙ m
  template <std::size_t N>
  Tensor<T, N> backward(const Tensor<T, N>& dy) const {
    require(saved_shape_.size() == N, "Dropout::backward", "no saved forward of rank ", N,
            " (call forward first)");
    check_same_shape("Dropout::backward", "dy", dy.shape(), saved_shape_);
    if (identity_) return dy;
    Tensor<T, N> dx(dy.shape());
    for (std::size_t i = 0; i < dy.size(); ++i) dx.data()[i] = dy.data()[i] * mask_[i];
    return dx;
  }

  /// The mask of the last forward (empty when it was the identity).
  std::span<const T> mask() const { return mask_; }

 private:
  DropoutConfig config_{};
  bool identity_ = true;
  std::vector<T> mask_;
  std::vector<std::size_t> saved_shape_;
};

}  // namespace difftrain::nn
