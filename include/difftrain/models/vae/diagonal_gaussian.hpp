#pragma once
// The VAE posterior q(z | image): a diagonal Gaussian (diffusers DiagonalGaussianDistribution).
//
// Dims legend: B batch, Z latent channels, h×w latent size.
//   moments [B, 2Z, h, w] = quant_conv(encoder(image)); mean = moments[:, :Z],
//   logvar = clamp(moments[:, Z:], −30, 20), std = exp(½·logvar)
//   sample = mean + std · noise,  mode = mean
// Noise drawn here (sample(stream)) is element i of fill_normal(stream) in the row-major order of
// the [B, Z, h, w] tensor, so a batch's draw does not depend on how it is split into threads.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>
#include <type_traits>

#include "difftrain/core/error.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/core/tensor.hpp"

namespace difftrain::models {

template <class T = float>
struct DiagonalGaussian {
  static constexpr double kLogvarMin = -30.0;
  static constexpr double kLogvarMax = 20.0;

  Tensor4<T> mean;    // [B, Z, h, w]
  Tensor4<T> logvar;  // [B, Z, h, w], clamped to [−30, 20]

  // mean = moments[:, :Z], logvar = clamp(moments[:, Z:], −30, 20)
  static DiagonalGaussian from_moments(const Tensor4<T>& moments) {
    const auto& s = moments.shape();
    require(s[1] % 2 == 0 && s[1] > 0, "DiagonalGaussian::from_moments", "moments has shape ",
            shape_string(s), ", expected an even, positive number of channels [B,2Z,h,w]");
    const std::size_t B = s[0], Z = s[1] / 2, P = s[2] * s[3];
    DiagonalGaussian d;
    d.mean = Tensor4<T>(std::array<std::size_t, 4>{B, Z, s[2], s[3]});
    d.logvar = Tensor4<T>(d.mean.shape());
    for (std::size_t b = 0; b < B; ++b) {
      const T* m = moments.data() + b * 2 * Z * P;
      std::copy(m, m + Z * P, d.mean.data() + b * Z * P);
      std::transform(m + Z * P, m + 2 * Z * P, d.logvar.data() + b * Z * P, [](T v) {
        return std::clamp(v, static_cast<T>(kLogvarMin), static_cast<T>(kLogvarMax));
      });
    }
    return d;
  }

  /// mode = mean
  const Tensor4<T>& mode() const { return mean; }

  // sample = mean + exp(½·logvar) · noise
  Tensor4<T> sample(const Tensor4<T>& noise) const {
    check_same_shape("DiagonalGaussian::sample", "noise", noise.shape(), mean.shape());
    check_same_shape("DiagonalGaussian::sample", "logvar", logvar.shape(), mean.shape());
    Tensor4<T> z(mean.shape());
    for (std::size_t i = 0; i < z.size(); ++i)
      z.data()[i] = mean.data()[i] + std::exp(T(0.5) * logvar.data()[i]) * noise.data()[i];
    return z;
  }

  /// The same with noise element i = normal number (offset + i) of `stream` (float draws).
  Tensor4<T> sample(RandomStream stream, std::uint64_t offset = 0) const {
    return sample(draw_noise(mean.shape(), stream, offset));
  }

  /// Standard normal noise of a shape: element i = normal number (offset + i) of `stream`.
  static Tensor4<T> draw_noise(const std::array<std::size_t, 4>& shape, RandomStream stream,
                               std::uint64_t offset = 0) {
    Tensor4<float> noise(shape);
    fill_normal(std::span<float>(noise.data(), noise.size()), stream, offset);
    if constexpr (std::is_same_v<T, float>) {
      return noise;
    } else {
      Tensor4<T> out(shape);
      std::copy(noise.begin(), noise.end(), out.begin());
      return out;
    }
  }
};

}  // namespace difftrain::models
