#pragma once
// BasicTransformerBlock and Transformer2DModel (diffusers, norm_type "layer_norm", GEGLU
// feed-forward, attention without q/k/v biases), forward and backward.
//
// Dims legend: B batch, C in_channels, H×W spatial, N = H·W tokens, D = heads·dim_head inner
// dim (= C for the UNet's blocks), L context tokens, Dc cross_attention_dim.
// BasicTransformerBlock on tokens h [B, N, D], context [B, L, Dc]:
//   h = h + attn1(norm1(h))               self-attention          (LayerNorm eps 1e-5)
//   h = h + attn2(norm2(h), context)      cross-attention
//   h = h + ff.net.2(geglu(norm3(h)))     ff.net.0 = GEGLU D → 4D (value, gate halves)
// Transformer2DModel on x [B, C, H, W]:
//   h = norm(x)                           GroupNorm(groups, C, eps 1e-6: diffusers hard-codes it)
//   h = proj_in(h) then NCHW → [B, N, D]  (1×1 conv), or NCHW → [B, N, C] then proj_in (Linear)
//   h = transformer_blocks(h, context)
//   y = proj_out(h) back to NCHW (mirror of proj_in) + x
// backward(dy, dcontext) returns dx and adds the context gradient into dcontext (shared by all
// cross-attentions of the UNet).

#include <Eigen/Core>
#include <cstddef>
#include <string>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/lora/inject.hpp"
#include "difftrain/models/unet/attention.hpp"
#include "difftrain/models/unet/module_tree.hpp"
#include "difftrain/nn/checkpoint.hpp"
#include "difftrain/nn/conv2d.hpp"
#include "difftrain/nn/group_norm.hpp"
#include "difftrain/nn/layer_norm.hpp"
#include "difftrain/nn/linear.hpp"

namespace difftrain::models {

namespace transformer_detail {
// tokens[b, s, c] = x[b, c, s] (s = h·W + w): [B, C, H, W] → [B, H·W, C]
template <class T>
Tensor3<T> to_tokens(const Tensor4<T>& x) {
  const std::size_t B = x.shape()[0], C = x.shape()[1], S = x.shape()[2] * x.shape()[3];
  Tensor3<T> y(std::array<std::size_t, 3>{B, S, C});
  for (std::size_t b = 0; b < B; ++b)
    nn::RowMatrixMap<T>(y.data() + b * S * C, S, C) =
        nn::ConstRowMatrixMap<T>(x.data() + b * C * S, C, S).transpose();
  return y;
}
// x[b, c, s] = tokens[b, s, c]: [B, H·W, C] → [B, C, H, W]
template <class T>
Tensor4<T> from_tokens(const Tensor3<T>& t, std::size_t H, std::size_t W) {
  const std::size_t B = t.shape()[0], S = t.shape()[1], C = t.shape()[2];
  Tensor4<T> y(std::array<std::size_t, 4>{B, C, H, W});
  for (std::size_t b = 0; b < B; ++b)
    nn::RowMatrixMap<T>(y.data() + b * C * S, C, S) =
        nn::ConstRowMatrixMap<T>(t.data() + b * S * C, S, C).transpose();
  return y;
}
}  // namespace transformer_detail

struct BasicTransformerBlockConfig {
  std::size_t dim = 0;                  // D
  std::size_t heads = 1;                // attention heads
  std::size_t dim_head = 0;             // D / heads
  std::size_t cross_attention_dim = 0;  // Dc
  double norm_eps = 1e-5;               // LayerNorms (diffusers' default)
  std::size_t ff_mult = 4;

  nn::LayerNormConfig norm() const { return {dim, norm_eps, true}; }
  nn::AttentionConfig attn1() const { return {dim, 0, heads, dim_head, false, true}; }
  nn::AttentionConfig attn2() const {
    return {dim, cross_attention_dim, heads, dim_head, false, true};
  }
  nn::GEGLUConfig ff_in() const { return {dim, ff_mult * dim, true}; }
  nn::LinearConfig ff_out() const { return {ff_mult * dim, dim, true}; }
};

template <class T = float>
class BasicTransformerBlock : public CompositeModule<BasicTransformerBlock<T>> {
 public:
  using Scalar = T;

  nn::LayerNorm<T> norm1;
  Attention<T> attn1;  // self
  nn::LayerNorm<T> norm2;
  Attention<T> attn2;  // cross
  nn::LayerNorm<T> norm3;
  GEGLU<T> ff_in;              // "ff.net.0"
  lora::LinearSlot<T> ff_out;  // "ff.net.2"

  BasicTransformerBlock() = default;
  explicit BasicTransformerBlock(const BasicTransformerBlockConfig& c,
                                 Allocation allocation = Allocation::parameters)
      : norm1(make_layer<nn::LayerNorm<T>>(c.norm(), allocation)),
        attn1(c.attn1(), allocation),
        norm2(make_layer<nn::LayerNorm<T>>(c.norm(), allocation)),
        attn2(c.attn2(), allocation),
        norm3(make_layer<nn::LayerNorm<T>>(c.norm(), allocation)),
        ff_in(c.ff_in(), allocation),
        ff_out(make_slot<lora::LinearSlot<T>>(c.ff_out(), allocation)),
        config_(c) {}

  const BasicTransformerBlockConfig& config() const { return config_; }

  template <class Self, class F>
  static void walk(Self& self, const std::string& prefix, F&& f) {
    const BasicTransformerBlockConfig& c = self.config_;
    f(nn::join_name(prefix, "norm1"), self.norm1, c.norm());
    Attention<T>::walk(self.attn1, nn::join_name(prefix, "attn1"), f);
    f(nn::join_name(prefix, "norm2"), self.norm2, c.norm());
    Attention<T>::walk(self.attn2, nn::join_name(prefix, "attn2"), f);
    f(nn::join_name(prefix, "norm3"), self.norm3, c.norm());
    GEGLU<T>::walk(self.ff_in, nn::join_name(prefix, "ff.net.0"), f);
    f(nn::join_name(prefix, "ff.net.2"), self.ff_out, c.ff_out());
  }

  // h += attn1(norm1(h)); h += attn2(norm2(h), context); h += ff(norm3(h))
  Tensor3<T> forward(const Tensor3<T>& x, const Tensor3<T>& context) {
    Tensor3<T> h = x + attn1.forward(norm1.forward(x));
    h += attn2.forward(norm2.forward(h), context);
    h += ff_out.forward(ff_in.forward(norm3.forward(h)));
    return h;
  }

  /// dx for the saved forward; dcontext += the context gradient.
  Tensor3<T> backward(const Tensor3<T>& dy, Tensor3<T>& dcontext) {
    Tensor3<T> d = dy;
    d += norm3.backward(ff_in.backward(ff_out.backward(d)));
    nn::AttentionGrads<T> cross = attn2.backward(d, true);
    check_same_shape("BasicTransformerBlock::backward", "dcontext", dcontext.shape(),
                     cross.context.shape());
    dcontext += cross.context;
    d += norm2.backward(cross.x);
    d += norm1.backward(attn1.backward(d).x);
    return d;
  }

  /// Drops the saved forward context of every layer.
  void clear_saved() {
    norm1.clear_saved();
    attn1.clear_saved();
    norm2.clear_saved();
    attn2.clear_saved();
    norm3.clear_saved();
    ff_in.clear_saved();
    ff_out.clear_saved();
  }

 private:
  BasicTransformerBlockConfig config_{};
};

struct Transformer2DModelConfig {
  std::size_t in_channels = 0;  // C
  std::size_t heads = 1;
  std::size_t dim_head = 0;  // C / heads in the UNet
  std::size_t num_layers = 1;
  std::size_t cross_attention_dim = 0;
  std::size_t norm_num_groups = 32;
  bool use_linear_projection = false;

  std::size_t inner_dim() const { return heads * dim_head; }
  nn::GroupNormConfig norm() const { return {norm_num_groups, in_channels, 1e-6, true}; }
  nn::Conv2dConfig proj_in_conv() const {
    return {in_channels, inner_dim(), 1, 1, nn::Padding2d{}, true};
  }
  nn::LinearConfig proj_in_linear() const { return {in_channels, inner_dim(), true}; }
  nn::Conv2dConfig proj_out_conv() const {
    return {inner_dim(), in_channels, 1, 1, nn::Padding2d{}, true};
  }
  nn::LinearConfig proj_out_linear() const { return {inner_dim(), in_channels, true}; }
  BasicTransformerBlockConfig block() const {
    return {inner_dim(), heads, dim_head, cross_attention_dim, 1e-5, 4};
  }
};

template <class T = float>
class Transformer2DModel : public CompositeModule<Transformer2DModel<T>> {
 public:
  using Scalar = T;

  nn::GroupNorm<T> norm;
  lora::Conv2dSlot<T> proj_in_conv, proj_out_conv;      // "proj_in" / "proj_out" (1×1 conv)
  lora::LinearSlot<T> proj_in_linear, proj_out_linear;  // "proj_in" / "proj_out" (Linear)
  std::vector<BasicTransformerBlock<T>> transformer_blocks;

  Transformer2DModel() = default;
  explicit Transformer2DModel(const Transformer2DModelConfig& c,
                              Allocation allocation = Allocation::parameters)
      : norm(make_layer<nn::GroupNorm<T>>(c.norm(), allocation)), config_(c) {
    require(c.heads > 0 && c.dim_head > 0 && c.num_layers > 0, "Transformer2DModel",
            "heads, dim_head and num_layers must be positive, got ", c.heads, ", ", c.dim_head,
            " and ", c.num_layers);
    if (c.use_linear_projection) {
      proj_in_linear = make_slot<lora::LinearSlot<T>>(c.proj_in_linear(), allocation);
      proj_out_linear = make_slot<lora::LinearSlot<T>>(c.proj_out_linear(), allocation);
    } else {
      proj_in_conv = make_slot<lora::Conv2dSlot<T>>(c.proj_in_conv(), allocation);
      proj_out_conv = make_slot<lora::Conv2dSlot<T>>(c.proj_out_conv(), allocation);
    }
    for (std::size_t i = 0; i < c.num_layers; ++i)
      transformer_blocks.emplace_back(c.block(), allocation);
  }

  const Transformer2DModelConfig& config() const { return config_; }
  /// Gradient checkpointing of each transformer block (nn/checkpoint.hpp).
  void set_gradient_checkpointing(bool on) { checkpoints_.set_enabled(on); }

  template <class Self, class F>
  static void walk(Self& self, const std::string& prefix, F&& f) {
    const Transformer2DModelConfig& c = self.config_;
    f(nn::join_name(prefix, "norm"), self.norm, c.norm());
    if (c.use_linear_projection) {
      f(nn::join_name(prefix, "proj_in"), self.proj_in_linear, c.proj_in_linear());
    } else {
      f(nn::join_name(prefix, "proj_in"), self.proj_in_conv, c.proj_in_conv());
    }
    for (std::size_t i = 0; i < self.transformer_blocks.size(); ++i)
      BasicTransformerBlock<T>::walk(self.transformer_blocks[i],
                                     prefix + ".transformer_blocks." + std::to_string(i), f);
    if (c.use_linear_projection) {
      f(nn::join_name(prefix, "proj_out"), self.proj_out_linear, c.proj_out_linear());
    } else {
      f(nn::join_name(prefix, "proj_out"), self.proj_out_conv, c.proj_out_conv());
    }
  }

  // y = proj_out(blocks(proj_in(norm(x)), context)) + x
  Tensor4<T> forward(const Tensor4<T>& x, const Tensor3<T>& context) {
    using namespace transformer_detail;
    const std::size_t H = x.shape()[2], W = x.shape()[3];
    const Tensor4<T> normed = norm.forward(x);
    Tensor3<T> h = config_.use_linear_projection ? proj_in_linear.forward(to_tokens(normed))
                                                 : to_tokens(proj_in_conv.forward(normed));
    checkpoints_.begin(context);
    for (std::size_t j = 0; j < transformer_blocks.size(); ++j)
      h = checkpoints_.forward(transformer_blocks[j], j, h, context);
    Tensor4<T> y = config_.use_linear_projection ? from_tokens(proj_out_linear.forward(h), H, W)
                                                 : proj_out_conv.forward(from_tokens(h, H, W));
    y += x;
    return y;
  }

  /// dx for the saved forward; dcontext += the context gradient of every block.
  Tensor4<T> backward(const Tensor4<T>& dy, Tensor3<T>& dcontext) {
    using namespace transformer_detail;
    const std::size_t H = dy.shape()[2], W = dy.shape()[3];
    Tensor3<T> d = config_.use_linear_projection ? proj_out_linear.backward(to_tokens(dy))
                                                 : to_tokens(proj_out_conv.backward(dy));
    for (std::size_t j = transformer_blocks.size(); j-- > 0;)
      d = checkpoints_.backward(transformer_blocks[j], j, d, dcontext);
    Tensor4<T> dnormed = config_.use_linear_projection
                             ? from_tokens(proj_in_linear.backward(d), H, W)
                             : proj_in_conv.backward(from_tokens(d, H, W));
    Tensor4<T> dx = norm.backward(dnormed);
    dx += dy;
    return dx;
  }

 private:
  Transformer2DModelConfig config_{};
  nn::Checkpoints<Tensor3<T>, Tensor3<T>> checkpoints_;  // block inputs and context
};

}  // namespace difftrain::models
