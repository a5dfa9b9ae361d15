// The nn layers' parallel loops at sizes above their thresholds (core/parallel.hpp), forward and
// backward: the results on 1, 2 and 3 threads are bitwise identical (Eigen's products excepted).
// The other nn tests use small shapes that stay on one thread, so this is also what scripts/tsan
// (ThreadSanitizer) needs to see these loops run on several threads.
#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "difftrain/core/parallel.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/nn/activations.hpp"
#include "difftrain/nn/conv2d.hpp"
#include "difftrain/nn/gradcheck.hpp"
#include "difftrain/nn/group_norm.hpp"
#include "difftrain/nn/layer_norm.hpp"
#include "difftrain/nn/upsample.hpp"

using namespace difftrain;
using namespace difftrain::nn;

namespace thread_counts {

// The values of tensors, one list per tensor.
using Values = std::vector<std::vector<float>>;
template <class... T>
Values values(const T&... t) {
  return {std::vector<float>(t.begin(), t.end())...};
}

// f() on 1, 2 and 3 threads; each result (Values) must equal the 1-thread one (within
// |a − b| <= tolerance·(1 + |b|) if tolerance is not 0).
template <class F>
void same_on_any_thread_count(F&& f, float tolerance = 0) {
#ifdef _OPENMP
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const auto one = f();
  for (int threads : {2, 3}) {
    omp_set_num_threads(threads);
    const auto many = f();
    INFO(threads << " threads");
    REQUIRE(many.size() == one.size());
    for (std::size_t i = 0; i < one.size(); ++i) {
      REQUIRE(many[i].size() == one[i].size());
      std::size_t differ = 0, first = one[i].size();
      for (std::size_t k = 0; k < one[i].size(); ++k)
        if (std::abs(many[i][k] - one[i][k]) > tolerance * (1 + std::abs(one[i][k])) &&
            differ++ == 0)
          first = k;
      INFO("result " << i << ": " << differ << " of " << one[i].size()
                     << " values differ, first at " << first << ": "
                     << (differ ? many[i][first] : 0.0f) << " vs "
                     << (differ ? one[i][first] : 0.0f));
      REQUIRE(differ == 0);
    }
  }
  omp_set_num_threads(saved);
#else
  (void)f();
#endif
}

template <std::size_t N>
Tensor<float, N> normal(const std::array<std::size_t, N>& shape, std::uint64_t seed) {
  Tensor<float, N> t(shape);
  fill_random_normal(t, RandomStream{seed, 0});
  return t;
}

}  // namespace thread_counts

using namespace thread_counts;

TEST_CASE("GroupNorm above its parallel threshold: the same on 1, 2 and 3 threads",
          "[nn][group_norm][threads]") {
  const auto x = normal<4>({2, 8, 48, 48}, 1), dy = normal<4>({2, 8, 48, 48}, 2);
  REQUIRE(x.size() > parallel::kNormSize);
  same_on_any_thread_count([&] {
    GroupNorm<float> gn(4, 8);
    gn.weight.value = normal<1>({8}, 3);
    const auto y = gn.forward(x);
    const auto dx = gn.backward(dy);
    return values(y, dx, gn.weight.grad, gn.bias.grad);
  });
}

TEST_CASE("LayerNorm above its parallel threshold: the same on 1, 2 and 3 threads",
          "[nn][layer_norm][threads]") {
  const auto x = normal<2>({700, 64}, 4), dy = normal<2>({700, 64}, 5);
  REQUIRE(x.size() > parallel::kNormSize);
  same_on_any_thread_count([&] {
    LayerNorm<float> ln(64);
    ln.weight.value = normal<1>({64}, 6);
    const auto y = ln.forward(x);
    const auto dx = ln.backward(dy);
    return values(y, dx, ln.weight.grad, ln.bias.grad);
  });
}

TEST_CASE("SiLU, GELU and GEGLU above their parallel threshold: the same on 1, 2 and 3 threads",
          "[nn][activations][threads]") {
  const auto x = normal<2>({300, 256}, 7), dy = normal<2>({300, 256}, 8);
  REQUIRE(x.size() > parallel::kElementwiseSize);
  same_on_any_thread_count([&] {
    SiLU<float> silu;
    GELU<float> gelu;
    const auto silu_y = silu.forward(x), gelu_y = gelu.forward(x);
    const auto silu_dx = silu.backward(dy), gelu_dx = gelu.backward(dy);
    GEGLU<float> geglu(256, 256);
    geglu.proj.weight.value = normal<2>({512, 256}, 9) * 0.05f;
    const auto geglu_y = geglu.forward(x);
    // Run for ThreadSanitizer, not compared: GEGLU's backward ends in its Linear's backward,
    // whose Eigen GEMMs block their sums by the thread count (last-bit differences).
    (void)geglu.backward(dy);
    return values(silu_y, silu_dx, gelu_y, gelu_dx, geglu_y);
  });
}

TEST_CASE("upsample_nearest2d above its parallel threshold: the same on 1, 2 and 3 threads",
          "[nn][upsample][threads]") {
  const auto x = normal<4>({2, 8, 64, 64}, 10), dy = normal<4>({2, 8, 128, 128}, 11);
  REQUIRE(dy.size() >= parallel::kUpsampleSize);
  same_on_any_thread_count(
      [&] { return values(upsample_nearest2d_forward(x), upsample_nearest2d_backward(dy)); });
}

TEST_CASE("Conv2d above its parallel threshold: the same on 1, 2 and 3 threads",
          "[nn][conv2d][threads]") {
  // Batch 1 and 2 on 2 and 3 threads: the threads split the batch, or share each sample. Its
  // GEMMs (Eigen) are blocked differently in each split: equal up to rounding.
  for (std::size_t batch : {1, 2}) {
    INFO("batch " << batch);
    const auto x = normal<4>({batch, 16, 32, 32}, 12), dy = normal<4>({batch, 16, 32, 32}, 13);
    REQUIRE(batch * 16 * 16 * 9 * 32 * 32 >= parallel::kConvMacs);
    same_on_any_thread_count(
        [&] {
          Conv2d<float> conv(16, 16, 3, 1, 1);
          conv.weight.value = normal<4>({16, 16, 3, 3}, 14) * 0.1f;
          const auto y = conv.forward(x);
          const auto dx = conv.backward(dy);
          const auto inference = conv.forward_inference(x);
          return values(y, dx, conv.weight.grad, conv.bias.grad, inference);
        },
        1e-5f);
  }
}
