#pragma once
// The building blocks of diffusers' AutoencoderKL (forward only: the VAE is frozen):
// VaeResnetBlock2D (ResnetBlock2D without time embedding), VaeAttentionBlock (the mid-block
// self-attention), UNetMidBlock2D, DownEncoderBlock2D, UpDecoderBlock2D.
//
// Dims legend: B batch, Ci / Co in / out channels, H×W spatial, L = H·W tokens, G groups.
// Every GroupNorm has G = norm_num_groups and eps 1e-6 (AutoencoderKLConfig::kNormEps).
//   VaeResnetBlock2D:  y = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))
//                      shortcut = conv_shortcut (1×1) iff Ci ≠ Co, else identity; 3×3 convs pad 1
//   VaeAttentionBlock: h = group_norm(x) as tokens [B, L, C]; one head of size C with biased
//                      to_q, to_k, to_v, to_out.0: y = x + to_out(softmax(q kᵀ/√C) v) as [B,C,H,W]
//   UNetMidBlock2D:    resnets.0 → attentions.0 (unless mid_block_add_attention is false) →
//   resnets.1 DownEncoderBlock2D: resnets.0..n−1, then downsamplers.0.conv: pad (0,1,0,1), 3×3
//   stride 2 UpDecoderBlock2D:   resnets.0..n−1 (n = layers_per_block + 1), then upsamplers.0.conv:
//                       nearest 2× then 3×3 pad 1
// Parameter names are diffusers' (prefix supplied by the caller). Every forward is const and
// takes the model's ConvWorkspace (3×3 convs run band by band, see vae_conv.hpp); nothing is saved.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/parallel.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/models/vae/vae_config.hpp"
#include "difftrain/models/vae/vae_conv.hpp"
#include "difftrain/nn/activations.hpp"
#include "difftrain/nn/attention.hpp"
#include "difftrain/nn/conv2d.hpp"
#include "difftrain/nn/group_norm.hpp"
#include "difftrain/nn/parameter.hpp"
#include "difftrain/nn/upsample.hpp"

namespace difftrain::models {

namespace vae_detail {

// x ← silu(x), in place (saves one activation-sized buffer per norm)
template <class T, std::size_t N>
void silu_inplace(Tensor<T, N>& x) {
  T* p = x.data();
  const auto n = static_cast<std::int64_t>(x.size());
#pragma omp parallel for schedule(static) if (parallel::exceeds(n, parallel::kElementwiseSize))
  for (std::int64_t i = 0; i < n; ++i) p[i] = nn::silu(p[i]);
}

// y ← y + x, in place
template <class T>
void add_inplace(Tensor4<T>& y, const Tensor4<T>& x) {
  T* p = y.data();
  const T* q = x.data();
  const auto n = static_cast<std::int64_t>(y.size());
#pragma omp parallel for schedule(static) if (parallel::exceeds(n, parallel::kElementwiseSize))
  for (std::int64_t i = 0; i < n; ++i) p[i] += q[i];
}

inline nn::GroupNormConfig norm(std::size_t groups, std::size_t channels) {
  return {groups, channels, AutoencoderKLConfig::kNormEps, true};
}
inline nn::Conv2dConfig conv3x3(std::size_t in, std::size_t out) {
  return {in, out, 3, 1, nn::Padding2d::same(1), true};
}

}  // namespace vae_detail

template <class T = float>
class VaeResnetBlock2D {
 public:
  using Scalar = T;

  nn::GroupNorm<T> norm1;
  nn::Conv2d<T> conv1;
  nn::GroupNorm<T> norm2;
  nn::Conv2d<T> conv2;
  nn::Conv2d<T> conv_shortcut;  // only when in_channels ≠ out_channels

  VaeResnetBlock2D() = default;
  VaeResnetBlock2D(std::size_t in_channels, std::size_t out_channels, std::size_t groups)
      : norm1(vae_detail::norm(groups, in_channels)),
        conv1(vae_detail::conv3x3(in_channels, out_channels)),
        norm2(vae_detail::norm(groups, out_channels)),
        conv2(vae_detail::conv3x3(out_channels, out_channels)),
        has_shortcut_(in_channels != out_channels) {
    if (has_shortcut_)
      conv_shortcut = nn::Conv2d<T>(nn::Conv2dConfig{in_channels, out_channels, 1, 1, {}, true});
  }

  bool has_shortcut() const { return has_shortcut_; }

  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    walk(*this, prefix, visit);
  }
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) const {
    walk(*this, prefix, visit);
  }

  // y = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))
  Tensor4<T> forward(const Tensor4<T>& x, ConvWorkspace<T>& ws) const {
    Tensor4<T> h;
    {
      Tensor4<T> a = norm1.forward_inference(x);
      vae_detail::silu_inplace(a);
      h = conv2d_banded(conv1, a, ws);
    }
    {
      Tensor4<T> a = norm2.forward_inference(h);
      vae_detail::silu_inplace(a);
      h = conv2d_banded(conv2, a, ws);
    }
    if (has_shortcut_) {
      vae_detail::add_inplace(h, conv_shortcut.forward_inference(x));
    } else {
      vae_detail::add_inplace(h, x);
    }
    return h;
  }

 private:
  template <class Self, class Visitor>
  static void walk(Self& self, const std::string& prefix, Visitor& visit) {
    self.norm1.for_each_parameter(nn::join_name(prefix, "norm1"), visit);
    self.conv1.for_each_parameter(nn::join_name(prefix, "conv1"), visit);
    self.norm2.for_each_parameter(nn::join_name(prefix, "norm2"), visit);
    self.conv2.for_each_parameter(nn::join_name(prefix, "conv2"), visit);
    if (self.has_shortcut_)
      self.conv_shortcut.for_each_parameter(nn::join_name(prefix, "conv_shortcut"), visit);
  }

  bool has_shortcut_ = false;
};

template <class T = float>
class VaeAttentionBlock {
 public:
  using Scalar = T;

  nn::GroupNorm<T> group_norm;
  nn::Attention<T> attention;  // to_q, to_k, to_v, to_out.0, all with bias

  VaeAttentionBlock() = default;
  VaeAttentionBlock(std::size_t channels, std::size_t groups)
      : group_norm(vae_detail::norm(groups, channels)),
        attention(nn::AttentionConfig{channels, 0, 1, channels, true, true}) {}

  std::size_t channels() const { return attention.config.query_dim; }

  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    group_norm.for_each_parameter(nn::join_name(prefix, "group_norm"), visit);
    attention.for_each_parameter(prefix, visit);
  }
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) const {
    group_norm.for_each_parameter(nn::join_name(prefix, "group_norm"), visit);
    attention.for_each_parameter(prefix, visit);
  }

  // y = x + attention(group_norm(x) as [B, L, C]) as [B, C, H, W]
  Tensor4<T> forward(const Tensor4<T>& x) const {
    const std::size_t B = x.shape()[0], C = channels(), H = x.shape()[2], W = x.shape()[3];
    check_shape("VaeAttentionBlock::forward", "x", x.shape(), {B, C, H, W});
    const std::size_t L = H * W;
    Tensor3<T> tokens(std::array<std::size_t, 3>{B, L, C});
    {
      const Tensor4<T> h = group_norm.forward_inference(x);
      for (std::size_t b = 0; b < B; ++b)
        nn::RowMatrixMap<T>(tokens.data() + b * L * C, L, C) =
            nn::ConstRowMatrixMap<T>(h.data() + b * C * L, C, L).transpose();
    }
    Tensor3<T> out;
    // a small attention (L²·C + 4·L·C² multiply-adds) stays on one thread, Eigen included
    if (L * C * (L + 4 * C) * B < parallel::kBandedConvWork) {
      parallel::without_eigen_threads([&] { out = attention.forward_inference(tokens); });
    } else {
      out = attention.forward_inference(tokens);
    }
    Tensor4<T> y = x;
    for (std::size_t b = 0; b < B; ++b)
      nn::RowMatrixMap<T>(y.data() + b * C * L, C, L) +=
          nn::ConstRowMatrixMap<T>(out.data() + b * L * C, L, C).transpose();
    return y;
  }
};

template <class T = float>
class UNetMidBlock2D {
 public:
  using Scalar = T;

  std::vector<VaeResnetBlock2D<T>> resnets;      // 2
  std::vector<VaeAttentionBlock<T>> attentions;  // 1, or 0 without attention

  UNetMidBlock2D() = default;
  UNetMidBlock2D(std::size_t channels, std::size_t groups, bool add_attention) {
    resnets.emplace_back(channels, channels, groups);
    if (add_attention) attentions.emplace_back(channels, groups);
    resnets.emplace_back(channels, channels, groups);
  }

  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    walk(*this, prefix, visit);
  }
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) const {
    walk(*this, prefix, visit);
  }

  // y = resnets.1(attentions.0(resnets.0(x)))
  Tensor4<T> forward(const Tensor4<T>& x, ConvWorkspace<T>& ws) const {
    Tensor4<T> h = resnets[0].forward(x, ws);
    if (!attentions.empty()) h = attentions[0].forward(h);
    return resnets[1].forward(h, ws);
  }

 private:
  template <class Self, class Visitor>
  static void walk(Self& self, const std::string& prefix, Visitor& visit) {
    // diffusers' state-dict order: attentions before resnets
    for (std::size_t i = 0; i < self.attentions.size(); ++i)
      self.attentions[i].for_each_parameter(
          nn::join_name(prefix, "attentions." + std::to_string(i)), visit);
    for (std::size_t i = 0; i < self.resnets.size(); ++i)
      self.resnets[i].for_each_parameter(nn::join_name(prefix, "resnets." + std::to_string(i)),
                                         visit);
  }
};

template <class T = float>
class DownEncoderBlock2D {
 public:
  using Scalar = T;

  std::vector<VaeResnetBlock2D<T>> resnets;
  nn::Conv2d<T> downsample;  // "downsamplers.0.conv", when has_downsample()

  DownEncoderBlock2D() = default;
  DownEncoderBlock2D(std::size_t in_channels, std::size_t out_channels, std::size_t num_layers,
                     std::size_t groups, bool add_downsample)
      : has_downsample_(add_downsample) {
    for (std::size_t i = 0; i < num_layers; ++i)
      resnets.emplace_back(i == 0 ? in_channels : out_channels, out_channels, groups);
    // diffusers Downsample2D with padding 0: F.pad(x, (0, 1, 0, 1)), then a stride-2 3×3 conv
    if (add_downsample)
      downsample = nn::Conv2d<T>(
          nn::Conv2dConfig{out_channels, out_channels, 3, 2, nn::Padding2d{0, 1, 0, 1}, true});
  }

  bool has_downsample() const { return has_downsample_; }

  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    walk(*this, prefix, visit);
  }
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) const {
    walk(*this, prefix, visit);
  }

  Tensor4<T> forward(const Tensor4<T>& x, ConvWorkspace<T>& ws) const {
    // the first resnet reads x directly: no copy of the block input is held
    require(!resnets.empty(), "DownEncoderBlock2D::forward", "the block has no resnets");
    Tensor4<T> h = resnets.front().forward(x, ws);
    for (std::size_t i = 1; i < resnets.size(); ++i) h = resnets[i].forward(h, ws);
    if (has_downsample_) h = conv2d_banded(downsample, h, ws);
    return h;
  }

 private:
  template <class Self, class Visitor>
  static void walk(Self& self, const std::string& prefix, Visitor& visit) {
    for (std::size_t i = 0; i < self.resnets.size(); ++i)
      self.resnets[i].for_each_parameter(nn::join_name(prefix, "resnets." + std::to_string(i)),
                                         visit);
    if (self.has_downsample_)
      self.downsample.for_each_parameter(nn::join_name(prefix, "downsamplers.0.conv"), visit);
  }

  bool has_downsample_ = false;
};

template <class T = float>
class UpDecoderBlock2D {
 public:
  using Scalar = T;

  std::vector<VaeResnetBlock2D<T>> resnets;
  nn::Conv2d<T> upsample;  // "upsamplers.0.conv", when has_upsample()

  UpDecoderBlock2D() = default;
  UpDecoderBlock2D(std::size_t in_channels, std::size_t out_channels, std::size_t num_layers,
                   std::size_t groups, bool add_upsample)
      : has_upsample_(add_upsample) {
    for (std::size_t i = 0; i < num_layers; ++i)
      resnets.emplace_back(i == 0 ? in_channels : out_channels, out_channels, groups);
    if (add_upsample) upsample = nn::Conv2d<T>(vae_detail::conv3x3(out_channels, out_channels));
  }

  bool has_upsample() const { return has_upsample_; }

  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    walk(*this, prefix, visit);
  }
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) const {
    walk(*this, prefix, visit);
  }

  Tensor4<T> forward(const Tensor4<T>& x, ConvWorkspace<T>& ws) const {
    require(!resnets.empty(), "UpDecoderBlock2D::forward", "the block has no resnets");
    Tensor4<T> h = resnets.front().forward(x, ws);
    for (std::size_t i = 1; i < resnets.size(); ++i) h = resnets[i].forward(h, ws);
    if (has_upsample_) {
      h = nn::upsample_nearest2d_forward(h);
      h = conv2d_banded(upsample, h, ws);
    }
    return h;
  }

 private:
  template <class Self, class Visitor>
  static void walk(Self& self, const std::string& prefix, Visitor& visit) {
    for (std::size_t i = 0; i < self.resnets.size(); ++i)
      self.resnets[i].for_each_parameter(nn::join_name(prefix, "resnets." + std::to_string(i)),
                                         visit);
    if (self.has_upsample_)
      self.upsample.for_each_parameter(nn::join_name(prefix, "upsamplers.0.conv"), visit);
  }

  bool has_upsample_ = false;
};

}  // namespace difftrain::models
