#pragma once
// Text-to-image sampling from a loaded pipeline folder (model_folder.hpp): prompts → context,
// DDIM or Euler with classifier-free guidance (schedule/sample.hpp), → images. What `difftrain
// sample` and `difftrain train`'s validation grids run.

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "difftrain/core/choice.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/models/sdxl_conditioning.hpp"
#include "difftrain/pipeline/model_folder.hpp"
#include "difftrain/schedule/ddim_scheduler.hpp"
#include "difftrain/schedule/euler_discrete_scheduler.hpp"
#include "difftrain/schedule/sample.hpp"

namespace difftrain::pipeline {

enum class SamplerKind { ddim, euler, flow_euler };

/// The samplers' names (`difftrain sample --sampler`).
inline constexpr std::array<Choice<SamplerKind>, 3> kSamplerKinds{{
    {"ddim", SamplerKind::ddim},
    {"euler", SamplerKind::euler},
    {"flow_euler", SamplerKind::flow_euler},
}};

inline SamplerKind parse_sampler_kind(std::string_view name) {
  return parse_choice("--sampler", name, kSamplerKinds);
}
inline std::string_view to_string(SamplerKind kind) { return choice_name(kind, kSamplerKinds); }

/// The sampler a model folder's scheduler config selects: flow_euler for a
/// FlowMatchEulerDiscreteScheduler, ddim otherwise.
inline SamplerKind default_sampler(const SamplingConfig& config) {
  return config.flow ? SamplerKind::flow_euler : SamplerKind::ddim;
}

/// A UNet with fixed added conditions (SDXL's pooled embeddings and time ids, one row per row of
/// the model input): the Denoiser that sample_latents runs for an SDXL pipeline.
template <class UNetT>
struct UNetWithAddedConditions {
  UNetT& unet;
  AddedConditions<float> added;
  template <class Time>
  Tensor4<float> forward(const Tensor4<float>& x, std::span<const Time> t,
                         const Tensor3<float>& context) {
    return unet.forward(x, t, context, added);
  }
  void backward(const Tensor4<float>& grad) { unet.backward(grad); }
};

/// SDXL's added conditions for B images of height × width pixels, as StableDiffusionXLPipeline
/// makes them: time ids [h, w, 0, 0, h, w] (original size = target size, no crop) for every row;
/// with guidance the rows are [negative × B; prompts], the negative pooled embedding zeros for an
/// empty negative prompt (force_zeros_for_empty_prompt, SDXL base's setting), else its own.
inline AddedConditions<float> sdxl_added_conditions(const Tensor<float, 2>& pooled,
                                                    const Tensor<float, 2>* negative_pooled,
                                                    std::size_t height, std::size_t width) {
  const std::size_t B = pooled.shape()[0], P = pooled.shape()[1];
  const std::size_t rows = negative_pooled ? 2 * B : B;
  AddedConditions<float> added;
  added.text_embeds = Tensor<float, 2>(std::array<std::size_t, 2>{rows, P}, 0.0f);
  if (negative_pooled && negative_pooled->size() > 0)
    for (std::size_t b = 0; b < B; ++b)
      std::copy_n(negative_pooled->data(), P, added.text_embeds.data() + b * P);
  std::copy_n(pooled.data(), B * P, added.text_embeds.data() + (rows - B) * P);
  const auto h = static_cast<double>(height), w = static_cast<double>(width);
  added.time_ids = models::sdxl_time_ids(
      std::vector<models::SdxlSizeConditioning>(rows, {{h, w}, {0, 0}, {h, w}}));
  return added;
}

/// Images [P·K, 3, H, W] (≈ [−1, 1]) for `prompts`, K = images_per_prompt consecutive rows per
/// prompt; options.channels/height/width are set from the folder and height × width pixels.
/// SDXL pipelines are conditioned as sdxl_added_conditions says (an empty negative prompt: zero
/// negative embeddings, as diffusers' force_zeros_for_empty_prompt).
inline Tensor4<float> generate_images(ModelFolder& model, const std::vector<std::string>& prompts,
                                      const std::string& negative_prompt,
                                      std::size_t images_per_prompt, SamplerKind sampler,
                                      std::size_t height, std::size_t width,
                                      SampleOptions options) {
  constexpr const char* fn = "generate_images";
  require(!prompts.empty(), fn, "no prompt given");
  require(images_per_prompt >= 1, fn, "num_images_per_prompt is 0, expected at least 1");
  const auto shape = model.latent_shape(height, width);
  options.channels = static_cast<std::int64_t>(shape[0]);
  options.height = static_cast<std::int64_t>(shape[1]);
  options.width = static_cast<std::int64_t>(shape[2]);

  std::vector<std::string> rows;
  for (const auto& p : prompts) rows.insert(rows.end(), images_per_prompt, p);
  const bool guided = options.guidance_scale > 1.0;
  Tensor3<float> cond, uncond(std::array<std::size_t, 3>{0, 0, 0});
  std::optional<UNetWithAddedConditions<models::UNet2DConditionModel<float>>> sdxl;
  if (model.is_sdxl()) {
    models::SdxlPromptEmbeds c = model.encode_sdxl_prompts(rows);
    Tensor<float, 2> negative_pooled;  // empty: zeros
    if (guided && negative_prompt.empty()) {
      uncond = Tensor3<float>(
          std::array<std::size_t, 3>{1, c.prompt_embeds.shape()[1], c.prompt_embeds.shape()[2]},
          0.0f);
    } else if (guided) {
      models::SdxlPromptEmbeds n = model.encode_sdxl_prompts({negative_prompt});
      uncond = std::move(n.prompt_embeds);
      negative_pooled = std::move(n.pooled_prompt_embeds);
    }
    sdxl.emplace(UNetWithAddedConditions<models::UNet2DConditionModel<float>>{
        model.unet, sdxl_added_conditions(c.pooled_prompt_embeds,
                                          guided ? &negative_pooled : nullptr, height, width)});
    cond = std::move(c.prompt_embeds);
  } else {
    cond = model.encode_prompts(rows);
    if (guided) uncond = model.encode_prompts({negative_prompt});
  }
  auto run = [&](auto& scheduler) {
    return sdxl ? sample_latents(*sdxl, scheduler, cond, uncond, options)
                : sample_latents(model.unet, scheduler, cond, uncond, options);
  };
  require((sampler == SamplerKind::flow_euler) == model.scheduler.flow.has_value(), fn,
          "--sampler ", to_string(sampler), " cannot sample this model: its scheduler config ",
          model.scheduler.flow ? "is FlowMatchEulerDiscreteScheduler's (use flow_euler)"
                               : "is a DDPM one (use ddim or euler)");
  const Tensor4<float> latents = [&] {
    switch (sampler) {
      case SamplerKind::flow_euler: {
        FlowMatchEulerDiscreteScheduler s(*model.scheduler.flow);
        return run(s);
      }
      case SamplerKind::euler: {
        EulerDiscreteScheduler s(model.scheduler);
        return run(s);
      }
      case SamplerKind::ddim:
        break;
    }
    DdimScheduler s(model.scheduler);
    return run(s);
  }();
  return model.decode(latents);
}

}  // namespace difftrain::pipeline
