#pragma once
// 2-D convolution (PyTorch nn.Conv2d, groups = 1, dilation = 1) as im2col + Eigen GEMM.
//
// Dims legend: B batch, C in_channels, H×W input, O out_channels, k kernel (k×k), s stride,
// pad (left, right, top, bottom) zero padding, Ho = (H + top + bottom − k) / s + 1 (likewise Wo),
// K = C·k·k rows of the column matrix, P = Ho·Wo its columns.
// Weight OIHW [O, C, k, k] (PyTorch layout, loads unchanged), bias [O]; activations NCHW.
//
// Per sample b (OpenMP over the batch, each thread its own column buffer):
//   col[K, P] = im2col(x_b);  y_b[O, P] = W[O, K] · col + b
// Backward (per thread partial dW/db, summed after the loop):
//   dW += dy_b · colᵀ;  db += Σ_P dy_b;  dx_b = col2im(Wᵀ · dy_b)
// A 1×1, stride-1, unpadded conv uses x_b itself as col. Asymmetric padding covers the VAE's
// pad (0,1,0,1) + stride-2 downsample in one layer. forward saves a copy of x; one context is kept.
// The per-thread column buffers are a reused member workspace: one layer object must not run two
// forwards/backwards concurrently (different layers may).

#include <Eigen/Core>
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>
#include <xtensor/xtensor.hpp>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
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

// col[(c·k + i)·k + j, oh·Wo + ow] = x[c, oh·s + i − top, ow·s + j − left] (0 outside)
template <class T>
void im2col(const T* x, const Geometry& g, T* col) {
  const auto H = static_cast<std::ptrdiff_t>(g.H), W = static_cast<std::ptrdiff_t>(g.W);
  for (std::size_t c = 0; c < g.C; ++c) {
    const T* xc = x + c * g.H * g.W;
    for (std::size_t i = 0; i < g.k; ++i) {
      for (std::size_t j = 0; j < g.k; ++j) {
        T* dst = col + ((c * g.k + i) * g.k + j) * g.P();
        for (std::size_t oh = 0; oh < g.Ho; ++oh, dst += g.Wo) {
          const auto ih =
              static_cast<std::ptrdiff_t>(oh * g.s + i) - static_cast<std::ptrdiff_t>(g.pad.top);
          if (ih < 0 || ih >= H) {
            std::fill(dst, dst + g.Wo, T(0));
            continue;
          }
          const T* row = xc + ih * W;
          for (std::size_t ow = 0; ow < g.Wo; ++ow) {
            const auto iw =
                static_cast<std::ptrdiff_t>(ow * g.s + j) - static_cast<std::ptrdiff_t>(g.pad.left);
            dst[ow] = (iw >= 0 && iw < W) ? row[iw] : T(0);
          }
        }
      }
    }
  }
}

// dx[c, ih, iw] += Σ over the col entries that read it (the transpose of im2col); dx zeroed first
template <class T>
void col2im(const T* col, const Geometry& g, T* dx) {
  std::fill(dx, dx + g.C * g.H * g.W, T(0));
  const auto H = static_cast<std::ptrdiff_t>(g.H), W = static_cast<std::ptrdiff_t>(g.W);
  for (std::size_t c = 0; c < g.C; ++c) {
    T* dxc = dx + c * g.H * g.W;
    for (std::size_t i = 0; i < g.k; ++i) {
      for (std::size_t j = 0; j < g.k; ++j) {
        const T* src = col + ((c * g.k + i) * g.k + j) * g.P();
        for (std::size_t oh = 0; oh < g.Ho; ++oh, src += g.Wo) {
          const auto ih =
              static_cast<std::ptrdiff_t>(oh * g.s + i) - static_cast<std::ptrdiff_t>(g.pad.top);
          if (ih < 0 || ih >= H) continue;
          T* row = dxc + ih * W;
          for (std::size_t ow = 0; ow < g.Wo; ++ow) {
            const auto iw =
                static_cast<std::ptrdiff_t>(ow * g.s + j) - static_cast<std::ptrdiff_t>(g.pad.left);
            if (iw >= 0 && iw < W) row[iw] += src[ow];
          }
        }
      }
    }
  }
}

// Threads for a loop over `work_items` samples of `flops_per_item` multiply-adds each: one when
// the whole job is small (a parallel region costs more than it saves, and far more on a loaded
// machine where a descheduled thread stalls the barrier).
inline int thread_count(std::size_t work_items, std::size_t flops_per_item) {
  constexpr std::size_t kMinParallelFlops = std::size_t{1} << 20;
#ifdef _OPENMP
  if (work_items * flops_per_item < kMinParallelFlops) return 1;
  return static_cast<int>(std::max<std::size_t>(
      1, std::min<std::size_t>(static_cast<std::size_t>(omp_get_max_threads()), work_items)));
#else
  (void)work_items;
  (void)flops_per_item;
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
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
  Tensor4<T> forward(const Tensor4<T>& x) {
    Tensor4<T> y = forward_inference(x);
    saved_input_ = x;
    has_saved_ = true;
    return y;
  }

  // same without saving anything
  Tensor4<T> forward_inference(const Tensor4<T>& x) const {
    check_parameters("Conv2d::forward", false);
    const auto g = geometry("Conv2d::forward", x.shape());
    const std::size_t B = x.shape()[0], O = out_channels(), K = g.K(), P = g.P();
    Tensor4<T> y({B, O, g.Ho, g.Wo});
    const int threads = conv_detail::thread_count(B, O * K * P);
    ensure_workspace(threads, g.identity_columns() ? 0 : K * P);
    ConstRowMatrixMap<T> Wm(weight.value.data(), O, K);
    const auto batch = static_cast<std::int64_t>(B);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (std::int64_t b = 0; b < batch; ++b) {
      const T* xb = x.data() + b * g.C * g.H * g.W;
      const T* col = xb;
      if (!g.identity_columns()) {
        T* buffer = workspace_[conv_detail::thread_id()].data();
        conv_detail::im2col(xb, g, buffer);
        col = buffer;
      }
      RowMatrixMap<T> yb(y.data() + b * O * P, O, P);
      yb.noalias() = Wm * ConstRowMatrixMap<T>(col, K, P);
      if (config_.bias) yb.colwise() += ConstVectorMap<T>(bias.value.data(), O);
    }
    return y;
  }

  /// dx for the saved input (empty when !input_grad); accumulates dW and db unless frozen.
  Tensor4<T> backward(const Tensor4<T>& dy, bool input_grad = true) {
    require(has_saved_, "Conv2d::backward", "no saved forward (call forward first)");
    check_parameters("Conv2d::backward", true);
    const auto& x = saved_input_;
    const auto g = geometry("Conv2d::backward", x.shape());
    const std::size_t B = x.shape()[0], O = out_channels(), K = g.K(), P = g.P();
    check_shape("Conv2d::backward", "dy", dy.shape(), {B, O, g.Ho, g.Wo});
    const bool weight_grad = weight.trainable, bias_grad = config_.bias && bias.trainable;
    Tensor4<T> dx;
    if (input_grad) dx = Tensor4<T>(x.shape());
    if (!input_grad && !weight_grad && !bias_grad) return dx;

    const int threads = conv_detail::thread_count(B, O * K * P);
    // buffer per thread: col (unless identity) then dcol (when the input gradient is needed)
    const std::size_t col_size = g.identity_columns() ? 0 : K * P;
    ensure_workspace(threads, col_size + (input_grad ? K * P : 0));
    // thread 0 accumulates straight into the gradients; the others into partials, summed after
    std::vector<RowMatrix<T>> dW_part(threads > 1 && weight_grad ? threads - 1 : 0,
                                      RowMatrix<T>::Zero(O, K));
    std::vector<Eigen::Matrix<T, Eigen::Dynamic, 1>> db_part(
        threads > 1 && bias_grad ? threads - 1 : 0, Eigen::Matrix<T, Eigen::Dynamic, 1>::Zero(O));
    ConstRowMatrixMap<T> Wm(weight.value.data(), O, K);
    const auto batch = static_cast<std::int64_t>(B);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (std::int64_t b = 0; b < batch; ++b) {
      const int t = conv_detail::thread_id();
      T* buffer = workspace_[t].data();
      const T* xb = x.data() + b * g.C * g.H * g.W;
      ConstRowMatrixMap<T> dyb(dy.data() + b * O * P, O, P);
      const T* col = xb;
      if (!g.identity_columns() && weight_grad) {
        conv_detail::im2col(xb, g, buffer);
        col = buffer;
      }
      if (weight_grad) {
        ConstRowMatrixMap<T> colm(col, K, P);
        if (t == 0) {
          RowMatrixMap<T>(weight.grad.data(), O, K).noalias() += dyb * colm.transpose();
        } else {
          dW_part[t - 1].noalias() += dyb * colm.transpose();
        }
      }
      if (bias_grad) {
        if (t == 0) {
          VectorMap<T>(bias.grad.data(), O) += dyb.rowwise().sum();
        } else {
          db_part[t - 1] += dyb.rowwise().sum();
        }
      }
      if (input_grad) {
        T* dxb = dx.data() + b * g.C * g.H * g.W;
        if (g.identity_columns()) {
          RowMatrixMap<T>(dxb, K, P).noalias() = Wm.transpose() * dyb;
        } else {
          T* dcol = buffer + col_size;
          RowMatrixMap<T>(dcol, K, P).noalias() = Wm.transpose() * dyb;
          conv_detail::col2im(dcol, g, dxb);
        }
      }
    }
    for (const auto& part : dW_part) RowMatrixMap<T>(weight.grad.data(), O, K) += part;
    for (const auto& part : db_part) VectorMap<T>(bias.grad.data(), O) += part;
    return dx;
  }

  void clear_saved() {
    saved_input_ = Tensor4<T>();
    has_saved_ = false;
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
    check_shape(function, "weight", weight.value.shape(), {out_channels(), in_channels(), k, k});
    if (grads && weight.trainable)
      check_shape(function, "weight.grad", weight.grad.shape(),
                  {out_channels(), in_channels(), k, k});
    if (config_.bias) {
      check_shape(function, "bias", bias.value.shape(), {out_channels()});
      if (grads && bias.trainable)
        check_shape(function, "bias.grad", bias.grad.shape(), {out_channels()});
    }
  }

  void ensure_workspace(int threads, std::size_t size) const {
    if (workspace_.size() < static_cast<std::size_t>(threads)) workspace_.resize(threads);
    for (int t = 0; t < threads; ++t)
      if (workspace_[t].size() < size) workspace_[t].resize(size);
  }

  Conv2dConfig config_{};
  Tensor4<T> saved_input_;
  bool has_saved_ = false;
  mutable std::vector<std::vector<T>> workspace_;  // per-thread column buffers, reused
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
