// Global-norm clipping: the norm by hand, the clip coefficient, non-finite and disabled cases,
// independence from the thread count.
#include <omp.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "difftrain/core/random.hpp"
#include "difftrain/train/grad_clip.hpp"

using namespace difftrain;
using namespace difftrain::train;

TEST_CASE("clip_grad_norm: returns the norm before clipping and scales by max/(norm + 1e-6)") {
  nn::Parameter<float> a({2}), b({1}), frozen({3}, false);
  a.grad = xt::xarray<float>({3.0f, 4.0f});
  b.grad = xt::xarray<float>({12.0f});
  const std::vector<nn::Parameter<float>*> params = {&a, &b, &frozen};
  REQUIRE(global_grad_norm(params) == 13.0);       // √(9 + 16 + 144)
  REQUIRE(clip_grad_norm(params, 100.0) == 13.0);  // below the limit: untouched
  REQUIRE(a.grad(0) == 3.0f);
  REQUIRE(clip_grad_norm(params, 1.0) == 13.0);
  const double coef = 1.0 / (13.0 + 1e-6);
  REQUIRE(a.grad(0) == Approx(3.0 * coef).epsilon(1e-6));
  REQUIRE(a.grad(1) == Approx(4.0 * coef).epsilon(1e-6));
  REQUIRE(b.grad(0) == Approx(12.0 * coef).epsilon(1e-6));
  REQUIRE(global_grad_norm(params) == Approx(1.0).epsilon(1e-6));
  // Disabled: the norm is still reported.
  REQUIRE(clip_grad_norm(params, 0.0) == Approx(1.0).epsilon(1e-6));
}

TEST_CASE("clip_grad_norm: a NaN gradient gives a NaN norm and no scaling") {
  nn::Parameter<float> a({3});
  a.grad = xt::xarray<float>({1.0f, NAN, 2.0f});
  REQUIRE(std::isnan(clip_grad_norm({&a}, 0.5)));
  REQUIRE(a.grad(0) == 1.0f);
  a.grad(1) = INFINITY;
  REQUIRE(std::isinf(global_grad_norm({&a})));
}

TEST_CASE("global_grad_norm: double accumulation, same value for any thread count") {
  const std::size_t n = 5 * (1 << 15) + 11;
  nn::Parameter<float> a({n}), b({1000});
  fill_normal(std::span<float>(a.grad.data(), n), {9, 1});
  fill_normal(std::span<float>(b.grad.data(), 1000), {9, 2});
  long double ref = 0;
  for (float g : a.grad) ref += (long double)g * g;
  for (float g : b.grad) ref += (long double)g * g;
  std::vector<double> norms;
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    norms.push_back(global_grad_norm({&a, &b}));
  }
  omp_set_num_threads(2);
  REQUIRE(norms[0] == norms[1]);
  REQUIRE(norms[0] == norms[2]);
  REQUIRE(norms[0] == Approx(double(std::sqrt(ref))).epsilon(1e-12));
}
