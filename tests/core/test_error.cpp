#include <catch2/catch.hpp>
#include <string>

#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"

using namespace difftrain;

TEST_CASE("check_shape names function, argument, actual and expected shapes") {
  Tensor4<float> noise = xt::zeros<float>({2, 4, 8, 9});
  REQUIRE_THROWS_WITH(check_shape("add_noise", "noise", noise.shape(), {2, 4, 8, 8}),
                      "add_noise: noise has shape [2,4,8,9], expected [2,4,8,8]");
  REQUIRE_NOTHROW(check_shape("add_noise", "noise", noise.shape(), {2, 4, 8, 9}));
  REQUIRE_THROWS_AS(check_shape("f", "x", noise.shape(), {2, 4, 8}), Error);
}

TEST_CASE("Error is a std::runtime_error and require formats its parts") {
  try {
    require(false, "ddpm", "gamma is ", -1.5, ", expected > 0");
    FAIL("require did not throw");
  } catch (const std::runtime_error& e) {
    REQUIRE(std::string(e.what()) == "ddpm: gamma is -1.5, expected > 0");
  }
}
