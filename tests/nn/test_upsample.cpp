// Nearest upsampling: hand-computed 2× and 5→9 outputs, adjoint identity of backward, gradient
// check in double on odd shapes, float vs double, errors.
#include <catch2/catch.hpp>

#include "difftrain/nn/gradcheck.hpp"
#include "difftrain/nn/upsample.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::nn;

TEMPLATE_TEST_CASE("upsample_nearest2d doubles every pixel", "[nn][upsample]", float, double) {
  Tensor4<TestType> x = {{{{1, 2, 3}, {4, 5, 6}}}};  // [1,1,2,3]
  auto y = upsample_nearest2d_forward(x);
  REQUIRE(y.shape() == std::array<std::size_t, 4>{1, 1, 4, 6});
  std::vector<double> expected = {1, 1, 2, 2, 3, 3, 1, 1, 2, 2, 3, 3,
                                  4, 4, 5, 5, 6, 6, 4, 4, 5, 5, 6, 6};
  REQUIRE_CLOSE(y, expected, 0, 0);
  // Backward sums each 2×2 block.
  Tensor4<TestType> dy(y.shape());
  for (std::size_t i = 0; i < dy.size(); ++i) dy.data()[i] = TestType(i);
  auto dx = upsample_nearest2d_backward(dy);
  REQUIRE(dx.shape() == x.shape());
  // block (0,0): 0+1+6+7, (0,1): 2+3+8+9, (0,2): 4+5+10+11, row 1: +24 to each block sum
  std::vector<double> expected_dx = {14, 22, 30, 62, 70, 78};
  REQUIRE_CLOSE(dx, expected_dx, 0, 0);
}

TEST_CASE("upsample_nearest2d to an explicit size picks floor(i * in / out)", "[nn][upsample]") {
  // 5 → 9 (an odd skip connection in the UNet): source rows 0,0,1,1,2,2,3,3,4 (hand-computed
  // floor(i·5/9)); 2 → 3 columns: floor(i·2/3) = 0,0,1.
  Tensor4<double> x({1, 1, 5, 2});
  for (std::size_t i = 0; i < 10; ++i) x.data()[i] = static_cast<double>(i);
  auto y = upsample_nearest2d_forward(x, 9, 3);
  const std::size_t rows[9] = {0, 0, 1, 1, 2, 2, 3, 3, 4};
  const std::size_t cols[3] = {0, 0, 1};
  for (std::size_t i = 0; i < 9; ++i)
    for (std::size_t j = 0; j < 3; ++j) {
      INFO("i=" << i << " j=" << j);
      REQUIRE(y(0, 0, i, j) == x(0, 0, rows[i], cols[j]));
    }
  REQUIRE(nearest_source_index(7, 4, 8) == 3);
  REQUIRE(nearest_source_index(3, 4, 4) == 3);
  REQUIRE(nearest_source_index(2, 5, 3) == 3);  // a smaller output: floor(2·5/3)
}

TEST_CASE("upsample_nearest2d backward is the adjoint of forward and passes a gradient check",
          "[nn][upsample]") {
  struct Case {
    std::size_t h, w, out_h, out_w;
  };
  for (const Case c : {Case{3, 5, 6, 10}, Case{3, 5, 7, 11}, Case{4, 1, 9, 2}}) {
    INFO(c.h << "x" << c.w << " -> " << c.out_h << "x" << c.out_w);
    Tensor4<double> x({2, 3, c.h, c.w});
    fill_random_normal(x, RandomStream{31, c.out_h});
    Tensor4<double> w({2, 3, c.out_h, c.out_w});
    fill_random_normal(w, RandomStream{32, c.out_w});
    auto dx = upsample_nearest2d_backward(w, c.h, c.w);
    // <up(x), w> = <x, upᵀ(w)>
    const double lhs = weighted_sum(upsample_nearest2d_forward(x, c.out_h, c.out_w), w);
    const double rhs = weighted_sum(x, dx);
    REQUIRE(lhs == Approx(rhs).epsilon(1e-12));
    auto r = check_gradient(
        x, dx, [&] { return weighted_sum(upsample_nearest2d_forward(x, c.out_h, c.out_w), w); });
    INFO(r.message);
    REQUIRE(r.max_error <= 1e-6);
  }
}

TEST_CASE("upsample_nearest2d float agrees with double exactly (it only copies and adds)",
          "[nn][upsample]") {
  Tensor4<double> xd({1, 2, 3, 3});
  fill_random_normal(xd, RandomStream{33, 0});
  Tensor4<float> xf = xt::cast<float>(xd);
  auto yf = upsample_nearest2d_forward(xf);
  auto yd = upsample_nearest2d_forward(Tensor4<double>(xt::cast<double>(xf)));
  REQUIRE_CLOSE(yf, yd, 0, 0);
  // backward sums 4 floats: within a few ulp of the double sum
  REQUIRE_CLOSE(upsample_nearest2d_backward(yf),
                upsample_nearest2d_backward(Tensor4<double>(xt::cast<double>(yf))), 1e-6, 1e-7);
}

TEST_CASE("upsample_nearest2d rejects bad sizes", "[nn][upsample]") {
  Tensor4<float> x({1, 1, 2, 2}), odd({1, 1, 3, 4}), empty({1, 1, 0, 2});
  x.fill(1);
  odd.fill(1);
  REQUIRE_THROWS_WITH(upsample_nearest2d_backward(odd),
                      Catch::Contains("upsample_nearest2d_backward") &&
                          Catch::Contains("[1,1,3,4]") && Catch::Contains("even"));
  REQUIRE_THROWS_AS(upsample_nearest2d_forward(x, 0, 4), Error);
  REQUIRE_THROWS_AS(upsample_nearest2d_forward(empty), Error);
  REQUIRE_THROWS_AS(upsample_nearest2d_backward(x, 0, 1), Error);
}
