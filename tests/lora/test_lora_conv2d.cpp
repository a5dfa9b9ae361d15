// LoraConv2d (kohya LoCon): shapes, B = 0 equals the base, forward equals the composition of the
// two convs, gradient checks in double (odd shapes, stride 2, asymmetric padding, dropouts),
// merged == unmerged, rank mask broadcast over pixels.
#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "difftrain/lora/lora_conv2d.hpp"
#include "difftrain/nn/gradcheck.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::lora;
using nn::check_gradient;
using nn::Conv2dConfig;
using nn::fill_random_normal;
using nn::Padding2d;
using nn::weighted_sum;

namespace {
LoraConv2d<double> random_locon(Conv2dConfig base_config, LoraConfig config, std::uint64_t seed) {
  nn::Conv2d<double> base(base_config);
  fill_random_normal(base.weight.value, RandomStream{seed, 0}, 0.5);
  if (base_config.bias) fill_random_normal(base.bias.value, RandomStream{seed, 1});
  LoraConv2d<double> l(std::move(base), config, RandomStream{seed, 9});
  fill_random_normal(l.lora_B.weight.value, RandomStream{seed, 2});
  return l;
}
}  // namespace

TEST_CASE("LoraConv2d shapes, names, B = 0 equals the base", "[lora][conv]") {
  nn::Conv2d<double> base(Conv2dConfig{3, 5, 3, 2, Padding2d::same(1), true});
  fill_random_normal(base.weight.value, RandomStream{1, 0});
  LoraConv2d<double> l(base, LoraConfig{.rank = 2}, RandomStream{1, 1});
  REQUIRE(l.lora_A.weight.value.shape() == std::vector<std::size_t>{2, 3, 3, 3});
  REQUIRE(l.lora_B.weight.value.shape() == std::vector<std::size_t>{5, 2, 1, 1});
  REQUIRE(l.lora_A.config().stride == 2);
  REQUIRE(l.lora_A.config().padding == Padding2d::same(1));
  // kaiming-uniform bound 1/√(C·k·k)
  REQUIRE(xt::amax(xt::abs(l.lora_A.weight.value))() <= 1 / std::sqrt(27.0));
  std::vector<std::string> names;
  l.for_each_parameter("proj_in",
                       [&](const std::string& n, nn::Parameter<double>&) { names.push_back(n); });
  REQUIRE(names == std::vector<std::string>{"proj_in.weight", "proj_in.bias",
                                            "proj_in.lora_A.weight", "proj_in.lora_B.weight"});
  Tensor4<double> x({2, 3, 5, 7});
  fill_random_normal(x, RandomStream{1, 2});
  REQUIRE_CLOSE(l.forward(x), base.forward_inference(x), 0, 0);
}

TEST_CASE("LoraConv2d forward is conv(x) + m·s·up(down(x))", "[lora][conv]") {
  auto l = random_locon({3, 4, 3, 2, Padding2d{0, 1, 0, 1}, true},
                        LoraConfig{.rank = 2, .alpha = 3, .multiplier = 0.5}, 2);
  Tensor4<double> x({2, 3, 6, 5});
  fill_random_normal(x, RandomStream{2, 3});
  const Tensor4<double> expected =
      l.base.forward_inference(x) +
      (0.5 * 3 / 2) * l.lora_B.forward_inference(l.lora_A.forward_inference(x));
  REQUIRE_CLOSE(l.forward(x), expected, 1e-13, 1e-13);
}

TEST_CASE("LoraConv2d gradients pass central-difference checks", "[lora][conv]") {
  struct Case {
    const char* name;
    Conv2dConfig conv;
    LoraConfig config;
  };
  const std::vector<Case> cases = {
      {"3 channels, 5x7, stride 2, padding 1",
       {3, 4, 3, 2, Padding2d::same(1), true},
       LoraConfig{.rank = 2, .alpha = 3}},
      {"1x1 with dropout and rank dropout",
       {3, 2, 1, 1, Padding2d{}, true},
       LoraConfig{.rank = 3, .dropout = 0.25, .rank_dropout = 0.5}},
      {"asymmetric padding, stride 2, rank dropout",
       {2, 3, 3, 2, Padding2d{0, 1, 0, 1}, false},
       LoraConfig{.rank = 2, .alpha = 4, .use_rslora = true, .rank_dropout = 0.3}},
      {"3x3 with network dropout (kohya, on down(x))",
       {2, 3, 3, 1, Padding2d::same(1), true},
       LoraConfig{.rank = 3, .network_dropout = 0.4, .rank_dropout = 0.2}},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    auto l = random_locon(c.conv, c.config, 3);
    l.set_step(5);
    Tensor4<double> x({2, c.conv.in_channels, 5, 7});
    fill_random_normal(x, RandomStream{3, 3});
    auto y = l.forward(x);
    Tensor4<double> w(y.shape());
    fill_random_normal(w, RandomStream{3, 4});
    auto dx = l.backward(w);
    auto loss = [&] { return weighted_sum(l.forward(x), w); };
    auto rx = check_gradient(x, dx, loss);
    INFO("dx: " << rx.message);
    REQUIRE(rx.max_error <= 1e-6);
    auto ra = check_gradient(l.lora_A.weight, loss);
    INFO("dA: " << ra.message);
    REQUIRE(ra.max_error <= 1e-6);
    auto rb = check_gradient(l.lora_B.weight, loss);
    INFO("dB: " << rb.message);
    REQUIRE(rb.max_error <= 1e-6);
    REQUIRE(l.base.weight.grad.size() == 0);
  }
}

TEST_CASE("LoraConv2d merged forward equals unmerged (reshaped B·A)", "[lora][conv]") {
  for (auto conv : {Conv2dConfig{3, 4, 3, 1, Padding2d::same(1), true},
                    Conv2dConfig{2, 3, 3, 2, Padding2d{0, 1, 0, 1}, true},
                    Conv2dConfig{4, 4, 1, 1, Padding2d{}, false}}) {
    auto l = random_locon(conv, LoraConfig{.rank = 2, .alpha = 5, .multiplier = 0.8}, 4);
    Tensor4<double> x({2, conv.in_channels, 6, 5});
    fill_random_normal(x, RandomStream{4, 3});
    const auto unmerged = l.forward_inference(x);
    const xt::xarray<double> w0 = l.base.weight.value;
    l.merge();
    REQUIRE_CLOSE(l.forward_inference(x), unmerged, 1e-12, 1e-12);
    REQUIRE_CLOSE(l.base.forward_inference(x), unmerged, 1e-12, 1e-12);
    l.unmerge();
    REQUIRE_CLOSE(l.base.weight.value, w0, 1e-14, 1e-14);
  }
}

TEST_CASE("LoraConv2d rank mask is [B, r] broadcast over pixels", "[lora][conv]") {
  // 1x1 base with zero weight, A = B = identity: adapter output = m[b, c]·x[b, c, h, w].
  const std::size_t c = 5;
  const double p = 0.5;
  LoraConv2d<double> l(nn::Conv2d<double>(c, c, 1, 1, 0, false),
                       LoraConfig{.rank = c, .rank_dropout = p}, RandomStream{6, 6});
  l.lora_A.weight.value =
      xt::reshape_view(xt::eye<double>(c), std::vector<std::size_t>{c, c, 1, 1});
  l.lora_B.weight.value = l.lora_A.weight.value;
  Tensor4<double> x = xt::ones<double>({std::size_t{2}, c, std::size_t{3}, std::size_t{4}});
  l.set_step(1);
  auto y = l.forward(x);
  std::size_t dropped = 0;
  for (std::size_t b = 0; b < 2; ++b)
    for (std::size_t j = 0; j < c; ++j) {
      const double m = y(b, j, 0, 0);
      REQUIRE((m == 0.0 || m == 1 / (1 - p)));
      dropped += m == 0.0;
      for (std::size_t i = 0; i < 12; ++i) REQUIRE(y(b, j, i / 4, i % 4) == m);
    }
  REQUIRE(dropped > 0);
  REQUIRE(dropped < 2 * c);
}
