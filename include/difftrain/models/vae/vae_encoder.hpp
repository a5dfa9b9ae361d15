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
// calls() (set_calls) repeats the uninterrupted one. A data-parallel shard whose rows b are rows
// global_rows[b] of the micro-batch of all processes calls encode(images, global_rows): its noise
// is noise[global_rows[b], i], the draw of those rows in the one-process call.

#include <cstdint>
#include <span>

#include "difftrain/concepts.hpp"
#include "difftrain/core/error.hpp"
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
  Tensor4<float> encode(const Tensor4<float>& images) { return encode(images, {}); }

  /// The same for a batch whose rows b are rows global_rows[b] of the whole batch (empty: 0..B−1):
  /// noise[b, i] = normal number (global_rows[b]·N + i) of call k's stream.
  Tensor4<float> encode(const Tensor4<float>& images, std::span<const std::uint64_t> global_rows) {
    require(global_rows.empty() || global_rows.size() == images.shape()[0], "VaeEncoder::encode",
            "global_rows has ", global_rows.size(), " entries, expected ", images.shape()[0],
            " (one per image) or 0");
    const DiagonalGaussian<float> posterior = vae_->encode(images);
    const std::uint64_t k = calls_++;
    if (sampling_ == LatentSampling::mode) return vae_->scale_latents(posterior.mean);
    Tensor4<float> noise(posterior.mean.shape());
    fill_normal_rows(std::span<float>(noise.data(), noise.size()), noise_stream(k), global_rows);
    return vae_->scale_latents(posterior.sample(noise));
  }

 private:
  const AutoencoderKL<float>* vae_;
  RandomStream stream_;
  LatentSampling sampling_;
  std::uint64_t calls_ = 0;
};

static_assert(LatentEncoder<VaeEncoder>);

}  // namespace difftrain::models
