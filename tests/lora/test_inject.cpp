// Injection by module-name suffix (PEFT target_modules), LoraSlot dispatch, trainable flags,
// base/adapter parameter views with strict loading, name-derived init, merge/remove, and a
// gradient check through a small model of slots.
#include <catch2/catch.hpp>
#include <map>
#include <string>
#include <vector>

#include "difftrain/lora/lora.hpp"
#include "difftrain/nn/gradcheck.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::lora;
using nn::fill_random_normal;

namespace {
// attn: y = to_out.0(to_q(x) + to_k(x) + to_v(x)), names as in diffusers' Attention.
template <class T>
struct ToyAttention {
  LinearSlot<T> to_q{nn::Linear<T>(4, 4, false)};
  LinearSlot<T> to_k{nn::Linear<T>(4, 4, false)};
  LinearSlot<T> to_v{nn::Linear<T>(4, 4, false)};
  LinearSlot<T> to_out_0{nn::Linear<T>(4, 4, true)};

  template <class F>
  void for_each_slot(const std::string& prefix, F&& f) {
    to_q.for_each_slot(nn::join_name(prefix, "to_q"), f);
    to_k.for_each_slot(nn::join_name(prefix, "to_k"), f);
    to_v.for_each_slot(nn::join_name(prefix, "to_v"), f);
    to_out_0.for_each_slot(nn::join_name(prefix, "to_out.0"), f);
  }
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& f) {
    for_each_slot(prefix,
                  [&](const std::string& name, auto& slot) { slot.for_each_parameter(name, f); });
  }
  Tensor<T, 3> forward(const Tensor<T, 3>& x) {
    Tensor<T, 3> s = to_q.forward(x) + to_k.forward(x) + to_v.forward(x);
    return to_out_0.forward(s);
  }
  Tensor<T, 3> backward(const Tensor<T, 3>& dy) {
    Tensor<T, 3> ds = to_out_0.backward(dy);
    return to_q.backward(ds) + to_k.backward(ds) + to_v.backward(ds);
  }
};

// model: norm-free toy with a conv "proj_in", two attentions and a decoy named "to_out.01".
template <class T>
struct ToyModel {
  Conv2dSlot<T> proj_in{nn::Conv2d<T>(2, 2, 1)};
  ToyAttention<T> attn1, attn2;
  LinearSlot<T> decoy{nn::Linear<T>(4, 4)};
  nn::Parameter<T> pos_embedding{{4}};  // a non-slot parameter: frozen by injection

  template <class F>
  void for_each_slot(const std::string& prefix, F&& f) {
    proj_in.for_each_slot(nn::join_name(prefix, "proj_in"), f);
    attn1.for_each_slot(nn::join_name(prefix, "blocks.0.attn1"), f);
    attn2.for_each_slot(nn::join_name(prefix, "blocks.0.attn2"), f);
    decoy.for_each_slot(nn::join_name(prefix, "extra.to_out.01"), f);
  }
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& f) {
    f(nn::join_name(prefix, "pos_embedding"), pos_embedding);
    for_each_slot(prefix,
                  [&](const std::string& name, auto& slot) { slot.for_each_parameter(name, f); });
  }
  // y = attn2(attn1(x)) (proj_in and decoy are only there for naming)
  Tensor<T, 3> forward(const Tensor<T, 3>& x) { return attn2.forward(attn1.forward(x)); }
  Tensor<T, 3> backward(const Tensor<T, 3>& dy) { return attn1.backward(attn2.backward(dy)); }
};

template <class T>
void randomize(ToyModel<T>& m, std::uint64_t seed) {
  std::uint64_t k = 0;
  m.for_each_parameter("", [&](const std::string&, nn::Parameter<T>& p) {
    fill_random_normal(p.value, RandomStream{seed, k++}, 0.5);
  });
}
}  // namespace

TEST_CASE("matches_target follows PEFT suffix semantics", "[lora][inject]") {
  REQUIRE(matches_target("to_q", "to_q"));
  REQUIRE(matches_target("blocks.0.attn1.to_q", "to_q"));
  REQUIRE(matches_target("blocks.0.attn1.to_out.0", "to_out.0"));
  REQUIRE(matches_target("blocks.0.attn1.to_q", "attn1.to_q"));
  REQUIRE_FALSE(matches_target("blocks.0.attn1.to_q", "q"));
  REQUIRE_FALSE(matches_target("extra.to_out.01", "to_out.0"));
  REQUIRE_FALSE(matches_target("blocks.0.attn1.to_out.0", "to_out"));
  REQUIRE_FALSE(matches_target("to_q", ""));
}

TEST_CASE("inject_lora adapts the targets and leaves only adapters trainable", "[lora][inject]") {
  ToyModel<double> model;
  randomize(model, 1);
  Tensor<double, 3> x({2, 3, 4});
  fill_random_normal(x, RandomStream{1, 100});
  const auto before = model.forward(x);

  const auto names = inject_lora(model, {"to_q", "to_k", "to_v", "to_out.0"}, LoraConfig{.rank = 2},
                                 RandomStream{7, 0});
  REQUIRE(names == std::vector<std::string>{"blocks.0.attn1.to_q", "blocks.0.attn1.to_k",
                                            "blocks.0.attn1.to_v", "blocks.0.attn1.to_out.0",
                                            "blocks.0.attn2.to_q", "blocks.0.attn2.to_k",
                                            "blocks.0.attn2.to_v", "blocks.0.attn2.to_out.0"});
  REQUIRE_FALSE(model.proj_in.has_adapter());
  REQUIRE_FALSE(model.decoy.has_adapter());
  std::vector<std::string> trainable;
  model.for_each_parameter("", [&](const std::string& n, nn::Parameter<double>& p) {
    if (p.trainable)
      trainable.push_back(n);
    else
      REQUIRE(p.grad.size() == 0);
  });
  REQUIRE(trainable.size() == 16);
  for (const auto& n : trainable) REQUIRE(is_adapter_parameter(n));
  REQUIRE(trainable[0] == "blocks.0.attn1.to_q.lora_A.weight");
  // B = 0: the adapted model starts equal to the base
  REQUIRE_CLOSE(model.forward(x), before, 0, 0);

  REQUIRE_THROWS_WITH(inject_lora(model, {"to_q"}, LoraConfig{}, RandomStream{}),
                      "inject_lora: module blocks.0.attn1.to_q already has an adapter");
  ToyModel<double> fresh;
  REQUIRE_THROWS_WITH(
      inject_lora(fresh, {"to_q", "ff.net.2", "conv9"}, LoraConfig{}, RandomStream{}),
      "inject_lora: target modules not found in the model: ff.net.2, conv9");
}

TEST_CASE("Adapter init depends on the module name, not on the other targets", "[lora][inject]") {
  ToyModel<double> all, one;
  inject_lora(all, {"to_q", "to_k", "proj_in"}, LoraConfig{.rank = 2}, RandomStream{3, 3});
  inject_lora(one, {"attn2.to_q"}, LoraConfig{.rank = 2}, RandomStream{3, 3});
  REQUIRE((all.attn2.to_q.adapter().lora_A.weight.value ==
           one.attn2.to_q.adapter().lora_A.weight.value));
  REQUIRE((all.attn1.to_q.adapter().lora_A.weight.value !=
           all.attn2.to_q.adapter().lora_A.weight.value));
  REQUIRE(all.proj_in.has_adapter());
  REQUIRE(all.proj_in.adapter().lora_A.weight.value.shape() ==
          std::vector<std::size_t>{2, 2, 1, 1});
}

TEST_CASE("Base and adapter parameter views load strictly", "[lora][inject]") {
  ToyModel<float> model;
  inject_lora(model, {"attn1.to_q", "to_v"}, LoraConfig{.rank = 2}, RandomStream{4, 4});
  auto adapters = adapter_parameters(model);
  auto adapter_state = nn::state_dict<float>(adapters);
  std::vector<std::string> keys;
  for (const auto& [k, v] : adapter_state) keys.push_back(k);
  REQUIRE(keys == std::vector<std::string>{
                      "blocks.0.attn1.to_q.lora_A.weight", "blocks.0.attn1.to_q.lora_B.weight",
                      "blocks.0.attn1.to_v.lora_A.weight", "blocks.0.attn1.to_v.lora_B.weight",
                      "blocks.0.attn2.to_v.lora_A.weight", "blocks.0.attn2.to_v.lora_B.weight"});
  REQUIRE_NOTHROW(nn::load_state_dict<float>(adapters, adapter_state));

  // a base checkpoint (no lora keys) loads into the adapted model through the base view
  ToyModel<float> plain;
  auto base_state = nn::state_dict<float>(plain);
  auto base = base_parameters(model);
  REQUIRE_NOTHROW(nn::load_state_dict<float>(base, base_state));
  REQUIRE_THROWS_WITH(nn::load_state_dict<float>(model, base_state),
                      Catch::Contains("missing: blocks.0.attn1.to_q.lora_A.weight"));

  auto missing = adapter_state;
  missing.erase("blocks.0.attn2.to_v.lora_B.weight");
  REQUIRE_THROWS_WITH(nn::load_state_dict<float>(adapters, missing),
                      Catch::Contains("missing: blocks.0.attn2.to_v.lora_B.weight"));
  auto unexpected = adapter_state;
  unexpected.emplace("blocks.0.attn2.to_k.lora_A.weight", xt::zeros<float>({2, 4}));
  REQUIRE_THROWS_WITH(nn::load_state_dict<float>(adapters, unexpected),
                      Catch::Contains("unexpected: blocks.0.attn2.to_k.lora_A.weight"));
  auto misshapen = adapter_state;
  misshapen["blocks.0.attn1.to_q.lora_B.weight"] = xt::zeros<float>({4, 3});
  REQUIRE_THROWS_WITH(
      nn::load_state_dict<float>(adapters, misshapen),
      Catch::Contains("blocks.0.attn1.to_q.lora_B.weight has shape [4,3], expected [4,2]"));
}

TEST_CASE("Gradient check through a model of slots; merge, remove, step, training",
          "[lora][inject]") {
  ToyModel<double> model;
  randomize(model, 5);
  Tensor<double, 3> x({2, 3, 4}), w({2, 3, 4});
  fill_random_normal(x, RandomStream{5, 100});
  fill_random_normal(w, RandomStream{5, 101});
  const auto plain = model.forward(x);
  inject_lora(model, {"to_q", "to_out.0"},
              LoraConfig{.rank = 2, .alpha = 3, .dropout = 0.2, .rank_dropout = 0.3},
              RandomStream{5, 5});
  for_each_adapter(model, [&](const std::string& name, auto& a) {
    fill_random_normal(a.lora_B.weight.value, RandomStream{6, lora_detail::name_hash(name)});
  });
  set_lora_step(model, 11);
  model.forward(x);
  auto dx = model.backward(w);
  auto loss = [&] { return nn::weighted_sum(model.forward(x), w); };
  auto rx = nn::check_gradient(x, dx, loss);
  INFO("dx: " << rx.message);
  REQUIRE(rx.max_error <= 1e-6);
  model.for_each_parameter("", [&](const std::string& name, nn::Parameter<double>& p) {
    if (!p.trainable) return;
    auto r = nn::check_gradient(p, loss);
    INFO(name << ": " << r.message);
    REQUIRE(r.max_error <= 1e-6);
  });

  // eval mode: no dropout; merged == unmerged; removing with merge keeps the function
  set_lora_training(model, false);
  const auto adapted = model.forward(x);
  merge_lora(model);
  REQUIRE_CLOSE(model.forward(x), adapted, 1e-12, 1e-12);
  unmerge_lora(model);
  REQUIRE_CLOSE(model.forward(x), adapted, 1e-12, 1e-12);
  set_lora_multiplier(model, 0.0);
  const auto base_only = model.forward(x);  // multiplier 0: the base model
  set_lora_multiplier(model, 1.0);
  remove_lora(model, true);
  REQUIRE_FALSE(model.attn1.to_q.has_adapter());
  model.proj_in.clear_saved();  // plain slot
  model.attn1.to_q.clear_saved();
  REQUIRE_THROWS_WITH(model.attn1.to_q.backward(w), Catch::Contains("call forward first"));
  REQUIRE_CLOSE(model.forward(x), adapted, 1e-12, 1e-12);
  REQUIRE(nn::state_dict<double>(model).size() == 1 + 2 * 5 + 2 + 2);  // no lora keys left
  REQUIRE_CLOSE(base_only, plain, 1e-14, 1e-14);
}
