// Whole-model gradient check of UNet2DConditionModel in double: the analytic gradients of
// L = Σ w ⊙ unet(sample, t, context) (backward(w)) against fourth-order central differences, for
// sampled entries of the sample, the context and every parameter. Two tiny configurations cover
// both Transformer2DModel projections, conv shortcuts, downsample padding 0, odd latent sizes
// (upsampling to the skip's size), mid_block_scale_factor, center_input_sample and two
// transformer layers per block; a third, SDXL-shaped (addition_embed_type "text_time", three
// levels the first without attention, 1/2/3 transformer layers reversed for the up blocks), also
// the pooled text_embeds' gradient.

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "difftrain/models/models.hpp"
#include "difftrain/nn/gradcheck.hpp"
#include "single_threaded.hpp"
#include "tiny_unet_configs.hpp"

using namespace difftrain;
using models::UNet2DConditionConfig;
using models::UNet2DConditionModel;

namespace {

template <class Tensor>
void fill_normal(Tensor& t, std::mt19937_64& rng, double stddev) {
  std::normal_distribution<double> normal(0.0, stddev);
  for (auto& v : t) v = normal(rng);
}

// sum(w ⊙ y)
double weighted_sum(const Tensor4<double>& y, const Tensor4<double>& w) {
  double s = 0;
  for (std::size_t i = 0; i < y.size(); ++i) s += y.data()[i] * w.data()[i];
  return s;
}

// Checks a few entries of the sample and the context, and one entry of every parameter for which
// selected(index, name) holds.
template <class Selected>
void check_model_gradients(const nlohmann::json& config_json, std::size_t H, std::size_t W,
                           Selected&& selected, double tolerance = 1e-6) {
  const test::SingleThreaded single_threaded;
  const auto config = UNet2DConditionConfig::from_json(config_json);
  UNet2DConditionModel<double> model(config);
  std::mt19937_64 rng(1234);
  // weights ~ N(0, 1/fan_in), 1-D parameters ~ 1 + N(0, 0.1²) (norm gains) or N(0, 0.1²)
  model.for_each_parameter("", [&](const std::string& name, nn::Parameter<double>& p) {
    if (p.value.dimension() == 1) {
      fill_normal(p.value, rng, 0.1);
      if (name.find("norm") != std::string::npos && name.find(".weight") != std::string::npos)
        p.value += 1.0;
    } else {
      const double fan_in = static_cast<double>(p.value.size() / p.value.shape()[0]);
      fill_normal(p.value, rng, 1.0 / std::sqrt(fan_in));
    }
  });
  const std::size_t B = 2, L = 3, Dc = config.cross_attention_dim[0];
  Tensor4<double> sample(std::array<std::size_t, 4>{B, config.in_channels, H, W});
  Tensor3<double> context(std::array<std::size_t, 3>{B, L, Dc});
  Tensor4<double> w(std::array<std::size_t, 4>{B, config.out_channels, H, W});
  fill_normal(sample, rng, 1.0);
  fill_normal(context, rng, 1.0);
  fill_normal(w, rng, 1.0);
  const std::vector<std::int64_t> t{917, 33};
  const std::span<const std::int64_t> ts(t);
  // SDXL: pooled text_embeds [B, P] and time ids (sizes, crops) [B, 6]
  AddedConditions<double> added;
  const bool sdxl = model.uses_added_conditions();
  if (sdxl) {
    added.text_embeds.resize(
        {B, config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim});
    fill_normal(added.text_embeds, rng, 1.0);
    added.time_ids = {{1024, 768, 16, 0, 512, 512}, {64, 96, 0, 8, 64, 64}};
  }
  auto forward = [&] {
    return sdxl ? model.forward(sample, ts, context, added) : model.forward(sample, ts, context);
  };

  forward();
  model.backward(w);
  const Tensor4<double> grad_sample = model.grad_sample();
  const Tensor3<double> grad_context = model.grad_encoder_hidden_states();
  auto loss = [&] { return weighted_sum(forward(), w); };

  // the UNet is strongly curved in its early weights (every GroupNorm downstream): with h = 1e-3
  // the fourth-order stencil's truncation error reaches 4e-5; with h = 1e-4 it is ~1e-9
  nn::GradCheckOptions options;
  options.step = 1e-4;
  options.floor = 1e-4;  // central-difference noise is ~1e-11 absolute
  options.max_checks = 6;
  {
    const auto r = nn::check_gradient(sample, grad_sample, loss, options);
    INFO("sample: " << r.message);
    CHECK(r.max_error <= tolerance);
  }
  {
    const auto r = nn::check_gradient(context, grad_context, loss, options);
    INFO("encoder_hidden_states: " << r.message);
    CHECK(r.max_error <= tolerance);
  }
  if (sdxl) {
    const Tensor<double, 2> grad_text_embeds = model.grad_text_embeds();
    const auto r = nn::check_gradient(added.text_embeds, grad_text_embeds, loss, options);
    INFO("text_embeds: " << r.message);
    CHECK(r.max_error <= tolerance);
  }
  options.max_checks = 1;
  std::size_t checked = 0, index = 0;
  double worst = 0;
  std::string worst_name;
  model.for_each_parameter("", [&](const std::string& name, nn::Parameter<double>& p) {
    if (!selected(index++, name)) return;
    const auto r = nn::check_gradient(p, loss, options);
    INFO(name << ": " << r.message);
    CHECK(r.max_error <= tolerance);
    if (r.max_error > worst) {
      worst = r.max_error;
      worst_name = name;
    }
    ++checked;
  });
  INFO("worst parameter " << worst_name << ": " << worst);
  CHECK(checked >= 60);
}

}  // namespace

TEST_CASE("UNet2DConditionModel gradients match central differences (conv projections)",
          "[models][unet][gradcheck]") {
  check_model_gradients(test::tiny_unet_config(), 6, 6,
                        [](std::size_t, const std::string&) { return true; });
}

TEST_CASE(
    "UNet2DConditionModel gradients match central differences (linear projections, odd "
    "size, padding 0, two transformer layers, mid scale, centered input)",
    "[models][unet][gradcheck]") {
  auto j = test::tiny_unet_config();
  j["down_block_types"] = {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D"};
  j["up_block_types"] = {"CrossAttnUpBlock2D", "CrossAttnUpBlock2D"};
  j["use_linear_projection"] = true;
  j["downsample_padding"] = 0;
  j["transformer_layers_per_block"] = {2, 1};
  j["layers_per_block"] = {1, 2};
  j["mid_block_scale_factor"] = 1.5;
  j["center_input_sample"] = true;
  j["attention_head_dim"] = {2, 4};
  // every fourth parameter, and all of those this configuration adds
  check_model_gradients(j, 5, 3, [](std::size_t index, const std::string& name) {
    for (const char* part : {"proj_in", "proj_out", "transformer_blocks.1", "downsamplers",
                             "upsamplers", "mid_block.resnets", "conv_shortcut"})
      if (name.find(part) != std::string::npos) return true;
    return index % 4 == 0;
  });
}

TEST_CASE(
    "UNet2DConditionModel gradients match central differences (SDXL-shaped: text_time added "
    "conditions, three levels, 1/2/3 transformer layers)",
    "[models][unet][gradcheck][sdxl]") {
  auto j = test::tiny_sdxl_unet_config();
  // the added embedding, the deepest level's third transformer layer, and every sixth parameter
  check_model_gradients(
      j, 8, 8,
      [](std::size_t index, const std::string& name) {
        for (const char* part : {"add_embedding", "transformer_blocks.2", "up_blocks.0.attentions"})
          if (name.find(part) != std::string::npos) return true;
        return index % 6 == 0;
      },
      /*tolerance=*/1e-5);  // the deeper model's larger loss: central-difference noise ~2e-6 at -Og
}
