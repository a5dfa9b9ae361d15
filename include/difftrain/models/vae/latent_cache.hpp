#pragma once
// Latent caching: encode a dataset once with the frozen VAE, keep the posterior, and redo only the
// cheap sampling step every epoch (as diffusers' and kohya's "cache latents" options do, except
// that they keep one fixed sample; here the noise can change per epoch).
//
// Dims legend: N cached images, Z latent channels, h×w latent size, M = Z·h·w values per image.
// File (safetensors, written atomically): `mean` and `logvar` [N, Z, h, w] F32, the unscaled
// posterior (logvar already clamped to [−30, 20]); metadata `format` = "difftrain.latent_cache",
// `version` = "1", `scaling_factor`, `shift_factor` (decimal, round-trip exact), `image_shape`
// "[C,H,W]". All images of one cache have the same size (one file per aspect-ratio bucket).
//   latents(indices, stream)[j] = scaling_factor · (mean[idx_j] + exp(½·logvar[idx_j])·noise_j
//                                 − shift_factor),  noise_j[i] = normal number (idx_j·M + i)
// of `stream`: the noise of an image depends on (stream, its index) only, so deriving the stream
// per epoch (stream.derive(epoch, purpose)) resamples every image each epoch, in any batch order.
// cache_latents keeps the whole posterior in memory until the write (2·N·M floats).

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <ranges>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>
#include <xtensor/xadapt.hpp>

#include "difftrain/core/error.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/vae/autoencoder_kl.hpp"
#include "difftrain/models/vae/diagonal_gaussian.hpp"
#include "difftrain/models/vae/vae_encoder.hpp"

namespace difftrain::models {

inline constexpr const char* kLatentCacheFormat = "difftrain.latent_cache";

struct LatentCache {
  Tensor4<float> mean;    // [N, Z, h, w]
  Tensor4<float> logvar;  // [N, Z, h, w]
  double scaling_factor = 1.0;
  double shift_factor = 0.0;

  std::size_t size() const { return mean.shape()[0]; }
  std::size_t values_per_image() const { return mean.size() / std::max<std::size_t>(size(), 1); }

  /// Scaled latents of the given images, sampled with the rule in the header comment.
  Tensor4<float> latents(std::span<const std::size_t> indices, RandomStream stream) const {
    return gather(indices, &stream);
  }
  /// Scaled latents of the posterior means (no sampling).
  Tensor4<float> latents_mode(std::span<const std::size_t> indices) const {
    return gather(indices, nullptr);
  }

 private:
  Tensor4<float> gather(std::span<const std::size_t> indices, const RandomStream* stream) const {
    const auto& s = mean.shape();
    const std::size_t M = values_per_image();
    Tensor4<float> out(std::array<std::size_t, 4>{indices.size(), s[1], s[2], s[3]});
    std::vector<float> noise(stream ? M : 0);
    const float sf = static_cast<float>(scaling_factor), shift = static_cast<float>(shift_factor);
    for (std::size_t j = 0; j < indices.size(); ++j) {
      const std::size_t idx = indices[j];
      require(idx < size(), "LatentCache::latents", "index ", idx, " is out of range (", size(),
              " cached images)");
      const float* m = mean.data() + idx * M;
      const float* lv = logvar.data() + idx * M;
      float* dst = out.data() + j * M;
      if (stream)
        fill_normal(std::span<float>(noise), *stream, static_cast<std::uint64_t>(idx) * M);
      for (std::size_t i = 0; i < M; ++i) {
        const float z = stream ? m[i] + std::exp(0.5f * lv[i]) * noise[i] : m[i];
        dst[i] = sf * (z - shift);
      }
    }
    return out;
  }
};

namespace latent_cache_detail {
inline std::string exact_decimal(double v) {
  std::ostringstream out;
  out.precision(17);
  out << v;
  return out.str();
}
}  // namespace latent_cache_detail

/// Writes an already computed cache (see the header comment for the file layout).
inline void save_latent_cache(const LatentCache& cache, const std::string& path,
                              const std::array<std::size_t, 3>& image_shape) {
  check_same_shape("save_latent_cache", "logvar", cache.logvar.shape(), cache.mean.shape());
  using io::TensorToWrite;
  const std::vector<std::size_t> shape(cache.mean.shape().begin(), cache.mean.shape().end());
  std::vector<TensorToWrite> tensors = {
      TensorToWrite::from_span<float>("mean", {cache.mean.data(), cache.mean.size()}, shape),
      TensorToWrite::from_span<float>("logvar", {cache.logvar.data(), cache.logvar.size()}, shape)};
  const std::map<std::string, std::string> metadata = {
      {"format", kLatentCacheFormat},
      {"version", "1"},
      {"scaling_factor", latent_cache_detail::exact_decimal(cache.scaling_factor)},
      {"shift_factor", latent_cache_detail::exact_decimal(cache.shift_factor)},
      {"image_shape", shape_string(image_shape)}};
  io::save_safetensors(path, tensors, metadata);
}

/// Encodes every batch of `batches` (a range of Tensor4<float> images [B, Cin, H, W] in [−1, 1],
/// e.g. a std::vector or a lazily loading view) and writes the posteriors to `path`. Returns the
/// number of images cached.
template <std::ranges::input_range Batches>
std::size_t cache_latents(const AutoencoderKL<float>& vae, Batches&& batches,
                          const std::string& path) {
  constexpr const char* fn = "cache_latents";
  std::vector<float> means, logvars;
  std::array<std::size_t, 3> image_shape{};
  std::array<std::size_t, 4> latent_shape{};
  std::size_t count = 0, batch_index = 0;
  for (auto&& item : batches) {
    const Tensor4<float>& images = item;
    const auto& s = images.shape();
    if (count == 0) {
      image_shape = {s[1], s[2], s[3]};
    } else {
      require(image_shape == std::array<std::size_t, 3>{s[1], s[2], s[3]}, fn, "batch ",
              batch_index, " has shape ", shape_string(s), ", expected [B,", image_shape[0], ",",
              image_shape[1], ",", image_shape[2],
              "] like the first batch (one cache holds one image size)");
    }
    const DiagonalGaussian<float> posterior = vae.encode(images);
    if (s[0] > 0) latent_shape = posterior.mean.shape();
    means.insert(means.end(), posterior.mean.begin(), posterior.mean.end());
    logvars.insert(logvars.end(), posterior.logvar.begin(), posterior.logvar.end());
    count += s[0];
    ++batch_index;
  }
  require(count > 0, fn, "no images to cache");
  LatentCache cache;
  const std::array<std::size_t, 4> shape{count, latent_shape[1], latent_shape[2], latent_shape[3]};
  cache.mean = xt::adapt(means, shape);
  cache.logvar = xt::adapt(logvars, shape);
  cache.scaling_factor = vae.config().scaling_factor;
  cache.shift_factor = vae.config().shift_factor;
  save_latent_cache(cache, path, image_shape);
  return count;
}

/// The same through the LatentEncoder wrapper (its model; its sampling mode does not matter: the
/// posterior is cached).
template <std::ranges::input_range Batches>
std::size_t cache_latents(const VaeEncoder& encoder, Batches&& batches, const std::string& path) {
  return cache_latents(encoder.vae(), std::forward<Batches>(batches), path);
}

/// Reads a cache written by cache_latents / save_latent_cache.
inline LatentCache load_latent_cache(const std::string& path) {
  constexpr const char* fn = "load_latent_cache";
  const auto file = io::SafetensorsFile::open(path);
  const auto& metadata = file.metadata();
  auto meta = [&](const char* key) -> const std::string& {
    auto it = metadata.find(key);
    require(it != metadata.end(), fn, "'", path, "' has no metadata key ", key,
            " (not a latent cache)");
    return it->second;
  };
  require(meta("format") == kLatentCacheFormat, fn, "'", path, "' has format ", meta("format"),
          ", expected ", kLatentCacheFormat);
  require(meta("version") == "1", fn, "'", path, "' has version ", meta("version"), ", expected 1");
  auto number = [&](const char* key) {
    const std::string& text = meta(key);
    try {
      std::size_t used = 0;
      const double v = std::stod(text, &used);
      if (used == text.size() && std::isfinite(v)) return v;
    } catch (const std::exception&) {
    }
    fail(fn, "'", path, "' metadata ", key, " = '", text, "', expected a finite number");
  };
  LatentCache cache;
  cache.scaling_factor = number("scaling_factor");
  cache.shift_factor = number("shift_factor");
  require(cache.scaling_factor != 0, fn, "'", path, "' has scaling_factor 0");
  cache.mean = file.read_tensor<float, 4>("mean");
  cache.logvar = file.read_tensor<float, 4>("logvar");
  check_same_shape(fn, "logvar", cache.logvar.shape(), cache.mean.shape());
  return cache;
}

}  // namespace difftrain::models
