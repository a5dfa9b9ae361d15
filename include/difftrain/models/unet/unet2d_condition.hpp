#pragma once
// UNet2DConditionModel (diffusers), the reference CPU denoiser: forward and backward.
//
// Dims legend: B batch, Cin/Cout in/out channels, H×W latent size, L context tokens,
// Dc cross_attention_dim, C0 = block_out_channels[0], E = time embedding width (4·C0).
//   x   = 2·sample − 1 if center_input_sample else sample           [B, Cin, H, W]
//   emb = time_embedding(time_proj(t))                              [B, E]
//   SDXL (addition_embed_type "text_time"), with text_embeds [B, P] and time_ids [B, K]:
//   emb += add_embedding(cat[text_embeds, add_time_proj(time_ids)])  (add_time_proj: the sinusoids
//          of time_proj, addition_time_embed_dim wide, for each of the K ids; P + K·d = the
//          config's projection_class_embeddings_input_dim)
//   h   = conv_in(x);                      res = [h]
//   for each down block: states = block(h, emb, ctx); res += states; h = states.back()
//   h   = mid_block(h, emb, ctx)
//   for each up block: h = block(h, pop the block's skips from res, emb, ctx,
//                                upsample to the size of the next skip)
//   out = conv_out(silu(conv_norm_out(h)))                          [B, Cout, H, W]
// time_proj (no parameters) is computed in float32 exactly as diffusers does it, whatever T is:
// f_k = exp(−ln(10000)·k / (C0/2 − freq_shift)), emb = [cos(t·f), sin(t·f)] (flip_sin_to_cos).
// At t ≈ 900 one float ulp of t·f is ~6e-5, so a double time_proj would not be diffusers' model.
//
// backward(grad_output) back-propagates the last forward: grad_sample() [B, Cin, H, W] and
// grad_encoder_hidden_states() [B, L, Dc] (and grad_text_embeds() [B, P]) are overwritten;
// trainable parameter gradients are
// accumulated (+=). Parameters carry diffusers' names (for_each_parameter). Every Linear and Conv2d
// but time_embedding's sits in a LoRA slot: lora::inject_lora(unet, {"to_q", "to_k", "to_v",
// "to_out.0"}, ...) adapts them by name (for_each_slot); for_each_linear / for_each_conv2d give
// the base layers. Allocation::shapes_only
// builds the structure without parameter storage: for_each_parameter_shape works, forward and
// the other visitors throw.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "difftrain/concepts.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/lora/inject.hpp"
#include "difftrain/models/unet/module_tree.hpp"
#include "difftrain/models/unet/unet_blocks.hpp"
#include "difftrain/models/unet/unet_config.hpp"
#include "difftrain/nn/activations.hpp"
#include "difftrain/nn/conv2d.hpp"
#include "difftrain/nn/group_norm.hpp"
#include "difftrain/nn/timestep_embedding.hpp"

namespace difftrain::models {

// emb[b] = [cos(t_b·f), sin(t_b·f)] (or [sin, cos]), f_k = exp(−ln(10000)·k/(half − shift)),
// every step rounded to float32 as torch does; zero-padded when dim is odd.
template <class T>
Tensor<T, 2> unet_time_proj(std::span<const float> timesteps, std::size_t dim, bool flip_sin_to_cos,
                            double freq_shift) {
  const std::size_t B = timesteps.size(), half = dim / 2;
  require(static_cast<double>(half) != freq_shift, "unet_time_proj", "freq_shift ", freq_shift,
          " equals embedding_dim / 2 = ", half);
  Tensor<T, 2> emb = xt::zeros<T>(std::array<std::size_t, 2>{B, dim});
  const float log_period = static_cast<float>(-std::log(10000.0));
  const float denominator = static_cast<float>(static_cast<double>(half) - freq_shift);
  std::vector<float> frequency(half);
  for (std::size_t k = 0; k < half; ++k)
    frequency[k] = std::exp(static_cast<float>(k) * log_period / denominator);
  const std::size_t cos_offset = flip_sin_to_cos ? 0 : half, sin_offset = half - cos_offset;
  for (std::size_t b = 0; b < B; ++b) {
    require(std::isfinite(timesteps[b]), "unet_time_proj", "timestep ", b, " is ", timesteps[b]);
    T* row = emb.data() + b * dim;
    for (std::size_t k = 0; k < half; ++k) {
      const float angle = timesteps[b] * frequency[k];
      row[sin_offset + k] = static_cast<T>(std::sin(angle));
      row[cos_offset + k] = static_cast<T>(std::cos(angle));
    }
  }
  return emb;
}

template <class T = float>
class UNet2DConditionModel : public CompositeModule<UNet2DConditionModel<T>> {
 public:
  using Scalar = T;

  lora::Conv2dSlot<T> conv_in;
  nn::TimestepEmbedding<T> time_embedding;
  std::vector<nn::TimestepEmbedding<T>> add_embedding;  // 1 with addition_embed_type text_time
  std::vector<UNetDownBlock2D<T>> down_blocks;
  std::vector<UNetMidBlock2DCrossAttn<T>> mid_block;  // 0 or 1 (mid_block_type null: none)
  std::vector<UNetUpBlock2D<T>> up_blocks;
  nn::GroupNorm<T> conv_norm_out;
  lora::Conv2dSlot<T> conv_out;

  explicit UNet2DConditionModel(const UNet2DConditionConfig& config,
                                Allocation allocation = Allocation::parameters);

  const UNet2DConditionConfig& config() const { return config_; }
  Allocation allocation() const { return allocation_; }

  // A shapes-only model has layers without parameters: visiting them would hand out empty
  // tensors (and default layer configs), so these refuse; for_each_parameter_shape works on both.
  using Base = CompositeModule<UNet2DConditionModel<T>>;
  template <class V>
  void for_each_parameter(const std::string& prefix, V&& visit) {
    require_parameters("for_each_parameter");
    Base::for_each_parameter(prefix, std::forward<V>(visit));
  }
  template <class V>
  void for_each_parameter(const std::string& prefix, V&& visit) const {
    require_parameters("for_each_parameter");
    Base::for_each_parameter(prefix, std::forward<V>(visit));
  }
  template <class F>
  void for_each_linear(const std::string& prefix, F&& f) {
    require_parameters("for_each_linear");
    Base::for_each_linear(prefix, std::forward<F>(f));
  }
  template <class F>
  void for_each_conv2d(const std::string& prefix, F&& f) {
    require_parameters("for_each_conv2d");
    Base::for_each_conv2d(prefix, std::forward<F>(f));
  }
  template <class V>
  void for_each_slot(const std::string& prefix, V&& visit) {
    require_parameters("for_each_slot");
    Base::for_each_slot(prefix, std::forward<V>(visit));
  }

  nn::Conv2dConfig conv_in_config() const {
    const std::size_t k = config_.conv_in_kernel;
    return {config_.in_channels,
            config_.block_out_channels[0],
            k,
            1,
            nn::Padding2d::same((k - 1) / 2),
            true};
  }
  nn::TimestepEmbeddingConfig time_embedding_config() const {
    return {config_.block_out_channels[0], config_.time_embed_dim(), 0, true};
  }
  nn::TimestepEmbeddingConfig add_embedding_config() const {
    return {config_.projection_class_embeddings_input_dim, config_.time_embed_dim(), 0, true};
  }
  nn::GroupNormConfig conv_norm_out_config() const {
    return {config_.norm_num_groups, config_.block_out_channels[0], config_.norm_eps, true};
  }
  nn::Conv2dConfig conv_out_config() const {
    const std::size_t k = config_.conv_out_kernel;
    return {config_.block_out_channels[0],
            config_.out_channels,
            k,
            1,
            nn::Padding2d::same((k - 1) / 2),
            true};
  }

  /// Every nn layer with its diffusers module name and config, in forward order.
  template <class Self, class F>
  static void walk(Self& self, const std::string& prefix, F&& f) {
    auto name = [&](const std::string& n) { return nn::join_name(prefix, n); };
    f(name("conv_in"), self.conv_in, self.conv_in_config());
    f(name("time_embedding"), self.time_embedding, self.time_embedding_config());
    for (auto& add : self.add_embedding) f(name("add_embedding"), add, self.add_embedding_config());
    for (std::size_t i = 0; i < self.down_blocks.size(); ++i)
      UNetDownBlock2D<T>::walk(self.down_blocks[i], name("down_blocks." + std::to_string(i)), f);
    for (auto& mid : self.mid_block) UNetMidBlock2DCrossAttn<T>::walk(mid, name("mid_block"), f);
    for (std::size_t i = 0; i < self.up_blocks.size(); ++i)
      UNetUpBlock2D<T>::walk(self.up_blocks[i], name("up_blocks." + std::to_string(i)), f);
    f(name("conv_norm_out"), self.conv_norm_out, self.conv_norm_out_config());
    f(name("conv_out"), self.conv_out, self.conv_out_config());
  }

  /// sample [B, Cin, H, W], timesteps [B] (integers), encoder_hidden_states [B, L, Dc].
  Tensor4<T> forward(const Tensor4<T>& sample, std::span<const std::int64_t> timesteps,
                     const Tensor3<T>& encoder_hidden_states) {
    return forward_impl(sample, float_timesteps(timesteps), encoder_hidden_states, nullptr);
  }
  /// The same with float32 timesteps (diffusers converts integer timesteps to float32 first).
  Tensor4<T> forward(const Tensor4<T>& sample, std::span<const float> timesteps,
                     const Tensor3<T>& encoder_hidden_states) {
    return forward_impl(sample, timesteps, encoder_hidden_states, nullptr);
  }
  /// SDXL: the same with added_cond_kwargs (text_embeds, time_ids).
  Tensor4<T> forward(const Tensor4<T>& sample, std::span<const std::int64_t> timesteps,
                     const Tensor3<T>& encoder_hidden_states, const AddedConditions<T>& added) {
    return forward_impl(sample, float_timesteps(timesteps), encoder_hidden_states, &added);
  }
  Tensor4<T> forward(const Tensor4<T>& sample, std::span<const float> timesteps,
                     const Tensor3<T>& encoder_hidden_states, const AddedConditions<T>& added) {
    return forward_impl(sample, timesteps, encoder_hidden_states, &added);
  }
  /// Whether forward needs AddedConditions (addition_embed_type "text_time").
  bool uses_added_conditions() const { return !add_embedding.empty(); }

  /// diffusers' enable_gradient_checkpointing(): every resnet and transformer block keeps only
  /// its input in forward and recomputes its activations in backward (nn/checkpoint.hpp); the
  /// gradients are bitwise the same.
  void set_gradient_checkpointing(bool on) {
    gradient_checkpointing_ = on;
    for (auto& b : down_blocks) b.set_gradient_checkpointing(on);
    for (auto& b : mid_block) b.set_gradient_checkpointing(on);
    for (auto& b : up_blocks) b.set_gradient_checkpointing(on);
  }
  bool gradient_checkpointing() const { return gradient_checkpointing_; }

  /// Back-propagates grad_output (dL/d output) through the last forward.
  void backward(const Tensor4<T>& grad_output);

  /// d⟨output, grad_output⟩ / d sample of the last backward.
  const Tensor4<T>& grad_sample() const { return grad_sample_; }
  /// d⟨output, grad_output⟩ / d encoder_hidden_states of the last backward.
  const Tensor3<T>& grad_encoder_hidden_states() const { return grad_encoder_hidden_states_; }
  /// d⟨output, grad_output⟩ / d text_embeds of the last backward (SDXL; empty otherwise).
  const Tensor<T, 2>& grad_text_embeds() const { return grad_text_embeds_; }

 private:
  void require_parameters(const char* what) const {
    require(allocation_ == Allocation::parameters, std::string("UNet2DConditionModel::") + what,
            "the model was built with Allocation::shapes_only and has no parameters (use "
            "for_each_parameter_shape)");
  }

  static std::vector<float> float_timesteps(std::span<const std::int64_t> timesteps) {
    std::vector<float> t(timesteps.size());
    for (std::size_t b = 0; b < t.size(); ++b) t[b] = static_cast<float>(timesteps[b]);
    return t;
  }
  Tensor4<T> forward_impl(const Tensor4<T>& sample, std::span<const float> timesteps,
                          const Tensor3<T>& encoder_hidden_states, const AddedConditions<T>* added);
  // aug_emb = add_embedding(cat[text_embeds, add_time_proj(time_ids)])  [B, E]
  Tensor<T, 2> added_embedding(const AddedConditions<T>& added, std::size_t batch);

  static const UNet2DConditionConfig& checked(const UNet2DConditionConfig& c) {
    c.validate();
    return c;
  }

  UNet2DConditionConfig config_;
  Allocation allocation_ = Allocation::parameters;
  nn::SiLU<T> conv_act_;
  bool gradient_checkpointing_ = false;
  // forward bookkeeping for backward
  bool has_forward_ = false;
  std::size_t batch_ = 0;
  std::array<std::size_t, 3> context_shape_{};
  std::array<std::size_t, 4> output_shape_{};
  std::vector<std::size_t> up_skip_begin_;  // index in res of each up block's first skip
  Tensor4<T> grad_sample_;
  Tensor3<T> grad_encoder_hidden_states_;
  std::size_t text_embeds_width_ = 0;  // P of the last forward (0: no added conditions)
  Tensor<T, 2> grad_text_embeds_;
};

// The heavy members, defined out of the class so that DIFFTRAIN_EXTERN_TEMPLATES can keep them
// from being compiled in every translation unit of the project (src/models/ holds the
// explicit instantiations).
template <class T>
UNet2DConditionModel<T>::UNet2DConditionModel(const UNet2DConditionConfig& config,
                                              Allocation allocation)
    : config_(checked(config)), allocation_(allocation) {
  const auto& c = config_;
  const std::size_t n = c.num_blocks(), E = c.time_embed_dim(), c0 = c.block_out_channels[0];
  conv_in = make_slot<lora::Conv2dSlot<T>>(conv_in_config(), allocation);
  time_embedding = make_layer<nn::TimestepEmbedding<T>>(time_embedding_config(), allocation);
  if (c.addition_embed_type == AdditionEmbedType::text_time)
    add_embedding.push_back(
        make_layer<nn::TimestepEmbedding<T>>(add_embedding_config(), allocation));
  std::size_t output = c0;
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t input = output;
    output = c.block_out_channels[i];
    UNetDownBlock2DConfig d;
    d.type = c.down_block_types[i];
    d.in_channels = input;
    d.out_channels = output;
    d.temb_channels = E;
    d.num_layers = c.layers_per_block[i];
    d.groups = c.norm_num_groups;
    d.eps = c.norm_eps;
    d.add_downsample = i + 1 < n;
    d.downsample_padding = c.downsample_padding;
    d.attention = {c.num_attention_heads[i], c.transformer_layers_per_block[i],
                   c.cross_attention_dim[i], c.use_linear_projection};
    down_blocks.emplace_back(d, allocation);
  }
  if (c.has_mid_block) {
    UNetMidBlock2DCrossAttnConfig m;
    m.channels = c.block_out_channels.back();
    m.temb_channels = E;
    m.num_layers = 1;
    m.groups = c.norm_num_groups;
    m.eps = c.norm_eps;
    m.output_scale_factor = c.mid_block_scale_factor;
    m.attention = {c.num_attention_heads.back(), c.transformer_layers_per_block.back(),
                   c.cross_attention_dim.back(), c.use_linear_projection};
    mid_block.emplace_back(m, allocation);
  }
  output = c.block_out_channels.back();
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t previous = output;
    output = UNet2DConditionConfig::reversed_at(c.block_out_channels, i);
    UNetUpBlock2DConfig u;
    u.type = c.up_block_types[i];
    u.in_channels =
        UNet2DConditionConfig::reversed_at(c.block_out_channels, std::min(i + 1, n - 1));
    u.prev_output_channels = previous;
    u.out_channels = output;
    u.temb_channels = E;
    u.num_layers = UNet2DConditionConfig::reversed_at(c.layers_per_block, i) + 1;
    u.groups = c.norm_num_groups;
    u.eps = c.norm_eps;
    u.add_upsample = i + 1 < n;
    u.attention = {UNet2DConditionConfig::reversed_at(c.num_attention_heads, i),
                   UNet2DConditionConfig::reversed_at(c.transformer_layers_per_block, i),
                   UNet2DConditionConfig::reversed_at(c.cross_attention_dim, i),
                   c.use_linear_projection};
    up_blocks.emplace_back(u, allocation);
  }
  conv_norm_out = make_layer<nn::GroupNorm<T>>(conv_norm_out_config(), allocation);
  conv_out = make_slot<lora::Conv2dSlot<T>>(conv_out_config(), allocation);
  std::size_t produced = 1, consumed = 0;
  for (const auto& d : down_blocks) produced += d.num_states();
  for (const auto& u : up_blocks) consumed += u.num_skips();
  require(produced == consumed, "UNet2DConditionModel", "the down blocks produce ", produced,
          " skip connections but the up blocks consume ", consumed,
          " (layers_per_block must be consistent)");
}

template <class T>
Tensor<T, 2> UNet2DConditionModel<T>::added_embedding(const AddedConditions<T>& added,
                                                      std::size_t batch) {
  constexpr const char* fn = "UNet2DConditionModel::forward";
  const auto& c = config_;
  const std::size_t d = c.addition_time_embed_dim, width = c.projection_class_embeddings_input_dim;
  const std::size_t P = added.text_embeds.shape()[1], K = added.time_ids.shape()[1];
  require(added.text_embeds.shape()[0] == batch && added.time_ids.shape()[0] == batch, fn,
          "text_embeds has shape ", shape_string(added.text_embeds.shape()), " and time_ids ",
          shape_string(added.time_ids.shape()), ", expected batch ", batch, " as the sample");
  require(P + K * d == width, fn, "text_embeds ", shape_string(added.text_embeds.shape()),
          " and time_ids ", shape_string(added.time_ids.shape()), " give ", P, " + ", K, " x ", d,
          " = ", P + K * d,
          " add_embedding inputs, expected projection_class_embeddings_input_dim = ", width);
  // [B·K, d] sinusoids are [B, K·d] row by row: value 0's d numbers first
  const Tensor<T, 2> time_embeds = unet_time_proj<T>(
      std::span<const float>(added.time_ids.data(), batch * K), d, c.flip_sin_to_cos, c.freq_shift);
  Tensor<T, 2> add_embeds(std::array<std::size_t, 2>{batch, width});
  for (std::size_t b = 0; b < batch; ++b) {
    std::copy_n(added.text_embeds.data() + b * P, P, add_embeds.data() + b * width);
    std::copy_n(time_embeds.data() + b * K * d, K * d, add_embeds.data() + b * width + P);
  }
  text_embeds_width_ = P;
  return add_embedding[0].forward(add_embeds);
}

template <class T>
Tensor4<T> UNet2DConditionModel<T>::forward_impl(const Tensor4<T>& sample,
                                                 std::span<const float> timesteps,
                                                 const Tensor3<T>& encoder_hidden_states,
                                                 const AddedConditions<T>* added) {
  constexpr const char* fn = "UNet2DConditionModel::forward";
  require_parameters("forward");
  const auto& c = config_;
  const std::size_t B = sample.shape()[0];
  require(B > 0 && sample.shape()[2] > 0 && sample.shape()[3] > 0, fn, "sample has shape ",
          shape_string(sample.shape()), ", expected a non-empty [B,", c.in_channels, ",H,W]");
  check_shape(fn, "sample", sample.shape(),
              {B, c.in_channels, sample.shape()[2], sample.shape()[3]});
  require(timesteps.size() == B, fn, "timesteps has ", timesteps.size(),
          " entries, expected one per sample (", B, ")");
  const std::size_t L = encoder_hidden_states.shape()[1];
  require(L > 0, fn, "encoder_hidden_states has shape ",
          shape_string(encoder_hidden_states.shape()), ", expected at least one token");
  check_shape(fn, "encoder_hidden_states", encoder_hidden_states.shape(),
              {B, L, c.cross_attention_dim[0]});

  const Tensor<T, 2> t_emb =
      unet_time_proj<T>(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift);
  Tensor<T, 2> emb = time_embedding.forward(t_emb);
  require(uses_added_conditions() == (added != nullptr), fn,
          uses_added_conditions()
              ? "the UNet has addition_embed_type \"text_time\" (SDXL): forward needs text_embeds "
                "and time_ids (AddedConditions)"
              : "added conditions (text_embeds, time_ids) were given, but the UNet has no "
                "addition_embed_type");
  text_embeds_width_ = 0;
  if (added) emb += added_embedding(*added, B);

  Tensor4<T> h = c.center_input_sample ? Tensor4<T>(T(2) * sample - T(1)) : sample;
  h = conv_in.forward(h);
  std::vector<Tensor4<T>> res;
  res.push_back(h);
  for (auto& block : down_blocks) {
    std::vector<Tensor4<T>> states = block.forward(h, emb, encoder_hidden_states);
    h = states.back();
    for (auto& s : states) res.push_back(std::move(s));
  }
  for (auto& mid : mid_block) h = mid.forward(h, emb, encoder_hidden_states);
  up_skip_begin_.clear();
  for (auto& block : up_blocks) {
    const std::size_t begin = res.size() - block.num_skips();
    up_skip_begin_.push_back(begin);
    std::optional<std::pair<std::size_t, std::size_t>> size;
    if (begin > 0) size = std::pair{res[begin - 1].shape()[2], res[begin - 1].shape()[3]};
    h = block.forward(h, std::span<const Tensor4<T>>(res.data() + begin, block.num_skips()), emb,
                      encoder_hidden_states, size);
    res.resize(begin);  // the skips are not needed by backward
  }
  Tensor4<T> out = conv_out.forward(conv_act_.forward(conv_norm_out.forward(h)));
  batch_ = B;
  context_shape_ = encoder_hidden_states.shape();
  output_shape_ = out.shape();
  has_forward_ = true;
  return out;
}

template <class T>
void UNet2DConditionModel<T>::backward(const Tensor4<T>& grad_output) {
  constexpr const char* fn = "UNet2DConditionModel::backward";
  require(has_forward_, fn, "no saved forward (call forward first)");
  check_same_shape(fn, "grad_output", grad_output.shape(), output_shape_);
  Tensor4<T> dh = conv_norm_out.backward(conv_act_.backward(conv_out.backward(grad_output)));
  Tensor<T, 2> dtemb = xt::zeros<T>(std::array<std::size_t, 2>{batch_, config_.time_embed_dim()});
  Tensor3<T> dcontext = xt::zeros<T>(context_shape_);
  std::size_t total = 1;
  for (const auto& d : down_blocks) total += d.num_states();
  std::vector<Tensor4<T>> d_res(total);
  for (std::size_t i = up_blocks.size(); i-- > 0;) {
    UpBlockGrads<T> g = up_blocks[i].backward(dh, dtemb, dcontext);
    for (std::size_t k = 0; k < g.skips.size(); ++k)
      d_res[up_skip_begin_[i] + k] = std::move(g.skips[k]);
    dh = std::move(g.x);
  }
  for (auto& mid : mid_block) dh = mid.backward(dh, dtemb, dcontext);
  std::size_t end = total;
  for (std::size_t i = down_blocks.size(); i-- > 0;) {
    const std::size_t m = down_blocks[i].num_states();
    end -= m;
    d_res[end + m - 1] += dh;
    dh = down_blocks[i].backward(std::span<const Tensor4<T>>(d_res.data() + end, m), dtemb,
                                 dcontext);
  }
  dh += d_res[0];
  grad_sample_ = conv_in.backward(dh);
  if (config_.center_input_sample) grad_sample_ *= T(2);
  if (text_embeds_width_ > 0) {
    const Tensor<T, 2> d_add = add_embedding[0].backward(dtemb);
    const std::size_t P = text_embeds_width_, width = d_add.shape()[1];
    grad_text_embeds_.resize({batch_, P});
    for (std::size_t b = 0; b < batch_; ++b)
      std::copy_n(d_add.data() + b * width, P, grad_text_embeds_.data() + b * P);
  } else {
    grad_text_embeds_ = Tensor<T, 2>();
  }
  time_embedding.backward(dtemb, false);
  grad_encoder_hidden_states_ = std::move(dcontext);
}

#ifdef DIFFTRAIN_EXTERN_TEMPLATES
extern template class CompositeModule<UNet2DConditionModel<float>>;
extern template class CompositeModule<UNet2DConditionModel<double>>;
extern template class UNet2DConditionModel<float>;
extern template class UNet2DConditionModel<double>;
#endif

static_assert(Denoiser<UNet2DConditionModel<float>>);
static_assert(lora::HasLoraSlots<UNet2DConditionModel<float>>);

}  // namespace difftrain::models
