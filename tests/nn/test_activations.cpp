// SiLU, GELU (erf and tanh), GEGLU: values at known points, gradient checks in double, float vs
// double.
#include <catch2/catch.hpp>
#include <cmath>

#include "difftrain/nn/activations.hpp"
#include "difftrain/nn/gradcheck.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::nn;

TEST_CASE("SiLU and GELU at known points", "[nn][activations]") {
  // silu(1) = 1/(1 + e^-1); silu(-2) = -2/(1 + e^2)
  REQUIRE(silu(0.0) == 0.0);
  REQUIRE(silu(1.0) == Approx(0.7310585786300049).epsilon(1e-15));
  REQUIRE(silu(-2.0) == Approx(-0.2384058440442351).epsilon(1e-15));
  // exact GELU: x·Φ(x) with the normal CDF table values Φ(1) = 0.8413447460685429,
  // Φ(2) = 0.9772498680518208, Φ(-3) = 0.0013498980316301
  REQUIRE(gelu(0.0) == 0.0);
  REQUIRE(gelu(1.0) == Approx(0.8413447460685429).epsilon(1e-15));
  REQUIRE(gelu(-1.0) == Approx(-(1 - 0.8413447460685429)).epsilon(1e-14));
  REQUIRE(gelu(2.0) == Approx(2 * 0.9772498680518208).epsilon(1e-15));
  REQUIRE(gelu(-3.0) == Approx(-3 * 0.0013498980316301).epsilon(1e-12));
  // tanh form (PyTorch approximate="tanh" gives 0.8411920 at 1)
  const auto tanh_form = GeluApproximation::tanh;
  REQUIRE(gelu(1.0, tanh_form) == Approx(0.8411919906082768).epsilon(1e-15));
  REQUIRE(gelu(-0.5, tanh_form) == Approx(-0.15428599017485606).epsilon(1e-14));
  REQUIRE(gelu(2.0, tanh_form) == Approx(1.954597694087775).epsilon(1e-15));
  // derivative closed forms: gelu'(0) = ½, silu'(0) = ½
  REQUIRE(gelu_grad(0.0) == 0.5);
  REQUIRE(gelu_grad(0.0, tanh_form) == 0.5);
  REQUIRE(silu_grad(0.0) == 0.5);
}

namespace {
template <class Module, std::size_t N>
void check_elementwise(Module& m, Tensor<double, N> x, std::uint64_t seed) {
  fill_random_normal(x, RandomStream{seed, 0}, 2.0);
  Tensor<double, N> w(x.shape());
  fill_random_normal(w, RandomStream{seed, 1});
  m.forward(x);
  auto dx = m.backward(w);
  auto r = check_gradient(x, dx, [&] { return weighted_sum(m.forward_inference(x), w); });
  INFO(r.message);
  REQUIRE(r.max_error <= 1e-6);
}
}  // namespace

TEST_CASE("SiLU and GELU gradients pass central-difference checks", "[nn][activations]") {
  SiLU<double> silu_module;
  check_elementwise(silu_module, Tensor<double, 3>({2, 3, 5}), 1);
  GELU<double> gelu_exact;
  check_elementwise(gelu_exact, Tensor4<double>({2, 3, 2, 3}), 2);
  GELU<double> gelu_tanh(GeluApproximation::tanh);
  check_elementwise(gelu_tanh, Tensor<double, 2>({7, 5}), 3);
}

TEST_CASE("GEGLU: value · gelu(gate) with the first half the value", "[nn][activations]") {
  GEGLU<double> geglu(2, 1);  // proj: 2 → 2 (value row 0, gate row 1)
  geglu.proj.weight.value = {{1, 0}, {0, 1}};
  geglu.proj.bias.value = {0, 0.5};
  Tensor<double, 2> x = {{3, 0.5}, {-1, -1.5}};
  Tensor<double, 2> expected = {{3 * gelu(1.0)}, {-1 * gelu(-1.0)}};
  REQUIRE_CLOSE(geglu.forward(x), expected, 1e-15, 1e-15);
  std::vector<std::string> names;
  geglu.for_each_parameter("ff.net.0",
                           [&](const std::string& n, Parameter<double>&) { names.push_back(n); });
  REQUIRE(names == std::vector<std::string>{"ff.net.0.proj.weight", "ff.net.0.proj.bias"});
}

TEST_CASE("GEGLU gradients pass central-difference checks", "[nn][activations]") {
  for (auto approximate : {GeluApproximation::none, GeluApproximation::tanh}) {
    GEGLU<double> geglu(GEGLUConfig{5, 3, true, approximate});
    fill_random_normal(geglu.proj.weight.value, RandomStream{9, 1});
    fill_random_normal(geglu.proj.bias.value, RandomStream{9, 2});
    Tensor<double, 3> x({2, 3, 5}), w({2, 3, 3});
    fill_random_normal(x, RandomStream{9, 3});
    fill_random_normal(w, RandomStream{9, 4});
    geglu.forward(x);
    auto dx = geglu.backward(w);
    REQUIRE(dx.shape() == x.shape());
    auto loss = [&] { return weighted_sum(geglu.forward_inference(x), w); };
    auto rx = check_gradient(x, dx, loss);
    INFO("dx: " << rx.message);
    REQUIRE(rx.max_error <= 1e-6);
    auto rw = check_gradient(geglu.proj.weight, loss);
    INFO("dW: " << rw.message);
    REQUIRE(rw.max_error <= 1e-6);
    auto rb = check_gradient(geglu.proj.bias, loss);
    INFO("db: " << rb.message);
    REQUIRE(rb.max_error <= 1e-6);
  }
}

TEST_CASE("Activations: float agrees with double within 1e-6 relative", "[nn][activations]") {
  Tensor<double, 2> x({8, 12}), w({8, 12});
  fill_random_normal(x, RandomStream{11, 0}, 3.0);
  fill_random_normal(w, RandomStream{11, 1});
  Tensor<float, 2> xf = xt::cast<float>(x), wf = xt::cast<float>(w);
  GELU<double> gd;
  GELU<float> gf;
  REQUIRE_CLOSE(gf.forward(xf), gd.forward(x), 1e-6, 1e-6);
  REQUIRE_CLOSE(gf.backward(wf), gd.backward(w), 1e-6, 1e-6);
  SiLU<double> sd;
  SiLU<float> sf;
  REQUIRE_CLOSE(sf.forward(xf), sd.forward(x), 1e-6, 1e-6);
  REQUIRE_CLOSE(sf.backward(wf), sd.backward(w), 1e-6, 1e-6);
  SiLU<float> fresh;
  REQUIRE_THROWS_WITH(fresh.backward(wf), Catch::Contains("call forward first"));
}
