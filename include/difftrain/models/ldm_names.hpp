#pragma once
// Original single-file checkpoints (CompVis / Stability "LDM" names, e.g.
// v1-5-pruned-emaonly.safetensors) ↔ the diffusers / transformers names the models use.
// One file holds every component under its own prefix; a loader takes its component's tensors
// and ignores the rest (the other components, model_ema.*, alphas_cumprod, ...):
//   UNet   model.diffusion_model.<LDM name>     (ldm_unet_name)
//   VAE    first_stage_model.<LDM name>         (ldm_vae_name)
//   CLIP   cond_stage_model.transformer.<transformers name> (identical below the prefix)
//
// UNet (blocks counted in forward order; L_i = layers_per_block[i], up block i has
// L'_i + 1 resnets with L' the reversed list):
//   conv_in ↔ input_blocks.0.0        time_embedding.linear_1 / _2 ↔ time_embed.0 / .2
//   (SDXL) add_embedding.linear_1 / _2 ↔ label_emb.0.0 / .2
//   down_blocks.i.resnets.j / attentions.j ↔ input_blocks.k.0 / .1,  k = 1 + Σ_{b<i}(L_b+1) + j
//   down_blocks.i.downsamplers.0.conv ↔ input_blocks.(1 + Σ_{b<i}(L_b+1) + L_i).0.op
//   mid_block.resnets.0 / attentions.0 / resnets.1 ↔ middle_block.0 / .1 / .2
//   up_blocks.i.resnets.j / attentions.j ↔ output_blocks.m.0 / .1,  m = Σ_{b<i}(L'_b+1) + j
//   up_blocks.i.upsamplers.0 ↔ output_blocks.(Σ_{b<i}(L'_b+1) + L'_i).(2 with attentions, else 1)
//   conv_norm_out / conv_out ↔ out.0 / out.2
//   resnet: norm1 conv1 time_emb_proj norm2 conv2 conv_shortcut
//         ↔ in_layers.0 in_layers.2 emb_layers.1 out_layers.0 out_layers.3 skip_connection
//   Transformer2DModel internals are named alike in both.
// VAE (n blocks; the decoder's up blocks are numbered from the deepest in diffusers, from the
// shallowest in LDM):
//   encoder.down_blocks.i.resnets.j ↔ encoder.down.i.block.j
//   encoder.down_blocks.i.downsamplers.0.conv ↔ encoder.down.i.downsample.conv
//   decoder.up_blocks.i.resnets.j ↔ decoder.up.(n−1−i).block.j
//   decoder.up_blocks.i.upsamplers.0.conv ↔ decoder.up.(n−1−i).upsample.conv
//   *.mid_block.resnets.0 / .1 ↔ *.mid.block_1 / block_2;  *.conv_norm_out ↔ *.norm_out
//   *.mid_block.attentions.0.group_norm / to_q / to_k / to_v / to_out.0
//       ↔ *.mid.attn_1.norm / q / k / v / proj_out  (LDM stores the four weights as 1×1 convs
//       [C, C, 1, 1]; they are read as the Linear weights [C, C], same elements)
//   resnet conv_shortcut ↔ nin_shortcut; conv_in, conv_out, quant_conv, post_quant_conv alike.

#include <charconv>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/io/state_dict.hpp"
#include "difftrain/models/unet/unet_config.hpp"
#include "difftrain/models/vae/vae_config.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::models {

inline constexpr std::string_view kLdmUnetPrefix = "model.diffusion_model.";
inline constexpr std::string_view kLdmVaePrefix = "first_stage_model.";
inline constexpr std::string_view kLdmClipPrefix = "cond_stage_model.transformer.";

namespace ldm_detail {

/// A parameter name split at its dots, read left to right.
class NameParts {
 public:
  NameParts(std::string_view function, const std::string& name) : function_(function), name_(name) {
    std::size_t start = 0;
    for (std::size_t dot = name.find('.'); dot != std::string::npos; dot = name.find('.', start)) {
      parts_.push_back(name.substr(start, dot - start));
      start = dot + 1;
    }
    parts_.push_back(name.substr(start));
  }

  std::size_t size() const { return parts_.size(); }
  bool is(std::size_t i, std::string_view part) const { return i < size() && parts_[i] == part; }
  /// The index at part i, which must be below `bound`.
  std::size_t index(std::size_t i, std::size_t bound) const {
    std::size_t value = 0;
    const std::string& text = i < size() ? parts_[i] : std::string();
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (text.empty() || ec != std::errc() || end != text.data() + text.size() || value >= bound)
      fail();
    return value;
  }
  /// Parts i, i+1, ... joined with dots (at least one part).
  std::string rest(std::size_t i) const {
    if (i >= size()) fail();
    std::string out = parts_[i];
    for (std::size_t k = i + 1; k < size(); ++k) out += "." + parts_[k];
    return out;
  }
  [[noreturn]] void fail() const {
    difftrain::fail(function_, "'", name_, "' is not a parameter name of this model's config");
  }

 private:
  std::string_view function_;
  const std::string& name_;
  std::vector<std::string> parts_;
};

// resnet parameter (from part i on) in the UNet's LDM names
inline std::string unet_resnet(const NameParts& p, std::size_t i) {
  static const std::pair<const char*, const char*> kNames[] = {
      {"norm1", "in_layers.0"},  {"conv1", "in_layers.2"},  {"time_emb_proj", "emb_layers.1"},
      {"norm2", "out_layers.0"}, {"conv2", "out_layers.3"}, {"conv_shortcut", "skip_connection"}};
  for (const auto& [diffusers, ldm] : kNames)
    if (p.is(i, diffusers)) return ldm + ("." + p.rest(i + 1));
  p.fail();
}

// resnet parameter (from part i on) in the VAE's LDM names
inline std::string vae_resnet(const NameParts& p, std::size_t i) {
  for (const char* same : {"norm1", "conv1", "norm2", "conv2"})
    if (p.is(i, same)) return p.rest(i);
  if (p.is(i, "conv_shortcut")) return "nin_shortcut." + p.rest(i + 1);
  p.fail();
}

// VAE mid-block attention parameter (from part i on)
inline std::string vae_attention(const NameParts& p, std::size_t i) {
  if (p.is(i, "group_norm")) return "norm." + p.rest(i + 1);
  if (p.is(i, "to_q")) return "q." + p.rest(i + 1);
  if (p.is(i, "to_k")) return "k." + p.rest(i + 1);
  if (p.is(i, "to_v")) return "v." + p.rest(i + 1);
  if (p.is(i, "to_out") && p.is(i + 1, "0")) return "proj_out." + p.rest(i + 2);
  p.fail();
}

}  // namespace ldm_detail

/// The LDM name (below model.diffusion_model.) of a diffusers UNet2DConditionModel parameter of
/// this config; Error for a name the config does not have.
inline std::string ldm_unet_name(const UNet2DConditionConfig& c, const std::string& name) {
  const ldm_detail::NameParts p("ldm_unet_name", name);
  const std::size_t n = c.num_blocks();
  auto up_layers = [&](std::size_t i) {
    return UNet2DConditionConfig::reversed_at(c.layers_per_block, i);
  };
  if (p.is(0, "conv_in")) return "input_blocks.0.0." + p.rest(1);
  if (p.is(0, "time_embedding") && p.is(1, "linear_1")) return "time_embed.0." + p.rest(2);
  if (p.is(0, "time_embedding") && p.is(1, "linear_2")) return "time_embed.2." + p.rest(2);
  if (p.is(0, "add_embedding") && p.is(1, "linear_1") &&
      c.addition_embed_type == AdditionEmbedType::text_time)
    return "label_emb.0.0." + p.rest(2);
  if (p.is(0, "add_embedding") && p.is(1, "linear_2") &&
      c.addition_embed_type == AdditionEmbedType::text_time)
    return "label_emb.0.2." + p.rest(2);
  if (p.is(0, "conv_norm_out")) return "out.0." + p.rest(1);
  if (p.is(0, "conv_out")) return "out.2." + p.rest(1);
  if (p.is(0, "down_blocks")) {
    const std::size_t i = p.index(1, n);
    std::size_t first = 1;
    for (std::size_t b = 0; b < i; ++b) first += c.layers_per_block[b] + 1;
    const std::size_t layers = c.layers_per_block[i];
    if (p.is(2, "downsamplers") && p.is(3, "0") && p.is(4, "conv") && i + 1 < n)
      return "input_blocks." + std::to_string(first + layers) + ".0.op." + p.rest(5);
    const bool attention = c.down_block_types[i] == DownBlockType::CrossAttnDownBlock2D;
    if (p.is(2, "resnets"))
      return "input_blocks." + std::to_string(first + p.index(3, layers)) + ".0." +
             ldm_detail::unet_resnet(p, 4);
    if (p.is(2, "attentions") && attention)
      return "input_blocks." + std::to_string(first + p.index(3, layers)) + ".1." + p.rest(4);
  }
  if (p.is(0, "mid_block") && c.has_mid_block) {
    if (p.is(1, "resnets"))
      return "middle_block." + std::to_string(2 * p.index(2, 2)) + "." +
             ldm_detail::unet_resnet(p, 3);
    if (p.is(1, "attentions") && p.is(2, "0")) return "middle_block.1." + p.rest(3);
  }
  if (p.is(0, "up_blocks")) {
    const std::size_t i = p.index(1, n);
    std::size_t first = 0;
    for (std::size_t b = 0; b < i; ++b) first += up_layers(b) + 1;
    const std::size_t resnets = up_layers(i) + 1;
    const bool attention = c.up_block_types[i] == UpBlockType::CrossAttnUpBlock2D;
    if (p.is(2, "upsamplers") && p.is(3, "0") && p.is(4, "conv") && i + 1 < n)
      return "output_blocks." + std::to_string(first + resnets - 1) + (attention ? ".2." : ".1.") +
             "conv." + p.rest(5);
    if (p.is(2, "resnets"))
      return "output_blocks." + std::to_string(first + p.index(3, resnets)) + ".0." +
             ldm_detail::unet_resnet(p, 4);
    if (p.is(2, "attentions") && attention)
      return "output_blocks." + std::to_string(first + p.index(3, resnets)) + ".1." + p.rest(4);
  }
  p.fail();
}

/// The LDM name (below first_stage_model.) of a diffusers AutoencoderKL parameter of this config;
/// Error for a name the config does not have.
inline std::string ldm_vae_name(const AutoencoderKLConfig& c, const std::string& name) {
  const ldm_detail::NameParts p("ldm_vae_name", name);
  const std::size_t n = c.num_blocks();
  if (p.is(0, "quant_conv") || p.is(0, "post_quant_conv")) return name;
  if (!p.is(0, "encoder") && !p.is(0, "decoder")) p.fail();
  const std::string coder = p.is(0, "encoder") ? "encoder." : "decoder.";
  if (p.is(1, "conv_in") || p.is(1, "conv_out")) return name;
  if (p.is(1, "conv_norm_out")) return coder + "norm_out." + p.rest(2);
  if (p.is(1, "mid_block")) {
    if (p.is(2, "resnets"))
      return coder + "mid.block_" + std::to_string(p.index(3, 2) + 1) + "." +
             ldm_detail::vae_resnet(p, 4);
    if (p.is(2, "attentions") && p.is(3, "0") && c.mid_block_add_attention)
      return coder + "mid.attn_1." + ldm_detail::vae_attention(p, 4);
  }
  if (p.is(0, "encoder") && p.is(1, "down_blocks")) {
    const std::size_t i = p.index(2, n);
    const std::string block = "encoder.down." + std::to_string(i) + ".";
    if (p.is(3, "resnets"))
      return block + "block." + std::to_string(p.index(4, c.layers_per_block)) + "." +
             ldm_detail::vae_resnet(p, 5);
    if (p.is(3, "downsamplers") && p.is(4, "0") && p.is(5, "conv") && i + 1 < n)
      return block + "downsample.conv." + p.rest(6);
  }
  if (p.is(0, "decoder") && p.is(1, "up_blocks")) {
    const std::size_t i = p.index(2, n);
    const std::string block = "decoder.up." + std::to_string(n - 1 - i) + ".";
    if (p.is(3, "resnets"))
      return block + "block." + std::to_string(p.index(4, c.layers_per_block + 1)) + "." +
             ldm_detail::vae_resnet(p, 5);
    if (p.is(3, "upsamplers") && p.is(4, "0") && p.is(5, "conv") && i + 1 < n)
      return block + "upsample.conv." + p.rest(6);
  }
  p.fail();
}

/// A module seen under other parameter names: visits (to_name(name), parameter). Lets a strict
/// loader (nn::load_state_dict) check a file in the file's own names, so its errors name the
/// tensors as the file spells them.
template <class M, class ToName>
struct RenamedModule {
  M& module;
  ToName to_name;

  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    module.for_each_parameter("", [&](const std::string& name, auto& parameter) {
      visit(nn::join_name(prefix, to_name(name)), parameter);
    });
  }
};

/// Strict load of one component of a single-file checkpoint: the file's tensors that
/// file_key(name, shape) keeps (an io::StateKey in the file's naming, or std::nullopt to ignore
/// the tensor) must be exactly the module's parameters named to_file_name(name), with their
/// shapes; all missing, unexpected and misshapen names are listed in one Error. A file with none
/// of the component's tensors is an Error naming `prefix`.
template <class T, nn::Module M, class ToFileName, class FileKey>
void load_single_file_component(M& model, const std::string& path, std::string_view prefix,
                                ToFileName&& to_file_name, FileKey&& file_key,
                                std::string_view what) {
  const auto state = io::open_safetensors_state<T>({path});
  const auto component = io::rename_state(state, file_key, what);
  require(!component.empty(), what, "'", path, "' has no tensor named ", prefix,
          "* (not an original single-file checkpoint of this component?)");
  RenamedModule<M, ToFileName&> view{model, to_file_name};
  nn::load_state_dict<T>(view, component, what);
}

/// file_key for load_single_file_component: the tensors named prefix*, unchanged.
inline auto keep_prefixed(std::string_view prefix) {
  return [prefix](const std::string& name,
                  const std::vector<std::size_t>& shape) -> std::optional<io::StateKey> {
    if (!name.starts_with(prefix)) return std::nullopt;
    return io::StateKey{name, shape};
  };
}

}  // namespace difftrain::models
