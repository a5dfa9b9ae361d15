#pragma once
// Noise for the training step beyond plain N(0, I): offset noise, kohya's multi-resolution
// (pyramid) noise, and the options that select them. Dims: B, C, H, W; noise NCHW float32.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/core/tensor.hpp"

namespace difftrain::kernels {

/// The noise options of diffusers' and kohya's training scripts (same names).
struct NoiseOptions {
  float noise_offset = 0;                     // k: eps += k·N(0,1)[b,c] (diffusers, kohya)
  bool noise_offset_random_strength = false;  // kohya: k ← U(0,1)·k, one draw per batch
  float adaptive_noise_scale = 0;             // kohya: k_bc = max(0, k + scale·|mean_HW x0[b,c]|)
  int multires_noise_iterations = 0;          // kohya pyramid noise levels (0 = off)
  float multires_noise_discount = 0.3f;       // kohya's argument default
  float input_perturbation = 0;               // γ: model input uses eps + γ·ξ, target keeps eps
  bool input_perturbation_random_strength = false;  // kohya: γ ← U(0,1)·γ, one draw per batch

  void validate() const {
    constexpr const char* fn = "NoiseOptions";
    require(std::isfinite(noise_offset) && noise_offset >= 0, fn, "noise_offset is ", noise_offset,
            ", expected a finite value >= 0");
    require(std::isfinite(adaptive_noise_scale), fn, "adaptive_noise_scale is ",
            adaptive_noise_scale, ", expected a finite value");
    require(adaptive_noise_scale == 0 || noise_offset > 0, fn,
            "adaptive_noise_scale needs noise_offset > 0 (as in kohya), got noise_offset ",
            noise_offset);
    require(multires_noise_iterations >= 0, fn, "multires_noise_iterations is ",
            multires_noise_iterations, ", expected >= 0");
    require(std::isfinite(multires_noise_discount) && multires_noise_discount >= 0, fn,
            "multires_noise_discount is ", multires_noise_discount, ", expected >= 0");
    require(std::isfinite(input_perturbation) && input_perturbation >= 0, fn,
            "input_perturbation is ", input_perturbation, ", expected a finite value >= 0");
  }
};

/// offset[b·C + c] = k_bc·n_{g·C + c} (empty when noise_offset is 0), n normal numbers of the
/// step's offset stream, g = rows[b] (a data-parallel shard's global rows) or b, k_bc as
/// NoiseOptions says (the random strength is one draw per step, the same in every shard).
inline std::vector<float> noise_offsets(const NoiseOptions& options, const Tensor4<float>& x0,
                                        RandomStream step_stream,
                                        std::span<const std::uint64_t> rows = {}) {
  if (options.noise_offset == 0) return {};
  const auto& sh = x0.shape();
  const std::size_t bc = sh[0] * sh[1], plane = sh[2] * sh[3];
  require(rows.empty() || rows.size() == sh[0], "noise_offsets", "rows has ", rows.size(),
          " entries, expected ", sh[0], " (one global row per sample) or 0");
  std::vector<float> offset(bc);
  fill_normal_rows(offset, step_stream.derive(0, StreamPurpose::noise_offset), rows);
  float k = options.noise_offset;
  if (options.noise_offset_random_strength)
    k *= static_cast<float>(
        uniform_double(step_stream.derive(0, StreamPurpose::noise_offset_strength), 0));
  for (std::size_t i = 0; i < bc; ++i) {
    float k_bc = k;
    if (options.adaptive_noise_scale != 0) {
      double mean = 0;
      const float* x = x0.data() + i * plane;
      for (std::size_t p = 0; p < plane; ++p) mean += x[p];
      mean /= static_cast<double>(plane);
      k_bc = std::max(0.0f, k + options.adaptive_noise_scale * static_cast<float>(std::abs(mean)));
    }
    offset[i] *= k_bc;
  }
  return offset;
}

/// The input-perturbation γ of this step (kohya's random strength draws U(0,1)·γ once per batch).
inline float input_perturbation_strength(const NoiseOptions& options, RandomStream step_stream) {
  float gamma = options.input_perturbation;
  if (options.input_perturbation_random_strength)
    gamma *= static_cast<float>(
        uniform_double(step_stream.derive(0, StreamPurpose::noise_perturbation_strength), 0));
  return gamma;
}

/// Bilinear resize of each [h, w] plane to [H, W], PyTorch's align_corners=False convention:
/// source coordinate (dst + 0.5)·(in/out) − 0.5, clamped at 0.
inline void resize_bilinear(const float* in, std::size_t planes, std::size_t h, std::size_t w,
                            float* out, std::size_t H, std::size_t W) {
  auto source = [](std::size_t dst, std::size_t in_size, std::size_t out_size, std::size_t& i0,
                   std::size_t& i1, float& frac) {
    const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
    const float src = std::max(0.0f, scale * (static_cast<float>(dst) + 0.5f) - 0.5f);
    i0 = std::min(static_cast<std::size_t>(src), in_size - 1);
    i1 = i0 + (i0 + 1 < in_size ? 1 : 0);
    frac = src - static_cast<float>(i0);
  };
  std::vector<std::size_t> x0(W), x1(W);
  std::vector<float> fx(W);
  for (std::size_t X = 0; X < W; ++X) source(X, w, W, x0[X], x1[X], fx[X]);
  for (std::size_t p = 0; p < planes; ++p) {
    const float* src = in + p * h * w;
    float* dst = out + p * H * W;
    for (std::size_t Y = 0; Y < H; ++Y) {
      std::size_t y0, y1;
      float fy;
      source(Y, h, H, y0, y1, fy);
      for (std::size_t X = 0; X < W; ++X) {
        const float top = src[y0 * w + x0[X]] * (1 - fx[X]) + src[y0 * w + x1[X]] * fx[X];
        const float bottom = src[y1 * w + x0[X]] * (1 - fx[X]) + src[y1 * w + x1[X]] * fx[X];
        dst[Y * W + X] = top * (1 - fy) + bottom * fy;
      }
    }
  }
}

/// kohya's multi-resolution noise, in place: for level i = 0..N−1, r_i ~ U(2, 4),
/// (h_i, w_i) = max(1, ⌊(H, W)/r_i^i⌋), noise += bilinear_up(N(0,I)[B,C,h_i,w_i])·discount^i,
/// stopping after a level with h_i = 1 or w_i = 1; finally noise /= std(noise) (one unbiased std
/// over the whole tensor). Level 0 adds a second full-resolution noise, as kohya does.
inline void pyramid_noise(Tensor4<float>& noise, int iterations, float discount,
                          RandomStream step_stream) {
  require(iterations >= 0, "pyramid_noise", "iterations is ", iterations, ", expected >= 0");
  const auto sh = noise.shape();
  const std::size_t planes = sh[0] * sh[1], H = sh[2], W = sh[3];
  if (noise.size() < 2 || iterations == 0) return;
  const RandomStream rs = step_stream.derive(0, StreamPurpose::noise_pyramid);
  std::vector<float> low, up(noise.size());
  float weight = 1;
  for (int i = 0; i < iterations; ++i, weight *= discount) {
    const auto level = static_cast<std::uint64_t>(i);
    const double r = 2.0 + 2.0 * uniform_double(rs.derive(level, StreamPurpose::pyramid_scale), 0);
    const double shrink = std::pow(r, i);
    const auto h =
        std::max<std::size_t>(1, static_cast<std::size_t>(static_cast<double>(H) / shrink));
    const auto w =
        std::max<std::size_t>(1, static_cast<std::size_t>(static_cast<double>(W) / shrink));
    low.resize(planes * h * w);
    fill_normal(low, rs.derive(level, StreamPurpose::pyramid_level));
    resize_bilinear(low.data(), planes, h, w, up.data(), H, W);
    float* n = noise.data();
    for (std::size_t k = 0; k < noise.size(); ++k) n[k] += up[k] * weight;
    if (h == 1 || w == 1) break;
  }
  double sum = 0, sum_sq = 0;
  for (float v : noise) sum += v;
  const double mean = sum / static_cast<double>(noise.size());
  for (float v : noise) sum_sq += (v - mean) * (v - mean);
  const double std_dev = std::sqrt(sum_sq / static_cast<double>(noise.size() - 1));
  require(std_dev > 0, "pyramid_noise", "noise has zero standard deviation");
  const auto inv = static_cast<float>(1.0 / std_dev);
  for (float& v : noise) v *= inv;
}

/// eps for NoiseOptions as a tensor (the unfused path): N(0,I) (same numbers as the fused pass)
/// + offsets, then pyramid noise if enabled.
inline void sample_noise(const NoiseOptions& options, const Tensor4<float>& x0,
                         RandomStream step_stream, Tensor4<float>& noise) {
  options.validate();
  const auto& sh = x0.shape();
  noise.resize(sh);
  fill_normal(std::span<float>(noise.data(), noise.size()),
              step_stream.derive(0, StreamPurpose::noise));
  const std::vector<float> offset = noise_offsets(options, x0, step_stream);
  const std::size_t plane = sh[2] * sh[3];
  for (std::size_t i = 0; i < offset.size(); ++i)
    for (std::size_t p = 0; p < plane; ++p) noise.data()[i * plane + p] += offset[i];
  pyramid_noise(noise, options.multires_noise_iterations, options.multires_noise_discount,
                step_stream);
}

/// The NoiseSampler of the options above (satisfies difftrain::NoiseSampler).
struct StandardNoise {
  NoiseOptions options;
  void sample(Tensor4<float>& noise, const Tensor4<float>& x0, RandomStream step_stream) const {
    sample_noise(options, x0, step_stream, noise);
  }
};

}  // namespace difftrain::kernels
