#pragma once
// 2-D convolution (PyTorch nn.Conv2d, groups = 1, dilation = 1) as im2col + Eigen GEMM.
//
// Dims legend: B batch, C in_channels, H×W input, O out_channels, k kernel (k×k), s stride,
// pad (left, right, top, bottom) zero padding, Ho = (H + top + bottom − k) / s + 1 (likewise Wo),
// K = C·k·k rows of the column matrix, P = Ho·Wo its columns.
// Weight OIHW [O, C, k, k] (PyTorch layout, loads unchanged), bias [O]; activations NCHW.
//
// Per sample b:
//   col[K, P] = im2col(x_b);  y_b[O, P] = W[O, K] · col + b
// Backward (col reused for dcol once dW is done):
//   dW += dy_b · colᵀ;  db += Σ_P dy_b;  dx_b = col2im(Wᵀ · dy_b)
// Threads: when the batch splits evenly, OpenMP over the batch, each thread its own column buffer
// and (backward) its own dW/db partial, summed after the loop. Otherwise (e.g. one sample, two
// threads) the threads share each sample: im2col/col2im by channels, forward and dcol GEMMs by
// column blocks of P, dW/db by output rows; every GEMM stays single-threaded inside the region.
// A 1×1, stride-1, unpadded conv uses x_b itself as col. Asymmetric padding covers the VAE's
// pad (0,1,0,1) + stride-2 downsample in one layer. forward saves a copy of x when the weight is
// trainable (one context is kept). The column buffers are shared by all Conv2d<T> layers run from
// one thread (thread_local): layers of one model run one after the other; one layer object must
// not run two forwards/backwards concurrently.

#include <Eigen/Core>
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>
#include <xtensor/xtensor.hpp>

#include "difftrain/core/error.hpp"
#include "difftrain/core/ordered_sum.hpp"
#include "difftrain/core/parallel.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/nn/bf16_weight.hpp"
#include "difftrain/nn/linear.hpp"  // RowMatrix maps
#include "difftrain/nn/parameter.hpp"

namespace difftrain::nn {

/// Zero padding per side, in pixels.
struct Padding2d {
  std::size_t left = 0, right = 0, top = 0, bottom = 0;
  static constexpr Padding2d same(std::size_t p) { return {p, p, p, p}; }
  bool operator==(const Padding2d&) const = default;
};

struct Conv2dConfig {
  std::size_t in_channels = 0;
  std::size_t out_channels = 0;
  std::size_t kernel_size = 1;
  std::size_t stride = 1;
  Padding2d padding{};
  bool bias = true;
};

namespace conv_detail {

struct Geometry {
  std::size_t C, H, W, k, s, Ho, Wo;
  Padding2d pad;
  std::size_t K() const { return C * k * k; }
  std::size_t P() const { return Ho * Wo; }
  bool identity_columns() const { return k == 1 && s == 1 && pad == Padding2d{}; }
};

// The output columns ow whose input column iw = ow·s + j − left lies inside [0, W): [lo, hi).
struct ValidRange {
  std::size_t lo, hi;
};
inline ValidRange valid_columns(const Geometry& g, std::size_t j) {
  const auto s = static_cast<std::ptrdiff_t>(g.s);
  const auto off = static_cast<std::ptrdiff_t>(j) - static_cast<std::ptrdiff_t>(g.pad.left);
  const auto wo = static_cast<std::ptrdiff_t>(g.Wo), w = static_cast<std::ptrdiff_t>(g.W);
  // smallest ow with ow·s + off >= 0, and one past the largest with ow·s + off <= W − 1
  const std::ptrdiff_t lo = off >= 0 ? 0 : (-off + s - 1) / s;
  const std::ptrdiff_t hi = w - 1 - off < 0 ? 0 : (w - 1 - off) / s + 1;
  const std::ptrdiff_t clamped_hi = std::min(hi, wo);
  const std::ptrdiff_t clamped_lo = std::min(lo, clamped_hi);
  return {static_cast<std::size_t>(clamped_lo), static_cast<std::size_t>(clamped_hi)};
}

// col[(c·k + i)·k + j, oh·Wo + ow] = x[c, oh·s + i − top, ow·s + j − left] (0 outside), for the
// channels [c0, c1) (the rows of a thread's share). Memory-bound: the valid span of each output
// row is a contiguous copy for stride 1, and the padding a short fill; no per-element branch.
template <class T>
void im2col(const T* x, const Geometry& g, T* col, std::size_t c0, std::size_t c1) {
  const auto H = static_cast<std::ptrdiff_t>(g.H);
  for (std::size_t c = c0; c < c1; ++c) {
    const T* xc = x + c * g.H * g.W;
    for (std::size_t i = 0; i < g.k; ++i) {
      for (std::size_t j = 0; j < g.k; ++j) {
        const ValidRange r = valid_columns(g, j);
        const std::ptrdiff_t shift =
            static_cast<std::ptrdiff_t>(j) - static_cast<std::ptrdiff_t>(g.pad.left);
        T* dst = col + ((c * g.k + i) * g.k + j) * g.P();
        for (std::size_t oh = 0; oh < g.Ho; ++oh, dst += g.Wo) {
          const auto ih =
              static_cast<std::ptrdiff_t>(oh * g.s + i) - static_cast<std::ptrdiff_t>(g.pad.top);
          if (ih < 0 || ih >= H || r.lo == r.hi) {
            std::fill(dst, dst + g.Wo, T(0));
            continue;
          }
          // x index of output column ow: base + ow·s (>= 0 for ow >= r.lo)
          const std::ptrdiff_t base = ih * static_cast<std::ptrdiff_t>(g.W) + shift;
          std::fill(dst, dst + r.lo, T(0));
          if (g.s == 1) {
            std::copy(xc + (base + static_cast<std::ptrdiff_t>(r.lo)),
                      xc + (base + static_cast<std::ptrdiff_t>(r.hi)), dst + r.lo);
          } else {
            for (std::size_t ow = r.lo; ow < r.hi; ++ow)
              dst[ow] = xc[base + static_cast<std::ptrdiff_t>(ow * g.s)];
          }
          std::fill(dst + r.hi, dst + g.Wo, T(0));
        }
      }
    }
  }
}
template <class T>
void im2col(const T* x, const Geometry& g, T* col) {
  im2col(x, g, col, 0, g.C);
}

// dx[c, ih, iw] = Σ over the col entries that read it (the transpose of im2col), for the channels
// [c0, c1); those channels of dx are overwritten.
template <class T>
void col2im(const T* col, const Geometry& g, T* dx, std::size_t c0, std::size_t c1) {
  std::fill(dx + c0 * g.H * g.W, dx + c1 * g.H * g.W, T(0));
  const auto H = static_cast<std::ptrdiff_t>(g.H);
  for (std::size_t c = c0; c < c1; ++c) {
    T* dxc = dx + c * g.H * g.W;
    for (std::size_t i = 0; i < g.k; ++i) {
      for (std::size_t j = 0; j < g.k; ++j) {
        const ValidRange r = valid_columns(g, j);
        if (r.lo == r.hi) continue;  // this kernel column reads only padding
        const std::ptrdiff_t shift =
            static_cast<std::ptrdiff_t>(j) - static_cast<std::ptrdiff_t>(g.pad.left);
        const T* src = col + ((c * g.k + i) * g.k + j) * g.P();
        for (std::size_t oh = 0; oh < g.Ho; ++oh, src += g.Wo) {
          const auto ih =
              static_cast<std::ptrdiff_t>(oh * g.s + i) - static_cast<std::ptrdiff_t>(g.pad.top);
          if (ih < 0 || ih >= H) continue;
          const std::ptrdiff_t base = ih * static_cast<std::ptrdiff_t>(g.W) + shift;
          if (g.s == 1) {
            T* row = dxc + (base + static_cast<std::ptrdiff_t>(r.lo));
            for (std::size_t n = 0; n < r.hi - r.lo; ++n) row[n] += src[r.lo + n];
          } else {
            for (std::size_t ow = r.lo; ow < r.hi; ++ow)
              dxc[base + static_cast<std::ptrdiff_t>(ow * g.s)] += src[ow];
          }
        }
      }
    }
  }
}
template <class T>
void col2im(const T* col, const Geometry& g, T* dx) {
  col2im(col, g, dx, 0, g.C);
}

// Threads for a conv of `macs` multiply-adds: one when the whole job is small.
inline int thread_count(std::size_t macs) {
  return macs < parallel::kConvMacs ? 1 : parallel::max_threads();
}

template <class T>
using StridedRowMap = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;
template <class T>
using ConstStridedRowMap = Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>>;

// Columns [cols.begin, cols.end) of a row-major [rows, P] buffer.
template <class T>
ConstStridedRowMap<T> column_block(const T* data, std::size_t rows, std::size_t P,
                                   parallel::Span cols) {
  return ConstStridedRowMap<T>(data + cols.begin, static_cast<Eigen::Index>(rows),
                               static_cast<Eigen::Index>(cols.size()), Eigen::OuterStride<>(P));
}
template <class T>
StridedRowMap<T> column_block(T* data, std::size_t rows, std::size_t P, parallel::Span cols) {
  return StridedRowMap<T>(data + cols.begin, static_cast<Eigen::Index>(rows),
                          static_cast<Eigen::Index>(cols.size()), Eigen::OuterStride<>(P));
}

}  // namespace conv_detail

template <class T = float>
class Conv2d {
 public:
  using Scalar = T;

  Parameter<T> weight;  // [O, C, k, k]
  Parameter<T> bias;    // [O]; shape [0] when config.bias is false (never visited then)

  Conv2d() = default;
  explicit Conv2d(Conv2dConfig config)
      : weight({config.out_channels, config.in_channels, config.kernel_size, config.kernel_size}),
        bias({config.bias ? config.out_channels : 0}),
        config_(config) {
    require(config.in_channels > 0 && config.out_channels > 0, "Conv2d",
            "in_channels and out_channels must be positive, got ", config.in_channels, " and ",
            config.out_channels);
    require(config.kernel_size > 0 && config.stride > 0, "Conv2d",
            "kernel_size and stride must be positive, got ", config.kernel_size, " and ",
            config.stride);
  }
  /// PyTorch-style: symmetric padding on all four sides.
  Conv2d(std::size_t in_channels, std::size_t out_channels, std::size_t kernel_size,
         std::size_t stride = 1, std::size_t padding = 0, bool has_bias = true)
      : Conv2d(Conv2dConfig{in_channels, out_channels, kernel_size, stride,
                            Padding2d::same(padding), has_bias}) {}

  const Conv2dConfig& config() const { return config_; }
  std::size_t in_channels() const { return config_.in_channels; }
  std::size_t out_channels() const { return config_.out_channels; }
  std::size_t kernel_size() const { return config_.kernel_size; }
  bool has_bias() const { return config_.bias; }

  /// Visits "prefix.weight" and, with a bias, "prefix.bias".
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    visit(join_name(prefix, "weight"), weight);
    if (config_.bias) visit(join_name(prefix, "bias"), bias);
  }
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) const {
    visit(join_name(prefix, "weight"), weight);
    if (config_.bias) visit(join_name(prefix, "bias"), bias);
  }

  /// Output shape [B, O, Ho, Wo] for an input [B, C, H, W] (throws if the input is too small).
  std::array<std::size_t, 4> output_shape(const std::array<std::size_t, 4>& in) const {
    const auto g = geometry("Conv2d::forward", in);
    return {in[0], out_channels(), g.Ho, g.Wo};
  }

  // y[b, o] = Σ_{c,i,j} W[o, c, i, j] · x_pad[b, c, s·oh + i, s·ow + j] + bias[o], saving x
  // when the weight is trainable (the input gradient of a frozen layer needs only W)
  Tensor4<T> forward(const Tensor4<T>& x) {
    Tensor4<T> y = forward_inference(x);
    saved_shape_ = x.shape();
    input_saved_ = weight.trainable;
    saved_input_ = input_saved_ ? x : Tensor4<T>();
    has_saved_ = true;
    return y;
  }

  // same without saving anything
  Tensor4<T> forward_inference(const Tensor4<T>& x) const {
    check_parameters("Conv2d::forward", false);
    const auto g = geometry("Conv2d::forward", x.shape());
    const std::size_t B = x.shape()[0], O = out_channels(), K = g.K(), P = g.P();
    const T* w = bf16_.data(weight);  // once, outside the parallel regions
    Tensor4<T> y({B, O, g.Ho, g.Wo});
    const int threads = conv_detail::thread_count(B * O * K * P);
    const std::size_t col_size = g.identity_columns() ? 0 : K * P;
    const std::size_t sample = g.C * g.H * g.W;
    if (split_batch(B, threads)) {
      std::vector<std::vector<T>>& workspace = column_workspace(threads, col_size);
      const auto batch = static_cast<std::int64_t>(B);
#pragma omp parallel for num_threads(threads) schedule(static)
      for (std::int64_t b = 0; b < batch; ++b) {
        const T* xb = x.data() + b * sample;
        const T* col = xb;
        if (!g.identity_columns()) {
          T* buffer = workspace[parallel::thread_id()].data();
          conv_detail::im2col(xb, g, buffer);
          col = buffer;
        }
        forward_columns(w, col, g, y.data() + b * O * P, {0, P});
      }
    } else {
      // Fewer samples than threads (or an uneven split): the threads share each sample, im2col
      // by channels, then the GEMM by column blocks, in one shared column buffer.
      T* buffer = column_workspace(1, col_size)[0].data();
#pragma omp parallel num_threads(threads)
      {
        const int t = parallel::thread_id(), n = parallel::team_size();
        const auto channels = parallel::split(g.C, t, n);
        const auto cols = parallel::split(P, t, n, kColumnAlign);
        for (std::size_t b = 0; b < B; ++b) {
          const T* xb = x.data() + b * sample;
          if (!g.identity_columns())
            conv_detail::im2col(xb, g, buffer, channels.begin, channels.end);
#pragma omp barrier
          forward_columns(w, g.identity_columns() ? xb : buffer, g, y.data() + b * O * P, cols);
#pragma omp barrier
        }
      }
    }
    return y;
  }

  /// dx for the saved input (empty when !input_grad); accumulates dW and db unless frozen.
  Tensor4<T> backward(const Tensor4<T>& dy, bool input_grad = true) {
    require(has_saved_, "Conv2d::backward", "no saved forward (call forward first)");
    check_parameters("Conv2d::backward", true);
    const bool weight_grad = weight.trainable, bias_grad = config_.bias && bias.trainable;
    require(!weight_grad || input_saved_, "Conv2d::backward",
            "the weight was frozen during the forward, which therefore kept no input; run the "
            "forward again after making it trainable");
    const auto g = geometry("Conv2d::backward", saved_shape_);
    const std::size_t B = saved_shape_[0], O = out_channels(), K = g.K(), P = g.P();
    check_shape("Conv2d::backward", "dy", dy.shape(), {B, O, g.Ho, g.Wo});
    const T* x = weight_grad ? saved_input_.data() : nullptr;  // read only for dW
    Tensor4<T> dx;
    if (input_grad) dx = Tensor4<T>(saved_shape_);
    if (!input_grad && !weight_grad && !bias_grad) return dx;

    const int threads = conv_detail::thread_count(B * O * K * P);
    // one buffer per thread: col for dW, then reused for dcol = Wᵀ·dy (col is no longer needed)
    const std::size_t col_size = g.identity_columns() || (!weight_grad && !input_grad) ? 0 : K * P;
    const std::size_t sample = g.C * g.H * g.W;
    ConstRowMatrixMap<T> Wm(bf16_.data(weight), O, K);
    RowMatrixMap<T> dW(weight_grad ? weight.grad.data() : nullptr, O, K);
    VectorMap<T> db(bias_grad ? bias.grad.data() : nullptr, O);

    if (split_batch(B, threads)) {
      std::vector<std::vector<T>>& workspace = column_workspace(threads, col_size);
      // thread 0 accumulates straight into the gradients; the others into partials, summed after
      const std::size_t parts = threads > 1 ? static_cast<std::size_t>(threads - 1) : 0;
      if (weight_grad) {
        if (dW_part_.size() < parts) dW_part_.resize(parts);
        for (std::size_t p = 0; p < parts; ++p) dW_part_[p].setZero(O, K);
      }
      if (bias_grad) {
        if (db_part_.size() < parts) db_part_.resize(parts);
        for (std::size_t p = 0; p < parts; ++p) db_part_[p].setZero(O);
      }
      const auto batch = static_cast<std::int64_t>(B);
#pragma omp parallel for num_threads(threads) schedule(static)
      for (std::int64_t b = 0; b < batch; ++b) {
        const int t = parallel::thread_id();
        T* buffer = workspace[t].data();
        const T* xb = x ? x + b * sample : nullptr;
        ConstRowMatrixMap<T> dyb(dy.data() + b * O * P, O, P);
        if (weight_grad) {
          const T* col = xb;
          if (!g.identity_columns()) {
            conv_detail::im2col(xb, g, buffer);
            col = buffer;
          }
          ConstRowMatrixMap<T> colm(col, K, P);
          if (t == 0) {
            dW.noalias() += dyb * colm.transpose();
          } else {
            dW_part_[t - 1].noalias() += dyb * colm.transpose();
          }
        }
        if (bias_grad) {
          if (t == 0) {
            for (std::size_t o = 0; o < O; ++o) db.data()[o] += ordered_sum(dyb.data() + o * P, P);
          } else {
            T* part = db_part_[t - 1].data();
            for (std::size_t o = 0; o < O; ++o) part[o] += ordered_sum(dyb.data() + o * P, P);
          }
        }
        if (input_grad) {
          T* dxb = dx.data() + b * sample;
          if (g.identity_columns()) {
            RowMatrixMap<T>(dxb, K, P).noalias() = Wm.transpose() * dyb;
          } else {
            RowMatrixMap<T>(buffer, K, P).noalias() = Wm.transpose() * dyb;
            conv_detail::col2im(buffer, g, dxb);
          }
        }
      }
      if (weight_grad)
        for (std::size_t p = 0; p < parts; ++p) dW += dW_part_[p];
      if (bias_grad)
        for (std::size_t p = 0; p < parts; ++p) db += db_part_[p];
    } else {
      // The threads share each sample: im2col and col2im by channels, dW and db by output rows
      // (no partials), dcol = Wᵀ·dy by column blocks, all in one shared buffer.
      T* buffer = column_workspace(1, col_size)[0].data();
#pragma omp parallel num_threads(threads)
      {
        const int t = parallel::thread_id(), n = parallel::team_size();
        const auto channels = parallel::split(g.C, t, n);
        const auto rows = parallel::split(O, t, n);
        const auto cols = parallel::split(P, t, n, kColumnAlign);
        const auto r0 = static_cast<Eigen::Index>(rows.begin);
        const auto nr = static_cast<Eigen::Index>(rows.size());
        for (std::size_t b = 0; b < B; ++b) {
          const T* xb = x ? x + b * sample : nullptr;
          const T* dyp = dy.data() + b * O * P;
          ConstRowMatrixMap<T> dyb(dyp, O, P);
          if (weight_grad) {
            if (!g.identity_columns())
              conv_detail::im2col(xb, g, buffer, channels.begin, channels.end);
#pragma omp barrier
            ConstRowMatrixMap<T> colm(g.identity_columns() ? xb : buffer, K, P);
            dW.middleRows(r0, nr).noalias() += dyb.middleRows(r0, nr) * colm.transpose();
          }
          if (bias_grad)
            for (std::size_t o = rows.begin; o < rows.end; ++o)
              db.data()[o] += ordered_sum(dyp + o * P, P);
          if (input_grad) {
            T* dxb = dx.data() + b * sample;
            const auto dy_cols = conv_detail::column_block(dyp, O, P, cols);
            if (g.identity_columns()) {
              conv_detail::column_block(dxb, K, P, cols).noalias() = Wm.transpose() * dy_cols;
            } else {
#pragma omp barrier
              conv_detail::column_block(buffer, K, P, cols).noalias() = Wm.transpose() * dy_cols;
#pragma omp barrier
              conv_detail::col2im(buffer, g, dxb, channels.begin, channels.end);
            }
          }
#pragma omp barrier
        }
      }
    }
    return dx;
  }

  /// --mixed_precision bf16: keeps the frozen weight as bfloat16 (nn/bf16_weight.hpp); weight.value
  /// is left empty.
  void store_weight_bf16() { bf16_.store(weight, "Conv2d::store_weight_bf16"); }
  bool weight_in_bf16() const { return bf16_.stored(); }

  void clear_saved() {
    saved_input_ = Tensor4<T>();
    has_saved_ = input_saved_ = false;
  }

 private:
  template <class Shape>
  conv_detail::Geometry geometry(std::string_view function, const Shape& shape) const {
    require(shape.size() == 4, function, "x has shape ", shape_string(shape), ", expected [B,",
            in_channels(), ",H,W]");
    require(shape[1] == in_channels(), function, "x has shape ", shape_string(shape),
            ", expected [B,", in_channels(), ",H,W]");
    const auto& p = config_.padding;
    const std::size_t k = kernel_size(), s = config_.stride;
    const std::size_t hp = shape[2] + p.top + p.bottom, wp = shape[3] + p.left + p.right;
    require(hp >= k && wp >= k, function, "x has shape ", shape_string(shape), ", padded to ", hp,
            "x", wp, ", smaller than the ", k, "x", k, " kernel");
    return {in_channels(), shape[2], shape[3], k, s, (hp - k) / s + 1, (wp - k) / s + 1, p};
  }

  void check_parameters(std::string_view function, bool grads) const {
    const std::size_t k = kernel_size();
    if (bf16_.stored()) {
      require(bf16_.size() == out_channels() * in_channels() * k * k, function,
              "the bf16 weight has ", bf16_.size(), " elements, expected ", out_channels(), "x",
              in_channels(), "x", k, "x", k);
    } else {
      check_shape(function, "weight", weight.value.shape(), {out_channels(), in_channels(), k, k});
    }
    if (grads && weight.trainable)
      check_shape(function, "weight.grad", weight.grad.shape(),
                  {out_channels(), in_channels(), k, k});
    if (config_.bias) {
      check_shape(function, "bias", bias.value.shape(), {out_channels()});
      if (grads && bias.trainable)
        check_shape(function, "bias.grad", bias.grad.shape(), {out_channels()});
    }
  }

  // The batch loop splits evenly over the threads; otherwise the threads share each sample.
  static bool split_batch(std::size_t batch, int threads) {
    return threads == 1 || batch % static_cast<std::size_t>(threads) == 0;
  }

  // y_b[:, cols] = W · col[:, cols] + b, for W = w [O, K], a row-major col [K, P] and y_b [O, P]
  void forward_columns(const T* w, const T* col, const conv_detail::Geometry& g, T* yb,
                       parallel::Span cols) const {
    const std::size_t O = out_channels(), K = g.K(), P = g.P();
    ConstRowMatrixMap<T> Wm(w, O, K);
    auto y = conv_detail::column_block(yb, O, P, cols);
    y.noalias() = Wm * conv_detail::column_block(col, K, P, cols);
    if (config_.bias) y.colwise() += ConstVectorMap<T>(bias.value.data(), O);
  }

  // Per-thread column buffers shared by every Conv2d<T> run from the calling thread (layers run one
  // at a time): one per layer held ~1 GiB of im2col columns in SD 1.5. Taken on the calling
  // thread, before the parallel region that uses them.
  static std::vector<std::vector<T>>& column_workspace(int threads, std::size_t size) {
    thread_local std::vector<std::vector<T>> workspace;
    if (workspace.size() < static_cast<std::size_t>(threads)) workspace.resize(threads);
    for (int t = 0; t < threads; ++t)
      if (workspace[t].size() < size) workspace[t].resize(size);
    return workspace;
  }

  Conv2dConfig config_{};
  Bf16Weight<T> bf16_;
  Tensor4<T> saved_input_;  // empty when the weight was frozen in the forward
  std::array<std::size_t, 4> saved_shape_{};
  bool has_saved_ = false, input_saved_ = false;
  std::vector<RowMatrix<T>> dW_part_;  // per-thread dW partials (threads 1..)
  std::vector<Eigen::Matrix<T, Eigen::Dynamic, 1>> db_part_;
  // Column blocks of the shared-sample split start on multiples of this (SIMD alignment).
  static constexpr std::size_t kColumnAlign = 16;
};

namespace reference {
// Naive direct convolution (7 nested loops), the reference the GEMM path is tested against.
template <class T>
Tensor4<T> conv2d(const Tensor4<T>& x, const Conv2d<T>& conv) {
  const auto shape = conv.output_shape(x.shape());
  const auto& cfg = conv.config();
  const std::size_t k = cfg.kernel_size;
  Tensor4<T> y(shape);
  for (std::size_t b = 0; b < shape[0]; ++b)
    for (std::size_t o = 0; o < shape[1]; ++o)
      for (std::size_t oh = 0; oh < shape[2]; ++oh)
        for (std::size_t ow = 0; ow < shape[3]; ++ow) {
          T sum = cfg.bias ? conv.bias.value(o) : T(0);
          for (std::size_t c = 0; c < cfg.in_channels; ++c)
            for (std::size_t i = 0; i < k; ++i)
              for (std::size_t j = 0; j < k; ++j) {
                const auto ih = static_cast<std::ptrdiff_t>(oh * cfg.stride + i) -
                                static_cast<std::ptrdiff_t>(cfg.padding.top);
                const auto iw = static_cast<std::ptrdiff_t>(ow * cfg.stride + j) -
                                static_cast<std::ptrdiff_t>(cfg.padding.left);
                if (ih < 0 || iw < 0 || ih >= static_cast<std::ptrdiff_t>(x.shape()[2]) ||
                    iw >= static_cast<std::ptrdiff_t>(x.shape()[3]))
                  continue;
                sum += conv.weight.value(o, c, i, j) * x(b, c, ih, iw);
              }
          y(b, o, oh, ow) = sum;
        }
  return y;
}
}  // namespace reference

}  // namespace difftrain::nn
