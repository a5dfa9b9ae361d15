// LayerNorm: a known vector, gradient checks in double (affine and not), frozen parameters, float
// vs double, errors.
#include <catch2/catch.hpp>
#include <cmath>

#include "difftrain/nn/gradcheck.hpp"
#include "difftrain/nn/layer_norm.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::nn;

TEST_CASE("LayerNorm of a known vector", "[nn][layer_norm]") {
  LayerNorm<double> ln(4);
  Tensor<double, 2> x = {{1, 2, 3, 4}, {-2, -2, -2, -2}};
  // row 0: mean 2.5, biased variance 1.25; row 1 is constant → 0 (then β).
  const double r = 1 / std::sqrt(1.25 + 1e-5);
  Tensor<double, 2> expected = {{-1.5 * r, -0.5 * r, 0.5 * r, 1.5 * r}, {0, 0, 0, 0}};
  REQUIRE_CLOSE(ln.forward(x), expected, 1e-14, 1e-14);
  ln.weight.value = {1, 2, 3, 4};
  ln.bias.value = {0, 1, 0, -1};
  Tensor<double, 2> affine = {{-1.5 * r, -1.0 * r + 1, 1.5 * r, 6 * r - 1}, {0, 1, 0, -1}};
  REQUIRE_CLOSE(ln.forward(x), affine, 1e-14, 1e-14);
}

TEST_CASE("LayerNorm gradients pass central-difference checks", "[nn][layer_norm]") {
  for (bool affine : {true, false}) {
    LayerNorm<double> ln(7, 1e-5, affine);
    if (affine) {
      fill_random_normal(ln.weight.value, RandomStream{3, 1});
      fill_random_normal(ln.bias.value, RandomStream{3, 2});
    }
    Tensor<double, 3> x({2, 3, 7}), w({2, 3, 7});
    fill_random_normal(x, RandomStream{3, 3}, 2.0);
    fill_random_normal(w, RandomStream{3, 4});
    ln.forward(x);
    auto dx = ln.backward(w);
    auto loss = [&] { return weighted_sum(ln.forward_inference(x), w); };
    auto rx = check_gradient(x, dx, loss);
    INFO("dx: " << rx.message);
    REQUIRE(rx.max_error <= 1e-6);
    if (affine) {
      auto rw = check_gradient(ln.weight, loss);
      INFO("dweight: " << rw.message);
      REQUIRE(rw.max_error <= 1e-6);
      auto rb = check_gradient(ln.bias, loss);
      INFO("dbias: " << rb.message);
      REQUIRE(rb.max_error <= 1e-6);
    }
  }
}

TEST_CASE("LayerNorm frozen parameters get no gradient, float agrees with double",
          "[nn][layer_norm]") {
  LayerNorm<double> ld(10);
  fill_random_normal(ld.weight.value, RandomStream{4, 1});
  fill_random_normal(ld.bias.value, RandomStream{4, 2});
  Tensor<double, 2> x({6, 10}), w({6, 10});
  fill_random_normal(x, RandomStream{4, 3});
  fill_random_normal(w, RandomStream{4, 4});
  ld.forward(x);
  auto dx_trainable = ld.backward(w);

  LayerNorm<float> lf(10);
  std::copy(ld.weight.value.begin(), ld.weight.value.end(), lf.weight.value.begin());
  std::copy(ld.bias.value.begin(), ld.bias.value.end(), lf.bias.value.begin());
  Tensor<float, 2> xf = xt::cast<float>(x), wf = xt::cast<float>(w);
  REQUIRE_CLOSE(lf.forward(xf), ld.forward_inference(x), 1e-5, 1e-5);
  REQUIRE_CLOSE(lf.backward(wf), dx_trainable, 1e-4, 1e-5);
  REQUIRE_CLOSE(lf.weight.grad, ld.weight.grad, 1e-4, 1e-5);
  REQUIRE_CLOSE(lf.bias.grad, ld.bias.grad, 1e-5, 1e-5);

  set_trainable<double>(ld, false);
  ld.forward(x);
  auto dx = ld.backward(w);
  REQUIRE(ld.weight.grad.size() == 0);
  REQUIRE_CLOSE(dx, dx_trainable, 1e-14, 1e-14);
}

TEST_CASE("LayerNorm rejects bad input", "[nn][layer_norm]") {
  LayerNorm<float> ln(4);
  REQUIRE_THROWS_WITH(ln.forward(Tensor<float, 2>(xt::zeros<float>({2, 5}))),
                      "LayerNorm::forward: x has shape [2,5], expected last dim 4");
  ln.forward(Tensor<float, 2>(xt::zeros<float>({2, 4})));
  REQUIRE_THROWS_WITH(ln.backward(Tensor<float, 2>(xt::zeros<float>({3, 4}))),
                      "LayerNorm::backward: dy has shape [3,4], expected [2,4]");
  REQUIRE_THROWS_AS(LayerNorm<float>(0), Error);
}
