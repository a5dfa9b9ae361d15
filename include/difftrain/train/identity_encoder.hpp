#pragma once
// Encoders that do nothing: for pixel-space diffusion, precomputed latents, or tests.

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

}  // namespace difftrain
