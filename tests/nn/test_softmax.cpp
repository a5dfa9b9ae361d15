// Softmax over the last dim: closed forms (uniform, hand-computed ratios), numerical stability at
// huge logits, shift invariance, gradient check in double, float vs double, shape errors.
#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "difftrain/nn/gradcheck.hpp"
#include "difftrain/nn/softmax.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::nn;

TEMPLATE_TEST_CASE("softmax of equal logits is uniform", "[nn][softmax]", float, double) {
  for (std::size_t n : {1, 2, 7, 100}) {
    Tensor<TestType, 2> x = xt::zeros<TestType>(std::array<std::size_t, 2>{3, n});
    for (std::size_t j = 0; j < n; ++j) {
      x(1, j) = TestType(42.5);
      x(2, j) = TestType(-7);
    }
    auto y = softmax_forward(x);
    std::vector<double> expected(3 * n, 1.0 / static_cast<double>(n));
    REQUIRE_CLOSE(y, expected, 4 * std::numeric_limits<TestType>::epsilon(), 0);
  }
}

TEMPLATE_TEST_CASE("softmax matches hand-computed ratios and survives huge logits", "[nn][softmax]",
                   float, double) {
  // exp(0) : exp(ln 2) : exp(ln 3) = 1 : 2 : 3; the same ratios shifted by ±1000 (exp overflows
  // or underflows without the max subtraction).
  const double l2 = std::log(2.0), l3 = std::log(3.0);
  Tensor<TestType, 2> x = {{TestType(0), TestType(l2), TestType(l3)},
                           {TestType(1000), TestType(1000 + l2), TestType(1000 + l3)},
                           {TestType(-1000), TestType(-1000 + l2), TestType(-1000 + l3)}};
  auto y = softmax_forward(x);
  // float: 1000 + ln 2 is rounded to 6e-5 absolute, so the ratios are only ~1e-4 exact there.
  const double tol = std::is_same_v<TestType, float> ? 2e-4 : 1e-12;
  for (std::size_t r = 0; r < 3; ++r) {
    std::vector<double> row = {y(r, 0), y(r, 1), y(r, 2)};
    REQUIRE_CLOSE(row, (std::vector<double>{1.0 / 6, 2.0 / 6, 3.0 / 6}), tol, 0);
  }
  // Extreme spread: one logit dominates completely, no NaN.
  Tensor<TestType, 1> spread = {TestType(-3e4), TestType(0), TestType(3e4)};
  auto s = softmax_forward(spread);
  REQUIRE_CLOSE(s, (std::vector<double>{0, 0, 1}), 0, 0);
}

TEST_CASE("softmax_row returns the log-sum-exp and is shift invariant", "[nn][softmax]") {
  std::vector<double> x = {0.3, -1.2, 2.5, 0.0, 1.1};
  std::vector<double> y(5), y_shift(5), x_shift(5);
  const double lse = softmax_row(x.data(), y.data(), 5);
  double sum = 0;
  for (double v : x) sum += std::exp(v);
  REQUIRE(lse == Approx(std::log(sum)).epsilon(1e-14));
  for (std::size_t j = 0; j < 5; ++j) {
    REQUIRE(y[j] == Approx(std::exp(x[j]) / sum).epsilon(1e-14));
    x_shift[j] = x[j] + 123.0;
  }
  softmax_row(x_shift.data(), y_shift.data(), 5);
  REQUIRE_CLOSE(y_shift, y, 1e-12, 0);
}

TEST_CASE("softmax gradient passes a central-difference check", "[nn][softmax]") {
  for (std::size_t n : {1, 2, 7}) {
    Tensor<double, 3> x({3, 4, n});
    fill_random_normal(x, RandomStream{11, n}, 2.0);
    Tensor<double, 3> w(x.shape());
    fill_random_normal(w, RandomStream{12, n});
    auto y = softmax_forward(x);
    auto dx = softmax_backward(y, w);
    auto r = check_gradient(x, dx, [&] { return weighted_sum(softmax_forward(x), w); });
    INFO("n = " << n << ": " << r.message);
    REQUIRE(r.max_error <= 1e-6);
  }
}

TEST_CASE("softmax in float agrees with double", "[nn][softmax]") {
  Tensor<double, 2> xd({5, 9});
  fill_random_normal(xd, RandomStream{13, 0}, 3.0);
  Tensor<double, 2> wd(xd.shape());
  fill_random_normal(wd, RandomStream{13, 1});
  Tensor<float, 2> xf = xt::cast<float>(xd), wf = xt::cast<float>(wd);
  auto yd = softmax_forward(xd);
  auto yf = softmax_forward(xf);
  // float rounding of the logits and exps: a few ulp relative
  REQUIRE_CLOSE(yf, yd, 1e-6, 1e-7);
  REQUIRE_CLOSE(softmax_backward(yf, wf), softmax_backward(yd, wd), 1e-5, 1e-6);
}

TEST_CASE("softmax_backward rejects mismatched shapes", "[nn][softmax]") {
  Tensor<double, 2> y({2, 3}), dy({2, 4});
  y.fill(1.0 / 3);
  dy.fill(0);
  REQUIRE_THROWS_AS(softmax_backward(y, dy), Error);
  REQUIRE_THROWS_WITH(softmax_backward(y, dy), Catch::Contains("softmax_backward") &&
                                                   Catch::Contains("[2,4]") &&
                                                   Catch::Contains("[2,3]"));
}
