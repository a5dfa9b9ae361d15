// Text encoders of SD 2.x and SDXL single files: OpenCLIP names (cond_stage_model.model.*,
// conditioner.embedders.1.model.*: fused in_proj q/k/v, text_projection transposed) and SDXL's
// first encoder (conditioner.embedders.0.transformer.*, transformers' names). The files are built
// here from the golden clip_tiny / clip_proj_tiny weights, renamed by
// support/ldm_file_builder.hpp's own table, among tensors of the other components; every loaded
// model must reproduce every golden output.

#include <catch2/catch.hpp>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "clip/clip_test_support.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/clip/clip.hpp"
#include "support/ldm_file_builder.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using Catch::Matchers::Contains;
using models::ClipSingleFileLayout;
using test::add_open_clip;
using test::add_transformers;
using test::FileBuilder;
using test::OpenClipOptions;

namespace {

constexpr std::size_t kLayers = 3;  // both golden configs
constexpr std::size_t kD = 32;      // hidden_size of both

// The golden model `folder`'s weights (transformers names).
std::string golden_weights(const std::string& folder) {
  return test::data_path(folder + "/model.safetensors");
}

// Tensors of the other components of a checkpoint.
void add_other_components(FileBuilder& out) {
  out.add("model.diffusion_model.out.2.bias", std::vector<float>(4, 0.25f), {4});
  out.add("model.diffusion_model.input_blocks.0.0.weight", std::vector<float>(8, 0.5f),
          {2, 4, 1, 1});
  out.add("first_stage_model.quant_conv.bias", std::vector<float>(8, 0.5f), {8});
  out.add("denoiser.sigmas", std::vector<float>(10, 1.0f), {10});
}

// The worst golden error of every output that `folder`'s expected.safetensors holds.
double worst_golden_error(const models::ClipTextOutput<float>& out, const std::string& folder) {
  const auto expected =
      io::SafetensorsFile::open(test::data_path(folder + "/expected.safetensors"));
  std::map<std::string, std::vector<float>> got;
  got["last_hidden_state"].assign(out.last_hidden_state.begin(), out.last_hidden_state.end());
  if (out.pooler_output.size() > 0)
    got["pooler_output"].assign(out.pooler_output.begin(), out.pooler_output.end());
  if (out.text_embeds.size() > 0)
    got["text_embeds"].assign(out.text_embeds.begin(), out.text_embeds.end());
  for (std::size_t i = 0; i < out.hidden_states.size(); ++i)
    got["hidden_states." + std::to_string(i)].assign(out.hidden_states[i].begin(),
                                                     out.hidden_states[i].end());
  double worst = 0;
  std::size_t compared = 0;
  for (const auto& name : expected.names()) {
    const auto it = got.find(name);
    INFO(folder << ": " << name);
    REQUIRE(it != got.end());
    const double error = test::golden_error(it->second, expected.read<float>(name));
    INFO("error " << error);
    CHECK(error <= 1e-4);
    worst = std::max(worst, error);
    ++compared;
  }
  CHECK(compared >= 5);  // last_hidden_state, the pooled output, hidden_states.0..3
  return worst;
}

TokenIds golden_ids(const std::string& folder) {
  return io::SafetensorsFile::open(test::data_path(folder + "/inputs.safetensors"))
      .read_tensor<std::int64_t, 2>("input_ids");
}

models::ClipTextConfig golden_config(const std::string& folder) {
  return models::ClipTextConfig::from_file(test::data_path(folder + "/config.json"));
}

}  // namespace

TEST_CASE("single file: SDXL's two text encoders (embedders.0 transformers, embedders.1 OpenCLIP)",
          "[clip][ldm][load][open_clip]") {
  test::TempDir dir("clip_open_clip_sdxl");
  const std::string path = dir.file("sdxl.safetensors");
  FileBuilder file;
  add_other_components(file);
  add_transformers(file, golden_weights("clip_tiny"), "conditioner.embedders.0.transformer.");
  add_open_clip(file, golden_weights("clip_proj_tiny"), "conditioner.embedders.1.model.");
  file.write(path);

  // the second encoder: a CLIPTextModelWithProjection, from the config or from the layout
  auto config = golden_config("clip_proj_tiny");
  for (const bool stated : {true, false}) {
    INFO("architectures stated: " << stated);
    if (!stated) config.architecture.reset();
    auto second = models::load_clip_text_model_single_file<float>(
        path, config, ClipSingleFileLayout::sdxl_second);
    REQUIRE(second.has_projection());
    const auto out = second.forward(golden_ids("clip_proj_tiny"));
    CHECK(worst_golden_error(out, "clip_proj_tiny") <= 1e-4);
    // exactly what the transformers folder gives
    auto folder = models::load_clip_text_model<float>(test::data_path("clip_proj_tiny"));
    CHECK(test::golden_error(out.text_embeds,
                             folder.forward(golden_ids("clip_proj_tiny")).text_embeds) == 0);
  }
  // the first encoder: transformers' names under conditioner.embedders.0.transformer.
  auto first = models::load_clip_text_model_single_file<float>(path, golden_config("clip_tiny"),
                                                               ClipSingleFileLayout::sdxl_first);
  CHECK_FALSE(first.has_projection());
  CHECK(worst_golden_error(first.forward(golden_ids("clip_tiny")), "clip_tiny") <= 1e-4);
}

TEST_CASE("single file: SD 2.x's OpenCLIP text encoder (cond_stage_model.model.*)",
          "[clip][ldm][load][open_clip]") {
  test::TempDir dir("clip_open_clip_sd2");
  const auto config = golden_config("clip_tiny");  // no architectures: a CLIPTextModel
  const std::string path = dir.file("sd2.safetensors");

  SECTION("loads; the block beyond the config, text_projection, logit_scale, attn_mask ignored") {
    FileBuilder file;
    add_other_components(file);
    // SD 2.x files hold a text_projection, unused by its CLIPTextModel
    OpenClipOptions options;
    options.extra_block = true;
    add_open_clip(file, golden_weights("clip_tiny"), "cond_stage_model.model.", options);
    file.add("cond_stage_model.model.text_projection", std::vector<float>(kD * 16, 0.125f),
             {kD, 16});
    file.write(path);
    auto model = models::load_clip_text_model_single_file<float>(path, config,
                                                                 ClipSingleFileLayout::open_clip);
    CHECK_FALSE(model.has_projection());
    CHECK(model.layers.size() == kLayers);
    const auto out = model.forward(golden_ids("clip_tiny"));
    CHECK(worst_golden_error(out, "clip_tiny") <= 1e-4);
    auto folder = models::load_clip_text_model<float>(test::clip_golden(""));
    CHECK(test::golden_error(out.last_hidden_state,
                             folder.forward(golden_ids("clip_tiny")).last_hidden_state) == 0);
  }
  SECTION("a missing in_proj is named as the file spells it") {
    FileBuilder file;
    add_other_components(file);
    OpenClipOptions options;
    options.skip = "transformer.resblocks.1.attn.in_proj_weight";
    add_open_clip(file, golden_weights("clip_tiny"), "cond_stage_model.model.", options);
    file.write(path);
    CHECK_THROWS_WITH(
        models::load_clip_text_model_single_file<float>(path, config,
                                                        ClipSingleFileLayout::open_clip),
        Contains("sd2.safetensors") &&
            Contains(
                "1 missing: cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"));
  }
  SECTION("a misshapen in_proj: expected [3D, D] against the file's shape") {
    FileBuilder file;
    add_other_components(file);
    OpenClipOptions options;
    options.in_proj_rows = 2 * kD;
    add_open_clip(file, golden_weights("clip_tiny"), "cond_stage_model.model.", options);
    file.write(path);
    CHECK_THROWS_WITH(
        models::load_clip_text_model_single_file<float>(path, config,
                                                        ClipSingleFileLayout::open_clip),
        Contains("sd2.safetensors") &&
            Contains("1 misshapen: cond_stage_model.model.transformer.resblocks.0.attn."
                     "in_proj_weight has shape [64,32], expected [96,32]"));
  }
  SECTION("a file with no tensor under the prefix names the layouts it has") {
    FileBuilder file;
    add_other_components(file);
    add_transformers(file, golden_weights("clip_tiny"),
                     "cond_stage_model.transformer.");  // an SD 1.x file
    file.write(path);
    CHECK_THROWS_WITH(models::load_clip_text_model_single_file<float>(
                          path, config, ClipSingleFileLayout::open_clip),
                      Contains("has no tensor named cond_stage_model.model.*") &&
                          Contains("cond_stage_model.transformer.* "
                                   "(ClipSingleFileLayout::hf_transformer)"));
    // and the file loads with the layout it has
    auto model = models::load_clip_text_model_single_file<float>(
        path, config, ClipSingleFileLayout::hf_transformer);
    CHECK(worst_golden_error(model.forward(golden_ids("clip_tiny")), "clip_tiny") <= 1e-4);
  }
}

TEST_CASE("single file: SDXL's text_projection must be there, transposed",
          "[clip][ldm][load][open_clip]") {
  test::TempDir dir("clip_open_clip_proj");
  const std::string path = dir.file("sdxl.safetensors");
  const auto config = golden_config("clip_proj_tiny");
  {
    FileBuilder file;
    add_other_components(file);
    OpenClipOptions options;
    options.skip = "text_projection";
    add_open_clip(file, golden_weights("clip_proj_tiny"), "conditioner.embedders.1.model.",
                  options);
    file.write(path);
  }
  CHECK_THROWS_WITH(models::load_clip_text_model_single_file<float>(
                        path, config, ClipSingleFileLayout::sdxl_second),
                    Contains("1 missing: conditioner.embedders.1.model.text_projection"));
  {
    FileBuilder file;
    OpenClipOptions options;
    options.transpose_projection = false;
    add_open_clip(file, golden_weights("clip_proj_tiny"), "conditioner.embedders.1.model.",
                  options);
    file.write(path);
  }
  CHECK_THROWS_WITH(
      models::load_clip_text_model_single_file<float>(path, config,
                                                      ClipSingleFileLayout::sdxl_second),
      Contains(
          "conditioner.embedders.1.model.text_projection has shape [24,32], expected [32,24]"));
}

TEST_CASE("OpenCLIP names and the SDXL second-encoder preset", "[clip][ldm][open_clip]") {
  CHECK(models::open_clip_name("text_model.encoder.layers.7.self_attn.k_proj.weight") ==
        "transformer.resblocks.7.attn.in_proj_weight");
  CHECK(models::open_clip_name("text_model.encoder.layers.0.mlp.fc2.bias") ==
        "transformer.resblocks.0.mlp.c_proj.bias");
  CHECK(models::open_clip_name("text_projection.weight") == "text_projection");
  CHECK_THROWS_WITH(models::open_clip_name("text_model.encoder.layers.0.self_attn.q_proj.lora_A"),
                    Contains("is not a parameter name"));
  const auto c = models::ClipTextConfig::sdxl_text_encoder_2();
  c.validate();
  CHECK(c.with_projection());
  CHECK(c.hidden_size == 1280);
  CHECK(c.num_hidden_layers == 32);
  CHECK(c.head_dim() == 64);
  CHECK(c.projection_dim == 1280);
  CHECK(c.hidden_act == models::ClipActivation::gelu);
}
