#pragma once
// ResnetBlock2D (diffusers, time_embedding_norm "default", act silu), forward and backward.
//
// Dims legend: B batch, Ci in_channels, Co out_channels, H×W spatial, E temb_channels.
//   h = conv1(silu(norm1(x)))                       [B, Co, H, W]
//   h = h + time_emb_proj(silu(temb))[:, :, None, None]
//   h = conv2(silu(norm2(h)))                       (dropout p = 0: identity)
//   y = (shortcut(x) + h) / output_scale_factor     shortcut = conv_shortcut (1×1) iff Ci ≠ Co
// GroupNorms: norm_num_groups groups, eps = the UNet's norm_eps. backward(dy, dtemb) returns dx
// and adds the temb gradient into dtemb (shared by every resnet of the UNet).

#include <cstddef>
#include <string>

#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/lora/inject.hpp"
#include "difftrain/models/unet/module_tree.hpp"
#include "difftrain/nn/activations.hpp"
#include "difftrain/nn/conv2d.hpp"
#include "difftrain/nn/group_norm.hpp"
#include "difftrain/nn/linear.hpp"

namespace difftrain::models {

struct ResnetBlock2DConfig {
  std::size_t in_channels = 0;    // Ci
  std::size_t out_channels = 0;   // Co
  std::size_t temb_channels = 0;  // E
  std::size_t groups = 32;
  double eps = 1e-5;
  double output_scale_factor = 1.0;

  bool use_conv_shortcut() const { return in_channels != out_channels; }
  nn::GroupNormConfig norm1() const { return {groups, in_channels, eps, true}; }
  nn::Conv2dConfig conv1() const {
    return {in_channels, out_channels, 3, 1, nn::Padding2d::same(1), true};
  }
  nn::LinearConfig time_emb_proj() const { return {temb_channels, out_channels, true}; }
  nn::GroupNormConfig norm2() const { return {groups, out_channels, eps, true}; }
  nn::Conv2dConfig conv2() const {
    return {out_channels, out_channels, 3, 1, nn::Padding2d::same(1), true};
  }
  nn::Conv2dConfig conv_shortcut() const {
    return {in_channels, out_channels, 1, 1, nn::Padding2d{}, true};
  }
};

template <class T = float>
class ResnetBlock2D : public CompositeModule<ResnetBlock2D<T>> {
 public:
  using Scalar = T;

  nn::GroupNorm<T> norm1;
  lora::Conv2dSlot<T> conv1;
  lora::LinearSlot<T> time_emb_proj;
  nn::GroupNorm<T> norm2;
  lora::Conv2dSlot<T> conv2;
  lora::Conv2dSlot<T> conv_shortcut;  // built only when Ci ≠ Co

  ResnetBlock2D() = default;
  explicit ResnetBlock2D(const ResnetBlock2DConfig& c,
                         Allocation allocation = Allocation::parameters)
      : norm1(make_layer<nn::GroupNorm<T>>(c.norm1(), allocation)),
        conv1(make_slot<lora::Conv2dSlot<T>>(c.conv1(), allocation)),
        time_emb_proj(make_slot<lora::LinearSlot<T>>(c.time_emb_proj(), allocation)),
        norm2(make_layer<nn::GroupNorm<T>>(c.norm2(), allocation)),
        conv2(make_slot<lora::Conv2dSlot<T>>(c.conv2(), allocation)),
        config_(c) {
    if (c.use_conv_shortcut())
      conv_shortcut = make_slot<lora::Conv2dSlot<T>>(c.conv_shortcut(), allocation);
  }

  const ResnetBlock2DConfig& config() const { return config_; }

  /// f(name, layer, layer config) over norm1, conv1, time_emb_proj, norm2, conv2[, conv_shortcut].
  template <class Self, class F>
  static void walk(Self& self, const std::string& prefix, F&& f) {
    const ResnetBlock2DConfig& c = self.config_;
    f(nn::join_name(prefix, "norm1"), self.norm1, c.norm1());
    f(nn::join_name(prefix, "conv1"), self.conv1, c.conv1());
    f(nn::join_name(prefix, "time_emb_proj"), self.time_emb_proj, c.time_emb_proj());
    f(nn::join_name(prefix, "norm2"), self.norm2, c.norm2());
    f(nn::join_name(prefix, "conv2"), self.conv2, c.conv2());
    if (c.use_conv_shortcut())
      f(nn::join_name(prefix, "conv_shortcut"), self.conv_shortcut, c.conv_shortcut());
  }

  // y = (shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))) / s
  Tensor4<T> forward(const Tensor4<T>& x, const Tensor<T, 2>& temb) {
    require(temb.shape()[0] == x.shape()[0], "ResnetBlock2D::forward", "temb has shape ",
            shape_string(temb.shape()), ", expected batch ", x.shape()[0], " (x has shape ",
            shape_string(x.shape()), ")");
    Tensor4<T> h = conv1.forward(act1_.forward(norm1.forward(x)));
    const Tensor<T, 2> t = time_emb_proj.forward(act_temb_.forward(temb));
    const std::size_t B = h.shape()[0], C = h.shape()[1], S = h.shape()[2] * h.shape()[3];
    for (std::size_t bc = 0; bc < B * C; ++bc) {
      const T v = t.data()[bc];
      T* plane = h.data() + bc * S;
      for (std::size_t s = 0; s < S; ++s) plane[s] += v;
    }
    h = conv2.forward(act2_.forward(norm2.forward(h)));
    if (config_.use_conv_shortcut()) {
      h += conv_shortcut.forward(x);
    } else {
      h += x;
    }
    if (config_.output_scale_factor != 1.0) h /= static_cast<T>(config_.output_scale_factor);
    return h;
  }

  /// dx for the saved forward; dtemb [B, E] += the temb gradient; parameter gradients +=.
  Tensor4<T> backward(const Tensor4<T>& dy, Tensor<T, 2>& dtemb) {
    Tensor4<T> g = dy;
    if (config_.output_scale_factor != 1.0) g /= static_cast<T>(config_.output_scale_factor);
    Tensor4<T> dh = norm2.backward(act2_.backward(conv2.backward(g)));
    const std::size_t B = dh.shape()[0], C = dh.shape()[1], S = dh.shape()[2] * dh.shape()[3];
    Tensor<T, 2> dt(std::array<std::size_t, 2>{B, C});
    for (std::size_t bc = 0; bc < B * C; ++bc) {
      const T* plane = dh.data() + bc * S;
      T sum = 0;
      for (std::size_t s = 0; s < S; ++s) sum += plane[s];
      dt.data()[bc] = sum;
    }
    check_shape("ResnetBlock2D::backward", "dtemb", dtemb.shape(), {B, config_.temb_channels});
    dtemb += act_temb_.backward(time_emb_proj.backward(dt));
    Tensor4<T> dx = norm1.backward(act1_.backward(conv1.backward(dh)));
    if (config_.use_conv_shortcut()) {
      dx += conv_shortcut.backward(g);
    } else {
      dx += g;
    }
    return dx;
  }

  /// Drops the saved forward context of every layer.
  void clear_saved() {
    for (nn::GroupNorm<T>* n : {&norm1, &norm2}) n->clear_saved();
    for (lora::Conv2dSlot<T>* c : {&conv1, &conv2, &conv_shortcut}) c->clear_saved();
    time_emb_proj.clear_saved();
    for (nn::SiLU<T>* a : {&act1_, &act2_, &act_temb_}) a->clear_saved();
  }

 private:
  ResnetBlock2DConfig config_{};
  nn::SiLU<T> act1_, act2_, act_temb_;
};

}  // namespace difftrain::models
