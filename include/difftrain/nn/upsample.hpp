#pragma once
// Nearest-neighbour upsampling of NCHW tensors, forward and backward (diffusers Upsample2D's
// interpolation step before its conv: F.interpolate(x, scale_factor=2, mode="nearest"), or
// size=output_size when the UNet must match an odd-sized skip connection).
//
// Dims legend: B batch, C channels, H×W input, Ho×Wo output (2H×2W by default).
// Output pixel (i, j) copies input pixel (src(i, H, Ho), src(j, W, Wo)); backward sums dy over
// all output pixels that copied an input pixel. Nothing is saved by forward but the shape.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/parallel.hpp"
#include "difftrain/core/tensor.hpp"

namespace difftrain::nn {

// src = min(floor(dst · (in / out)), in − 1), with in / out rounded to float as PyTorch does, so
// that non-integer ratios (e.g. 5 → 9) pick the same source pixels; out = 2·in gives dst / 2.
inline std::size_t nearest_source_index(std::size_t dst, std::size_t in, std::size_t out) {
  if (out == in) return dst;
  if (out == 2 * in) return dst / 2;
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  const auto src = static_cast<std::size_t>(std::floor(static_cast<float>(dst) * scale));
  return std::min(src, in - 1);
}

namespace detail {
inline std::vector<std::size_t> nearest_table(std::size_t in, std::size_t out) {
  std::vector<std::size_t> table(out);
  for (std::size_t i = 0; i < out; ++i) table[i] = nearest_source_index(i, in, out);
  return table;
}
}  // namespace detail

/// [B, C, H, W] → [B, C, out_h, out_w] by nearest neighbour.
template <class T>
Tensor4<T> upsample_nearest2d_forward(const Tensor4<T>& x, std::size_t out_h, std::size_t out_w) {
  const std::size_t B = x.shape()[0], C = x.shape()[1], H = x.shape()[2], W = x.shape()[3];
  require(H > 0 && W > 0, "upsample_nearest2d_forward", "x has shape ", shape_string(x.shape()),
          ", expected positive H and W");
  require(out_h > 0 && out_w > 0, "upsample_nearest2d_forward", "output size ", out_h, "x", out_w,
          " must be positive");
  const auto rows = detail::nearest_table(H, out_h);
  const auto cols = detail::nearest_table(W, out_w);
  Tensor4<T> y(std::array<std::size_t, 4>{B, C, out_h, out_w});
#pragma omp parallel for schedule(static) if (y.size() >= parallel::kUpsampleSize)
  for (std::ptrdiff_t bc = 0; bc < static_cast<std::ptrdiff_t>(B * C); ++bc) {
    const T* src = x.data() + bc * H * W;
    T* dst = y.data() + bc * out_h * out_w;
    for (std::size_t i = 0; i < out_h; ++i) {
      const T* src_row = src + rows[i] * W;
      for (std::size_t j = 0; j < out_w; ++j) dst[i * out_w + j] = src_row[cols[j]];
    }
  }
  return y;
}

/// [B, C, H, W] → [B, C, 2H, 2W].
template <class T>
Tensor4<T> upsample_nearest2d_forward(const Tensor4<T>& x) {
  return upsample_nearest2d_forward(x, 2 * x.shape()[2], 2 * x.shape()[3]);
}

// dx[b,c,src(i),src(j)] = Σ_{i,j} dy[b,c,i,j]; dy [B, C, Ho, Wo] → dx [B, C, in_h, in_w].
template <class T>
Tensor4<T> upsample_nearest2d_backward(const Tensor4<T>& dy, std::size_t in_h, std::size_t in_w) {
  const std::size_t B = dy.shape()[0], C = dy.shape()[1], Ho = dy.shape()[2], Wo = dy.shape()[3];
  require(in_h > 0 && in_w > 0, "upsample_nearest2d_backward", "input size ", in_h, "x", in_w,
          " must be positive");
  require(Ho > 0 && Wo > 0, "upsample_nearest2d_backward", "dy has shape ",
          shape_string(dy.shape()), ", expected positive H and W");
  const auto rows = detail::nearest_table(in_h, Ho);
  const auto cols = detail::nearest_table(in_w, Wo);
  Tensor4<T> dx = xt::zeros<T>(std::array<std::size_t, 4>{B, C, in_h, in_w});
#pragma omp parallel for schedule(static) if (dy.size() >= parallel::kUpsampleSize)
  for (std::ptrdiff_t bc = 0; bc < static_cast<std::ptrdiff_t>(B * C); ++bc) {
    const T* src = dy.data() + bc * Ho * Wo;
    T* dst = dx.data() + bc * in_h * in_w;
    for (std::size_t i = 0; i < Ho; ++i) {
      T* dst_row = dst + rows[i] * in_w;
      for (std::size_t j = 0; j < Wo; ++j) dst_row[cols[j]] += src[i * Wo + j];
    }
  }
  return dx;
}

/// Backward of the 2× forward: dy [B, C, 2H, 2W] → dx [B, C, H, W].
template <class T>
Tensor4<T> upsample_nearest2d_backward(const Tensor4<T>& dy) {
  require(dy.shape()[2] % 2 == 0 && dy.shape()[3] % 2 == 0, "upsample_nearest2d_backward",
          "dy has shape ", shape_string(dy.shape()), ", expected even H and W for 2x upsampling");
  return upsample_nearest2d_backward(dy, dy.shape()[2] / 2, dy.shape()[3] / 2);
}

}  // namespace difftrain::nn
