#pragma once
// The UNet's down, mid and up blocks (diffusers DownBlock2D / CrossAttnDownBlock2D,
// UNetMidBlock2DCrossAttn, UpBlock2D / CrossAttnUpBlock2D), forward and backward.
//
// Dims legend: B batch, H×W spatial, E temb channels, L context tokens, Dc context width.
// A "stage" j is resnets.j, followed by attentions.j in the cross-attention kinds.
//   Down block (m = num_layers stages):
//     h = x;  for j < m: h = stage_j(h);  states += h;   [h = downsamplers.0(h); states += h]
//     returns the output states (the skip connections; the last one is the block's output).
//   Mid block: h = resnets.0(x); for i < num_layers: h = resnets.i+1(attentions.i(h)).
//   Up block (m = num_layers stages, m = layers_per_block + 1 in the UNet):
//     h = x;  for j < m: h = stage_j(cat_C[h, skips[m−1−j]])  (skips consumed last-in first-out)
//     [h = upsamplers.0(h, size of the next skip)]
// The two kinds of a level share one class (the type only adds the attentions).
// backward: the down block takes the gradient of every output state (the last one including the
// gradient that flowed back from the next block) and returns dx; the up block returns dx and the
// gradients of its skips in the order they were given. temb and context gradients are added
// into dtemb and dcontext.

#include <cstddef>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/models/unet/module_tree.hpp"
#include "difftrain/models/unet/resample.hpp"
#include "difftrain/models/unet/resnet_block.hpp"
#include "difftrain/models/unet/transformer_2d.hpp"
#include "difftrain/models/unet/unet_config.hpp"
#include "difftrain/nn/checkpoint.hpp"
#include "difftrain/nn/concat.hpp"

namespace difftrain::models {

/// What the attentions of a block are built from (unused by the resnet-only kinds).
struct BlockAttentionConfig {
  std::size_t heads = 1;
  std::size_t transformer_layers = 1;
  std::size_t cross_attention_dim = 0;
  bool use_linear_projection = false;

  // heads of size C / heads (diffusers: out_channels // num_attention_heads)
  Transformer2DModelConfig transformer(std::size_t channels, std::size_t groups) const {
    return {channels,
            heads,
            channels / heads,
            transformer_layers,
            cross_attention_dim,
            groups,
            use_linear_projection};
  }
};

// ---------------------------------------------------------------------------------------------

struct UNetDownBlock2DConfig {
  DownBlockType type = DownBlockType::DownBlock2D;
  std::size_t in_channels = 0;
  std::size_t out_channels = 0;
  std::size_t temb_channels = 0;
  std::size_t num_layers = 1;
  std::size_t groups = 32;
  double eps = 1e-5;
  bool add_downsample = true;
  std::size_t downsample_padding = 1;
  BlockAttentionConfig attention{};

  bool has_attention() const { return type == DownBlockType::CrossAttnDownBlock2D; }
  ResnetBlock2DConfig resnet(std::size_t j) const {
    return {j == 0 ? in_channels : out_channels, out_channels, temb_channels, groups, eps, 1.0};
  }
  Transformer2DModelConfig transformer() const {
    return attention.transformer(out_channels, groups);
  }
  Downsample2DConfig downsampler() const { return {out_channels, downsample_padding}; }
};

template <class T = float>
class UNetDownBlock2D : public CompositeModule<UNetDownBlock2D<T>> {
 public:
  using Scalar = T;

  std::vector<ResnetBlock2D<T>> resnets;
  std::vector<Transformer2DModel<T>> attentions;  // empty for DownBlock2D
  std::vector<Downsample2D<T>> downsamplers;      // 0 or 1

  UNetDownBlock2D() = default;
  explicit UNetDownBlock2D(const UNetDownBlock2DConfig& c,
                           Allocation allocation = Allocation::parameters)
      : config_(c) {
    require(c.num_layers > 0, "UNetDownBlock2D", "num_layers must be positive");
    for (std::size_t j = 0; j < c.num_layers; ++j) {
      resnets.emplace_back(c.resnet(j), allocation);
      if (c.has_attention()) attentions.emplace_back(c.transformer(), allocation);
    }
    if (c.add_downsample) downsamplers.emplace_back(c.downsampler(), allocation);
  }

  const UNetDownBlock2DConfig& config() const { return config_; }
  /// Gradient checkpointing of each resnet and transformer block (nn/checkpoint.hpp).
  void set_gradient_checkpointing(bool on) {
    checkpoints_.set_enabled(on);
    for (auto& a : attentions) a.set_gradient_checkpointing(on);
  }
  /// Output states per forward (skip connections): num_layers (+1 with a downsampler).
  std::size_t num_states() const { return resnets.size() + downsamplers.size(); }

  template <class Self, class F>
  static void walk(Self& self, const std::string& prefix, F&& f) {
    for (std::size_t j = 0; j < self.resnets.size(); ++j) {
      ResnetBlock2D<T>::walk(self.resnets[j], prefix + ".resnets." + std::to_string(j), f);
      if (!self.attentions.empty())
        Transformer2DModel<T>::walk(self.attentions[j], prefix + ".attentions." + std::to_string(j),
                                    f);
    }
    if (!self.downsamplers.empty())
      Downsample2D<T>::walk(self.downsamplers[0], prefix + ".downsamplers.0", f);
  }

  // states = [stage_0(x), stage_1(·), …, downsample(·)]
  std::vector<Tensor4<T>> forward(const Tensor4<T>& x, const Tensor<T, 2>& temb,
                                  const Tensor3<T>& context) {
    std::vector<Tensor4<T>> states;
    states.reserve(num_states());
    Tensor4<T> h = x;
    checkpoints_.begin(temb);
    for (std::size_t j = 0; j < resnets.size(); ++j) {
      h = checkpoints_.forward(resnets[j], j, h, temb);
      if (!attentions.empty()) h = attentions[j].forward(h, context);
      states.push_back(h);
    }
    if (!downsamplers.empty()) states.push_back(downsamplers[0].forward(h));
    return states;
  }

  /// d_states: one gradient per output state (the last includes the downstream gradient).
  Tensor4<T> backward(std::span<const Tensor4<T>> d_states, Tensor<T, 2>& dtemb,
                      Tensor3<T>& dcontext) {
    require(d_states.size() == num_states(), "UNetDownBlock2D::backward", "got ", d_states.size(),
            " state gradients, expected ", num_states());
    Tensor4<T> g = d_states.back();
    const std::size_t m = resnets.size();
    if (!downsamplers.empty()) {
      g = downsamplers[0].backward(g);
      g += d_states[m - 1];
    }
    for (std::size_t j = m; j-- > 0;) {
      if (!attentions.empty()) g = attentions[j].backward(g, dcontext);
      g = checkpoints_.backward(resnets[j], j, g, dtemb);
      if (j > 0) g += d_states[j - 1];
    }
    return g;
  }

 private:
  UNetDownBlock2DConfig config_{};
  nn::Checkpoints<Tensor4<T>, Tensor<T, 2>> checkpoints_;  // resnet inputs and temb
};

// ---------------------------------------------------------------------------------------------

struct UNetMidBlock2DCrossAttnConfig {
  std::size_t channels = 0;
  std::size_t temb_channels = 0;
  std::size_t num_layers = 1;  // attention + resnet pairs after resnets.0
  std::size_t groups = 32;
  double eps = 1e-5;
  double output_scale_factor = 1.0;  // the UNet's mid_block_scale_factor
  BlockAttentionConfig attention{};

  ResnetBlock2DConfig resnet() const {
    return {channels, channels, temb_channels, groups, eps, output_scale_factor};
  }
  Transformer2DModelConfig transformer() const { return attention.transformer(channels, groups); }
};

template <class T = float>
class UNetMidBlock2DCrossAttn : public CompositeModule<UNetMidBlock2DCrossAttn<T>> {
 public:
  using Scalar = T;

  std::vector<ResnetBlock2D<T>> resnets;          // num_layers + 1
  std::vector<Transformer2DModel<T>> attentions;  // num_layers

  UNetMidBlock2DCrossAttn() = default;
  explicit UNetMidBlock2DCrossAttn(const UNetMidBlock2DCrossAttnConfig& c,
                                   Allocation allocation = Allocation::parameters)
      : config_(c) {
    resnets.emplace_back(c.resnet(), allocation);
    for (std::size_t i = 0; i < c.num_layers; ++i) {
      attentions.emplace_back(c.transformer(), allocation);
      resnets.emplace_back(c.resnet(), allocation);
    }
  }

  const UNetMidBlock2DCrossAttnConfig& config() const { return config_; }
  /// Gradient checkpointing of each resnet and transformer block (nn/checkpoint.hpp).
  void set_gradient_checkpointing(bool on) {
    checkpoints_.set_enabled(on);
    for (auto& a : attentions) a.set_gradient_checkpointing(on);
  }

  template <class Self, class F>
  static void walk(Self& self, const std::string& prefix, F&& f) {
    ResnetBlock2D<T>::walk(self.resnets[0], prefix + ".resnets.0", f);
    for (std::size_t i = 0; i < self.attentions.size(); ++i) {
      Transformer2DModel<T>::walk(self.attentions[i], prefix + ".attentions." + std::to_string(i),
                                  f);
      ResnetBlock2D<T>::walk(self.resnets[i + 1], prefix + ".resnets." + std::to_string(i + 1), f);
    }
  }

  // h = resnets.0(x); h = resnets.i+1(attentions.i(h))
  Tensor4<T> forward(const Tensor4<T>& x, const Tensor<T, 2>& temb, const Tensor3<T>& context) {
    checkpoints_.begin(temb);
    Tensor4<T> h = checkpoints_.forward(resnets[0], 0, x, temb);
    for (std::size_t i = 0; i < attentions.size(); ++i)
      h = checkpoints_.forward(resnets[i + 1], i + 1, attentions[i].forward(h, context), temb);
    return h;
  }

  Tensor4<T> backward(const Tensor4<T>& dy, Tensor<T, 2>& dtemb, Tensor3<T>& dcontext) {
    Tensor4<T> g = dy;
    for (std::size_t i = attentions.size(); i-- > 0;)
      g = attentions[i].backward(checkpoints_.backward(resnets[i + 1], i + 1, g, dtemb), dcontext);
    return checkpoints_.backward(resnets[0], 0, g, dtemb);
  }

 private:
  UNetMidBlock2DCrossAttnConfig config_{};
  nn::Checkpoints<Tensor4<T>, Tensor<T, 2>> checkpoints_;  // resnet inputs and temb
};

// ---------------------------------------------------------------------------------------------

struct UNetUpBlock2DConfig {
  UpBlockType type = UpBlockType::UpBlock2D;
  std::size_t in_channels = 0;           // skip width of the last stage
  std::size_t prev_output_channels = 0;  // width of the block's input
  std::size_t out_channels = 0;
  std::size_t temb_channels = 0;
  std::size_t num_layers = 1;
  std::size_t groups = 32;
  double eps = 1e-5;
  bool add_upsample = true;
  BlockAttentionConfig attention{};

  bool has_attention() const { return type == UpBlockType::CrossAttnUpBlock2D; }
  std::size_t skip_channels(std::size_t j) const {
    return j + 1 == num_layers ? in_channels : out_channels;
  }
  ResnetBlock2DConfig resnet(std::size_t j) const {
    const std::size_t hidden = j == 0 ? prev_output_channels : out_channels;
    return {hidden + skip_channels(j), out_channels, temb_channels, groups, eps, 1.0};
  }
  Transformer2DModelConfig transformer() const {
    return attention.transformer(out_channels, groups);
  }
  Upsample2DConfig upsampler() const { return {out_channels}; }
};

/// Gradients of an up block: its input and its skip connections (in the order given).
template <class T>
struct UpBlockGrads {
  Tensor4<T> x;
  std::vector<Tensor4<T>> skips;
};

template <class T = float>
class UNetUpBlock2D : public CompositeModule<UNetUpBlock2D<T>> {
 public:
  using Scalar = T;

  std::vector<ResnetBlock2D<T>> resnets;
  std::vector<Transformer2DModel<T>> attentions;  // empty for UpBlock2D
  std::vector<Upsample2D<T>> upsamplers;          // 0 or 1

  UNetUpBlock2D() = default;
  explicit UNetUpBlock2D(const UNetUpBlock2DConfig& c,
                         Allocation allocation = Allocation::parameters)
      : config_(c) {
    require(c.num_layers > 0, "UNetUpBlock2D", "num_layers must be positive");
    for (std::size_t j = 0; j < c.num_layers; ++j) {
      resnets.emplace_back(c.resnet(j), allocation);
      if (c.has_attention()) attentions.emplace_back(c.transformer(), allocation);
    }
    if (c.add_upsample) upsamplers.emplace_back(c.upsampler(), allocation);
  }

  const UNetUpBlock2DConfig& config() const { return config_; }
  /// Gradient checkpointing of each resnet and transformer block (nn/checkpoint.hpp).
  void set_gradient_checkpointing(bool on) {
    checkpoints_.set_enabled(on);
    for (auto& a : attentions) a.set_gradient_checkpointing(on);
  }
  std::size_t num_skips() const { return resnets.size(); }

  template <class Self, class F>
  static void walk(Self& self, const std::string& prefix, F&& f) {
    for (std::size_t j = 0; j < self.resnets.size(); ++j) {
      ResnetBlock2D<T>::walk(self.resnets[j], prefix + ".resnets." + std::to_string(j), f);
      if (!self.attentions.empty())
        Transformer2DModel<T>::walk(self.attentions[j], prefix + ".attentions." + std::to_string(j),
                                    f);
    }
    if (!self.upsamplers.empty())
      Upsample2D<T>::walk(self.upsamplers[0], prefix + ".upsamplers.0", f);
  }

  /// skips: num_layers tensors in the order the down path produced them (the last is used
  /// first); upsample_size: output H×W of the upsampler (default 2H×2W).
  Tensor4<T> forward(const Tensor4<T>& x, std::span<const Tensor4<T>> skips,
                     const Tensor<T, 2>& temb, const Tensor3<T>& context,
                     std::optional<std::pair<std::size_t, std::size_t>> upsample_size = {}) {
    const std::size_t m = resnets.size();
    require(skips.size() == m, "UNetUpBlock2D::forward", "got ", skips.size(),
            " skip connections, expected ", m);
    hidden_channels_.assign(m, 0);
    Tensor4<T> h = x;
    checkpoints_.begin(temb);
    for (std::size_t j = 0; j < m; ++j) {
      hidden_channels_[j] = h.shape()[1];
      h = checkpoints_.forward(resnets[j], j, nn::concat_channels_forward(h, skips[m - 1 - j]),
                               temb);
      if (!attentions.empty()) h = attentions[j].forward(h, context);
    }
    if (!upsamplers.empty()) {
      const auto size = upsample_size.value_or(std::pair{2 * h.shape()[2], 2 * h.shape()[3]});
      h = upsamplers[0].forward(h, size.first, size.second);
    }
    return h;
  }

  UpBlockGrads<T> backward(const Tensor4<T>& dy, Tensor<T, 2>& dtemb, Tensor3<T>& dcontext) {
    const std::size_t m = resnets.size();
    require(hidden_channels_.size() == m, "UNetUpBlock2D::backward",
            "no saved forward (call forward first)");
    UpBlockGrads<T> grads;
    grads.skips.resize(m);
    Tensor4<T> g = upsamplers.empty() ? dy : upsamplers[0].backward(dy);
    for (std::size_t j = m; j-- > 0;) {
      if (!attentions.empty()) g = attentions[j].backward(g, dcontext);
      auto [dh, dskip] = nn::concat_channels_backward(
          checkpoints_.backward(resnets[j], j, g, dtemb), hidden_channels_[j]);
      grads.skips[m - 1 - j] = std::move(dskip);
      g = std::move(dh);
    }
    grads.x = std::move(g);
    return grads;
  }

 private:
  UNetUpBlock2DConfig config_{};
  std::vector<std::size_t> hidden_channels_;               // channels of h before each concat
  nn::Checkpoints<Tensor4<T>, Tensor<T, 2>> checkpoints_;  // resnet inputs (concatenated), temb
};

}  // namespace difftrain::models
