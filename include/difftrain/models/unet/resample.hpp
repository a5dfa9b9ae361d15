#pragma once
// Downsample2D and Upsample2D of the UNet (diffusers, use_conv=True), forward and backward.
//
// Dims legend: B batch, C channels (in = out), H×W input spatial, Ho×Wo output spatial.
//   Downsample2D: y = conv(x), 3×3 stride 2, padding 1 on every side; with padding 0 diffusers
//                 pads (left 0, right 1, top 0, bottom 1) first: the conv's asymmetric padding.
//                 Ho = ⌈H/2⌉ (padding 1) or ⌊(H − 2)/2⌋ + 1 (padding 0).
//   Upsample2D:   y = conv(nearest(x, Ho×Wo)), 3×3 padding 1; Ho×Wo = 2H×2W, or the size of the
//                 skip connection the next up block concatenates (odd latent sizes).
// Parameter names: "conv.weight", "conv.bias" (the key diffusers keeps for name="op" too).

#include <cstddef>
#include <string>

#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/lora/inject.hpp"
#include "difftrain/models/unet/module_tree.hpp"
#include "difftrain/nn/conv2d.hpp"
#include "difftrain/nn/upsample.hpp"

namespace difftrain::models {

struct Downsample2DConfig {
  std::size_t channels = 0;
  std::size_t padding = 1;  // diffusers downsample_padding: 1 or 0

  nn::Conv2dConfig conv() const {
    const nn::Padding2d pad = padding == 1 ? nn::Padding2d::same(1) : nn::Padding2d{0, 1, 0, 1};
    return {channels, channels, 3, 2, pad, true};
  }
};

template <class T = float>
class Downsample2D : public CompositeModule<Downsample2D<T>> {
 public:
  using Scalar = T;
  lora::Conv2dSlot<T> conv;

  Downsample2D() = default;
  explicit Downsample2D(const Downsample2DConfig& c, Allocation allocation = Allocation::parameters)
      : conv(make_slot<lora::Conv2dSlot<T>>(c.conv(), allocation)), config_(c) {
    require(c.padding <= 1, "Downsample2D", "padding is ", c.padding, ", expected 0 or 1");
  }

  template <class Self, class F>
  static void walk(Self& self, const std::string& prefix, F&& f) {
    f(nn::join_name(prefix, "conv"), self.conv, self.config_.conv());
  }

  // y = conv_{3×3, stride 2}(pad(x))
  Tensor4<T> forward(const Tensor4<T>& x) { return conv.forward(x); }
  Tensor4<T> backward(const Tensor4<T>& dy) { return conv.backward(dy); }

 private:
  Downsample2DConfig config_{};
};

struct Upsample2DConfig {
  std::size_t channels = 0;
  nn::Conv2dConfig conv() const { return {channels, channels, 3, 1, nn::Padding2d::same(1), true}; }
};

template <class T = float>
class Upsample2D : public CompositeModule<Upsample2D<T>> {
 public:
  using Scalar = T;
  lora::Conv2dSlot<T> conv;

  Upsample2D() = default;
  explicit Upsample2D(const Upsample2DConfig& c, Allocation allocation = Allocation::parameters)
      : conv(make_slot<lora::Conv2dSlot<T>>(c.conv(), allocation)), config_(c) {}

  template <class Self, class F>
  static void walk(Self& self, const std::string& prefix, F&& f) {
    f(nn::join_name(prefix, "conv"), self.conv, self.config_.conv());
  }

  // y = conv_{3×3}(nearest(x, out_h × out_w))
  Tensor4<T> forward(const Tensor4<T>& x, std::size_t out_h, std::size_t out_w) {
    in_h_ = x.shape()[2];
    in_w_ = x.shape()[3];
    return conv.forward(nn::upsample_nearest2d_forward(x, out_h, out_w));
  }
  /// y = conv(nearest(x, 2H × 2W))
  Tensor4<T> forward(const Tensor4<T>& x) { return forward(x, 2 * x.shape()[2], 2 * x.shape()[3]); }
  Tensor4<T> backward(const Tensor4<T>& dy) {
    return nn::upsample_nearest2d_backward(conv.backward(dy), in_h_, in_w_);
  }

 private:
  Upsample2DConfig config_{};
  std::size_t in_h_ = 0, in_w_ = 0;
};

}  // namespace difftrain::models
