// Benchmarks of the training-step kernels against the machine's bandwidth (STREAM triad) and
// naive baselines, side by side in one binary. Arguments: N floats, threads.
// bytes processed = what the kernel must read plus write, counted once.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <numbers>
#include <random>
#include <vector>

#include "difftrain/core/random.hpp"
#include "difftrain/kernels/forward_diffusion.hpp"
#include "difftrain/kernels/loss.hpp"

using namespace difftrain;

namespace {
constexpr std::size_t kBatch = 8;  // N = 8·C·H·W: per-sample coefficients as in a real step

std::vector<float> normals(std::size_t n, std::uint64_t seed) {
  std::vector<float> v(n);
  fill_normal(v, {seed, 1});
  return v;
}

void set_counters(benchmark::State& state, std::size_t n, std::size_t bytes_per_element) {
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * n));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * n * bytes_per_element));
}

// a = b + q·c: 2 reads + 1 write.
void triad(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  omp_set_num_threads(static_cast<int>(state.range(1)));
  std::vector<float> a(n), b = normals(n, 1), c = normals(n, 2);
  const float q = 0.5f;
  for (auto _ : state) {
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < static_cast<std::int64_t>(n); ++i) a[i] = b[i] + q * c[i];
    benchmark::DoNotOptimize(a.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, n, 12);
}

// std::mt19937 + std::normal_distribution, one thread: what plain C++ code does.
void normal_std_baseline(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  std::vector<float> out(n);
  std::mt19937 engine(42);
  std::normal_distribution<float> normal;
  for (auto _ : state) {
    for (auto& v : out) v = normal(engine);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, n, 4);
}

// Philox4x32-10 + Box–Muller on SIMD batches.
void normal_fill(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  omp_set_num_threads(static_cast<int>(state.range(1)));
  std::vector<float> out(n);
  std::uint64_t step = 0;
  for (auto _ : state) {
    fill_normal(out, {42, step++});
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, n, 4);
}

kernels::DiffusionCoefficients coefficients() {
  std::vector<float> a(kBatch), s(kBatch);
  for (std::size_t b = 0; b < kBatch; ++b) {
    a[b] = 0.1f + 0.1f * static_cast<float>(b);
    s[b] = std::sqrt(1 - a[b] * a[b]);
  }
  return {a, s, PredictionType::v_prediction};
}

// Reads x0, writes x_t and the v target; eps drawn in registers.
void fused_noise_forward_target(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  omp_set_num_threads(static_cast<int>(state.range(1)));
  const std::vector<float> x0 = normals(n, 3);
  std::vector<float> x_t(n), target(n);
  const auto k = coefficients();
  std::uint64_t step = 0;
  for (auto _ : state) {
    kernels::fused_noise_forward_target(x0.data(), kBatch, 4, n / kBatch / 4, k,
                                        kernels::FusedNoise{{42, step++}, {}, 0, {}}, x_t.data(),
                                        target.data());
    benchmark::DoNotOptimize(x_t.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, n, 12);
}

// Plain scalar loops, pass by pass (noise, then x_t, then target) with the same generator and
// std::log/std::sincos — the unfused, unvectorized version of the kernel above.
void naive_forward_target(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  omp_set_num_threads(static_cast<int>(state.range(1)));
  const std::vector<float> x0 = normals(n, 3);
  std::vector<float> noise(n), x_t(n), target(n);
  const auto k = coefficients();
  const std::size_t per_sample = n / kBatch;
  std::uint64_t step = 0;
  for (auto _ : state) {
    const RandomStream rs{42, step++};
    const auto pairs = static_cast<std::int64_t>(n / 2);
#pragma omp parallel for schedule(static)
    for (std::int64_t p = 0; p < pairs; ++p) {
      const std::uint64_t i = 2 * static_cast<std::uint64_t>(p);
      const float u1 = 1.0f - static_cast<float>(random_bits(rs, i) >> 8) * 0x1p-24f;
      const float u2 = static_cast<float>(random_bits(rs, i + 1) >> 8) * 0x1p-24f;
      const float r = std::sqrt(-2.0f * std::log(u1));
      noise[i] = r * std::cos(2 * std::numbers::pi_v<float> * u2);
      noise[i + 1] = r * std::sin(2 * std::numbers::pi_v<float> * u2);
    }
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < static_cast<std::int64_t>(n); ++i) {
      const std::size_t b = static_cast<std::size_t>(i) / per_sample;
      x_t[i] = k.a[b] * x0[i] + k.s[b] * noise[i];
    }
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < static_cast<std::int64_t>(n); ++i) {
      const std::size_t b = static_cast<std::size_t>(i) / per_sample;
      target[i] = k.target_eps[b] * noise[i] + k.target_x0[b] * x0[i];
    }
    benchmark::DoNotOptimize(target.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, n, 12);
}

// Reads pred and target, writes dL/dpred; Min-SNR-like per-sample weights.
void loss_and_grad(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  omp_set_num_threads(static_cast<int>(state.range(1)));
  const std::vector<float> pred = normals(n, 4), target = normals(n, 5);
  std::vector<float> grad(n);
  const std::vector<float> weights = {1.0f, 0.9f, 0.8f, 0.7f, 0.6f, 0.5f, 0.4f, 0.3f};
  for (auto _ : state) {
    const auto r = kernels::loss_and_grad(pred.data(), target.data(), kBatch, 4, n / kBatch / 4,
                                          kernels::LossType::l2, weights, {}, nullptr,
                                          kernels::MaskLayout::none, grad.data());
    benchmark::DoNotOptimize(r.loss);
    benchmark::ClobberMemory();
  }
  set_counters(state, n, 12);
}

void sizes_and_threads(benchmark::internal::Benchmark* b) {
  for (std::int64_t n : {131072, 1048576, 16777216})
    for (std::int64_t threads : {1, 2}) b->Args({n, threads});
  b->UseRealTime()->Unit(benchmark::kMicrosecond);
}
void sizes_one_thread(benchmark::internal::Benchmark* b) {
  for (std::int64_t n : {131072, 1048576, 16777216}) b->Args({n, 1});
  b->UseRealTime()->Unit(benchmark::kMicrosecond);
}
}  // namespace

BENCHMARK(triad)->Apply(sizes_and_threads);
BENCHMARK(normal_std_baseline)->Apply(sizes_one_thread);
BENCHMARK(normal_fill)->Apply(sizes_and_threads);
BENCHMARK(fused_noise_forward_target)->Apply(sizes_and_threads);
BENCHMARK(naive_forward_target)->Apply(sizes_and_threads);
BENCHMARK(loss_and_grad)->Apply(sizes_and_threads);
BENCHMARK_MAIN();
