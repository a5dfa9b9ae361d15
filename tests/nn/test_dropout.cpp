// Dropout: identity cases, determinism in the stream, the keep rule u_i >= p, mask values,
// keep rate and expectation, gradient check, errors.
#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "difftrain/nn/dropout.hpp"
#include "difftrain/nn/gradcheck.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::nn;

TEST_CASE("Dropout with p = 0 or in eval mode is the identity", "[nn][dropout]") {
  Tensor<double, 2> x({4, 9});
  fill_random_normal(x, RandomStream{1, 0});
  Dropout<double> none(0.0);
  REQUIRE((none.forward(x, RandomStream{1, 1}) == x));
  Dropout<double> eval(0.5);
  eval.training = false;
  REQUIRE((eval.forward(x, RandomStream{1, 1}) == x));
  REQUIRE((eval.backward(x) == x));
  REQUIRE(eval.mask().empty());
}

TEST_CASE("Dropout keeps element i iff uniform(i) >= p, scaled by 1/(1-p)", "[nn][dropout]") {
  const double p = 0.3;
  const RandomStream rs{42, 7};
  Dropout<double> drop(p);
  Tensor<double, 3> x = xt::ones<double>({3, 5, 11});
  auto y = drop.forward(x, rs);
  std::vector<float> u(x.size());
  fill_uniform(std::span<float>(u), rs);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double expected = u[i] >= p ? 1 / (1 - p) : 0.0;
    REQUIRE(y.data()[i] == expected);
  }
  // deterministic: same stream, same mask; a smaller tensor sees a prefix of the same mask
  Dropout<double> again(p);
  REQUIRE((again.forward(x, rs) == y));
  Tensor<double, 1> small = xt::ones<double>({10});
  auto ys = again.forward(small, rs);
  for (std::size_t i = 0; i < 10; ++i) REQUIRE(ys(i) == y.data()[i]);
  // another stream gives another mask
  REQUIRE((again.forward(x, rs.derive(1, 0)) != y));
}

TEST_CASE("Dropout keep rate is 1-p and the expectation is preserved", "[nn][dropout]") {
  const double p = 0.25;
  const std::size_t n = 200000;
  Dropout<double> drop(p);
  Tensor<double, 1> x = xt::ones<double>({n}) * 2.0;
  auto y = drop.forward(x, RandomStream{3, 3});
  std::size_t kept = 0;
  double sum = 0;
  for (double v : y) {
    kept += v != 0;
    sum += v;
  }
  const double rate = static_cast<double>(kept) / n;
  const double sigma = std::sqrt(p * (1 - p) / n);  // binomial standard deviation of the rate
  REQUIRE(std::abs(rate - (1 - p)) < 5 * sigma);
  REQUIRE(std::abs(sum / n - 2.0) < 5 * 2.0 * sigma / (1 - p));
  Dropout<double> all(1.0);
  auto zeros = all.forward(x, RandomStream{3, 3});
  REQUIRE(xt::amax(xt::abs(zeros))() == 0.0);
}

TEST_CASE("Dropout backward multiplies by the saved mask", "[nn][dropout]") {
  Dropout<double> drop(0.4);
  Tensor<double, 2> x({5, 6}), w({5, 6});
  fill_random_normal(x, RandomStream{4, 0});
  fill_random_normal(w, RandomStream{4, 1});
  const RandomStream rs{4, 2};
  drop.forward(x, rs);
  auto dx = drop.backward(w);
  auto r = check_gradient(x, dx, [&] {
    Dropout<double> replay(0.4);
    return weighted_sum(replay.forward(x, rs), w);
  });
  INFO(r.message);
  REQUIRE(r.max_error <= 1e-6);
  REQUIRE_THROWS_WITH(drop.backward(Tensor<double, 2>(xt::zeros<double>({6, 5}))),
                      "Dropout::backward: dy has shape [6,5], expected [5,6]");
  REQUIRE_THROWS_WITH(Dropout<float>(1.5), "Dropout: p is 1.5, expected in [0, 1]");
  REQUIRE_THROWS_AS(Dropout<float>(-0.1), Error);
}
