// UNet2DConditionConfig: parsing diffusers' config.json, per-block lists, presets, and the
// errors for unsupported or unknown settings (each naming the key and the value).

#include <catch2/catch.hpp>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "difftrain/models/unet/unet_config.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using models::DownBlockType;
using models::UNet2DConditionConfig;
using models::UpBlockType;
using V = std::vector<std::size_t>;

namespace {

nlohmann::json tiny_json() {
  std::ifstream in(test::data_path("unet_tiny/config.json"));
  return nlohmann::json::parse(in);
}

std::string error_of(const nlohmann::json& json) {
  try {
    UNet2DConditionConfig::from_json(json);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no Error thrown)";
}

}  // namespace

TEST_CASE("UNet2DConditionConfig parses the golden unet_tiny config.json", "[models][config]") {
  const auto c = UNet2DConditionConfig::from_file(test::data_path("unet_tiny/config.json"));
  CHECK(c.in_channels == 4);
  CHECK(c.out_channels == 4);
  CHECK(c.block_out_channels == V{32, 64});
  CHECK(c.layers_per_block == V{1, 1});
  CHECK(c.down_block_types ==
        std::vector{DownBlockType::CrossAttnDownBlock2D, DownBlockType::DownBlock2D});
  CHECK(c.up_block_types == std::vector{UpBlockType::UpBlock2D, UpBlockType::CrossAttnUpBlock2D});
  CHECK(c.has_mid_block);
  CHECK(c.cross_attention_dim == V{32, 32});
  CHECK(c.num_attention_heads == V{8, 8});  // attention_head_dim is the head count
  CHECK(c.transformer_layers_per_block == V{1, 1});
  CHECK(c.norm_num_groups == 32);
  CHECK(c.norm_eps == 1e-5);
  CHECK(c.flip_sin_to_cos);
  CHECK(c.freq_shift == 0);
  CHECK(c.downsample_padding == 1);
  CHECK(c.mid_block_scale_factor == 1);
  CHECK_FALSE(c.use_linear_projection);
  CHECK_FALSE(c.center_input_sample);
  CHECK(c.time_embed_dim() == 128);
}

TEST_CASE("UNet2DConditionConfig: per-block lists and defaults", "[models][config]") {
  auto j = tiny_json();
  j["attention_head_dim"] = {2, 4};
  j["layers_per_block"] = {1, 3};
  j["transformer_layers_per_block"] = {2, 1};
  j["cross_attention_dim"] = {32, 32};
  j["use_linear_projection"] = true;
  j["upcast_attention"] = true;
  j["time_embedding_dim"] = 96;
  j["some_future_key"] = nullptr;  // unknown but null: ignored
  j["_name_or_path"] = "x/y";      // leading underscore: ignored
  const auto c = UNet2DConditionConfig::from_json(j);
  CHECK(c.num_attention_heads == V{2, 4});
  CHECK(c.layers_per_block == V{1, 3});
  CHECK(c.transformer_layers_per_block == V{2, 1});
  CHECK(c.use_linear_projection);
  CHECK(c.time_embed_dim() == 96);
  CHECK(UNet2DConditionConfig::reversed_at(c.num_attention_heads, 0) == 4);

  // only the structural keys given: diffusers' defaults for the rest
  nlohmann::json minimal = {{"block_out_channels", {32, 64}},
                            {"down_block_types", {"CrossAttnDownBlock2D", "DownBlock2D"}},
                            {"up_block_types", {"UpBlock2D", "CrossAttnUpBlock2D"}}};
  const auto d = UNet2DConditionConfig::from_json(minimal);
  CHECK(d.layers_per_block == V{2, 2});
  CHECK(d.cross_attention_dim == V{1280, 1280});
  CHECK(d.num_attention_heads == V{8, 8});
  CHECK(d.norm_num_groups == 32);
}

TEST_CASE("UNet2DConditionConfig presets sd15 and sd21", "[models][config]") {
  const auto a = UNet2DConditionConfig::sd15();
  CHECK_NOTHROW(a.validate());
  CHECK(a.block_out_channels == V{320, 640, 1280, 1280});
  CHECK(a.cross_attention_dim == V{768, 768, 768, 768});
  CHECK(a.num_attention_heads == V{8, 8, 8, 8});
  CHECK(a.time_embed_dim() == 1280);
  const auto b = UNet2DConditionConfig::sd21();
  CHECK_NOTHROW(b.validate());
  CHECK(b.cross_attention_dim == V{1024, 1024, 1024, 1024});
  CHECK(b.num_attention_heads == V{5, 10, 20, 20});
  CHECK(b.use_linear_projection);
  CHECK(b.upcast_attention);
}

TEST_CASE("UNet2DConditionConfig errors name the key and the value", "[models][config]") {
  struct Case {
    const char* key;
    nlohmann::json value;
    const char* expect;  // substring of the message
  };
  const std::vector<Case> cases = {
      {"dropout", 0.1, "dropout = 0.1 is not supported"},
      {"down_block_types",
       {"CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"},
       "down_block_types[1] = \"SimpleCrossAttnDownBlock2D\" is not supported"},
      {"up_block_types",
       {"UpBlock2D", "AttnUpBlock2D"},
       "up_block_types[1] = \"AttnUpBlock2D\" is not supported"},
      {"mid_block_type", "UNetMidBlock2DSimpleCrossAttn",
       "mid_block_type = \"UNetMidBlock2DSimpleCrossAttn\" is not supported"},
      {"attention_head_dim", {8, 8, 8}, "attention_head_dim = [8,8,8] has 3 entries, expected"},
      {"layers_per_block", {1}, "layers_per_block = [1] has 1 entries"},
      {"num_attention_heads", 8, "num_attention_heads = 8 is not supported"},
      {"act_fn", "gelu", "act_fn = \"gelu\" is not supported"},
      {"resnet_time_scale_shift", "scale_shift",
       "resnet_time_scale_shift = \"scale_shift\" is not supported"},
      {"time_embedding_type", "fourier", "time_embedding_type = \"fourier\" is not supported"},
      {"class_embed_type", "timestep", "class_embed_type = \"timestep\" is not supported"},
      {"addition_embed_type", "text", "addition_embed_type = \"text\" is not supported"},
      {"only_cross_attention", true, "only_cross_attention = true is not supported"},
      {"dual_cross_attention", true, "dual_cross_attention = true is not supported"},
      {"attention_type", "gated", "attention_type = \"gated\" is not supported"},
      {"resnet_out_scale_factor", 2.0, "resnet_out_scale_factor = 2.0 is not supported"},
      {"encoder_hid_dim", 768, "encoder_hid_dim = 768 is not supported"},
      {"downsample_padding", 2, "downsample_padding = 2 is not supported"},
      {"norm_num_groups", 24,
       "block_out_channels[0] = 32 is not divisible by norm_num_groups = 24"},
      {"norm_num_groups", nullptr, "norm_num_groups = null is not supported"},
      {"block_out_channels", {32, 64, 128}, "down_block_types = "},
      {"cross_attention_dim", -3, "cross_attention_dim = -3, expected a positive integer"},
      {"in_channels", "4", "in_channels = \"4\", expected an integer"},
      {"use_linear_projection", 1, "use_linear_projection = 1, expected true or false"},
      {"attention_head_dim", 64, "has 32 channels, fewer than its 64 attention heads"},
      {"conv_in_kernel", 4, "conv_in_kernel = 4, expected an odd kernel size"},
      {"reverse_transformer_layers_per_block",
       {{1}, {1}},
       "reverse_transformer_layers_per_block = [[1],[1]] is not supported"},
      {"flux_capacitor", 1.21, "unknown key flux_capacitor = 1.21"},
  };
  for (const auto& c : cases) {
    auto j = tiny_json();
    j[c.key] = c.value;
    const std::string message = error_of(j);
    INFO(c.key << " = " << c.value.dump() << " → " << message);
    CHECK_THAT(message, Catch::StartsWith("UNet2DConditionConfig: "));
    CHECK_THAT(message, Catch::Contains(c.expect));
  }
  auto j = tiny_json();
  j.erase("block_out_channels");
  CHECK_THAT(error_of(j), Catch::Contains("block_out_channels is missing"));
  CHECK_THAT(error_of(nlohmann::json::array()), Catch::Contains("expected an object"));
  CHECK_THROWS_AS(UNet2DConditionConfig::from_file("/nonexistent/config.json"), Error);
}
