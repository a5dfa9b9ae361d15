#pragma once
// Global-norm gradient clipping (PyTorch clip_grad_norm_, as accelerate's clip_grad_norm_ calls
// it in the diffusers scripts with --max_grad_norm 1.0).
//
// The norm is accumulated in double over fixed chunks of each gradient, and the chunk sums are
// added in a fixed order, so it does not depend on the thread count. The parameters are
// ParameterRefs (parameter_view.hpp): nn::Parameter<float>s or views of any model's storage.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <ranges>
#include <span>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/parallel.hpp"
#include "difftrain/nn/parameter.hpp"
#include "difftrain/train/parameter_view.hpp"

namespace difftrain::train {

namespace detail {
inline constexpr std::size_t kNormChunk = 1 << 15;  // elements per partial sum (fixed)
}

/// ‖g‖ = sqrt(Σ_params Σ_i g_i²) over the gradients of the trainable parameters (frozen ones,
/// with an empty gradient, are skipped). NaN or Inf if a gradient holds one.
inline double global_grad_norm(const std::vector<ParameterRef>& params) {
  struct Chunk {
    const float* data;
    std::size_t size;
  };
  std::vector<Chunk> chunks;
  for (const ParameterRef& p : params) {
    require(!p.is_null(), "global_grad_norm", "a parameter pointer is null");
    const std::span<float> grad = p.grad();
    if (!p.trainable() || grad.empty()) continue;
    require(grad.size() == p.value().size(), "global_grad_norm", "gradient has ", grad.size(),
            " elements, expected ", p.value().size(), " as the value");
    for (std::size_t o = 0; o < grad.size(); o += detail::kNormChunk)
      chunks.push_back({grad.data() + o, std::min(detail::kNormChunk, grad.size() - o)});
  }
  std::vector<double> partial(chunks.size(), 0.0);
  const auto n_chunks = static_cast<std::ptrdiff_t>(chunks.size());
#pragma omp parallel for schedule(static) if (n_chunks > 4)
  for (std::ptrdiff_t c = 0; c < n_chunks; ++c) {
    const Chunk& chunk = chunks[std::size_t(c)];
    double sum = 0;
    for (std::size_t i = 0; i < chunk.size; ++i) {
      const double g = chunk.data[i];
      sum += g * g;
    }
    partial[std::size_t(c)] = sum;
  }
  double total = 0;
  for (double s : partial) total += s;
  return std::sqrt(total);
}

/// Scales every gradient by min(1, max_norm/(‖g‖ + 1e-6)) (PyTorch's clip coefficient) and
/// returns ‖g‖ before clipping. A non-finite norm leaves the gradients as they are (the caller
/// decides what to do with a NaN/Inf gradient); max_norm <= 0 disables clipping.
inline double clip_grad_norm(const std::vector<ParameterRef>& params, double max_norm) {
  require(!std::isnan(max_norm), "clip_grad_norm", "max_norm is NaN");
  const double norm = global_grad_norm(params);
  if (max_norm <= 0 || !std::isfinite(norm)) return norm;
  const double coef = max_norm / (norm + 1e-6);
  if (coef >= 1.0) return norm;
  const float scale = static_cast<float>(coef);
  for (const ParameterRef& p : params) {
    const std::span<float> grad = p.grad();
    if (!p.trainable() || grad.empty()) continue;
    float* g = grad.data();
    const auto n = static_cast<std::ptrdiff_t>(grad.size());
#pragma omp parallel for simd schedule(static) if (parallel::exceeds(n, parallel::kElementwiseSize))
    for (std::ptrdiff_t i = 0; i < n; ++i) g[i] *= scale;
  }
  return norm;
}

/// The same over any range of parameters convertible to ParameterRef (e.g. a
/// std::vector<nn::Parameter<float>*>).
template <std::ranges::input_range R>
requires std::convertible_to<std::ranges::range_reference_t<const R&>, ParameterRef>
double global_grad_norm(const R& params) {
  return global_grad_norm(
      std::vector<ParameterRef>(std::ranges::begin(params), std::ranges::end(params)));
}
template <std::ranges::input_range R>
requires std::convertible_to<std::ranges::range_reference_t<const R&>, ParameterRef>
double clip_grad_norm(const R& params, double max_norm) {
  return clip_grad_norm(
      std::vector<ParameterRef>(std::ranges::begin(params), std::ranges::end(params)), max_norm);
}

}  // namespace difftrain::train
