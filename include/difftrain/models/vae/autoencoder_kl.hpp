#pragma once
// AutoencoderKL (diffusers), forward only: the frozen VAE of Stable Diffusion.
//
// Dims legend: B batch, Cin / Cout image channels, H×W image, Z latent channels,
// h×w = H/f × W/f latent size (f = 2^(blocks − 1), 8 for SD), c_i = block_out_channels[i].
//   encoder: conv_in (Cin → c_0) → down_blocks.i (DownEncoderBlock2D, c_{i−1} → c_i, downsample
//            except the last) → mid_block → conv_norm_out → silu → conv_out (c_last → 2Z)
//   moments = quant_conv(encoder(image))           (1×1, 2Z → 2Z; skipped if !use_quant_conv)
//   decoder: post_quant_conv (1×1 Z → Z) → conv_in (Z → c_last) → mid_block → up_blocks.i
//            (UpDecoderBlock2D over the reversed channels, layers_per_block + 1 resnets, upsample
//            except the last) → conv_norm_out → silu → conv_out (c_0 → Cout); not clamped
//   latents = scaling_factor · (sample − shift_factor);  image = decode(latents / scaling_factor
//            + shift_factor)
//
// Memory: encode() and decode() run one sample at a time, and 3×3 convs run in bands of output
// rows (vae_conv.hpp), so the peak is one sample's activations plus one 16 MiB band buffer per
// thread, whatever the batch size (beyond the [B, ...] inputs and outputs). Measured peak RSS for
// the SD 1.x VAE (c = 128, 256, 512, 512; 335 MB of float weights), 2 threads: encoding a
// 512×512 image 1.05 GB (≈ 0.7 GB above the weights: at most about four [128, 512, 512] tensors
// of 128 MiB alive in a resnet), decoding to 512×512 1.17 GB (the last up blocks at 256 and 128
// channels on 512×512); 256×256 encoding 0.57 GB. Building the model holds gradients for one
// block at a time only.
// Parameters are frozen (no gradient storage). One model object must not run two calls at once
// (the conv and attention workspaces are shared scratch); separate objects may.

#include <cstddef>
#include <string>
#include <vector>
#include <xtensor/xview.hpp>

#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/models/vae/diagonal_gaussian.hpp"
#include "difftrain/models/vae/vae_blocks.hpp"
#include "difftrain/models/vae/vae_config.hpp"
#include "difftrain/models/vae/vae_conv.hpp"
#include "difftrain/nn/conv2d.hpp"
#include "difftrain/nn/group_norm.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::models {

namespace vae_detail {
// Drops a freshly built block's gradient storage at once, so that building the model never holds
// gradients for more than one block (the whole model is frozen at the end of its constructor).
template <class Block>
void freeze(Block& block) {
  nn::set_trainable<typename Block::Scalar>(block, false);
}
}  // namespace vae_detail

/// diffusers' vae.Encoder (double_z): image [B, Cin, H, W] → [B, 2Z, h, w].
template <class T = float>
class AutoencoderKLEncoder {
 public:
  using Scalar = T;

  nn::Conv2d<T> conv_in;
  std::vector<DownEncoderBlock2D<T>> down_blocks;
  UNetMidBlock2D<T> mid_block;
  nn::GroupNorm<T> conv_norm_out;
  nn::Conv2d<T> conv_out;

  AutoencoderKLEncoder() = default;
  explicit AutoencoderKLEncoder(const AutoencoderKLConfig& c) {
    const auto& ch = c.block_out_channels;
    const std::size_t n = ch.size(), groups = c.norm_num_groups;
    conv_in = nn::Conv2d<T>(vae_detail::conv3x3(c.in_channels, ch[0]));
    for (std::size_t i = 0; i < n; ++i)
      vae_detail::freeze(down_blocks.emplace_back(i == 0 ? ch[0] : ch[i - 1], ch[i],
                                                  c.layers_per_block, groups, i + 1 < n));
    mid_block = UNetMidBlock2D<T>(ch.back(), groups, c.mid_block_add_attention);
    vae_detail::freeze(mid_block);
    conv_norm_out = nn::GroupNorm<T>(vae_detail::norm(groups, ch.back()));
    conv_out = nn::Conv2d<T>(vae_detail::conv3x3(ch.back(), 2 * c.latent_channels));
  }

  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    walk(*this, prefix, visit);
  }
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) const {
    walk(*this, prefix, visit);
  }

  Tensor4<T> forward(const Tensor4<T>& x, ConvWorkspace<T>& ws) const {
    Tensor4<T> h = conv2d_banded(conv_in, x, ws);
    for (const auto& block : down_blocks) h = block.forward(h, ws);
    h = mid_block.forward(h, ws);
    h = conv_norm_out.forward_inference(h);
    vae_detail::silu_inplace(h);
    return conv2d_banded(conv_out, h, ws);
  }

 private:
  template <class Self, class Visitor>
  static void walk(Self& self, const std::string& prefix, Visitor& visit) {
    self.conv_in.for_each_parameter(nn::join_name(prefix, "conv_in"), visit);
    for (std::size_t i = 0; i < self.down_blocks.size(); ++i)
      self.down_blocks[i].for_each_parameter(
          nn::join_name(prefix, "down_blocks." + std::to_string(i)), visit);
    self.mid_block.for_each_parameter(nn::join_name(prefix, "mid_block"), visit);
    self.conv_norm_out.for_each_parameter(nn::join_name(prefix, "conv_norm_out"), visit);
    self.conv_out.for_each_parameter(nn::join_name(prefix, "conv_out"), visit);
  }
};

/// diffusers' vae.Decoder: z [B, Z, h, w] → image [B, Cout, H, W].
template <class T = float>
class AutoencoderKLDecoder {
 public:
  using Scalar = T;

  nn::Conv2d<T> conv_in;
  UNetMidBlock2D<T> mid_block;
  std::vector<UpDecoderBlock2D<T>> up_blocks;
  nn::GroupNorm<T> conv_norm_out;
  nn::Conv2d<T> conv_out;

  AutoencoderKLDecoder() = default;
  explicit AutoencoderKLDecoder(const AutoencoderKLConfig& c) {
    const auto& ch = c.block_out_channels;
    const std::size_t n = ch.size(), groups = c.norm_num_groups;
    conv_in = nn::Conv2d<T>(vae_detail::conv3x3(c.latent_channels, ch.back()));
    mid_block = UNetMidBlock2D<T>(ch.back(), groups, c.mid_block_add_attention);
    vae_detail::freeze(mid_block);
    std::size_t previous = ch.back();
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t out = ch[n - 1 - i];
      vae_detail::freeze(
          up_blocks.emplace_back(previous, out, c.layers_per_block + 1, groups, i + 1 < n));
      previous = out;
    }
    conv_norm_out = nn::GroupNorm<T>(vae_detail::norm(groups, ch[0]));
    conv_out = nn::Conv2d<T>(vae_detail::conv3x3(ch[0], c.out_channels));
  }

  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    walk(*this, prefix, visit);
  }
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) const {
    walk(*this, prefix, visit);
  }

  Tensor4<T> forward(const Tensor4<T>& z, ConvWorkspace<T>& ws) const {
    Tensor4<T> h = conv2d_banded(conv_in, z, ws);
    h = mid_block.forward(h, ws);
    for (const auto& block : up_blocks) h = block.forward(h, ws);
    h = conv_norm_out.forward_inference(h);
    vae_detail::silu_inplace(h);
    return conv2d_banded(conv_out, h, ws);
  }

 private:
  template <class Self, class Visitor>
  static void walk(Self& self, const std::string& prefix, Visitor& visit) {
    self.conv_in.for_each_parameter(nn::join_name(prefix, "conv_in"), visit);
    self.mid_block.for_each_parameter(nn::join_name(prefix, "mid_block"), visit);
    for (std::size_t i = 0; i < self.up_blocks.size(); ++i)
      self.up_blocks[i].for_each_parameter(nn::join_name(prefix, "up_blocks." + std::to_string(i)),
                                           visit);
    self.conv_norm_out.for_each_parameter(nn::join_name(prefix, "conv_norm_out"), visit);
    self.conv_out.for_each_parameter(nn::join_name(prefix, "conv_out"), visit);
  }
};

template <class T = float>
class AutoencoderKL {
 public:
  using Scalar = T;

  AutoencoderKLEncoder<T> encoder;
  nn::Conv2d<T> quant_conv;       // when config.use_quant_conv
  nn::Conv2d<T> post_quant_conv;  // when config.use_post_quant_conv
  AutoencoderKLDecoder<T> decoder;

  /// Builds the model with zero weights (load them with load_vae / nn::load_state_dict), frozen.
  explicit AutoencoderKL(const AutoencoderKLConfig& config) : config_(checked(config)) {
    encoder = AutoencoderKLEncoder<T>(config_);
    decoder = AutoencoderKLDecoder<T>(config_);
    const std::size_t Z = config_.latent_channels;
    if (config_.use_quant_conv)
      quant_conv = nn::Conv2d<T>(nn::Conv2dConfig{2 * Z, 2 * Z, 1, 1, {}, true});
    if (config_.use_post_quant_conv)
      post_quant_conv = nn::Conv2d<T>(nn::Conv2dConfig{Z, Z, 1, 1, {}, true});
    nn::set_trainable<T>(*this, false);
  }

  const AutoencoderKLConfig& config() const { return config_; }
  std::size_t latent_channels() const { return config_.latent_channels; }
  std::size_t downsample_factor() const { return config_.downsample_factor(); }

  /// Peak band buffer per thread, in elements (see vae_conv.hpp); 4 Mi by default.
  void set_max_band_elements(std::size_t n) {
    require(n > 0, "AutoencoderKL::set_max_band_elements", "n must be positive");
    workspace_.max_band_elements = n;
    workspace_.buffers.clear();
  }

  /// encoder.*, quant_conv.*, post_quant_conv.*, decoder.* (diffusers' names).
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    walk(*this, prefix, visit);
  }
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) const {
    walk(*this, prefix, visit);
  }

  /// Latent shape [B, Z, h, w] of images [B, Cin, H, W] (H, W ≥ 1; h = the encoder's output).
  std::array<std::size_t, 4> latent_shape(const std::array<std::size_t, 4>& image_shape) const {
    std::size_t h = image_shape[2], w = image_shape[3];
    // each downsample: pad (0,1,0,1) then 3×3 stride 2 → ⌊(n + 1 − 3)/2⌋ + 1 = ⌊(n − 2)/2⌋ + 1
    for (std::size_t i = 0; i + 1 < config_.num_blocks(); ++i) {
      require(h >= 2 && w >= 2, "AutoencoderKL::latent_shape", "image shape ",
              shape_string(image_shape), " is too small for ", config_.num_blocks() - 1,
              " downsamplings");
      h = (h - 2) / 2 + 1;
      w = (w - 2) / 2 + 1;
    }
    return {image_shape[0], config_.latent_channels, h, w};
  }

  // moments = quant_conv(encoder(image)), one sample at a time
  Tensor4<T> encode_moments(const Tensor4<T>& images) const;

  /// The posterior q(z | image): mean and clamped logvar (unscaled, as diffusers' latent_dist).
  DiagonalGaussian<T> encode(const Tensor4<T>& images) const {
    return DiagonalGaussian<T>::from_moments(encode_moments(images));
  }

  // latents = scaling_factor · (z − shift_factor)
  Tensor4<T> scale_latents(const Tensor4<T>& z) const {
    const T sf = static_cast<T>(config_.scaling_factor),
            shift = static_cast<T>(config_.shift_factor);
    Tensor4<T> out(z.shape());
    for (std::size_t i = 0; i < z.size(); ++i) out.data()[i] = sf * (z.data()[i] - shift);
    return out;
  }
  // z = latents / scaling_factor + shift_factor
  Tensor4<T> unscale_latents(const Tensor4<T>& latents) const {
    const T sf = static_cast<T>(config_.scaling_factor),
            shift = static_cast<T>(config_.shift_factor);
    Tensor4<T> out(latents.shape());
    for (std::size_t i = 0; i < latents.size(); ++i) out.data()[i] = latents.data()[i] / sf + shift;
    return out;
  }

  // image = decoder(post_quant_conv(z)) for unscaled z (diffusers' AutoencoderKL.decode(z)),
  // one sample at a time
  Tensor4<T> decode(const Tensor4<T>& z) const;

  /// image = decode(latents / scaling_factor + shift_factor), for the latents a UNet works on.
  Tensor4<T> decode_latents(const Tensor4<T>& latents) const {
    return decode(unscale_latents(latents));
  }

 private:
  static const AutoencoderKLConfig& checked(const AutoencoderKLConfig& c) {
    c.validate();
    return c;
  }

  template <class Self, class Visitor>
  static void walk(Self& self, const std::string& prefix, Visitor& visit) {
    self.encoder.for_each_parameter(nn::join_name(prefix, "encoder"), visit);
    if (self.config_.use_quant_conv)
      self.quant_conv.for_each_parameter(nn::join_name(prefix, "quant_conv"), visit);
    if (self.config_.use_post_quant_conv)
      self.post_quant_conv.for_each_parameter(nn::join_name(prefix, "post_quant_conv"), visit);
    self.decoder.for_each_parameter(nn::join_name(prefix, "decoder"), visit);
  }

  AutoencoderKLConfig config_;
  mutable ConvWorkspace<T> workspace_;
};

// The heavy members, out of the class so that DIFFTRAIN_EXTERN_TEMPLATES keeps them from being
// compiled in every translation unit of the project (src/models/ holds the
// explicit instantiations).
template <class T>
Tensor4<T> AutoencoderKL<T>::encode_moments(const Tensor4<T>& images) const {
  constexpr const char* fn = "AutoencoderKL::encode";
  const auto& s = images.shape();
  check_shape(fn, "image", s, {s[0], config_.in_channels, s[2], s[3]});
  require(s[2] > 0 && s[3] > 0, fn, "image has shape ", shape_string(s),
          ", expected a non-empty image");
  const auto latent = latent_shape({s[0], s[1], s[2], s[3]});
  Tensor4<T> moments(std::array<std::size_t, 4>{s[0], 2 * latent[1], latent[2], latent[3]});
  for (std::size_t b = 0; b < s[0]; ++b) {
    const Tensor4<T> x = xt::view(images, xt::range(b, b + 1));
    Tensor4<T> m = encoder.forward(x, workspace_);
    if (config_.use_quant_conv) m = quant_conv.forward_inference(m);
    std::copy(m.begin(), m.end(), moments.data() + b * m.size());
  }
  return moments;
}

template <class T>
Tensor4<T> AutoencoderKL<T>::decode(const Tensor4<T>& z) const {
  constexpr const char* fn = "AutoencoderKL::decode";
  const auto& s = z.shape();
  check_shape(fn, "z", s, {s[0], config_.latent_channels, s[2], s[3]});
  require(s[2] > 0 && s[3] > 0, fn, "z has shape ", shape_string(s), ", expected non-empty");
  Tensor4<T> images;
  for (std::size_t b = 0; b < s[0]; ++b) {
    Tensor4<T> x = xt::view(z, xt::range(b, b + 1));
    if (config_.use_post_quant_conv) x = post_quant_conv.forward_inference(x);
    const Tensor4<T> y = decoder.forward(x, workspace_);
    if (b == 0)
      images =
          Tensor4<T>(std::array<std::size_t, 4>{s[0], y.shape()[1], y.shape()[2], y.shape()[3]});
    std::copy(y.begin(), y.end(), images.data() + b * y.size());
  }
  if (s[0] == 0) {
    const std::size_t f = config_.downsample_factor();
    images = Tensor4<T>(std::array<std::size_t, 4>{0, config_.out_channels, s[2] * f, s[3] * f});
  }
  return images;
}

#ifdef DIFFTRAIN_EXTERN_TEMPLATES
extern template class AutoencoderKL<float>;
extern template class AutoencoderKL<double>;
#endif

}  // namespace difftrain::models
