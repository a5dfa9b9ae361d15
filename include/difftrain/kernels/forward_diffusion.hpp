#pragma once
// Forward diffusion and training targets, fused with noise generation: one pass reads x0 and
// writes x_t and the target; eps is drawn in registers from the counter-based generator.
// Dims: B batch, C channels, P = H·W plane size, N = B·C·P. Tensors NCHW, float32, contiguous.
//
//   eps    = n_g + offset[b,c]                       (n_g = normal number g of the noise stream)
//   x_t    = a_b·x0 + s_b·(eps + γ·ξ_g)              (γ: input perturbation, ξ_g its own stream)
//   target = ce_b·eps + cx_b·x0                      ((1,0) eps, (a,−s) v, (0,1) x0, (1,−1) flow)
// with g = i for element i = b·C·P + j, or g = rows[b]·C·P + j when the batch is rows `rows` of
// a larger one (a data-parallel shard draws its rows' numbers of the one-process batch).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>
#include <xsimd/xsimd.hpp>

#include "difftrain/concepts.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/parallel.hpp"
#include "difftrain/core/prediction_type.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/core/tensor.hpp"

namespace difftrain::kernels {

/// Per-sample coefficients: x_t = a·x0 + s·eps (DDPM: a = sqrt(ᾱ_t), s = sqrt(1 − ᾱ_t); flow
/// matching: 1 − σ, σ) and target = target_eps·eps + target_x0·x0.
struct DiffusionCoefficients {
  std::vector<float> a, s, target_eps, target_x0;

  DiffusionCoefficients() = default;
  /// From per-sample sqrt(ᾱ_t), sqrt(1 − ᾱ_t) and the prediction type.
  DiffusionCoefficients(std::span<const float> sqrt_alpha_prod,
                        std::span<const float> sqrt_one_minus_alpha_prod, PredictionType type)
      : a(sqrt_alpha_prod.begin(), sqrt_alpha_prod.end()),
        s(sqrt_one_minus_alpha_prod.begin(), sqrt_one_minus_alpha_prod.end()) {
    require(a.size() == s.size(), "DiffusionCoefficients", "sqrt_one_minus_alpha_prod has ",
            s.size(), " entries, expected ", a.size());
    target_eps.resize(a.size());
    target_x0.resize(a.size());
    for (std::size_t b = 0; b < a.size(); ++b) {
      const TargetCoefficients t = prediction_target(type, a[b], s[b]);
      target_eps[b] = static_cast<float>(t.eps);
      target_x0[b] = static_cast<float>(t.x0);
    }
  }
  /// From a training schedule's coefficients of each sample (rounded to float).
  explicit DiffusionCoefficients(std::span<const TrainingCoefficients> c)
      : a(c.size()), s(c.size()), target_eps(c.size()), target_x0(c.size()) {
    for (std::size_t b = 0; b < c.size(); ++b) {
      a[b] = static_cast<float>(c[b].x0_coef);
      s[b] = static_cast<float>(c[b].eps_coef);
      target_eps[b] = static_cast<float>(c[b].target_eps_coef);
      target_x0[b] = static_cast<float>(c[b].target_x0_coef);
    }
  }
  std::size_t batch() const { return a.size(); }
};

/// Where eps comes from in the fused pass.
struct FusedNoise {
  RandomStream noise;             // n_i
  std::span<const float> offset;  // [B·C] per (sample, channel), or empty for none
  float input_perturbation = 0;   // γ; 0 disables ξ
  RandomStream perturbation;      // ξ_i
};

namespace detail {
// One run [lo, hi) of flat indices inside a group, all in sample b with offset `off`; n and xi
// hold the random numbers of elements lo..hi−1.
template <class Arch>
inline void diffuse_run(const float* x0, const float* n, const float* xi, std::size_t lo,
                        std::size_t hi, float a, float s, float ce, float cx, float off,
                        float gamma, float* x_t, float* target, float* noise_out) {
  using F = xsimd::batch<float, Arch>;
  constexpr std::size_t W = F::size;
  std::size_t i = lo;
  const F va(a), vs(s), vce(ce), vcx(cx), voff(off), vg(gamma);
  for (; i + W <= hi; i += W) {
    const std::size_t j = i - lo;
    const F x = F::load_unaligned(x0 + i);
    const F eps = F::load_unaligned(n + j) + voff;
    const F model_eps = xi ? xsimd::fma(vg, F::load_unaligned(xi + j), eps) : eps;
    xsimd::fma(va, x, vs * model_eps).store_unaligned(x_t + i);
    xsimd::fma(vce, eps, vcx * x).store_unaligned(target + i);
    if (noise_out) eps.store_unaligned(noise_out + i);
  }
  for (; i < hi; ++i) {
    const std::size_t j = i - lo;
    const float eps = n[j] + off;
    const float model_eps = xi ? std::fma(gamma, xi[j], eps) : eps;
    x_t[i] = std::fma(a, x0[i], s * model_eps);
    target[i] = std::fma(ce, eps, cx * x0[i]);
    if (noise_out) noise_out[i] = eps;
  }
}

// Local rows [local, local + count) are the consecutive global rows [global, global + count).
struct RowRun {
  std::size_t local;
  std::uint64_t global;
  std::size_t count;
};
// The maximal runs of consecutive rows of `rows` (one run of all rows when it is empty).
inline std::vector<RowRun> row_runs(std::span<const std::uint64_t> rows, std::size_t batch) {
  if (rows.empty()) return {RowRun{0, 0, batch}};
  std::vector<RowRun> runs;
  for (std::size_t b = 0; b < rows.size(); ++b) {
    if (!runs.empty() && runs.back().global + runs.back().count == rows[b]) {
      ++runs.back().count;
    } else {
      runs.push_back({b, rows[b], 1});
    }
  }
  return runs;
}
}  // namespace detail

/// The fused pass on raw NCHW buffers of N = batch·channels·plane floats. `noise_out` (optional)
/// receives eps. Element i of every output depends only on the inputs at i and the random streams,
/// so the result is the same for any thread count. `rows` (a data-parallel shard; empty: 0..B−1):
/// sample b draws the numbers of global row rows[b], bitwise as the one-process pass computes
/// that row (see below).
template <class Arch = xsimd::default_arch>
void fused_noise_forward_target(const float* x0, std::size_t batch, std::size_t channels,
                                std::size_t plane, const DiffusionCoefficients& k,
                                const FusedNoise& noise, float* x_t, float* target,
                                float* noise_out = nullptr,
                                std::span<const std::uint64_t> rows = {}) {
  constexpr const char* fn = "fused_noise_forward_target";
  require(k.batch() == batch, fn, "coefficients for ", k.batch(), " samples, expected ", batch);
  require(noise.offset.empty() || noise.offset.size() == batch * channels, fn, "offset has ",
          noise.offset.size(), " entries, expected ", batch * channels, " (B·C) or 0");
  require(rows.empty() || rows.size() == batch, fn, "rows has ", rows.size(), " entries, expected ",
          batch, " (one global row per sample) or 0");
  const std::size_t per_sample = channels * plane;
  const std::size_t total = batch * per_sample;
  if (total == 0) return;
  // Work items: the random groups that each run of consecutive global rows touches, numbered
  // over the runs (identity rows: one run, groups 0..⌈N/64⌉−1). A run begins and ends on a row
  // boundary, which is a plane boundary, so the pieces [lo, hi) that diffuse_run gets are, in
  // global indices, the same as in the one-process pass: same SIMD/tail split, same bits.
  const std::vector<detail::RowRun> runs = detail::row_runs(rows, batch);
  std::vector<std::uint64_t> first_group(runs.size());
  std::vector<std::int64_t> item_begin(runs.size() + 1, 0);
  for (std::size_t r = 0; r < runs.size(); ++r) {
    const std::uint64_t begin = runs[r].global * per_sample;
    const std::uint64_t end = begin + runs[r].count * per_sample;
    first_group[r] = begin / kRandomGroup;
    item_begin[r + 1] =
        item_begin[r] + static_cast<std::int64_t>((end - 1) / kRandomGroup - first_group[r] + 1);
  }
  const std::int64_t items = item_begin.back();
  const bool perturb = noise.input_perturbation != 0.0f;
  const PreparedStream noise_stream(noise.noise), perturbation_stream(noise.perturbation);
#pragma omp parallel if (parallel::exceeds(items, parallel::kRandomGroups))
  {
    // The (sample, channel) plane of the previous piece, so that consecutive groups of a plane
    // need no division; the run of the previous item (a thread's items increase).
    std::size_t plane_begin = 0, plane_end = 0, bc = 0, b = 0, r = 0;
#pragma omp for schedule(static)
    for (std::int64_t item = 0; item < items; ++item) {
      while (item >= item_begin[r + 1]) ++r;
      const detail::RowRun& run = runs[r];
      const std::uint64_t g = first_group[r] + static_cast<std::uint64_t>(item - item_begin[r]);
      alignas(64) float n[kRandomGroup];
      alignas(64) float xi[kRandomGroup];
      normal_group<Arch>(noise_stream, g, n);
      if (perturb) normal_group<Arch>(perturbation_stream, g, xi);
      // The part of group g inside the run, in global indices, then in local ones.
      const std::uint64_t run_begin = run.global * per_sample;
      const std::uint64_t global_lo = std::max(g * kRandomGroup, run_begin);
      const std::uint64_t global_hi =
          std::min((g + 1) * kRandomGroup, run_begin + run.count * per_sample);
      const std::size_t begin = run.local * per_sample + (global_lo - run_begin);
      const std::size_t end = begin + (global_hi - global_lo);
      const std::size_t in_group = global_lo - g * kRandomGroup;  // n[in_group] is element begin's
      // Split into pieces of one plane: coefficients are constant on each.
      for (std::size_t lo = begin; lo < end;) {
        if (lo < plane_begin || lo >= plane_end) {
          bc = lo / plane;
          b = bc / channels;
          plane_begin = bc * plane;
          plane_end = plane_begin + plane;
        }
        const std::size_t hi = std::min(end, plane_end);
        const float off = noise.offset.empty() ? 0.0f : noise.offset[bc];
        const std::size_t j = in_group + (lo - begin);
        detail::diffuse_run<Arch>(x0, n + j, perturb ? xi + j : nullptr, lo, hi, k.a[b], k.s[b],
                                  k.target_eps[b], k.target_x0[b], off, noise.input_perturbation,
                                  x_t, target, noise_out);
        lo = hi;
      }
    }
  }
}

/// The same on tensors: x0 [B,C,H,W] → x_t, target (resized to x0's shape).
template <class Arch = xsimd::default_arch>
void fused_noise_forward_target(const Tensor4<float>& x0, const DiffusionCoefficients& k,
                                const FusedNoise& noise, Tensor4<float>& x_t,
                                Tensor4<float>& target, Tensor4<float>* noise_out = nullptr,
                                std::span<const std::uint64_t> rows = {}) {
  const auto& sh = x0.shape();
  x_t.resize(sh);
  target.resize(sh);
  if (noise_out) noise_out->resize(sh);
  fused_noise_forward_target<Arch>(x0.data(), sh[0], sh[1], sh[2] * sh[3], k, noise, x_t.data(),
                                   target.data(), noise_out ? noise_out->data() : nullptr, rows);
}

/// Forward diffusion with a given noise tensor (diffusers' add_noise / get_velocity, when eps
/// comes from elsewhere, e.g. pyramid noise): x_t = a_b·x0 + s_b·(eps + γ·ξ); target as above.
/// `perturbation` (optional, same shape) is ξ already scaled by γ.
template <class Arch = xsimd::default_arch>
void forward_target(const Tensor4<float>& x0, const Tensor4<float>& eps,
                    const DiffusionCoefficients& k, Tensor4<float>& x_t, Tensor4<float>& target,
                    const Tensor4<float>* perturbation = nullptr) {
  constexpr const char* fn = "forward_target";
  const auto& sh = x0.shape();
  check_same_shape(fn, "noise", eps.shape(), sh);
  if (perturbation) check_same_shape(fn, "perturbation", perturbation->shape(), sh);
  require(k.batch() == sh[0], fn, "coefficients for ", k.batch(), " samples, expected ", sh[0]);
  x_t.resize(sh);
  target.resize(sh);
  using F = xsimd::batch<float, Arch>;
  constexpr std::size_t W = F::size;
  const std::size_t per_sample = sh[1] * sh[2] * sh[3];
  const auto batch = static_cast<std::int64_t>(sh[0]);
#pragma omp parallel for schedule(static)
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::size_t o = static_cast<std::size_t>(b) * per_sample;
    const float* x = x0.data() + o;
    const float* e = eps.data() + o;
    const float* p = perturbation ? perturbation->data() + o : nullptr;
    float* xt = x_t.data() + o;
    float* tg = target.data() + o;
    const float a = k.a[b], s = k.s[b], ce = k.target_eps[b], cx = k.target_x0[b];
    std::size_t i = 0;
    for (; i + W <= per_sample; i += W) {
      const F vx = F::load_unaligned(x + i), ve = F::load_unaligned(e + i);
      const F model_eps = p ? ve + F::load_unaligned(p + i) : ve;
      xsimd::fma(F(a), vx, F(s) * model_eps).store_unaligned(xt + i);
      xsimd::fma(F(ce), ve, F(cx) * vx).store_unaligned(tg + i);
    }
    for (; i < per_sample; ++i) {
      const float model_eps = p ? e[i] + p[i] : e[i];
      xt[i] = std::fma(a, x[i], s * model_eps);
      tg[i] = std::fma(ce, e[i], cx * x[i]);
    }
  }
}

}  // namespace difftrain::kernels
