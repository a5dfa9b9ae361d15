// Sinusoidal timestep embedding (diffusers get_timestep_embedding): t = 0 gives sin 0 / cos 1,
// hand-computed frequencies at known t, [sin, cos] vs flipped order, odd dims, frequency shift,
// double-precision arguments at t = 999, errors. TimestepEmbedding (linear_1 → SiLU → linear_2):
// gradient checks, names, frozen parameters, float vs double.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "difftrain/nn/gradcheck.hpp"
#include "difftrain/nn/timestep_embedding.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::nn;

TEMPLATE_TEST_CASE("timestep embedding at t = 0 is sin 0 and cos 1", "[nn][timestep]", float,
                   double) {
  const std::vector<std::int64_t> t = {0, 0};
  for (bool flip : {false, true}) {
    auto emb = get_timestep_embedding<TestType>(t, 10, flip, 1.0);
    REQUIRE(emb.shape() == std::array<std::size_t, 2>{2, 10});
    for (std::size_t b = 0; b < 2; ++b)
      for (std::size_t k = 0; k < 5; ++k) {
        REQUIRE(emb(b, (flip ? 5 : 0) + k) == TestType(0));  // sin
        REQUIRE(emb(b, (flip ? 0 : 5) + k) == TestType(1));  // cos
      }
  }
}

TEST_CASE("timestep embedding matches hand-computed frequencies", "[nn][timestep]") {
  // dim 8, shift 0: f_k = 10000^(−k/4) = 1, 0.1, 0.01, 0.001; at t = 10 the angles are
  // 10, 1, 0.1, 0.01. Values of sin/cos from a table (not from std::sin).
  const std::vector<double> t = {10.0};
  auto emb = get_timestep_embedding<double>(t, 8, false, 0.0);
  const std::vector<double> expected = {
      -0.5440211108893698, 0.8414709848078965, 0.09983341664682815, 0.009999833334166664,
      -0.8390715290764524, 0.5403023058681398, 0.9950041652780258,  0.9999500004166653};
  REQUIRE_CLOSE(emb, expected, 1e-14, 1e-15);
  // flip_sin_to_cos swaps the halves
  auto flipped = get_timestep_embedding<double>(t, 8, true, 0.0);
  for (std::size_t k = 0; k < 4; ++k) {
    REQUIRE(flipped(0, k) == emb(0, 4 + k));
    REQUIRE(flipped(0, 4 + k) == emb(0, k));
  }
  // scale multiplies the angle: scale 2 at t = 5 equals t = 10
  const std::vector<double> five = {5.0};
  REQUIRE_CLOSE(get_timestep_embedding<double>(five, 8, false, 0.0, 2.0), emb, 1e-14, 1e-15);
}

TEST_CASE("timestep embedding of the SD1.x UNet (dim 320, [cos, sin], shift 0)", "[nn][timestep]") {
  // half = 160, f_k = exp(−ln(10000)·k/160); f_80 = 10000^(−1/2) = 0.01, so t = 500 gives the
  // angle 5 at k = 80: emb[80] = cos 5, emb[240] = sin 5.
  Timesteps time_proj{TimestepsConfig{320, true, 0.0, 1.0}};
  const std::vector<std::int64_t> t = {500, 999};
  auto emb = time_proj.forward<float>(t);
  REQUIRE(emb.shape() == std::array<std::size_t, 2>{2, 320});
  REQUIRE(emb(0, 80) == Approx(0.28366218546322625).margin(1e-7));   // cos 5
  REQUIRE(emb(0, 240) == Approx(-0.9589242746631385).margin(1e-7));  // sin 5
  REQUIRE(emb(0, 0) == Approx(std::cos(500.0)).margin(1e-7));        // f_0 = 1
  // Every (cos, sin) pair lies on the unit circle.
  for (std::size_t b = 0; b < 2; ++b)
    for (std::size_t k = 0; k < 160; ++k) {
      const double c = emb(b, k), s = emb(b, 160 + k);
      REQUIRE(c * c + s * s == Approx(1.0).margin(1e-6));
    }
}

TEST_CASE("timestep embedding is computed in double and rounded once", "[nn][timestep]") {
  // At t = 999 the float result is exactly the float rounding of the double one: the argument
  // t·f_k is not formed in float (one float ulp at 999 is 6e-5).
  const std::vector<std::int64_t> t = {999, 1, 123};
  auto ef = get_timestep_embedding<float>(t, 320, true, 0.0);
  auto ed = get_timestep_embedding<double>(t, 320, true, 0.0);
  for (std::size_t i = 0; i < ef.size(); ++i) REQUIRE(ef.data()[i] == float(ed.data()[i]));
  // and the double result is accurate: sin/cos of the angle 999 · f_k formed in long double
  for (std::size_t k : {0, 1, 37, 159}) {
    const long double f = std::exp(-std::log(10000.0L) * k / 160.0L);
    REQUIRE(ed(0, k) == Approx(double(std::cos(999.0L * f))).margin(1e-12));
    REQUIRE(ed(0, 160 + k) == Approx(double(std::sin(999.0L * f))).margin(1e-12));
  }
}

TEST_CASE("timestep embedding shift, odd dims, float timesteps and errors", "[nn][timestep]") {
  // downscale_freq_shift 1 (diffusers' default): f_k = 10000^(−k/(half − 1)); dim 7 → half 3,
  // f = 1, 0.01, 0.0001; the 7th column is zero padding.
  const std::vector<float> t = {2.5f};
  auto emb = get_timestep_embedding<double>(t, 7);
  const std::vector<double> expected = {std::sin(2.5),
                                        std::sin(0.025),
                                        std::sin(0.00025),
                                        std::cos(2.5),
                                        std::cos(0.025),
                                        std::cos(0.00025),
                                        0.0};
  REQUIRE_CLOSE(emb, expected, 1e-13, 1e-16);
  auto one = get_timestep_embedding<double>(t, 1);  // half 0: only the padding
  REQUIRE(one.shape() == std::array<std::size_t, 2>{1, 1});
  REQUIRE(one(0, 0) == 0.0);

  REQUIRE_THROWS_WITH(get_timestep_embedding<float>(t, 0), Catch::Contains("embedding_dim is 0"));
  REQUIRE_THROWS_WITH(get_timestep_embedding<float>(t, 2, false, 1.0),
                      Catch::Contains("downscale_freq_shift is 1"));
  const std::vector<double> bad = {1.0, std::nan("")};
  REQUIRE_THROWS_WITH(get_timestep_embedding<float>(bad, 4), Catch::Contains("timestep 1 is nan"));
}

namespace {
template <class T>
void randomize(TimestepEmbedding<T>& te, std::uint64_t seed) {
  std::uint64_t stream = 0;
  te.for_each_parameter("", [&](const std::string&, Parameter<T>& p) {
    fill_random_normal(p.value, RandomStream{seed, stream++}, 0.5);
  });
}
}  // namespace

static_assert(Module<TimestepEmbedding<float>>);

TEST_CASE("TimestepEmbedding computes linear_2(silu(linear_1(x))) by hand", "[nn][timestep]") {
  TimestepEmbedding<double> te(TimestepEmbeddingConfig{2, 2, 1});
  te.linear_1.weight.value = {{1, 0}, {0.5, -1}};
  te.linear_1.bias.value = {0, 1};
  te.linear_2.weight.value = {{2, -3}};
  te.linear_2.bias.value = {0.25};
  Tensor<double, 2> x = {{1, 2}};
  // h = [1, 0.5 − 2 + 1] = [1, −0.5]; y = 2·silu(1) − 3·silu(−0.5) + 0.25
  const double silu1 = 1 / (1 + std::exp(-1.0)), silu_m = -0.5 / (1 + std::exp(0.5));
  auto y = te.forward(x);
  REQUIRE(y.shape() == std::array<std::size_t, 2>{1, 1});
  REQUIRE(y(0, 0) == Approx(2 * silu1 - 3 * silu_m + 0.25).epsilon(1e-14));
}

TEST_CASE("TimestepEmbedding gradients pass central-difference checks", "[nn][timestep]") {
  for (std::size_t out_dim : {0, 5}) {
    TimestepEmbedding<double> te(TimestepEmbeddingConfig{6, 7, out_dim});
    randomize(te, 91 + out_dim);
    const std::vector<std::int64_t> t = {3, 250, 999};
    Tensor<double, 2> x = get_timestep_embedding<double>(t, 6, true, 0.0);
    auto y = te.forward(x);
    REQUIRE(y.shape() == std::array<std::size_t, 2>{3, out_dim ? out_dim : 7});
    Tensor<double, 2> w(y.shape());
    fill_random_normal(w, RandomStream{92, out_dim});
    auto dx = te.backward(w);
    auto loss = [&] { return weighted_sum(te.forward_inference(x), w); };
    auto rx = check_gradient(x, dx, loss);
    INFO(rx.message);
    REQUIRE(rx.max_error <= 1e-6);
    te.for_each_parameter("time_embedding", [&](const std::string& name, Parameter<double>& p) {
      auto r = check_gradient(p, loss);
      INFO(name << ": " << r.message);
      REQUIRE(r.max_error <= 1e-6);
    });
    REQUIRE(te.backward(w, false).size() == 0);  // no input gradient requested
  }
}

TEST_CASE("TimestepEmbedding names, frozen parameters, float vs double and errors",
          "[nn][timestep]") {
  TimestepEmbedding<double> te(TimestepEmbeddingConfig{4, 8});
  randomize(te, 93);
  std::vector<std::string> names;
  std::vector<std::vector<std::size_t>> shapes;
  te.for_each_parameter("time_embedding", [&](const std::string& n, Parameter<double>& p) {
    names.push_back(n);
    shapes.emplace_back(p.value.shape().begin(), p.value.shape().end());
  });
  REQUIRE(names == std::vector<std::string>{
                       "time_embedding.linear_1.weight", "time_embedding.linear_1.bias",
                       "time_embedding.linear_2.weight", "time_embedding.linear_2.bias"});
  using S = std::vector<std::size_t>;
  REQUIRE(shapes == std::vector<S>{S{8, 4}, S{8}, S{8, 8}, S{8}});

  te.linear_1.weight.set_trainable(false);
  Tensor<double, 2> x({2, 4}), w({2, 8});
  fill_random_normal(x, RandomStream{94, 0});
  fill_random_normal(w, RandomStream{94, 1});
  te.forward(x);
  auto dx = te.backward(w);
  REQUIRE(te.linear_1.weight.grad.size() == 0);
  auto r =
      check_gradient(te.linear_1.bias, [&] { return weighted_sum(te.forward_inference(x), w); });
  INFO(r.message);
  REQUIRE(r.max_error <= 1e-6);

  // float vs double: two small GEMMs and a SiLU, relative 1e-5 of the largest magnitude
  TimestepEmbedding<float> tf(TimestepEmbeddingConfig{4, 8});
  std::map<std::string, xt::xarray<float>> state;
  for (auto& [name, value] : state_dict<double>(te)) state[name] = xt::cast<float>(value);
  load_state_dict<float>(tf, state);
  Tensor<float, 2> xf = xt::cast<float>(x);
  auto yd = te.forward_inference(x);
  auto yf = tf.forward_inference(xf);
  REQUIRE_CLOSE(yf, yd, 1e-5, 1e-5 * xt::amax(xt::abs(yd))());

  Tensor<double, 2> bad({2, 5});
  REQUIRE_THROWS_WITH(te.forward(bad), Catch::Contains("TimestepEmbedding::forward: sample has "
                                                       "shape [2,5], expected [2,4]"));
}
