// Benchmarks of the reference nn layers against the machine's GEMM ceiling, side by side in one
// binary. Every benchmark takes the OpenMP thread count as its last argument and reports
// GFLOP/s = useful FLOPs / wall time, FLOPs = 2 · multiply-adds of the GEMMs the math needs
// (elementwise work, bias sums and softmax are not counted; neither is attention's recompute of
// the probabilities in backward).
//
// The ceiling is Eigen's float GEMM used the way the layers use it: one single-threaded GEMM per
// thread (with T threads, T independent GEMMs in one OpenMP region), not Eigen's own threading.
//
// cpu_time is the whole process's CPU time: GFLOP/s · real_time / cpu_time is the rate per busy
// core, a steadier figure than GFLOP/s on a loaded machine.
// The machine is shared: compare numbers from one run, e.g.
//   bench_layers --benchmark_repetitions=5 --benchmark_enable_random_interleaving=true
// and take the best repetition of each.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <Eigen/Core>
#include <cstdint>
#include <vector>

#include "difftrain/core/random.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/nn/attention.hpp"
#include "difftrain/nn/conv2d.hpp"
#include "difftrain/nn/linear.hpp"

using namespace difftrain;

namespace {

template <class Tensor>
void fill(Tensor& t, std::uint64_t seed, float scale = 1.0f) {
  fill_normal(std::span<float>(t.data(), t.size()), RandomStream{seed, 7});
  for (auto& v : t) v *= scale;
}

void set_flops(benchmark::State& state, double flops_per_iteration) {
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops_per_iteration * static_cast<double>(state.iterations()) * 1e-9,
                         benchmark::Counter::kIsRate);
}

int threads_of(const benchmark::State& state, int index) {
  const int threads = static_cast<int>(state.range(index));
  omp_set_num_threads(threads);
  return threads;
}

// ---- ceiling: C = A·B, N×N float, one GEMM per thread ----

void sgemm_ceiling(benchmark::State& state) {
  const auto n = static_cast<Eigen::Index>(state.range(0));
  const int threads = threads_of(state, 1);
  using Matrix = nn::RowMatrix<float>;
  std::vector<Matrix> a(threads), b(threads), c(threads);
  for (int t = 0; t < threads; ++t) {
    a[t] = Matrix::Random(n, n);
    b[t] = Matrix::Random(n, n);
    c[t] = Matrix::Zero(n, n);
  }
  for (auto _ : state) {
#pragma omp parallel num_threads(threads)
    {
      // inside a parallel region Eigen runs single-threaded, as in the layers' loops
      const int t = omp_get_thread_num();
      c[t].noalias() = a[t] * b[t];
    }
    benchmark::DoNotOptimize(c[0].data());
    benchmark::ClobberMemory();
  }
  set_flops(state, 2.0 * threads * static_cast<double>(n) * n * n);
}

// ---- 3×3 conv, stride 1, padding 1: x [B, C, H, W] → [B, O, H, W] ----
// Arguments: B, C (= O), H (= W), threads.

struct ConvCase {
  std::size_t batch, channels, size;
  nn::Conv2d<float> conv;
  Tensor4<float> x, dy;
  explicit ConvCase(const benchmark::State& state)
      : batch(static_cast<std::size_t>(state.range(0))),
        channels(static_cast<std::size_t>(state.range(1))),
        size(static_cast<std::size_t>(state.range(2))),
        conv(channels, channels, 3, 1, 1),
        x({batch, channels, size, size}),
        dy({batch, channels, size, size}) {
    fill(conv.weight.value, 1, 0.02f);
    fill(conv.bias.value, 2);
    fill(x, 3);
    fill(dy, 4);
  }
  // multiply-adds of one GEMM pass: B · O · (C·9) · (H·W)
  double macs() const { return static_cast<double>(batch) * channels * channels * 9 * size * size; }
};

void conv3x3_forward(benchmark::State& state) {
  threads_of(state, 3);
  ConvCase c(state);
  c.conv.forward(c.x);  // warm-up: the column workspace is allocated once per layer
  for (auto _ : state) {
    auto y = c.conv.forward(c.x);
    benchmark::DoNotOptimize(y.data());
  }
  set_flops(state, 2 * c.macs());
}

// dx, dW and db: two GEMM passes
void conv3x3_backward(benchmark::State& state) {
  threads_of(state, 3);
  ConvCase c(state);
  c.conv.forward(c.x);
  c.conv.backward(c.dy);  // warm-up (workspace, partials)
  for (auto _ : state) {
    auto dx = c.conv.backward(c.dy);
    benchmark::DoNotOptimize(dx.data());
    benchmark::DoNotOptimize(c.conv.weight.grad.data());
  }
  set_flops(state, 4 * c.macs());
}

// ---- linear: x [R, I] → [R, O]; arguments R, I (= O), threads ----

struct LinearCase {
  std::size_t rows, features;
  nn::Linear<float> linear;
  Tensor<float, 2> x, dy;
  explicit LinearCase(const benchmark::State& state)
      : rows(static_cast<std::size_t>(state.range(0))),
        features(static_cast<std::size_t>(state.range(1))),
        linear(features, features),
        x({rows, features}),
        dy({rows, features}) {
    fill(linear.weight.value, 1, 0.05f);
    fill(linear.bias.value, 2);
    fill(x, 3);
    fill(dy, 4);
  }
  double macs() const { return static_cast<double>(rows) * features * features; }
};

void linear_forward(benchmark::State& state) {
  threads_of(state, 2);
  LinearCase c(state);
  for (auto _ : state) {
    auto y = c.linear.forward(c.x);
    benchmark::DoNotOptimize(y.data());
  }
  set_flops(state, 2 * c.macs());
}

// dx and dW
void linear_backward(benchmark::State& state) {
  threads_of(state, 2);
  LinearCase c(state);
  c.linear.forward(c.x);
  for (auto _ : state) {
    auto dx = c.linear.backward(c.dy);
    benchmark::DoNotOptimize(dx.data());
    benchmark::DoNotOptimize(c.linear.weight.grad.data());
  }
  set_flops(state, 4 * c.macs());
}

// ---- self-attention: x [B, L, D], Hn heads of Hd = D / Hn; arguments B, L, D, Hn, threads ----

struct AttentionCase {
  std::size_t batch, tokens, dim, heads;
  nn::Attention<float> attention;
  Tensor3<float> x, dy;
  explicit AttentionCase(const benchmark::State& state)
      : batch(static_cast<std::size_t>(state.range(0))),
        tokens(static_cast<std::size_t>(state.range(1))),
        dim(static_cast<std::size_t>(state.range(2))),
        heads(static_cast<std::size_t>(state.range(3))),
        attention(nn::AttentionConfig{dim, 0, heads, dim / heads}),
        x({batch, tokens, dim}),
        dy({batch, tokens, dim}) {
    std::uint64_t seed = 10;
    attention.for_each_parameter(
        "", [&](const std::string&, nn::Parameter<float>& p) { fill(p.value, seed++, 0.05f); });
    fill(x, 3);
    fill(dy, 4);
  }
  // four D×D projections of B·L tokens
  double projection_macs() const { return 4.0 * batch * tokens * dim * dim; }
  // S = QKᵀ and O = PV over all heads: 2 · B · L · L · (Hn·Hd)
  double core_macs() const { return 2.0 * batch * tokens * tokens * dim; }
};

void attention_forward(benchmark::State& state) {
  threads_of(state, 4);
  AttentionCase c(state);
  c.attention.forward(c.x);  // warm-up: score workspace
  for (auto _ : state) {
    auto y = c.attention.forward(c.x);
    benchmark::DoNotOptimize(y.data());
  }
  set_flops(state, 2 * (c.projection_macs() + c.core_macs()));
}

// projections: dx and dW (2 passes); core: dV, dP, dQ, dK (2 passes; the recomputed S not counted)
void attention_backward(benchmark::State& state) {
  threads_of(state, 4);
  AttentionCase c(state);
  c.attention.forward(c.x);
  c.attention.backward(c.dy);  // warm-up
  for (auto _ : state) {
    auto grads = c.attention.backward(c.dy);
    benchmark::DoNotOptimize(grads.x.data());
  }
  set_flops(state, 4 * (c.projection_macs() + c.core_macs()));
}

}  // namespace

BENCHMARK(sgemm_ceiling)
    ->ArgNames({"N", "threads"})
    ->ArgsProduct({{1024}, {1, 2}})
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(conv3x3_forward)
    ->ArgNames({"B", "C", "HW", "threads"})
    ->ArgsProduct({{4}, {64}, {32}, {1, 2}})
    ->ArgsProduct({{2}, {320}, {64}, {1, 2}})
    ->ArgsProduct({{1}, {320}, {64}, {2}})
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(conv3x3_backward)
    ->ArgNames({"B", "C", "HW", "threads"})
    ->ArgsProduct({{4}, {64}, {32}, {1, 2}})
    ->ArgsProduct({{2}, {320}, {64}, {1, 2}})
    ->ArgsProduct({{1}, {320}, {64}, {2}})
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(linear_forward)
    ->ArgNames({"R", "D", "threads"})
    ->ArgsProduct({{4096}, {320}, {1, 2}})
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(linear_backward)
    ->ArgNames({"R", "D", "threads"})
    ->ArgsProduct({{4096}, {320}, {1, 2}})
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(attention_forward)
    ->ArgNames({"B", "L", "D", "heads", "threads"})
    ->ArgsProduct({{2}, {1024}, {320}, {8}, {1, 2}})
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(attention_backward)
    ->ArgNames({"B", "L", "D", "heads", "threads"})
    ->ArgsProduct({{2}, {1024}, {320}, {8}, {1, 2}})
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
