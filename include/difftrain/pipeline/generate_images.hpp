#pragma once
// Text-to-image sampling from a loaded pipeline folder (model_folder.hpp): prompts → context,
// DDIM or Euler with classifier-free guidance (schedule/sample.hpp), → images. What `difftrain
// sample` and `difftrain train`'s validation grids run.

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "difftrain/core/choice.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
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

/// Images [P·K, 3, H, W] (≈ [−1, 1]) for `prompts`, K = images_per_prompt consecutive rows per
/// prompt; options.channels/height/width are set from the folder and height × width pixels.
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
  const Tensor3<float> cond = model.encode_prompts(rows);
  const Tensor3<float> uncond = options.guidance_scale > 1.0
                                    ? model.encode_prompts({negative_prompt})
                                    : Tensor3<float>(std::array<std::size_t, 3>{0, 0, 0});
  require((sampler == SamplerKind::flow_euler) == model.scheduler.flow.has_value(), fn,
          "--sampler ", to_string(sampler), " cannot sample this model: its scheduler config ",
          model.scheduler.flow ? "is FlowMatchEulerDiscreteScheduler's (use flow_euler)"
                               : "is a DDPM one (use ddim or euler)");
  const Tensor4<float> latents = [&] {
    switch (sampler) {
      case SamplerKind::flow_euler: {
        FlowMatchEulerDiscreteScheduler s(*model.scheduler.flow);
        return sample_latents(model.unet, s, cond, uncond, options);
      }
      case SamplerKind::euler: {
        EulerDiscreteScheduler s(model.scheduler);
        return sample_latents(model.unet, s, cond, uncond, options);
      }
      case SamplerKind::ddim:
        break;
    }
    DdimScheduler s(model.scheduler);
    return sample_latents(model.unet, s, cond, uncond, options);
  }();
  return model.decode(latents);
}

}  // namespace difftrain::pipeline
