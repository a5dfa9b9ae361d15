// AutoencoderKLConfig: diffusers' config.json, strict parsing, errors naming the key.
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <string>

#include "difftrain/models/vae/autoencoder_kl.hpp"
#include "difftrain/models/vae/vae_config.hpp"
#include "support/tensor_match.hpp"
#include "vae/vae_test_support.hpp"

using Catch::Matchers::Contains;
using difftrain::Error;
using difftrain::models::AutoencoderKL;
using difftrain::models::AutoencoderKLConfig;

namespace {
nlohmann::json tiny_json() {
  return nlohmann::json::parse(R"({
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.26.3", "act_fn": "silu",
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "force_upcast": true, "in_channels": 3, "latent_channels": 4, "layers_per_block": 1,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 32, "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]})");
}
}  // namespace

TEST_CASE("AutoencoderKLConfig reads the golden vae_tiny config.json", "[vae][config]") {
  const auto c = AutoencoderKLConfig::from_file(difftrain::test::data_path("vae_tiny/config.json"));
  CHECK(c.block_out_channels == std::vector<std::size_t>{32, 64, 64});
  CHECK(c.layers_per_block == 1);
  CHECK(c.latent_channels == 4);
  CHECK(c.norm_num_groups == 32);
  CHECK(c.in_channels == 3);
  CHECK(c.out_channels == 3);
  CHECK(c.scaling_factor == 0.18215);
  CHECK(c.shift_factor == 0.0);
  CHECK(c.mid_block_add_attention);
  CHECK(c.use_quant_conv);
  CHECK(c.use_post_quant_conv);
  CHECK(c.downsample_factor() == 4);
}

TEST_CASE("AutoencoderKLConfig optional keys", "[vae][config]") {
  auto j = tiny_json();
  j["shift_factor"] = 0.0609;
  j["scaling_factor"] = 1.5305;
  j["mid_block_add_attention"] = false;
  j["use_quant_conv"] = false;
  j["use_post_quant_conv"] = false;
  j["latents_mean"] = nullptr;
  j["some_future_key"] = nullptr;  // unknown but null: accepted
  const auto c = AutoencoderKLConfig::from_json(j);
  CHECK(c.shift_factor == 0.0609);
  CHECK(c.scaling_factor == 1.5305);
  CHECK_FALSE(c.mid_block_add_attention);
  CHECK_FALSE(c.use_quant_conv);
  CHECK_FALSE(c.use_post_quant_conv);
  // the model then has no quant convs and no mid-block attention among its parameters
  AutoencoderKL<float> vae(c);
  bool any_quant = false, any_attention = false;
  vae.for_each_parameter("", [&](const std::string& name, auto&) {
    any_quant = any_quant || name.find("quant_conv") != std::string::npos;
    any_attention = any_attention || name.find("attentions") != std::string::npos;
  });
  CHECK_FALSE(any_quant);
  CHECK_FALSE(any_attention);
}

TEST_CASE("AutoencoderKLConfig errors name the key and the value", "[vae][config]") {
  auto expect_error = [](nlohmann::json j, const std::string& a, const std::string& b) {
    CHECK_ERROR_WITH(AutoencoderKLConfig::from_json(j),
                     Contains(a) && Contains(b) && Contains("AutoencoderKLConfig"));
  };
  {
    auto j = tiny_json();
    j["down_block_types"][1] = "AttnDownEncoderBlock2D";
    expect_error(j, "down_block_types[1]", "AttnDownEncoderBlock2D");
  }
  {
    auto j = tiny_json();
    j["up_block_types"][2] = "AttnUpDecoderBlock2D";
    expect_error(j, "up_block_types[2]", "AttnUpDecoderBlock2D");
  }
  {
    auto j = tiny_json();
    j["up_block_types"] = {"UpDecoderBlock2D"};
    expect_error(j, "up_block_types", "expected 3");
  }
  {
    auto j = tiny_json();
    j["act_fn"] = "gelu";
    expect_error(j, "act_fn", "gelu");
  }
  {
    auto j = tiny_json();
    j["norm_type"] = "spatial";
    expect_error(j, "unknown key norm_type", "spatial");
  }
  {
    auto j = tiny_json();
    j["latents_mean"] = {0.1, 0.2, 0.3, 0.4};
    expect_error(j, "latents_mean", "0.1");
  }
  {
    auto j = tiny_json();
    j["layers_per_block"] = 0;
    expect_error(j, "layers_per_block", "0");
  }
  {
    auto j = tiny_json();
    j["use_quant_conv"] = "yes";
    expect_error(j, "use_quant_conv", "yes");
  }
  {
    auto j = tiny_json();
    j["block_out_channels"] = {32, 48, 64};
    expect_error(j, "block_out_channels[1]", "48");
  }
  {
    auto j = tiny_json();
    j["scaling_factor"] = 0;
    expect_error(j, "scaling_factor", "0");
  }
  CHECK_ERROR_WITH(AutoencoderKLConfig::from_file("/nonexistent/config.json"),
                   Contains("/nonexistent/config.json"));
}

TEST_CASE("AutoencoderKLConfig sd15 preset has the SD 1.x VAE's 83.65M parameters",
          "[vae][config]") {
  // counting parameters needs no weights in memory beyond the zero-initialised model; the SD VAE
  // (stable-diffusion-v1-5/vae) has 83,653,863 parameters
  AutoencoderKL<float> vae(AutoencoderKLConfig::sd15());
  std::size_t count = 0;
  vae.for_each_parameter("", [&](const std::string&, auto& p) { count += p.value.size(); });
  CHECK(count == 83653863);
}
