// Conv2d: forward against hand-computed values and the naive reference, gradient checks in double
// (odd shapes, stride 2, symmetric and asymmetric padding), frozen parameters, float vs double,
// shape errors, strict state loading.
#include <catch2/catch.hpp>
#include <map>
#include <string>
#include <xtensor/xview.hpp>

#include "difftrain/nn/conv2d.hpp"
#include "difftrain/nn/gradcheck.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::nn;

namespace {
template <class T>
void randomize(Conv2d<T>& conv, std::uint64_t seed) {
  fill_random_normal(conv.weight.value, RandomStream{seed, 100}, 0.5);
  if (conv.has_bias()) fill_random_normal(conv.bias.value, RandomStream{seed, 101});
}

// Checks dx, dW, db of L = Σ w ⊙ conv(x) against central differences.
void check_conv_gradients(Conv2dConfig config, std::array<std::size_t, 4> x_shape,
                          std::uint64_t seed) {
  Conv2d<double> conv(config);
  randomize(conv, seed);
  Tensor4<double> x(x_shape);
  fill_random_normal(x, RandomStream{seed, 1});
  auto y = conv.forward(x);
  Tensor4<double> w(y.shape());
  fill_random_normal(w, RandomStream{seed, 2});
  auto dx = conv.backward(w);
  auto loss = [&] { return weighted_sum(conv.forward_inference(x), w); };
  auto rx = check_gradient(x, dx, loss);
  INFO("dx: " << rx.message);
  REQUIRE(rx.max_error <= 1e-6);
  auto rw = check_gradient(conv.weight, loss);
  INFO("dW: " << rw.message);
  REQUIRE(rw.max_error <= 1e-6);
  if (config.bias) {
    auto rb = check_gradient(conv.bias, loss);
    INFO("db: " << rb.message);
    REQUIRE(rb.max_error <= 1e-6);
  }
}
}  // namespace

TEST_CASE("Conv2d forward matches a hand-computed 3x3 case", "[nn][conv2d]") {
  // x = 1..9 on a 3x3 grid; kernel = [[0,1,0],[1,-4,1],[0,1,0]] (Laplacian), padding 1, bias 0.5.
  Conv2d<double> conv(1, 1, 3, 1, 1);
  conv.weight.value = xt::xarray<double>({{{{0, 1, 0}, {1, -4, 1}, {0, 1, 0}}}});
  conv.bias.value = {0.5};
  Tensor4<double> x = {{{{1, 2, 3}, {4, 5, 6}, {7, 8, 9}}}};
  auto y = conv.forward(x);
  // e.g. y[0,0] = 2 + 4 - 4·1 + 0.5 = 2.5; y[1,1] = 2 + 4 + 6 + 8 - 20 + 0.5 = 0.5
  Tensor4<double> expected = {{{{2.5, 1.5, -3.5}, {-2.5, 0.5, -6.5}, {-15.5, -10.5, -21.5}}}};
  REQUIRE_CLOSE(y, expected, 0, 1e-14);

  // stride 2, no padding, all-ones 2x2 kernel on a 4x5 input: sums of 2x2 blocks; Wo = 2.
  Conv2d<double> pool(1, 1, 2, 2, 0, false);
  pool.weight.value.fill(1.0);
  Tensor4<double> z =
      xt::reshape_view(xt::arange<double>(20), std::vector<std::size_t>{1, 1, 4, 5});
  auto p = pool.forward(z);
  Tensor4<double> expected_p = {
      {{{0 + 1 + 5 + 6, 2 + 3 + 7 + 8}, {10 + 11 + 15 + 16, 12 + 13 + 17 + 18}}}};
  REQUIRE_CLOSE(p, expected_p, 0, 1e-14);
}

TEST_CASE("Conv2d GEMM path equals the naive reference", "[nn][conv2d]") {
  const std::vector<Conv2dConfig> configs = {
      {3, 4, 3, 1, Padding2d::same(1), true},    {3, 5, 3, 2, Padding2d::same(1), true},
      {2, 3, 1, 1, Padding2d{}, true},           {4, 2, 3, 2, Padding2d{0, 1, 0, 1}, false},
      {3, 2, 2, 1, Padding2d{2, 0, 1, 3}, true}, {2, 2, 5, 3, Padding2d::same(2), true}};
  std::uint64_t seed = 10;
  for (const auto& config : configs) {
    Conv2d<double> conv(config);
    randomize(conv, seed);
    Tensor4<double> x({3, config.in_channels, 5, 7});
    fill_random_normal(x, RandomStream{seed++, 0});
    REQUIRE_CLOSE(conv.forward(x), reference::conv2d(x, conv), 1e-12, 1e-12);
  }
}

TEST_CASE("Conv2d output shapes follow (H + pads - k) / s + 1", "[nn][conv2d]") {
  Conv2d<float> down(Conv2dConfig{4, 4, 3, 2, Padding2d{0, 1, 0, 1}, true});  // VAE downsample
  REQUIRE(down.output_shape({2, 4, 8, 8}) == std::array<std::size_t, 4>{2, 4, 4, 4});
  REQUIRE(down.output_shape({1, 4, 7, 9}) == std::array<std::size_t, 4>{1, 4, 3, 4});
  Conv2d<float> same(4, 6, 3, 1, 1);
  REQUIRE(same.output_shape({1, 4, 5, 7}) == std::array<std::size_t, 4>{1, 6, 5, 7});
}

TEST_CASE("Conv2d gradients pass central-difference checks", "[nn][conv2d]") {
  SECTION("3 input channels, 5x7 image, stride 2, padding 1") {
    check_conv_gradients({3, 4, 3, 2, Padding2d::same(1), true}, {2, 3, 5, 7}, 20);
  }
  SECTION("3x3 stride 1 padding 1") {
    check_conv_gradients({2, 3, 3, 1, Padding2d::same(1), true}, {2, 2, 4, 5}, 21);
  }
  SECTION("1x1 conv (identity columns), no bias") {
    check_conv_gradients({3, 2, 1, 1, Padding2d{}, false}, {3, 3, 3, 4}, 22);
  }
  SECTION("asymmetric padding (0,1,0,1) then stride 2, no padding (VAE downsample)") {
    check_conv_gradients({2, 3, 3, 2, Padding2d{0, 1, 0, 1}, true}, {2, 2, 6, 5}, 23);
  }
  SECTION("kernel larger than stride with uneven padding") {
    check_conv_gradients({1, 2, 2, 3, Padding2d{2, 0, 1, 3}, true}, {1, 1, 5, 7}, 24);
  }
}

TEST_CASE("Conv2d backward accumulates and frozen parameters get no gradient", "[nn][conv2d]") {
  Conv2d<double> conv(2, 3, 3, 1, 1);
  randomize(conv, 30);
  Tensor4<double> x({2, 2, 4, 4}), w({2, 3, 4, 4});
  fill_random_normal(x, RandomStream{30, 1});
  fill_random_normal(w, RandomStream{30, 2});
  conv.forward(x);
  auto dx_trainable = conv.backward(w);
  xt::xarray<double> once = conv.weight.grad;
  conv.backward(w);
  REQUIRE_CLOSE(conv.weight.grad, xt::xarray<double>(2.0 * once), 1e-14, 1e-14);

  set_trainable<double>(conv, false);
  REQUIRE(conv.weight.grad.size() == 0);
  auto dx = conv.backward(w);
  REQUIRE(conv.weight.grad.size() == 0);
  REQUIRE(conv.bias.grad.size() == 0);
  REQUIRE_CLOSE(dx, dx_trainable, 1e-14, 1e-14);
  auto r = check_gradient(x, dx, [&] { return weighted_sum(conv.forward_inference(x), w); });
  INFO(r.message);
  REQUIRE(r.max_error <= 1e-6);
  REQUIRE(conv.backward(w, false).size() == 0);
}

TEST_CASE("Conv2d float path agrees with double within 1e-5", "[nn][conv2d]") {
  Conv2dConfig config{5, 7, 3, 2, Padding2d::same(1), true};
  Conv2d<double> cd(config);
  Conv2d<float> cf(config);
  randomize(cd, 40);
  std::copy(cd.weight.value.begin(), cd.weight.value.end(), cf.weight.value.begin());
  std::copy(cd.bias.value.begin(), cd.bias.value.end(), cf.bias.value.begin());
  Tensor4<double> xd({4, 5, 9, 8});
  fill_random_normal(xd, RandomStream{40, 1});
  Tensor4<float> xf = xt::cast<float>(xd);
  auto yd = cd.forward(xd);
  REQUIRE_CLOSE(cf.forward(xf), yd, 1e-5, 1e-5);
  Tensor4<double> wd(yd.shape());
  fill_random_normal(wd, RandomStream{40, 2});
  Tensor4<float> wf = xt::cast<float>(wd);
  REQUIRE_CLOSE(cf.backward(wf), cd.backward(wd), 1e-5, 1e-5);
  REQUIRE_CLOSE(cf.weight.grad, cd.weight.grad, 1e-5, 1e-5);
  REQUIRE_CLOSE(cf.bias.grad, cd.bias.grad, 1e-5, 1e-5);
}

TEST_CASE("Conv2d batch-parallel path equals per-sample results", "[nn][conv2d]") {
  // 4 samples of 16·144·256 multiply-adds each: large enough for the OpenMP batch loop (with
  // per-thread dW/db partials), while each single sample runs serially.
  Conv2d<double> conv(16, 16, 3, 1, 1);
  randomize(conv, 50);
  Tensor4<double> x({4, 16, 16, 16});
  fill_random_normal(x, RandomStream{50, 1});
  auto y = conv.forward(x);
  REQUIRE_CLOSE(y, reference::conv2d(x, conv), 1e-12, 1e-12);
  Tensor4<double> w(y.shape());
  fill_random_normal(w, RandomStream{50, 2});
  auto dx = conv.backward(w);
  const xt::xarray<double> dW = conv.weight.grad, db = conv.bias.grad;

  zero_grad<double>(conv);
  for (std::size_t b = 0; b < 4; ++b) {
    Tensor4<double> xb = xt::view(x, xt::range(b, b + 1));
    Tensor4<double> wb = xt::view(w, xt::range(b, b + 1));
    conv.forward(xb);
    Tensor4<double> dxb = conv.backward(wb);
    Tensor4<double> expected = xt::view(dx, xt::range(b, b + 1));
    REQUIRE_CLOSE(dxb, expected, 1e-12, 1e-12);
  }
  REQUIRE_CLOSE(conv.weight.grad, dW, 1e-12, 1e-12);
  REQUIRE_CLOSE(conv.bias.grad, db, 1e-12, 1e-12);
}

TEST_CASE("Conv2d rejects bad input with a named Error", "[nn][conv2d]") {
  Conv2d<float> conv(3, 4, 3);
  REQUIRE_THROWS_WITH(conv.forward(Tensor4<float>(xt::zeros<float>({1, 2, 5, 5}))),
                      "Conv2d::forward: x has shape [1,2,5,5], expected [B,3,H,W]");
  REQUIRE_THROWS_WITH(conv.forward(Tensor4<float>(xt::zeros<float>({1, 3, 2, 5}))),
                      Catch::Contains("smaller than the 3x3 kernel"));
  REQUIRE_THROWS_WITH(conv.backward(Tensor4<float>(xt::zeros<float>({1, 4, 3, 3}))),
                      Catch::Contains("call forward first"));
  conv.forward(Tensor4<float>(xt::zeros<float>({1, 3, 5, 5})));
  REQUIRE_THROWS_WITH(conv.backward(Tensor4<float>(xt::zeros<float>({1, 4, 5, 5}))),
                      "Conv2d::backward: dy has shape [1,4,5,5], expected [1,4,3,3]");
  REQUIRE_THROWS_AS(Conv2d<float>(3, 4, 0), Error);
}

TEST_CASE("Conv2d strict loading names missing, unexpected and misshapen keys", "[nn][conv2d]") {
  Conv2d<float> conv(2, 3, 3);
  using Dict = std::map<std::string, xt::xarray<float>>;
  Dict good{{"weight", xt::ones<float>({3, 2, 3, 3})}, {"bias", xt::ones<float>({3})}};
  REQUIRE_NOTHROW(load_state_dict<float>(conv, good));
  Dict missing{{"bias", xt::ones<float>({3})}};
  REQUIRE_THROWS_WITH(load_state_dict<float>(conv, missing), Catch::Contains("missing: weight"));
  Dict unexpected = good;
  unexpected.emplace("running_mean", xt::ones<float>({3}));
  REQUIRE_THROWS_WITH(load_state_dict<float>(conv, unexpected),
                      Catch::Contains("unexpected: running_mean"));
  Dict misshapen{{"weight", xt::ones<float>({3, 2, 1, 1})}, {"bias", xt::ones<float>({3})}};
  REQUIRE_THROWS_WITH(load_state_dict<float>(conv, misshapen),
                      Catch::Contains("weight has shape [3,2,1,1], expected [3,2,3,3]"));
}
