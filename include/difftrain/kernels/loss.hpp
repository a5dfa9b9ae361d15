#pragma once
// The loss of the step and its gradient in one pass over memory (read pred, target; write
// dL/dpred). Dims: B batch, C channels, P = H·W, N = B·C·P.
//
//   L_b = (1/(C·P)) Σ_i m_i·ℓ(pred_i − target_i)        per-sample mean (mask m optional)
//   L   = (1/B) Σ_b w_b·L_b                              weighted batch mean
//   dL/dpred_i = w_b·m_i·ℓ'(d_i) / (B·C·P)
//
// ℓ: l2 d²; l1 |d| (gradient sign d, 0 at 0, as PyTorch); huber 2c(√(d²+c²) − c);
// smooth_l1 2(√(d²+c²) − c), with c per sample.
// Sums are accumulated per fixed chunk of a sample and the chunks added in order in double, so
// the result does not depend on the thread count.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>
#include <xsimd/xsimd.hpp>

#include "difftrain/core/choice.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/parallel.hpp"
#include "difftrain/core/tensor.hpp"

namespace difftrain::kernels {

enum class LossType : std::uint8_t { l2, huber, smooth_l1, l1 };

/// kohya's names.
inline constexpr std::array<Choice<LossType>, 4> kLossTypes{{
    {"l2", LossType::l2},
    {"l1", LossType::l1},
    {"huber", LossType::huber},
    {"smooth_l1", LossType::smooth_l1},
}};

inline std::string_view to_string(LossType type) { return choice_name(type, kLossTypes); }

/// Whether the loss takes the per-sample Huber c (huber, smooth_l1).
constexpr bool uses_huber_c(LossType type) {
  return type == LossType::huber || type == LossType::smooth_l1;
}

/// kohya's names: "l2", "l1", "huber", "smooth_l1".
inline LossType parse_loss_type(std::string_view name) {
  return parse_choice("loss_type", name, kLossTypes);
}

struct LossResult {
  double loss = 0;                 // L
  std::vector<double> per_sample;  // L_b, before the weights
};

/// How a mask is laid out: none, one plane per sample broadcast over channels [B,1,H,W], or full.
enum class MaskLayout : std::uint8_t { none, per_sample_plane, full };

// sqrt for scalars and batches alike (used by the generic loss body below).
inline float sqrt_of(float x) { return std::sqrt(x); }
inline float abs_of(float x) { return std::abs(x); }
inline float sign_of(float x) { return static_cast<float>((x > 0.0f) - (x < 0.0f)); }
template <class Arch>
inline xsimd::batch<float, Arch> abs_of(xsimd::batch<float, Arch> x) {
  return xsimd::abs(x);
}
template <class Arch>
inline xsimd::batch<float, Arch> sign_of(xsimd::batch<float, Arch> x) {
  using F = xsimd::batch<float, Arch>;
  return xsimd::select(x > F(0.0f), F(1.0f), F(0.0f)) -
         xsimd::select(x < F(0.0f), F(1.0f), F(0.0f));
}
template <class Arch>
inline xsimd::batch<float, Arch> sqrt_of(xsimd::batch<float, Arch> x) {
  return xsimd::sqrt(x);
}

namespace detail {
inline constexpr std::size_t kLossChunk = 8192;  // elements per partial sum (fixed: determinism)

// Sum over [0, n) of m·ℓ(d); writes scale·m·ℓ'(d) to grad when given.
template <LossType type, class Arch>
inline double loss_chunk(const float* pred, const float* target, const float* mask, std::size_t n,
                         float c, float scale, float* grad) {
  using F = xsimd::batch<float, Arch>;
  constexpr std::size_t W = F::size;
  const F vscale(scale);
  F acc(0.0f);
  std::size_t i = 0;
  const std::size_t hi = n;
  auto value_and_slope = [&](auto d, auto& slope) {
    if constexpr (type == LossType::l2) {
      slope = d + d;
      return d * d;
    } else if constexpr (type == LossType::l1) {
      slope = sign_of(d);
      return abs_of(d);
    } else {
      // √(d²+c²) − c = d²/(√(d²+c²) + c): no cancellation when c ≫ |d|.
      using V = decltype(d);
      const V d2 = d * d;
      const V root = sqrt_of(d2 + V(c * c));
      const V k = type == LossType::huber ? V(2 * c) : V(2.0f);
      slope = k * d / root;
      return k * d2 / (root + V(c));
    }
  };
  for (; i + W <= hi; i += W) {
    const F d = F::load_unaligned(pred + i) - F::load_unaligned(target + i);
    F slope;
    F value = value_and_slope(d, slope);
    if (mask) {
      const F m = F::load_unaligned(mask + i);
      value *= m;
      slope *= m;
    }
    acc += value;
    if (grad) (slope * vscale).store_unaligned(grad + i);
  }
  float tail = 0;
  for (; i < hi; ++i) {
    const float d = pred[i] - target[i];
    float slope;
    float value = value_and_slope(d, slope);
    if (mask) {
      value *= mask[i];
      slope *= mask[i];
    }
    tail += value;
    if (grad) grad[i] = slope * scale;
  }
  return static_cast<double>(xsimd::hadd(acc)) + tail;
}
}  // namespace detail

/// The loss, per-sample losses and dL/dpred (when `grad` is non-null) on raw buffers.
/// `weights` [B]; `huber_c` [B] (ignored for l2); `mask` laid out as `mask_layout` says.
template <class Arch = xsimd::default_arch>
LossResult loss_and_grad(const float* pred, const float* target, std::size_t batch,
                         std::size_t channels, std::size_t plane, LossType type,
                         std::span<const float> weights, std::span<const float> huber_c,
                         const float* mask, MaskLayout mask_layout, float* grad) {
  constexpr const char* fn = "loss_and_grad";
  require(weights.size() == batch, fn, "weights has ", weights.size(), " entries, expected ",
          batch);
  require(!uses_huber_c(type) || huber_c.size() == batch, fn, "huber_c has ", huber_c.size(),
          " entries, expected ", batch, " for loss type ", to_string(type));
  for (std::size_t b = 0; uses_huber_c(type) && b < batch; ++b)
    require(huber_c[b] > 0, fn, "huber_c[", b, "] is ", huber_c[b], ", expected > 0");
  require((mask == nullptr) == (mask_layout == MaskLayout::none), fn,
          "mask pointer and mask layout disagree");
  const std::size_t per_sample = channels * plane;
  LossResult result;
  result.per_sample.assign(batch, 0.0);
  if (batch == 0 || per_sample == 0) return result;
  // Work units: fixed chunks of a sample; with a per-plane mask, chunks of one channel's plane
  // (so that a chunk reads one contiguous stretch of the mask).
  const std::size_t chunk = mask_layout == MaskLayout::per_sample_plane ? 0 : detail::kLossChunk;
  const std::size_t units_per_sample =
      chunk != 0 ? (per_sample + chunk - 1) / chunk
                 : channels * ((plane + detail::kLossChunk - 1) / detail::kLossChunk);
  std::vector<double> partial(batch * units_per_sample, 0.0);
  const auto units = static_cast<std::int64_t>(batch * units_per_sample);
  const double inv_count = 1.0 / static_cast<double>(per_sample);
#pragma omp parallel for schedule( \
    static) if (parallel::exceeds(batch * per_sample, parallel::kNormSize))
  for (std::int64_t u = 0; u < units; ++u) {
    const std::size_t b = static_cast<std::size_t>(u) / units_per_sample;
    const std::size_t k = static_cast<std::size_t>(u) % units_per_sample;
    std::size_t lo, hi;
    const float* m = nullptr;
    if (chunk != 0) {
      lo = k * chunk;
      hi = std::min(per_sample, lo + chunk);
      if (mask) m = mask + b * per_sample + lo;
    } else {  // per (channel, plane-chunk); the mask plane is shared by the channels
      const std::size_t per_channel = (plane + detail::kLossChunk - 1) / detail::kLossChunk;
      const std::size_t ch = k / per_channel, pk = k % per_channel;
      lo = ch * plane + pk * detail::kLossChunk;
      hi = ch * plane + std::min(plane, (pk + 1) * detail::kLossChunk);
      m = mask + b * plane + pk * detail::kLossChunk;
    }
    const std::size_t o = b * per_sample + lo;
    const std::size_t n = hi - lo;
    const float c = uses_huber_c(type) ? huber_c[b] : 0.0f;
    const float scale = static_cast<float>(static_cast<double>(weights[b]) * inv_count /
                                           static_cast<double>(batch));
    float* g = grad ? grad + o : nullptr;
    double sum = 0;
    switch (type) {
      case LossType::l2:
        sum = detail::loss_chunk<LossType::l2, Arch>(pred + o, target + o, m, n, c, scale, g);
        break;
      case LossType::l1:
        sum = detail::loss_chunk<LossType::l1, Arch>(pred + o, target + o, m, n, c, scale, g);
        break;
      case LossType::huber:
        sum = detail::loss_chunk<LossType::huber, Arch>(pred + o, target + o, m, n, c, scale, g);
        break;
      case LossType::smooth_l1:
        sum =
            detail::loss_chunk<LossType::smooth_l1, Arch>(pred + o, target + o, m, n, c, scale, g);
        break;
    }
    partial[static_cast<std::size_t>(u)] = sum;
  }
  for (std::size_t b = 0; b < batch; ++b) {
    double sum = 0;
    for (std::size_t k = 0; k < units_per_sample; ++k) sum += partial[b * units_per_sample + k];
    result.per_sample[b] = sum * inv_count;
    result.loss += static_cast<double>(weights[b]) * result.per_sample[b];
  }
  result.loss /= static_cast<double>(batch);
  return result;
}

/// The same on tensors: pred, target [B,C,H,W]; mask empty, [B,1,H,W] or [B,C,H,W]; grad resized
/// to pred's shape when non-null.
template <class Arch = xsimd::default_arch>
LossResult loss_and_grad(const Tensor4<float>& pred, const Tensor4<float>& target, LossType type,
                         std::span<const float> weights, std::span<const float> huber_c = {},
                         const Tensor4<float>* mask = nullptr, Tensor4<float>* grad = nullptr) {
  constexpr const char* fn = "loss_and_grad";
  const auto& sh = pred.shape();
  check_same_shape(fn, "target", target.shape(), sh);
  MaskLayout layout = MaskLayout::none;
  if (mask && mask->size() > 0) {
    if (mask->shape()[1] == 1 && sh[1] != 1) {
      check_shape(fn, "mask", mask->shape(), {sh[0], 1, sh[2], sh[3]});
      layout = MaskLayout::per_sample_plane;
    } else {
      check_same_shape(fn, "mask", mask->shape(), sh);
      layout = MaskLayout::full;
    }
  }
  if (grad) grad->resize(sh);
  return loss_and_grad<Arch>(pred.data(), target.data(), sh[0], sh[1], sh[2] * sh[3], type, weights,
                             huber_c, layout == MaskLayout::none ? nullptr : mask->data(), layout,
                             grad ? grad->data() : nullptr);
}

}  // namespace difftrain::kernels
