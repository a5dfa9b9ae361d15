// AdamW and SGD against updates worked out by hand in double; thread-count independence;
// parameter groups (LoRA+); optimizer state round trips.
#include <omp.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "difftrain/core/random.hpp"
#include "difftrain/train/optimizer.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using difftrain::train::AdamW;
using difftrain::train::ParamGroup;
using difftrain::train::Sgd;

namespace {
nn::Parameter<float> make_param(std::vector<std::size_t> shape, std::vector<float> value,
                                std::vector<float> grad) {
  nn::Parameter<float> p(shape);
  std::copy(value.begin(), value.end(), p.value.begin());
  std::copy(grad.begin(), grad.end(), p.grad.begin());
  return p;
}

// A module with LoRA-style names (kohya and PEFT spellings) and a frozen parameter.
struct LoraLike {
  nn::Parameter<float> base{{2, 2}, false};
  nn::Parameter<float> a{{1, 2}}, b{{2, 1}}, down{{1, 2}}, up{{2, 1}}, bias{{2}};
  template <class V>
  void for_each_parameter(const std::string& prefix, V&& visit) {
    visit(nn::join_name(prefix, "to_q.base_layer.weight"), base);
    visit(nn::join_name(prefix, "to_q.lora_A.weight"), a);
    visit(nn::join_name(prefix, "to_q.lora_B.weight"), b);
    visit(nn::join_name(prefix, "lora_unet_x.lora_down.weight"), down);
    visit(nn::join_name(prefix, "lora_unet_x.lora_up.weight"), up);
    visit(nn::join_name(prefix, "to_q.bias"), bias);
  }
};
}  // namespace

TEST_CASE("AdamW: two steps equal PyTorch's update worked out in double") {
  const std::vector<float> p0 = {0.5f, -1.25f, 2.0f, 0.0f, -0.3f};
  const std::vector<float> g1 = {0.1f, -0.2f, 0.003f, 1.5f, -4.0f};
  const std::vector<float> g2 = {-0.05f, 0.4f, 0.003f, -2.0f, 1.0f};
  nn::Parameter<float> p = make_param({5}, p0, g1);
  ParamGroup group;
  group.params = {&p};
  group.names = {"w"};
  group.lr = 1e-2;
  group.weight_decay = 0.1;
  AdamW opt({group});

  // Hand computation, element by element, in double.
  const double lr = 1e-2, wd = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-8;
  std::vector<double> expected(5);
  for (std::size_t i = 0; i < 5; ++i) {
    double w = p0[i], m = 0, v = 0;
    // step 1: decay, moments, bias corrections 1 − 0.9 = 0.1 and 1 − 0.999 = 0.001
    w *= 1 - lr * wd;
    m = 0.9 * m + 0.1 * g1[i];
    v = 0.999 * v + 0.001 * double(g1[i]) * g1[i];
    w -= (lr / 0.1) * m / (std::sqrt(v) / std::sqrt(0.001) + eps);
    // step 2: bias corrections 1 − 0.81 = 0.19 and 1 − 0.998001 = 0.001999
    w *= 1 - lr * wd;
    m = b1 * m + (1 - b1) * g2[i];
    v = b2 * v + (1 - b2) * double(g2[i]) * g2[i];
    w -= (lr / 0.19) * m / (std::sqrt(v) / std::sqrt(0.001999) + eps);
    expected[i] = w;
  }
  opt.step();
  std::copy(g2.begin(), g2.end(), p.grad.begin());
  opt.step();
  REQUIRE(opt.step_count() == 2);
  REQUIRE_CLOSE(p.value, expected, 2e-6, 1e-7);
  // The state holds the moments.
  const auto state = opt.state_dict();
  REQUIRE(state.count("w.exp_avg") == 1);
  REQUIRE(state.count("w.exp_avg_sq") == 1);
  REQUIRE(state.at("w.exp_avg")(3) == Approx(0.9 * 0.1 * 1.5 + 0.1 * -2.0).epsilon(1e-6));
}

TEST_CASE("AdamW: lr_scale multiplies the learning rate, including the decoupled decay") {
  nn::Parameter<float> p = make_param({1}, {2.0f}, {0.5f});
  ParamGroup group;
  group.params = {&p};
  group.names = {"w"};
  group.lr = 0.1;
  group.weight_decay = 0.5;
  AdamW opt({group});
  opt.step(0.25);  // lr 0.025: p = 2·(1 − 0.0125) − 0.025·0.5/(0.5 + 1e-8)
  REQUIRE(p.value(0) == Approx(2.0 * (1 - 0.025 * 0.5) - 0.025 * 0.5 / (0.5 + 1e-8)).epsilon(1e-6));
}

TEST_CASE("SGD with momentum (and nesterov, weight decay): three steps by hand") {
  const bool nesterov = GENERATE(false, true);
  const std::vector<float> p0 = {1.0f, -2.0f, 0.25f};
  const std::vector<std::vector<float>> grads = {
      {0.5f, 0.1f, -1.0f}, {0.25f, -0.3f, 0.0f}, {-1.0f, 0.2f, 0.5f}};
  nn::Parameter<float> p = make_param({3}, p0, grads[0]);
  ParamGroup group;
  group.params = {&p};
  group.names = {"w"};
  group.lr = 0.1;
  group.weight_decay = 0.01;
  group.momentum = 0.9;
  group.nesterov = nesterov;
  Sgd opt({group});
  for (std::size_t s = 0; s < 3; ++s) {
    std::copy(grads[s].begin(), grads[s].end(), p.grad.begin());
    opt.step();
  }
  for (std::size_t i = 0; i < 3; ++i) {
    double w = p0[i], buf = 0;
    for (std::size_t s = 0; s < 3; ++s) {
      double d = grads[s][i] + 0.01 * w;  // weight decay
      buf = s == 0 ? d : 0.9 * buf + d;   // first step: buffer = d (dampening 0)
      d = nesterov ? d + 0.9 * buf : buf;
      w -= 0.1 * d;
    }
    REQUIRE(p.value(i) == Approx(w).epsilon(1e-6));
  }
  REQUIRE(opt.state_dict().count("w.momentum_buffer") == 1);
}

TEST_CASE("SGD without momentum is p − lr·(g + wd·p)") {
  nn::Parameter<float> p = make_param({2}, {1.0f, -1.0f}, {0.5f, 0.5f});
  ParamGroup group;
  group.params = {&p};
  group.names = {"w"};
  group.lr = 0.5;
  group.weight_decay = 0.0;
  Sgd opt({group});
  opt.step();
  opt.step();
  REQUIRE(p.value(0) == 0.5f);
  REQUIRE(p.value(1) == -1.5f);
}

TEST_CASE(
    "AdamW and SGD: large parameters (many chunks, SIMD tail) match a scalar double "
    "reference and do not depend on the thread count") {
  const std::size_t n = 3 * (1 << 14) + 37;
  std::vector<float> v0(n), g(n);
  fill_normal(v0, {7, 1});
  fill_normal(g, {7, 2});
  auto run = [&](int threads, bool adam) {
    omp_set_num_threads(threads);
    nn::Parameter<float> p = make_param({n}, v0, g);
    nn::Parameter<float> q = make_param({5}, {1, 2, 3, 4, 5}, {1, 1, 1, 1, 1});
    ParamGroup group;
    group.params = {&p, &q};
    group.names = {"p", "q"};
    group.lr = 1e-3;
    group.momentum = 0.9;
    if (adam) {
      AdamW opt({group});
      opt.step();
      opt.step();
    } else {
      Sgd opt({group});
      opt.step();
      opt.step();
    }
    return std::vector<float>(p.value.begin(), p.value.end());
  };
  for (bool adam : {true, false}) {
    const std::vector<float> one = run(1, adam), two = run(2, adam), three = run(3, adam);
    REQUIRE(one == two);
    REQUIRE(one == three);
    std::vector<double> ref(n);
    for (std::size_t i = 0; i < n; ++i) {
      double w = v0[i], m = 0, v = 0, buf = 0;
      for (int t = 1; t <= 2; ++t) {
        if (adam) {
          w *= 1 - 1e-3 * 1e-2;
          m = 0.9 * m + 0.1 * g[i];
          v = 0.999 * v + 0.001 * double(g[i]) * g[i];
          w -= 1e-3 / (1 - std::pow(0.9, t)) * m /
               (std::sqrt(v) / std::sqrt(1 - std::pow(0.999, t)) + 1e-8);
        } else {
          const double d = g[i] + 1e-2 * w;
          buf = t == 1 ? d : 0.9 * buf + d;
          w -= 1e-3 * buf;
        }
      }
      ref[i] = w;
    }
    REQUIRE_CLOSE(one, ref, 1e-5, 1e-6);
  }
  omp_set_num_threads(2);
}

TEST_CASE("make_param_groups: trainable parameters only, LoRA+ group with lr·ratio") {
  LoraLike m;
  ParamGroup hyper;
  hyper.lr = 1e-4;
  hyper.weight_decay = 0.5;
  auto one = train::make_param_groups(m, hyper);
  REQUIRE(one.size() == 1);
  REQUIRE(one[0].params.size() == 5);  // the frozen base weight is left out
  auto groups = train::make_param_groups(m, hyper, 16.0);
  REQUIRE(groups.size() == 2);
  REQUIRE(groups[0].names == std::vector<std::string>{"to_q.lora_A.weight",
                                                      "lora_unet_x.lora_down.weight", "to_q.bias"});
  REQUIRE(groups[1].names ==
          std::vector<std::string>{"to_q.lora_B.weight", "lora_unet_x.lora_up.weight"});
  REQUIRE(groups[0].lr == 1e-4);
  REQUIRE(groups[1].lr == Approx(16e-4));
  REQUIRE(groups[1].weight_decay == 0.5);
  REQUIRE(groups[1].params[0] == &m.b);
  // The LoRA+ group really steps with the larger lr (SGD: Δ = −lr·g).
  for (auto* p : {&m.a, &m.b, &m.down, &m.up, &m.bias}) p->grad.fill(1.0f);
  for (auto& g : groups) g.weight_decay = 0;
  Sgd opt(groups);
  opt.step();
  REQUIRE(m.a.value(0, 0) == Approx(-1e-4));
  REQUIRE(m.b.value(0, 0) == Approx(-16e-4));
  REQUIRE_THROWS_WITH(train::make_param_groups(m, hyper, 0.0),
                      Catch::Contains("loraplus_lr_ratio is 0"));
}

TEST_CASE("make_param_groups: a prefix with its own lr (text_encoder_lr) over a ModulePair") {
  LoraLike unet, text;
  nn::ModulePair<LoraLike, LoraLike> both{unet, text, "text_encoder"};
  ParamGroup hyper;
  hyper.lr = 1e-4;
  const std::vector<train::PrefixLr> te{{"text_encoder.", 5e-5}};
  auto groups = train::make_param_groups(both, hyper, 1.0, te);
  REQUIRE(groups.size() == 2);
  REQUIRE(groups[0].params.size() == 5);
  REQUIRE(groups[0].lr == 1e-4);
  REQUIRE(groups[1].names.front() == "text_encoder.to_q.lora_A.weight");
  REQUIRE(groups[1].params.size() == 5);
  REQUIRE(groups[1].params.front() == &text.a);
  REQUIRE(groups[1].lr == 5e-5);
  // with LoRA+: four groups, each B group × ratio
  auto plus = train::make_param_groups(both, hyper, 4.0, te);
  REQUIRE(plus.size() == 4);
  REQUIRE(plus[1].lr == Approx(4e-4));
  REQUIRE(plus[3].lr == Approx(2e-4));
  REQUIRE(plus[3].params.front() == &text.b);
  REQUIRE_THROWS_WITH(train::make_param_groups(both, hyper, 1.0, {{"text_encoder.", -1.0}}),
                      Catch::Contains("learning rate of 'text_encoder.' is -1"));
}

TEST_CASE("optimizer state: save, load into a fresh optimizer, continue identically") {
  std::vector<float> v0(40), g(40);
  fill_normal(v0, {3, 1});
  fill_normal(g, {3, 2});
  nn::Parameter<float> a = make_param({4, 10}, v0, g), b = make_param({4, 10}, v0, g);
  ParamGroup ga, gb;
  ga.params = {&a};
  gb.params = {&b};
  ga.names = gb.names = {"layer.weight"};
  AdamW first({ga});
  first.step();
  first.step();
  AdamW second({gb});
  b.value = a.value;
  second.load_state_dict(first.state_dict(), first.step_count());
  first.step();
  second.step();
  REQUIRE((a.value == b.value));

  auto state = first.state_dict();
  state.erase("layer.weight.exp_avg");
  state["stray"] = xt::zeros<float>({1});
  REQUIRE_THROWS_WITH(
      second.load_state_dict(state, 1),
      Catch::Contains("missing layer.weight.exp_avg") && Catch::Contains("unexpected stray"));
  state = first.state_dict();
  state["layer.weight.exp_avg_sq"] = xt::zeros<float>({40});
  REQUIRE_THROWS_WITH(second.load_state_dict(state, 1),
                      Catch::Contains("exp_avg_sq has shape [40], expected [4,10]"));

  // A corrupted state resumes into NaN weights: refused, and the optimizer keeps its own.
  const auto before = second.state_dict();
  state = first.state_dict();
  state["layer.weight.exp_avg"](1, 2) = std::nanf("");
  REQUIRE_THROWS_WITH(second.load_state_dict(state, 1),
                      Catch::Contains("layer.weight.exp_avg element 12 is nan") &&
                          Catch::Contains("expected a finite number"));
  state = first.state_dict();
  state["layer.weight.exp_avg_sq"](0, 3) = -1e-3f;
  REQUIRE_THROWS_WITH(second.load_state_dict(state, 1),
                      Catch::Contains("layer.weight.exp_avg_sq element 3 is -0.001") &&
                          Catch::Contains("expected a finite non-negative number"));
  state = first.state_dict();
  state["layer.weight.exp_avg"](0, 0) = -std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_WITH(second.load_state_dict(state, 1), Catch::Contains("is -inf"));
  const auto after = second.state_dict();
  for (const auto& [key, value] : before) REQUIRE((after.at(key) == value));
  state = first.state_dict();
  state["layer.weight.exp_avg"](0, 0) = -5.0f;  // a first moment may be negative
  REQUIRE_NOTHROW(second.load_state_dict(state, 1));
}

TEST_CASE("optimizers reject bad groups and gradients") {
  nn::Parameter<float> p({2}), frozen({2}, false);
  ParamGroup g;
  g.params = {&p};
  g.names = {"p"};
  ParamGroup bad = g;
  bad.betas = {0.9, 1.0};
  REQUIRE_THROWS_WITH(AdamW({bad}), Catch::Contains("betas[1] is 1, expected in [0, 1)"));
  bad = g;
  bad.names = {};
  REQUIRE_THROWS_WITH(AdamW({bad}), Catch::Contains("1 parameters but 0 names"));
  bad = g;
  bad.params = {&frozen};
  REQUIRE_THROWS_WITH(Sgd({bad}), Catch::Contains("'p' is frozen"));
  REQUIRE_THROWS_WITH(AdamW({g, g}), Catch::Contains("appears twice"));
  bad = g;
  bad.nesterov = true;
  REQUIRE_THROWS_WITH(Sgd({bad}), Catch::Contains("nesterov needs momentum > 0"));
  AdamW opt({g});
  p.grad = xt::zeros<float>({3});
  REQUIRE_THROWS_WITH(opt.step(), Catch::Contains("gradient of 'p' has shape [3], expected [2]"));
}
