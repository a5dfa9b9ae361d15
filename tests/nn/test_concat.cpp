// Channel concatenation of NCHW tensors: hand-computed layout, backward = exact split, gradient
// check in double, shape errors.
#include <catch2/catch.hpp>

#include "difftrain/nn/concat.hpp"
#include "difftrain/nn/gradcheck.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::nn;

TEMPLATE_TEST_CASE("concat_channels puts a's channels before b's", "[nn][concat]", float, double) {
  Tensor4<TestType> a({2, 1, 1, 2}), b({2, 2, 1, 2});
  a = {{{{1, 2}}}, {{{3, 4}}}};
  b = {{{{10, 11}}, {{12, 13}}}, {{{20, 21}}, {{22, 23}}}};
  auto y = concat_channels_forward(a, b);
  REQUIRE(y.shape() == std::array<std::size_t, 4>{2, 3, 1, 2});
  std::vector<double> expected = {1, 2, 10, 11, 12, 13, 3, 4, 20, 21, 22, 23};
  REQUIRE_CLOSE(y, expected, 0, 0);
}

TEST_CASE("concat_channels backward splits dy exactly and passes a gradient check",
          "[nn][concat]") {
  Tensor4<double> a({2, 3, 5, 3}), b({2, 4, 5, 3});
  fill_random_normal(a, RandomStream{21, 0});
  fill_random_normal(b, RandomStream{21, 1});
  auto y = concat_channels_forward(a, b);
  auto [ga, gb] = concat_channels_backward(y, 3);
  REQUIRE(ga.shape() == a.shape());
  REQUIRE(gb.shape() == b.shape());
  REQUIRE_CLOSE(ga, a, 0, 0);
  REQUIRE_CLOSE(gb, b, 0, 0);

  Tensor4<double> w(y.shape());
  fill_random_normal(w, RandomStream{21, 2});
  auto [da, db] = concat_channels_backward(w, 3);
  auto loss = [&] { return weighted_sum(concat_channels_forward(a, b), w); };
  auto ra = check_gradient(a, da, loss);
  INFO(ra.message);
  REQUIRE(ra.max_error <= 1e-6);
  auto rb = check_gradient(b, db, loss);
  INFO(rb.message);
  REQUIRE(rb.max_error <= 1e-6);
}

TEST_CASE("concat_channels handles an empty part and rejects mismatched shapes", "[nn][concat]") {
  Tensor4<float> a({1, 2, 3, 3}), empty({1, 0, 3, 3});
  a.fill(1.5f);
  auto y = concat_channels_forward(a, empty);
  REQUIRE(y.shape() == a.shape());
  REQUIRE_CLOSE(y, a, 0, 0);

  Tensor4<float> wrong_h({1, 2, 4, 3}), wrong_b({2, 2, 3, 3});
  REQUIRE_THROWS_WITH(concat_channels_forward(a, wrong_h),
                      Catch::Contains("concat_channels_forward: b has shape [1,2,4,3], "
                                      "expected [1,2,3,3]"));
  REQUIRE_THROWS_AS(concat_channels_forward(a, wrong_b), Error);
  REQUIRE_THROWS_WITH(concat_channels_backward(a, 3),
                      Catch::Contains("channels_a is 3") && Catch::Contains("2 channels"));
}
