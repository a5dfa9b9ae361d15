// GroupNorm: constant input, a hand-computed group, per-group moments, gradient checks in double
// (NCHW and [B, C, L], with and without affine), frozen parameters, float vs double, errors.
#include <catch2/catch.hpp>
#include <cmath>

#include "difftrain/nn/gradcheck.hpp"
#include "difftrain/nn/group_norm.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::nn;

TEST_CASE("GroupNorm of a constant input is the bias", "[nn][group_norm]") {
  GroupNorm<double> gn(2, 4);
  gn.weight.value = {2, 3, 4, 5};
  gn.bias.value = {0.5, -1, 0, 7};
  Tensor4<double> x = xt::ones<double>({2, 4, 3, 3}) * 3.25;
  auto y = gn.forward(x);
  for (std::size_t b = 0; b < 2; ++b)
    for (std::size_t c = 0; c < 4; ++c)
      for (std::size_t i = 0; i < 9; ++i) REQUIRE(y(b, c, i / 3, i % 3) == gn.bias.value(c));
}

TEST_CASE("GroupNorm matches a hand-computed group", "[nn][group_norm]") {
  // One group over channels {[1,2],[3,4]}: mean 2.5, biased variance 1.25.
  const double eps = 1e-5;
  GroupNorm<double> gn(1, 2, eps);
  gn.weight.value = {2, -1};
  gn.bias.value = {0.5, 0};
  Tensor<double, 3> x = {{{1, 2}, {3, 4}}};
  const double r = 1 / std::sqrt(1.25 + eps);
  Tensor<double, 3> expected = {{{-1.5 * r * 2 + 0.5, -0.5 * r * 2 + 0.5}, {-0.5 * r, -1.5 * r}}};
  REQUIRE_CLOSE(gn.forward(x), expected, 1e-14, 1e-14);
}

TEST_CASE("GroupNorm without affine gives zero mean and unit variance per group",
          "[nn][group_norm]") {
  GroupNorm<double> gn(3, 6, 1e-6, false);
  int visited = 0;
  gn.for_each_parameter("norm", [&](const std::string&, Parameter<double>&) { ++visited; });
  REQUIRE(visited == 0);
  Tensor4<double> x({2, 6, 4, 5});
  fill_random_normal(x, RandomStream{5, 0}, 3.0);
  x += 10.0;
  auto y = gn.forward(x);
  for (std::size_t b = 0; b < 2; ++b)
    for (std::size_t g = 0; g < 3; ++g) {
      double sum = 0, squares = 0;
      for (std::size_t c = 2 * g; c < 2 * g + 2; ++c)
        for (std::size_t i = 0; i < 20; ++i) {
          const double v = y(b, c, i / 5, i % 5);
          sum += v;
          squares += v * v;
        }
      REQUIRE(std::abs(sum / 40) < 1e-12);
      REQUIRE(std::abs(squares / 40 - 1) < 1e-6);  // eps shrinks the variance by ~eps/var
    }
}

TEST_CASE("GroupNorm gradients pass central-difference checks", "[nn][group_norm]") {
  auto run = [](auto x, GroupNorm<double> gn, std::uint64_t seed) {
    fill_random_normal(x, RandomStream{seed, 0}, 2.0);
    if (gn.config().affine) {
      fill_random_normal(gn.weight.value, RandomStream{seed, 1});
      fill_random_normal(gn.bias.value, RandomStream{seed, 2});
    }
    auto y = gn.forward(x);
    decltype(y) w(y.shape());
    fill_random_normal(w, RandomStream{seed, 3});
    auto dx = gn.backward(w);
    auto loss = [&] { return weighted_sum(gn.forward_inference(x), w); };
    auto rx = check_gradient(x, dx, loss);
    INFO("dx: " << rx.message);
    REQUIRE(rx.max_error <= 1e-6);
    if (gn.config().affine) {
      auto rw = check_gradient(gn.weight, loss);
      INFO("dweight: " << rw.message);
      REQUIRE(rw.max_error <= 1e-6);
      auto rb = check_gradient(gn.bias, loss);
      INFO("dbias: " << rb.message);
      REQUIRE(rb.max_error <= 1e-6);
    }
  };
  SECTION("NCHW, 3 groups of 2 channels, 3x5") {
    run(Tensor4<double>({2, 6, 3, 5}), GroupNorm<double>(3, 6), 1);
  }
  SECTION("[B, C, L], odd sizes") {
    run(Tensor<double, 3>({3, 5, 7}), GroupNorm<double>(5, 5, 1e-6), 2);
  }
  SECTION("one group, no affine") {
    run(Tensor4<double>({1, 4, 3, 3}), GroupNorm<double>(1, 4, 1e-5, false), 3);
  }
}

TEST_CASE("GroupNorm frozen parameters get no gradient, float agrees with double",
          "[nn][group_norm]") {
  GroupNorm<double> gd(4, 8);
  fill_random_normal(gd.weight.value, RandomStream{7, 1});
  fill_random_normal(gd.bias.value, RandomStream{7, 2});
  Tensor4<double> x({2, 8, 5, 3}), w({2, 8, 5, 3});
  fill_random_normal(x, RandomStream{7, 3});
  fill_random_normal(w, RandomStream{7, 4});
  gd.forward(x);
  auto dx_trainable = gd.backward(w);
  xt::xarray<double> dgamma = gd.weight.grad;

  GroupNorm<float> gf(4, 8);
  std::copy(gd.weight.value.begin(), gd.weight.value.end(), gf.weight.value.begin());
  std::copy(gd.bias.value.begin(), gd.bias.value.end(), gf.bias.value.begin());
  Tensor4<float> xf = xt::cast<float>(x), wf = xt::cast<float>(w);
  REQUIRE_CLOSE(gf.forward(xf), gd.forward_inference(x), 1e-5, 1e-5);
  REQUIRE_CLOSE(gf.backward(wf), dx_trainable, 1e-4, 1e-5);
  REQUIRE_CLOSE(gf.weight.grad, dgamma, 1e-4, 1e-5);

  set_trainable<double>(gd, false);
  gd.forward(x);
  auto dx = gd.backward(w);
  REQUIRE(gd.weight.grad.size() == 0);
  REQUIRE(gd.bias.grad.size() == 0);
  REQUIRE_CLOSE(dx, dx_trainable, 1e-14, 1e-14);
}

TEST_CASE("GroupNorm rejects bad configuration and input", "[nn][group_norm]") {
  REQUIRE_THROWS_WITH(GroupNorm<float>(3, 8),
                      "GroupNorm: num_channels 8 is not divisible by num_groups 3");
  GroupNorm<float> gn(2, 4);
  REQUIRE_THROWS_WITH(gn.forward(Tensor4<float>(xt::zeros<float>({1, 3, 2, 2}))),
                      "GroupNorm::forward: x has shape [1,3,2,2], expected [B,4,...]");
  REQUIRE_THROWS_WITH(gn.backward(Tensor4<float>(xt::zeros<float>({1, 4, 2, 2}))),
                      Catch::Contains("call forward first"));
}
