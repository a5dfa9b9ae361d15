#pragma once
// sample_latents: the sampling loop of diffusers' text-to-image pipelines, with classifier-free
// guidance, for any Denoiser and a DDIM or Euler scheduler, or flow matching's Euler sampler.
//
//   x ← N(0, I)·init_noise_sigma            (counter-based RNG, deterministic in the seed)
//   for t in timesteps (descending; flow matching: σ_k·T, fractional):
//     out = denoiser([x; x] scaled, t, [uncond; cond])     one forward on 2B rows
//     pred = u + g·(c − u)                                  (g <= 1: cond only, B rows)
//     x ← step(pred, t, x)                                  (flow: x + (σ_{k+1} − σ_k)·pred)
//
// Dims legend: B images (rows of cond_context), C, H, W the latent shape, L tokens, D features.

#include <algorithm>
#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

#include "difftrain/concepts.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/schedule/ddim_scheduler.hpp"
#include "difftrain/schedule/euler_discrete_scheduler.hpp"
#include "difftrain/schedule/flow_match.hpp"

namespace difftrain {

struct SampleOptions {
  std::int64_t num_inference_steps = 30;
  double guidance_scale = 7.5;  // classifier-free guidance weight g; <= 1 disables it
  std::uint64_t seed = 0;
  std::int64_t channels = 4, height = 64, width = 64;  // latent shape of one image
};

/// The initial latents [B, C, H, W]: element i is standard normal number i of
/// RandomStream{seed}.derive(0, StreamPurpose::sample_noise), times init_noise_sigma. Image b is
/// the same for any batch size B > b.
inline Tensor4<float> initial_latents(std::size_t batch, const SampleOptions& options,
                                      double init_noise_sigma) {
  constexpr const char* fn = "initial_latents";
  require(options.channels > 0 && options.height > 0 && options.width > 0, fn,
          "latent shape [C,H,W] is [", options.channels, ",", options.height, ",", options.width,
          "], expected positive sizes");
  Tensor4<float> x(std::array<std::size_t, 4>{batch, static_cast<std::size_t>(options.channels),
                                              static_cast<std::size_t>(options.height),
                                              static_cast<std::size_t>(options.width)});
  fill_normal(std::span<float>(x.data(), x.size()),
              RandomStream{options.seed, 0}.derive(0, StreamPurpose::sample_noise));
  x *= static_cast<float>(init_noise_sigma);
  return x;
}

namespace detail {
// Rows [uncond (broadcast to B); cond] of the guided forward: [2B, L, D].
inline Tensor3<float> guidance_context(const Tensor3<float>& cond, const Tensor3<float>& uncond) {
  constexpr const char* fn = "sample_latents";
  const std::size_t B = cond.shape()[0], L = cond.shape()[1], D = cond.shape()[2];
  const std::size_t U = uncond.shape()[0];
  require(U == 1 || U == B, fn, "uncond_context has ", U, " rows, expected 1 or ", B,
          " (the rows of cond_context)");
  check_shape(fn, "uncond_context", uncond.shape(), {U, L, D});
  Tensor3<float> context(std::array<std::size_t, 3>{2 * B, L, D});
  const std::size_t row = L * D;
  for (std::size_t b = 0; b < B; ++b)
    std::copy_n(uncond.data() + (U == 1 ? 0 : b) * row, row, context.data() + b * row);
  std::copy_n(cond.data(), B * row, context.data() + B * row);
  return context;
}
}  // namespace detail

/// Latents [B, C, H, W] sampled from `denoiser` with `scheduler` (B = rows of cond_context);
/// uncond_context has 1 row (broadcast) or B rows and is used only when guidance_scale > 1.
/// With FlowMatchEulerDiscreteScheduler the denoiser gets float timesteps σ·T; with
/// use_dynamic_shifting, mu = calculate_shift((H/2)·(W/2)) (the tokens of 2×2 latent patches, as
/// the Flux pipeline packs them).
template <Denoiser D, class S>
requires SamplingScheduler<S> || std::same_as<S, FlowMatchEulerDiscreteScheduler> Tensor4<float>
sample_latents(D& denoiser, S& scheduler, const Tensor3<float>& cond_context,
               const Tensor3<float>& uncond_context, const SampleOptions& options) {
  constexpr const char* fn = "sample_latents";
  constexpr bool flow = std::same_as<S, FlowMatchEulerDiscreteScheduler>;
  static_assert(!flow || FloatTimestepDenoiser<D>,
                "sample_latents: flow matching's timesteps σ·T are fractional, so the denoiser "
                "needs a forward(x, std::span<const float> timesteps, context) overload");
  const std::size_t B = cond_context.shape()[0];
  require(B > 0, fn, "cond_context has 0 rows, expected one per image");
  const bool guided = options.guidance_scale > 1.0;
  const Tensor3<float> context =
      guided ? detail::guidance_context(cond_context, uncond_context) : cond_context;
  const std::size_t rows = guided ? 2 * B : B;

  if constexpr (flow) {
    std::optional<double> mu;
    if (scheduler.config().use_dynamic_shifting)
      mu = scheduler.calculate_shift(
          static_cast<double>((options.height / 2) * (options.width / 2)));
    scheduler.set_timesteps(options.num_inference_steps, mu);
  } else {
    scheduler.set_timesteps(options.num_inference_steps);
  }
  Tensor4<float> x = initial_latents(B, options, scheduler.init_noise_sigma());
  const auto shape = x.shape();
  const std::size_t per_image = x.size() / B;
  const auto g = static_cast<float>(options.guidance_scale);

  Tensor4<float> model_input(std::array<std::size_t, 4>{rows, shape[1], shape[2], shape[3]});
  Tensor4<float> pred(x.shape());
  using Time = std::conditional_t<flow, float, std::int64_t>;
  std::vector<Time> t_batch(rows);
  const std::vector<double> timesteps(scheduler.timesteps().begin(), scheduler.timesteps().end());
  for (std::size_t k = 0; k < timesteps.size(); ++k) {
    std::copy_n(x.data(), x.size(), model_input.data());
    if (guided) std::copy_n(x.data(), x.size(), model_input.data() + x.size());
    const auto t = static_cast<Time>(timesteps[k]);
    if constexpr (!flow) scheduler.scale_model_input(model_input, t);
    std::fill(t_batch.begin(), t_batch.end(), t);
    const Tensor4<float> out =
        denoiser.forward(model_input, std::span<const Time>(t_batch), context);
    check_shape(fn, "the denoiser's output", out.shape(), {rows, shape[1], shape[2], shape[3]});
    if (guided) {
      const float* u = out.data();
      const float* c = out.data() + B * per_image;
      float* p = pred.data();
      for (std::size_t i = 0; i < B * per_image; ++i) p[i] = u[i] + g * (c[i] - u[i]);
    }
    const Tensor4<float>& velocity_or_pred = guided ? pred : out;
    if constexpr (flow) {
      scheduler.step(velocity_or_pred, static_cast<std::int64_t>(k), x);
    } else {
      scheduler.step(velocity_or_pred, t, x);
    }
  }
  return x;
}

}  // namespace difftrain
