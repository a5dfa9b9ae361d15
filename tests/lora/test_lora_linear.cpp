// LoraLinear: scale, inits, B = 0 equals the base, the forward formula, gradient checks in double
// (with dropout and rank dropout), frozen base, merge/unmerge, rank and module dropout
// determinism and expectation, multiplier, strict loading, float vs double.
#include <catch2/catch.hpp>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "difftrain/lora/lora_linear.hpp"
#include "difftrain/nn/gradcheck.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::lora;
using nn::check_gradient;
using nn::fill_random_normal;
using nn::weighted_sum;

namespace {
nn::Linear<double> random_linear(std::size_t in, std::size_t out, std::uint64_t seed,
                                 bool bias = true) {
  nn::Linear<double> lin(in, out, bias);
  fill_random_normal(lin.weight.value, RandomStream{seed, 0}, 0.5);
  if (bias) fill_random_normal(lin.bias.value, RandomStream{seed, 1});
  return lin;
}
// A LoraLinear with a non-zero B so that every gradient is exercised.
LoraLinear<double> random_lora(std::size_t in, std::size_t out, LoraConfig config,
                               std::uint64_t seed) {
  LoraLinear<double> l(random_linear(in, out, seed), config, RandomStream{seed, 9});
  fill_random_normal(l.lora_B.weight.value, RandomStream{seed, 2});
  return l;
}
}  // namespace

TEST_CASE("LoRA scale is alpha/r, alpha/sqrt(r) with rslora, 1 without alpha", "[lora]") {
  REQUIRE(LoraConfig{.rank = 4, .alpha = 8}.scale() == 2.0);
  REQUIRE(LoraConfig{.rank = 4, .alpha = 8, .use_rslora = true}.scale() == 4.0);
  REQUIRE(LoraConfig{.rank = 16}.scale() == 1.0);
  REQUIRE_THROWS_WITH(LoraLinear<float>(nn::Linear<float>(3, 2), LoraConfig{.rank = 0}, {}),
                      "LoraLinear: rank must be positive");
  REQUIRE_THROWS_AS(LoraLinear<float>(nn::Linear<float>(3, 2), LoraConfig{.rank_dropout = 1}, {}),
                    Error);
}

TEST_CASE("LoRA inits: kaiming-uniform and gaussian A, zero B, deterministic", "[lora]") {
  const std::size_t in = 256, r = 16;
  LoraLinear<double> k(nn::Linear<double>(in, 8), LoraConfig{.rank = r}, RandomStream{1, 2});
  const auto& a = k.lora_A.weight.value;
  REQUIRE(a.shape() == std::vector<std::size_t>{r, in});
  REQUIRE(k.lora_B.weight.value.shape() == std::vector<std::size_t>{8, r});
  REQUIRE(xt::amax(xt::abs(k.lora_B.weight.value))() == 0.0);
  const double bound = 1 / std::sqrt(256.0), n = static_cast<double>(a.size());
  REQUIRE(xt::amax(xt::abs(a))() <= bound);
  // U(-b, b): mean 0 (sd b/√(3n)), variance b²/3 (sd of the estimate ≈ b²·0.3/√n)
  REQUIRE(std::abs(xt::mean(a)()) < 5 * bound / std::sqrt(3 * n));
  REQUIRE(std::abs(xt::mean(a * a)() - bound * bound / 3) < 5 * 0.3 * bound * bound / std::sqrt(n));

  LoraLinear<double> g(nn::Linear<double>(in, 8), LoraConfig{.rank = r, .init = LoraInit::gaussian},
                       RandomStream{1, 2});
  const auto& ga = g.lora_A.weight.value;
  const double var = 1.0 / (r * r);  // N(0, 1/r²): variance of the variance estimate 2var²/n
  REQUIRE(std::abs(xt::mean(ga * ga)() - var) < 5 * var * std::sqrt(2 / n));

  LoraLinear<double> same(nn::Linear<double>(in, 8), LoraConfig{.rank = r}, RandomStream{1, 2});
  REQUIRE((same.lora_A.weight.value == a));
  LoraLinear<double> other(nn::Linear<double>(in, 8), LoraConfig{.rank = r}, RandomStream{1, 3});
  REQUIRE((other.lora_A.weight.value != a));
}

TEST_CASE("LoraLinear with B = 0 equals the base; names and trainable flags", "[lora]") {
  auto base = random_linear(6, 5, 3);
  for (auto init : {LoraInit::kaiming_uniform, LoraInit::gaussian}) {
    LoraLinear<double> l(base, LoraConfig{.rank = 3, .alpha = 6, .init = init}, RandomStream{3, 1});
    Tensor<double, 3> x({2, 4, 6});
    fill_random_normal(x, RandomStream{3, 5});
    REQUIRE_CLOSE(l.forward(x), base.forward_inference(x), 0, 0);
    REQUIRE_CLOSE(l.forward_inference(x), base.forward_inference(x), 0, 0);
  }
  LoraLinear<double> l(base, LoraConfig{.rank = 3}, RandomStream{3, 1});
  std::vector<std::string> names;
  std::vector<bool> trainable;
  l.for_each_parameter("attn1.to_q", [&](const std::string& n, nn::Parameter<double>& p) {
    names.push_back(n);
    trainable.push_back(p.trainable);
  });
  REQUIRE(names == std::vector<std::string>{"attn1.to_q.weight", "attn1.to_q.bias",
                                            "attn1.to_q.lora_A.weight",
                                            "attn1.to_q.lora_B.weight"});
  REQUIRE(trainable == std::vector<bool>{false, false, true, true});
  REQUIRE(l.base.weight.grad.size() == 0);
}

TEST_CASE("LoraLinear forward is W x + b + m·s·B A x", "[lora]") {
  auto l = random_lora(5, 3, LoraConfig{.rank = 2, .alpha = 3, .multiplier = 0.7}, 4);
  Tensor<double, 2> x({4, 5});
  fill_random_normal(x, RandomStream{4, 5});
  const double c = 0.7 * 3 / 2;
  Tensor<double, 2> expected = xt::zeros<double>({4, 3});
  const auto &W = l.base.weight.value, &A = l.lora_A.weight.value, &B = l.lora_B.weight.value;
  for (std::size_t n = 0; n < 4; ++n)
    for (std::size_t o = 0; o < 3; ++o) {
      double v = l.base.bias.value(o);
      for (std::size_t i = 0; i < 5; ++i) {
        v += W(o, i) * x(n, i);
        for (std::size_t j = 0; j < 2; ++j) v += c * B(o, j) * A(j, i) * x(n, i);
      }
      expected(n, o) = v;
    }
  REQUIRE_CLOSE(l.forward(x), expected, 1e-13, 1e-13);
  REQUIRE_CLOSE(l.forward_inference(x), expected, 1e-13, 1e-13);
  // multiplier 0 switches the adapter off
  l.set_multiplier(0);
  REQUIRE_CLOSE(l.forward(x), l.base.forward_inference(x), 0, 0);
}

TEST_CASE("LoraLinear gradients pass central-difference checks", "[lora]") {
  struct Case {
    const char* name;
    LoraConfig config;
    bool train_base;
  };
  const std::vector<Case> cases = {
      {"plain", LoraConfig{.rank = 3, .alpha = 5}, false},
      {"rslora, base unfrozen", LoraConfig{.rank = 2, .alpha = 2, .use_rslora = true}, true},
      {"dropout + rank dropout", LoraConfig{.rank = 4, .dropout = 0.3, .rank_dropout = 0.4}, false},
      {"network dropout + rank dropout",
       LoraConfig{.rank = 4, .network_dropout = 0.3, .rank_dropout = 0.2}, false},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    auto l = random_lora(5, 4, c.config, 6);
    if (c.train_base) nn::set_trainable<double>(l.base, true);
    l.set_step(17);
    Tensor<double, 3> x({3, 2, 5}), w({3, 2, 4});
    fill_random_normal(x, RandomStream{6, 5});
    fill_random_normal(w, RandomStream{6, 6});
    l.forward(x);
    auto dx = l.backward(w);
    // the training forward of the same step replays the same masks
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
    if (c.train_base) {
      auto rw = check_gradient(l.base.weight, loss);
      INFO("dW: " << rw.message);
      REQUIRE(rw.max_error <= 1e-6);
    } else {
      REQUIRE(l.base.weight.grad.size() == 0);
      REQUIRE(l.base.bias.grad.size() == 0);
    }
  }
}

TEST_CASE("LoraLinear merged forward equals unmerged; unmerge restores W", "[lora]") {
  auto l = random_lora(7, 6, LoraConfig{.rank = 3, .alpha = 4, .multiplier = 1.3}, 8);
  Tensor<double, 2> x({5, 7});
  fill_random_normal(x, RandomStream{8, 5});
  const auto unmerged = l.forward_inference(x);
  const xt::xarray<double> w0 = l.base.weight.value;
  const auto delta = l.delta_weight();
  l.merge();
  REQUIRE(l.merged());
  REQUIRE_CLOSE(l.base.weight.value, xt::xarray<double>(w0 + delta), 1e-14, 1e-14);
  REQUIRE_CLOSE(l.forward_inference(x), unmerged, 1e-12, 1e-12);
  REQUIRE_CLOSE(l.forward(x), unmerged, 1e-12, 1e-12);
  REQUIRE_THROWS_WITH(l.merge(), "LoraLinear: merge: already merged");
  REQUIRE_THROWS_WITH(l.set_multiplier(2), Catch::Contains("unmerge first"));
  REQUIRE_THROWS_WITH(l.backward(Tensor<double, 2>(xt::zeros<double>({5, 6}))),
                      Catch::Contains("backward through a merged adapter"));
  l.unmerge();
  REQUIRE_CLOSE(l.base.weight.value, w0, 1e-14, 1e-14);
  REQUIRE_CLOSE(l.forward(x), unmerged, 1e-12, 1e-12);
  REQUIRE_THROWS_WITH(l.unmerge(), "LoraLinear: unmerge: not merged");
  l.clear_saved();
  REQUIRE_THROWS_WITH(l.backward(Tensor<double, 2>(xt::zeros<double>({5, 6}))),
                      Catch::Contains("call forward first"));
}

TEST_CASE("Rank dropout: mask [B, r] broadcast over tokens, deterministic per step", "[lora]") {
  // A = B = identity (r = in = out), zero base: the adapter output is m[b, j]·x[b, l, j].
  const std::size_t d = 6;
  const double p = 0.5;
  LoraLinear<double> l(nn::Linear<double>(d, d, false), LoraConfig{.rank = d, .rank_dropout = p},
                       RandomStream{5, 5});
  l.lora_A.weight.value = xt::eye<double>(d);
  l.lora_B.weight.value = xt::eye<double>(d);
  Tensor<double, 3> x = xt::ones<double>({std::size_t{3}, std::size_t{4}, d});
  l.set_step(2);
  auto y = l.forward(x);
  std::size_t dropped = 0;
  for (std::size_t b = 0; b < 3; ++b)
    for (std::size_t j = 0; j < d; ++j) {
      const double m = y(b, 0, j);
      REQUIRE((m == 0.0 || m == 1 / (1 - p)));
      dropped += m == 0.0;
      for (std::size_t t = 1; t < 4; ++t) REQUIRE(y(b, t, j) == m);  // same for every token
    }
  REQUIRE(dropped > 0);
  REQUIRE(dropped < 3 * d);
  REQUIRE((l.forward(x) == y));  // same step, same mask
  l.set_step(3);
  REQUIRE((l.forward(x) != y));
  l.training = false;  // eval: no rank dropout
  REQUIRE((l.forward(x) == x));
}

TEST_CASE("Network dropout (kohya): elementwise on A·x, fresh for every step", "[lora]") {
  // A = B = identity (r = in = out), zero base: the adapter output is m[b, l, j]·x[b, l, j].
  const std::size_t d = 6;
  const double p = 0.4;
  LoraLinear<double> l(nn::Linear<double>(d, d, false), LoraConfig{.rank = d, .network_dropout = p},
                       RandomStream{5, 6});
  l.lora_A.weight.value = xt::eye<double>(d);
  l.lora_B.weight.value = xt::eye<double>(d);
  Tensor<double, 3> x = xt::ones<double>({std::size_t{3}, std::size_t{4}, d});
  l.set_step(2);
  auto y = l.forward(x);
  std::size_t dropped = 0, token_differs = 0;
  for (std::size_t i = 0; i < y.size(); ++i) {
    const double m = y.data()[i];
    REQUIRE((m == 0.0 || m == Approx(1 / (1 - p)).epsilon(1e-15)));
    dropped += m == 0.0;
  }
  for (std::size_t b = 0; b < 3; ++b)
    for (std::size_t j = 0; j < d; ++j) token_differs += y(b, 0, j) != y(b, 1, j);
  const double rate = double(dropped) / double(y.size());
  CHECK(rate > 0.15);
  CHECK(rate < 0.65);
  CHECK(token_differs > 0);      // elementwise, not one mask per rank
  REQUIRE((l.forward(x) == y));  // same step, same mask
  l.set_step(3);
  REQUIRE((l.forward(x) != y));
  l.training = false;
  REQUIRE((l.forward(x) == x));
  REQUIRE_THROWS_AS(
      LoraLinear<float>(nn::Linear<float>(3, 2), LoraConfig{.network_dropout = 1}, {}), Error);
}

TEST_CASE("Rank dropout and input dropout preserve the expectation", "[lora]") {
  auto l = random_lora(
      4, 3, LoraConfig{.rank = 3, .dropout = 0.2, .network_dropout = 0.1, .rank_dropout = 0.3}, 12);
  nn::set_trainable<double>(l.base, false);
  Tensor<double, 2> x({2, 4});
  fill_random_normal(x, RandomStream{12, 5});
  const auto base_y = l.base.forward_inference(x);
  const Tensor<double, 2> expected = l.forward_inference(x) - base_y;  // no dropout
  const std::size_t steps = 4000;
  xt::xarray<double> sum = xt::zeros<double>({2, 3}), squares = xt::zeros<double>({2, 3});
  for (std::size_t s = 0; s < steps; ++s) {
    l.set_step(s);
    const xt::xarray<double> z = l.forward(x) - base_y;
    sum += z;
    squares += z * z;
  }
  const xt::xarray<double> mean = sum / double(steps);
  const xt::xarray<double> sd = xt::sqrt(squares / double(steps) - mean * mean);
  for (std::size_t i = 0; i < mean.size(); ++i) {
    INFO("element " << i << ": mean " << mean.data()[i] << ", expected " << expected.data()[i]);
    REQUIRE(std::abs(mean.data()[i] - expected.data()[i]) <=
            5 * sd.data()[i] / std::sqrt(double(steps)) + 1e-12);
  }
}

TEST_CASE("Module dropout skips the whole adapter with probability p in training", "[lora]") {
  auto l = random_lora(4, 3, LoraConfig{.rank = 2, .module_dropout = 0.5}, 13);
  Tensor<double, 2> x({2, 4}), w({2, 3});
  fill_random_normal(x, RandomStream{13, 5});
  fill_random_normal(w, RandomStream{13, 6});
  const auto base_y = l.base.forward_inference(x);
  const auto full_y = l.forward_inference(x);
  std::size_t skipped = 0;
  const std::size_t steps = 2000;
  for (std::size_t s = 0; s < steps; ++s) {
    l.set_step(s);
    const bool skip = l.module_dropped();
    REQUIRE(skip == l.module_dropped());  // deterministic per step
    auto y = l.forward(x);
    REQUIRE_CLOSE(y, skip ? base_y : full_y, 1e-13, 1e-13);
    skipped += skip;
    if (s < 20) {  // a skipped step gives the adapters no gradient
      nn::zero_grad<double>(l);
      l.backward(w);
      REQUIRE((xt::amax(xt::abs(l.lora_B.weight.grad))() == 0.0) == skip);
    }
  }
  const double rate = double(skipped) / steps, sigma = std::sqrt(0.25 / steps);
  REQUIRE(std::abs(rate - 0.5) < 5 * sigma);
  l.training = false;
  for (std::size_t s = 0; s < 10; ++s) {
    l.set_step(s);
    REQUIRE_CLOSE(l.forward(x), full_y, 1e-13, 1e-13);
  }
}

TEST_CASE("LoraLinear strict loading names missing, unexpected and misshapen keys", "[lora]") {
  LoraLinear<float> l(nn::Linear<float>(3, 2), LoraConfig{.rank = 2}, RandomStream{1, 1});
  using Dict = std::map<std::string, xt::xarray<float>>;
  Dict good{{"weight", xt::ones<float>({2, 3})},
            {"bias", xt::ones<float>({2})},
            {"lora_A.weight", xt::ones<float>({2, 3})},
            {"lora_B.weight", xt::ones<float>({2, 2})}};
  REQUIRE_NOTHROW(nn::load_state_dict<float>(l, good));
  REQUIRE(l.lora_B.weight.value(1, 1) == 1.0f);
  Dict missing = good;
  missing.erase("lora_B.weight");
  REQUIRE_THROWS_WITH(nn::load_state_dict<float>(l, missing),
                      Catch::Contains("missing: lora_B.weight"));
  Dict unexpected = good;
  unexpected.emplace("lora_A.default.weight", xt::ones<float>({2, 3}));
  REQUIRE_THROWS_WITH(nn::load_state_dict<float>(l, unexpected),
                      Catch::Contains("unexpected: lora_A.default.weight"));
  Dict misshapen = good;
  misshapen["lora_A.weight"] = xt::ones<float>({3, 2});
  REQUIRE_THROWS_WITH(nn::load_state_dict<float>(l, misshapen),
                      Catch::Contains("lora_A.weight has shape [3,2], expected [2,3]"));
}

TEST_CASE("LoraLinear float path agrees with double within 1e-5", "[lora]") {
  auto ld = random_lora(9, 7, LoraConfig{.rank = 3, .alpha = 6, .rank_dropout = 0.25}, 14);
  LoraLinear<float> lf(nn::Linear<float>(9, 7), ld.config(), RandomStream{14, 9});
  auto copy = [](const auto& from, auto& to) { std::copy(from.begin(), from.end(), to.begin()); };
  copy(ld.base.weight.value, lf.base.weight.value);
  copy(ld.base.bias.value, lf.base.bias.value);
  copy(ld.lora_A.weight.value, lf.lora_A.weight.value);
  copy(ld.lora_B.weight.value, lf.lora_B.weight.value);
  Tensor<double, 3> xd({2, 3, 9}), wd({2, 3, 7});
  fill_random_normal(xd, RandomStream{14, 5});
  fill_random_normal(wd, RandomStream{14, 6});
  Tensor<float, 3> xf = xt::cast<float>(xd), wf = xt::cast<float>(wd);
  REQUIRE_CLOSE(lf.forward(xf), ld.forward(xd), 1e-5, 1e-5);  // same stream: same rank mask
  REQUIRE_CLOSE(lf.backward(wf), ld.backward(wd), 1e-5, 1e-5);
  REQUIRE_CLOSE(lf.lora_A.weight.grad, ld.lora_A.weight.grad, 1e-5, 1e-5);
  REQUIRE_CLOSE(lf.lora_B.weight.grad, ld.lora_B.weight.grad, 1e-5, 1e-5);
}
