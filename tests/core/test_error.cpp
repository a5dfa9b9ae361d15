#include <catch2/catch.hpp>
#include <cstddef>
#include <limits>
#include <string>
#include <string_view>

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

TEST_CASE("fail throws Error(function + \": \" + parts...)") {
  try {
    difftrain::fail("load_vae", "'", std::string("a.json"), "' has ", 3, " keys, expected ", 2.5);
    FAIL("fail did not throw");
  } catch (const NonFiniteLoss&) {
    FAIL("fail threw NonFiniteLoss, expected Error");
  } catch (const Error& e) {
    REQUIRE(std::string(e.what()) == "load_vae: 'a.json' has 3 keys, expected 2.5");
  }
  REQUIRE_THROWS_AS(difftrain::fail("f"), Error);
  REQUIRE_THROWS_WITH(difftrain::fail("f"), "f: ");
  REQUIRE_THROWS_WITH(difftrain::fail(std::string_view("g"), "x"), "g: x");
  // require(false, ...) and fail(...) give the same message.
  REQUIRE_THROWS_WITH(require(false, "ddpm", "gamma is ", -1.5), "ddpm: gamma is -1.5");
  REQUIRE_THROWS_WITH(difftrain::fail("ddpm", "gamma is ", -1.5), "ddpm: gamma is -1.5");
}

TEST_CASE("message concatenates its parts as operator<< prints them") {
  REQUIRE(message() == "");
  REQUIRE(message("micro-batch ", 3, ": loss is ", 0.25) == "micro-batch 3: loss is 0.25");
  REQUIRE(message(std::string("a"), std::string_view("b"), 'c', std::size_t{7}, -2) == "abc7-2");
  try {
    throw NonFiniteLoss(message("step: loss is ", std::numeric_limits<double>::infinity()));
  } catch (const Error& e) {
    REQUIRE(std::string(e.what()) == "step: loss is inf");
  }
}
