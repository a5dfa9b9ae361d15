// Gradient checkpointing of UNet2DConditionModel (set_gradient_checkpointing, diffusers'
// enable_gradient_checkpointing): a recomputation, so the output, the input gradients and every
// parameter gradient are bitwise those of the same model without it — for LoRA training with
// dropout masks (re-drawn identically by the recomputed forward) and for full training, over two
// steps, on three tiny configurations (conv projections; linear projections with two transformer
// layers, two resnets per block and conv shortcuts; SDXL-shaped with added conditions). The
// forward really drops the units' saved state: a unit's backward right after it has nothing to
// work from.

#include <catch2/catch.hpp>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/lora/inject.hpp"
#include "difftrain/models/models.hpp"
#include "difftrain/nn/init.hpp"
#include "single_threaded.hpp"
#include "tiny_unet_configs.hpp"

using namespace difftrain;
using models::UNet2DConditionConfig;
using models::UNet2DConditionModel;

namespace {

template <class Tensor>
void fill_normal_f(Tensor& t, std::mt19937& rng, float stddev) {
  std::normal_distribution<float> normal(0.f, stddev);
  for (auto& v : t) v = normal(rng);
}

template <class A, class B>
bool same_bits(const A& a, const B& b) {
  if (a.shape() != b.shape()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a.data()[i] != b.data()[i]) return false;
  return true;
}

enum class Training { lora, full };

// A model of `config`, initialised from `seed`, with dropout-carrying adapters (lora) or every
// parameter trainable (full).
UNet2DConditionModel<float> make_model(const UNet2DConditionConfig& config, Training training) {
  UNet2DConditionModel<float> model(config);
  nn::init_like_pytorch<float>(model, RandomStream{11, 1});
  if (training == Training::lora) {
    lora::LoraConfig c;
    c.rank = 2;
    c.dropout = 0.2;
    c.network_dropout = 0.1;
    c.rank_dropout = 0.3;
    lora::inject_lora(model, {"to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"}, c,
                      RandomStream{11, 2});
    std::mt19937 rng(5);
    lora::for_each_adapter(model, [&](const std::string&, auto& adapter) {
      fill_normal_f(adapter.lora_B.weight.value, rng, 0.3f);
    });
  } else {
    nn::set_trainable<float>(model, true);
  }
  return model;
}

void check_checkpointing_is_exact(const nlohmann::json& config_json, Training training,
                                  std::size_t H, std::size_t W) {
  const test::SingleThreaded single_threaded;
  const auto config = UNet2DConditionConfig::from_json(config_json);
  UNet2DConditionModel<float> plain = make_model(config, training);
  UNet2DConditionModel<float> checkpointed = make_model(config, training);
  checkpointed.set_gradient_checkpointing(true);
  REQUIRE(checkpointed.gradient_checkpointing());

  std::mt19937 rng(77);
  const std::size_t B = 2, L = 3;
  Tensor4<float> sample(std::array<std::size_t, 4>{B, config.in_channels, H, W});
  Tensor3<float> context(std::array<std::size_t, 3>{B, L, config.cross_attention_dim[0]});
  Tensor4<float> w(std::array<std::size_t, 4>{B, config.out_channels, H, W});
  const std::vector<std::int64_t> t{917, 33};
  AddedConditions<float> added;
  if (plain.uses_added_conditions()) {
    added.text_embeds.resize(
        {B, config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim});
    fill_normal_f(added.text_embeds, rng, 1.f);
    added.time_ids = {{1024, 768, 16, 0, 512, 512}, {64, 96, 0, 8, 64, 64}};
  }
  auto step = [&](UNet2DConditionModel<float>& m, std::uint64_t s) {
    lora::set_lora_step(m, s);
    const Tensor4<float> y = m.uses_added_conditions()
                                 ? m.forward(sample, std::span(t), context, added)
                                 : m.forward(sample, std::span(t), context);
    m.backward(w);
    return y;
  };
  for (std::uint64_t s = 0; s < 2; ++s) {
    fill_normal_f(sample, rng, 1.f);
    fill_normal_f(context, rng, 1.f);
    fill_normal_f(w, rng, 1.f);
    const Tensor4<float> y_plain = step(plain, s), y_checkpointed = step(checkpointed, s);
    CHECK(same_bits(y_plain, y_checkpointed));
    CHECK(same_bits(plain.grad_sample(), checkpointed.grad_sample()));
    CHECK(same_bits(plain.grad_encoder_hidden_states(), checkpointed.grad_encoder_hidden_states()));
    CHECK(same_bits(plain.grad_text_embeds(), checkpointed.grad_text_embeds()));
  }
  // gradients accumulated over both steps, parameter by parameter
  std::vector<const nn::Parameter<float>*> expected;
  plain.for_each_parameter("", [&](const std::string&, nn::Parameter<float>& p) {
    if (p.trainable) expected.push_back(&p);
  });
  std::size_t compared = 0, nonzero = 0;
  checkpointed.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>& p) {
    if (!p.trainable) return;
    REQUIRE(compared < expected.size());
    INFO("gradient of " << name);
    CHECK(same_bits(expected[compared]->grad, p.grad));
    nonzero += xt::amax(xt::abs(p.grad))() > 0 ? 1 : 0;
    ++compared;
  });
  CHECK(compared == expected.size());
  CHECK(nonzero > compared / 2);  // the comparison is of real gradients

  // The forward kept no activations of its units: their backward has nothing to work from
  // (and works in the model without checkpointing).
  for (UNet2DConditionModel<float>* m : {&plain, &checkpointed}) {
    (void)(m->uses_added_conditions() ? m->forward(sample, std::span(t), context, added)
                                      : m->forward(sample, std::span(t), context));
  }
  const std::size_t C0 = config.block_out_channels[0];
  const Tensor4<float> dy = xt::zeros<float>(std::array<std::size_t, 4>{B, C0, H, W});
  Tensor<float, 2> dtemb = xt::zeros<float>(std::array<std::size_t, 2>{B, config.time_embed_dim()});
  CHECK_NOTHROW(plain.down_blocks[0].resnets[0].backward(dy, dtemb));
  CHECK_THROWS_AS(checkpointed.down_blocks[0].resnets[0].backward(dy, dtemb), Error);
  for (std::size_t i = 0; i < plain.down_blocks.size(); ++i) {
    if (plain.down_blocks[i].attentions.empty()) continue;
    const std::size_t C = config.block_out_channels[i], N = (H >> i) * (W >> i);
    const Tensor3<float> d_tokens = xt::zeros<float>(std::array<std::size_t, 3>{B, N, C});
    Tensor3<float> dcontext = xt::zeros<float>(context.shape());
    CHECK_NOTHROW(
        plain.down_blocks[i].attentions[0].transformer_blocks[0].backward(d_tokens, dcontext));
    CHECK_THROWS_AS(checkpointed.down_blocks[i].attentions[0].transformer_blocks[0].backward(
                        d_tokens, dcontext),
                    Error);
    break;
  }
}

}  // namespace

TEST_CASE("UNet gradient checkpointing: bitwise the gradients without it (conv projections)",
          "[models][unet][checkpointing]") {
  check_checkpointing_is_exact(test::tiny_unet_config(), Training::lora, 6, 6);
  check_checkpointing_is_exact(test::tiny_unet_config(), Training::full, 6, 6);
}

TEST_CASE(
    "UNet gradient checkpointing: bitwise the gradients without it (linear projections, two "
    "transformer layers, two resnets per block, conv shortcuts, odd size)",
    "[models][unet][checkpointing]") {
  auto j = test::tiny_unet_config();
  j["down_block_types"] = {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D"};
  j["up_block_types"] = {"CrossAttnUpBlock2D", "CrossAttnUpBlock2D"};
  j["use_linear_projection"] = true;
  j["transformer_layers_per_block"] = {2, 1};
  j["layers_per_block"] = {2, 2};
  j["attention_head_dim"] = {2, 4};
  check_checkpointing_is_exact(j, Training::lora, 5, 7);
  check_checkpointing_is_exact(j, Training::full, 5, 7);
}

TEST_CASE(
    "UNet gradient checkpointing: bitwise the gradients without it (SDXL-shaped, added "
    "conditions)",
    "[models][unet][checkpointing][sdxl]") {
  auto j = test::tiny_sdxl_unet_config();
  check_checkpointing_is_exact(j, Training::lora, 8, 8);
  check_checkpointing_is_exact(j, Training::full, 8, 8);
}
