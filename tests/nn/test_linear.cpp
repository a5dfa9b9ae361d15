// Linear: forward against hand-computed values, gradient checks (input, weight, bias) in double,
// frozen parameters, float vs double, shape errors, strict state loading.
#include <catch2/catch.hpp>
#include <map>
#include <string>

#include "difftrain/nn/gradcheck.hpp"
#include "difftrain/nn/linear.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::nn;

TEST_CASE("Linear forward matches hand-computed values", "[nn][linear]") {
  Linear<double> lin(3, 2);
  lin.weight.value = {{1, 2, 3}, {-1, 0, 0.5}};
  lin.bias.value = {0.25, -2};
  Tensor<double, 2> x = {{1, 1, 1}, {2, -1, 4}};
  auto y = lin.forward(x);
  // row 0: [1+2+3+0.25, -1+0+0.5-2]; row 1: [2-2+12+0.25, -2+0+2-2]
  Tensor<double, 2> expected = {{6.25, -2.5}, {12.25, -2}};
  REQUIRE(y.shape() == expected.shape());
  REQUIRE_CLOSE(y, expected, 0, 1e-15);

  Linear<double> no_bias(3, 2, false);
  no_bias.weight.value = lin.weight.value;
  int visited = 0;
  no_bias.for_each_parameter("p", [&](const std::string& name, Parameter<double>&) {
    REQUIRE(name == "p.weight");
    ++visited;
  });
  REQUIRE(visited == 1);
  Tensor<double, 2> expected_nb = {{6, -0.5}, {12, 0}};
  REQUIRE_CLOSE(no_bias.forward(x), expected_nb, 0, 1e-15);
}

TEST_CASE("Linear gradients pass central-difference checks for any leading dims", "[nn][linear]") {
  for (bool has_bias : {true, false}) {
    Linear<double> lin(5, 3, has_bias);
    fill_random_normal(lin.weight.value, RandomStream{1, 0});
    if (has_bias) fill_random_normal(lin.bias.value, RandomStream{1, 1});
    Tensor<double, 3> x({2, 3, 5});
    fill_random_normal(x, RandomStream{1, 2});
    Tensor<double, 3> w({2, 3, 3});
    fill_random_normal(w, RandomStream{1, 3});

    auto y = lin.forward(x);
    REQUIRE(y.shape() == std::array<std::size_t, 3>{2, 3, 3});
    auto dx = lin.backward(w);
    auto loss = [&] { return weighted_sum(lin.forward_inference(x), w); };
    auto rx = check_gradient(x, dx, loss);
    INFO(rx.message);
    REQUIRE(rx.max_error <= 1e-6);
    auto rw = check_gradient(lin.weight, loss);
    INFO(rw.message);
    REQUIRE(rw.max_error <= 1e-6);
    if (has_bias) {
      auto rb = check_gradient(lin.bias, loss);
      INFO(rb.message);
      REQUIRE(rb.max_error <= 1e-6);
    }

    // backward accumulates: a second identical backward doubles the parameter gradients.
    auto grad_once = xt::xarray<double>(lin.weight.grad);
    lin.backward(w);
    REQUIRE_CLOSE(lin.weight.grad, xt::xarray<double>(2.0 * grad_once), 1e-14, 1e-14);
  }
}

TEST_CASE("Linear frozen parameters get no gradient, input gradient still right", "[nn][linear]") {
  Linear<double> lin(4, 6);
  fill_random_normal(lin.weight.value, RandomStream{2, 0});
  fill_random_normal(lin.bias.value, RandomStream{2, 1});
  set_trainable<double>(lin, false);
  Tensor<double, 2> x({7, 4}), w({7, 6});
  fill_random_normal(x, RandomStream{2, 2});
  fill_random_normal(w, RandomStream{2, 3});
  lin.forward(x);
  auto dx = lin.backward(w);
  REQUIRE(lin.weight.grad.size() == 0);  // frozen: no gradient storage
  REQUIRE(lin.bias.grad.size() == 0);
  auto r = check_gradient(x, dx, [&] { return weighted_sum(lin.forward_inference(x), w); });
  INFO(r.message);
  REQUIRE(r.max_error <= 1e-6);
  // dx = w · W
  Tensor<double, 2> expected = xt::zeros<double>({7, 4});
  for (std::size_t n = 0; n < 7; ++n)
    for (std::size_t i = 0; i < 4; ++i)
      for (std::size_t o = 0; o < 6; ++o) expected(n, i) += w(n, o) * lin.weight.value(o, i);
  REQUIRE_CLOSE(dx, expected, 1e-13, 1e-13);
  // input_grad = false skips dx
  lin.forward(x);
  REQUIRE(lin.backward(w, false).size() == 0);
}

TEST_CASE("Linear float path agrees with double within 1e-5 relative", "[nn][linear]") {
  Linear<double> ld(33, 17);
  Linear<float> lf(33, 17);
  fill_random_normal(ld.weight.value, RandomStream{3, 0}, 0.2);
  fill_random_normal(ld.bias.value, RandomStream{3, 1});
  std::copy(ld.weight.value.begin(), ld.weight.value.end(), lf.weight.value.begin());
  std::copy(ld.bias.value.begin(), ld.bias.value.end(), lf.bias.value.begin());
  Tensor<double, 2> xd({9, 33}), wd({9, 17});
  fill_random_normal(xd, RandomStream{3, 2});
  fill_random_normal(wd, RandomStream{3, 3});
  Tensor<float, 2> xf = xt::cast<float>(xd), wf = xt::cast<float>(wd);
  REQUIRE_CLOSE(lf.forward(xf), ld.forward(xd), 1e-5, 1e-5);
  REQUIRE_CLOSE(lf.backward(wf), ld.backward(wd), 1e-5, 1e-5);
  REQUIRE_CLOSE(lf.weight.grad, ld.weight.grad, 1e-5, 1e-5);
  REQUIRE_CLOSE(lf.bias.grad, ld.bias.grad, 1e-5, 1e-5);
}

TEST_CASE("Linear rejects bad shapes with a named Error", "[nn][linear]") {
  Linear<float> lin(4, 2);
  Tensor<float, 2> x = xt::zeros<float>({3, 5});
  REQUIRE_THROWS_WITH(lin.forward(x), "Linear::forward: x has shape [3,5], expected last dim 4");
  REQUIRE_THROWS_AS(lin.backward(Tensor<float, 2>(xt::zeros<float>({3, 2}))), Error);
  Tensor<float, 2> ok = xt::zeros<float>({3, 4});
  lin.forward(ok);
  REQUIRE_THROWS_WITH(lin.backward(Tensor<float, 2>(xt::zeros<float>({3, 3}))),
                      "Linear::backward: dy has shape [3,3], expected [3,2]");
  REQUIRE_THROWS_AS(Linear<float>(0, 2), Error);
}

TEST_CASE("Linear strict loading names missing, unexpected and misshapen keys", "[nn][linear]") {
  Linear<float> lin(3, 2);
  using Dict = std::map<std::string, xt::xarray<float>>;
  Dict good{{"weight", xt::ones<float>({2, 3})}, {"bias", xt::ones<float>({2})}};
  REQUIRE_NOTHROW(load_state_dict<float>(lin, good));
  REQUIRE(lin.weight.value(1, 2) == 1.0f);

  Dict missing{{"weight", xt::ones<float>({2, 3})}};
  REQUIRE_THROWS_WITH(load_state_dict<float>(lin, missing), Catch::Contains("missing: bias"));
  Dict unexpected = good;
  unexpected.emplace("extra.weight", xt::ones<float>({1}));
  REQUIRE_THROWS_WITH(load_state_dict<float>(lin, unexpected),
                      Catch::Contains("unexpected: extra.weight"));
  Dict misshapen{{"weight", xt::ones<float>({3, 2})}, {"bias", xt::ones<float>({2})}};
  REQUIRE_THROWS_WITH(load_state_dict<float>(lin, misshapen),
                      Catch::Contains("weight has shape [3,2], expected [2,3]"));
}
