#pragma once
// Encoders that do nothing: for pixel-space diffusion, precomputed latents, unconditional models,
// or tests.

#include <array>
#include <cstddef>

#include "difftrain/concepts.hpp"

namespace difftrain {

/// x0 = images (times an optional scaling factor, like a VAE's).
struct IdentityEncoder {
  using input_type = Tensor4<float>;
  using output_type = Tensor4<float>;
  float scaling_factor = 1.0f;
  Tensor4<float> encode(const Tensor4<float>& images) const {
    if (scaling_factor == 1.0f) return images;
    return images * scaling_factor;
  }
};
static_assert(LatentEncoder<IdentityEncoder>);

/// The text encoder of an unconditional model: no context. DiffusionTrainStep gives the
/// denoiser an empty context [B, 0, 0] for a batch of B images, whatever the token ids (the
/// Trainer passes none: 0 rows).
struct NoTextEncoder {
  using input_type = TokenIds;
  using output_type = Tensor3<float>;
  Tensor3<float> encode(const TokenIds& ids) const {
    return Tensor3<float>(std::array<std::size_t, 3>{ids.shape()[0], 0, 0});
  }
};
static_assert(TextEncoder<NoTextEncoder>);

}  // namespace difftrain
