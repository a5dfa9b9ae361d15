#pragma once
// VaeEncoder: the frozen AutoencoderKL as a difftrain::LatentEncoder (images → scaled latents),
// the `LatentEncoderT` of DiffusionTrainStep.
//
// Dims legend: B batch, Z latent channels, h×w latent size, N = Z·h·w latent values per sample.
//   latents = scaling_factor · (mean + exp(½·logvar)·noise − shift_factor)   (sampling)
//   latents = scaling_factor · (mean − shift_factor)                         (LatentSampling::mode)
// Deterministic noise rule: the k-th call of encode (k = 0, 1, …; calls() counts them) draws
// noise[b, i] = normal number (b·N + i) of stream.derive(k, StreamPurpose::vae_noise). The noise of
// a sample thus depends only on (seed, stream, k, b), not on threads; a resumed run that restores
// calls() (set_calls) repeats the uninterrupted one.

#include <cstdint>

#include "difftrain/concepts.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/models/vae/autoencoder_kl.hpp"
#include "difftrain/models/vae/diagonal_gaussian.hpp"

namespace difftrain::models {

/// RandomStream::derive purpose of the VAE's latent-sampling noise ("VAEn"): the id of
/// StreamPurpose::vae_noise, under its old name.
inline constexpr std::uint32_t kVaeNoisePurpose =
    static_cast<std::uint32_t>(StreamPurpose::vae_noise);

/// Draw a sample from q(z | image) (diffusers' latent_dist.sample(), what SD training scripts
/// use) or take its mode (the mean).
enum class LatentSampling { sample, mode };

class VaeEncoder {
 public:
  using input_type = Tensor4<float>;
  using output_type = Tensor4<float>;

  /// Holds the model by reference (the caller owns it and keeps it alive).
  VaeEncoder(const AutoencoderKL<float>& vae, RandomStream stream,
             LatentSampling sampling = LatentSampling::sample)
      : vae_(&vae), stream_(stream), sampling_(sampling) {}

  const AutoencoderKL<float>& vae() const { return *vae_; }
  LatentSampling sampling() const { return sampling_; }
  /// Number of encode calls so far (the index of the next call's noise stream).
  std::uint64_t calls() const { return calls_; }
  void set_calls(std::uint64_t calls) { calls_ = calls; }
  /// The noise stream of call k.
  RandomStream noise_stream(std::uint64_t k) const {
    return stream_.derive(k, StreamPurpose::vae_noise);
  }

  /// images [B, Cin, H, W] in [−1, 1] → latents [B, Z, h, w], scaled; advances calls().
  Tensor4<float> encode(const Tensor4<float>& images) {
    const DiagonalGaussian<float> posterior = vae_->encode(images);
    const std::uint64_t k = calls_++;
    if (sampling_ == LatentSampling::mode) return vae_->scale_latents(posterior.mean);
    return vae_->scale_latents(posterior.sample(noise_stream(k)));
  }

 private:
  const AutoencoderKL<float>* vae_;
  RandomStream stream_;
  LatentSampling sampling_;
  std::uint64_t calls_ = 0;
};

static_assert(LatentEncoder<VaeEncoder>);

}  // namespace difftrain::models
