// Original single-file checkpoints (model.diffusion_model.* LDM names) for the UNet: the SD 1.5
// preset's 686 diffusers names map one-to-one onto the LDM names (checked against pairs and
// shapes of the original checkpoint), and a single file built here from the golden unet_tiny
// weights, renamed by this test's own table, loads strictly, ignores the other components'
// tensors and reproduces the golden output (API and `difftrain unet --config`).

#include <CLI/CLI.hpp>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "clip/clip_test_support.hpp"  // test::TempDir
#include "cmd_unet.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/ldm_names.hpp"
#include "difftrain/models/unet/load.hpp"
#include "single_threaded.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using Catch::Matchers::Contains;
using difftrain::test::data_path;
using models::UNet2DConditionConfig;

namespace {

using Shape = std::vector<std::size_t>;

// This test's own LDM table for the unet_tiny config (2 blocks, layers_per_block 1, attention in
// down block 0 and up block 1), written out by hand from the LDM UNet's block list.
const std::vector<std::pair<std::string, std::string>> kTinyModules = {
    {"conv_in.", "input_blocks.0.0."},
    {"time_embedding.linear_1.", "time_embed.0."},
    {"time_embedding.linear_2.", "time_embed.2."},
    {"down_blocks.0.resnets.0.", "input_blocks.1.0."},
    {"down_blocks.0.attentions.0.", "input_blocks.1.1."},
    {"down_blocks.0.downsamplers.0.conv.", "input_blocks.2.0.op."},
    {"down_blocks.1.resnets.0.", "input_blocks.3.0."},
    {"mid_block.resnets.0.", "middle_block.0."},
    {"mid_block.attentions.0.", "middle_block.1."},
    {"mid_block.resnets.1.", "middle_block.2."},
    {"up_blocks.0.resnets.0.", "output_blocks.0.0."},
    {"up_blocks.0.resnets.1.", "output_blocks.1.0."},
    {"up_blocks.0.upsamplers.0.conv.", "output_blocks.1.1.conv."},
    {"up_blocks.1.resnets.0.", "output_blocks.2.0."},
    {"up_blocks.1.attentions.0.", "output_blocks.2.1."},
    {"up_blocks.1.resnets.1.", "output_blocks.3.0."},
    {"up_blocks.1.attentions.1.", "output_blocks.3.1."},
    {"conv_norm_out.", "out.0."},
    {"conv_out.", "out.2."}};
const std::vector<std::pair<std::string, std::string>> kResnetLeaves = {
    {"norm1.", "in_layers.0."},          {"conv1.", "in_layers.2."},
    {"time_emb_proj.", "emb_layers.1."}, {"norm2.", "out_layers.0."},
    {"conv2.", "out_layers.3."},         {"conv_shortcut.", "skip_connection."}};

// The LDM name of a diffusers parameter by one of this test's module tables.
std::string table_ldm_name(const std::vector<std::pair<std::string, std::string>>& table,
                           const std::string& name) {
  for (const auto& [module, ldm] : table) {
    if (!name.starts_with(module)) continue;
    std::string rest = name.substr(module.size());
    if (module.find("resnets") != std::string::npos) {
      for (const auto& [leaf, ldm_leaf] : kResnetLeaves)
        if (rest.starts_with(leaf)) return ldm + ldm_leaf + rest.substr(leaf.size());
      FAIL("resnet parameter without an LDM name in the test's table: " << name);
    }
    return ldm + rest;
  }
  FAIL("parameter without an LDM name in the test's table: " << name);
  return {};
}

using Tensors = std::map<std::string, std::pair<std::vector<float>, Shape>>;

// The golden unet_tiny weights under LDM names, with tensors of the other components of an
// original checkpoint around them (which the UNet loader must ignore).
Tensors tiny_single_file_tensors() {
  const auto file =
      io::SafetensorsFile::open(data_path("unet_tiny/diffusion_pytorch_model.safetensors"));
  Tensors out;
  for (const auto& name : file.names())
    out["model.diffusion_model." + table_ldm_name(kTinyModules, name)] = {file.read<float>(name),
                                                                          file.info(name).shape};
  REQUIRE(out.size() == 208);
  out["first_stage_model.encoder.conv_in.weight"] = {std::vector<float>(8 * 3 * 9, 0.5f),
                                                     {8, 3, 3, 3}};
  out["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = {
      std::vector<float>(32, 1.f), {32}};
  out["model_ema.decay"] = {{0.9999f}, {}};
  out["model_ema.diffusion_modelconv_inweight"] = {std::vector<float>(4, 0.f), {4}};
  out["alphas_cumprod"] = {std::vector<float>(1000, 0.5f), {1000}};
  return out;
}

void write_tensors(const std::string& path, const Tensors& tensors) {
  std::vector<io::TensorToWrite> list;
  for (const auto& [name, entry] : tensors)
    list.push_back(io::TensorToWrite::from_span(name, std::span<const float>(entry.first),
                                                entry.second, io::Dtype::F32));
  io::save_safetensors(path, list);
}

}  // namespace

TEST_CASE("LDM names: the SD 1.5 UNet's 686 diffusers names map one-to-one onto LDM names",
          "[models][unet][ldm]") {
  const auto config = UNet2DConditionConfig::sd15();
  const models::UNet2DConditionModel<float> model(config, models::Allocation::shapes_only);
  std::map<std::string, std::string> to_diffusers;  // LDM → diffusers
  std::map<std::string, Shape> ldm_shapes;
  std::set<std::string> blocks;  // "input_blocks.N", "middle_block.N", "output_blocks.N", ...
  std::size_t count = 0;
  model.for_each_parameter_shape("", [&](const std::string& name, const Shape& shape) {
    ++count;
    const std::string ldm = models::ldm_unet_name(config, name);
    INFO(name << " -> " << ldm);
    CHECK(to_diffusers.emplace(ldm, name).second);  // injective
    ldm_shapes.emplace(ldm, shape);
    const auto first = ldm.find('.');
    const auto second = ldm.find('.', first + 1);
    const std::string head = ldm.substr(0, first);
    blocks.insert(head == "input_blocks" || head == "middle_block" || head == "output_blocks"
                      ? ldm.substr(0, second)
                      : head);
  });
  CHECK(count == 686);
  CHECK(to_diffusers.size() == 686);

  // the original checkpoint's top-level modules: 12 input blocks, 3 middle, 12 output, time_embed,
  // out
  std::set<std::string> expected_blocks = {"time_embed", "out"};
  for (int i = 0; i < 12; ++i) {
    expected_blocks.insert("input_blocks." + std::to_string(i));
    expected_blocks.insert("output_blocks." + std::to_string(i));
  }
  for (int i = 0; i < 3; ++i) expected_blocks.insert("middle_block." + std::to_string(i));
  CHECK(blocks == expected_blocks);

  // pairs from REFERENCE-formats.md (c) and the SD 1.5 checkpoint's own names and shapes
  const std::vector<std::pair<std::string, std::string>> pairs = {
      {"input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
       "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"},
      {"output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"},
      {"input_blocks.0.0.weight", "conv_in.weight"},
      {"time_embed.0.weight", "time_embedding.linear_1.weight"},
      {"time_embed.2.bias", "time_embedding.linear_2.bias"},
      {"input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"},
      {"input_blocks.9.0.op.bias", "down_blocks.2.downsamplers.0.conv.bias"},
      {"input_blocks.11.0.out_layers.3.weight", "down_blocks.3.resnets.1.conv2.weight"},
      {"input_blocks.4.0.skip_connection.weight", "down_blocks.1.resnets.0.conv_shortcut.weight"},
      {"input_blocks.8.1.proj_out.weight", "down_blocks.2.attentions.1.proj_out.weight"},
      {"middle_block.0.emb_layers.1.weight", "mid_block.resnets.0.time_emb_proj.weight"},
      {"middle_block.1.transformer_blocks.0.attn2.to_k.weight",
       "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"},
      {"middle_block.2.in_layers.0.weight", "mid_block.resnets.1.norm1.weight"},
      {"output_blocks.0.0.in_layers.2.weight", "up_blocks.0.resnets.0.conv1.weight"},
      {"output_blocks.5.2.conv.weight", "up_blocks.1.upsamplers.0.conv.weight"},
      {"output_blocks.8.2.conv.bias", "up_blocks.2.upsamplers.0.conv.bias"},
      {"output_blocks.5.1.norm.weight", "up_blocks.1.attentions.2.norm.weight"},
      {"output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
       "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight"},
      {"output_blocks.11.0.skip_connection.weight", "up_blocks.3.resnets.2.conv_shortcut.weight"},
      {"out.0.weight", "conv_norm_out.weight"},
      {"out.2.bias", "conv_out.bias"}};
  for (const auto& [ldm, diffusers] : pairs) {
    INFO(ldm << " == " << diffusers);
    REQUIRE(to_diffusers.count(ldm) == 1);
    CHECK(to_diffusers.at(ldm) == diffusers);
  }
  // shapes the v1-5 checkpoint has under these LDM names
  CHECK(ldm_shapes.at("output_blocks.2.1.conv.weight") == Shape{1280, 1280, 3, 3});
  CHECK(ldm_shapes.at("input_blocks.4.0.skip_connection.weight") == Shape{640, 320, 1, 1});
  CHECK(ldm_shapes.at("output_blocks.0.0.in_layers.2.weight") == Shape{1280, 2560, 3, 3});
  CHECK(ldm_shapes.at("output_blocks.3.0.in_layers.2.weight") == Shape{1280, 2560, 3, 3});
  CHECK(ldm_shapes.at("output_blocks.9.0.in_layers.2.weight") == Shape{320, 960, 3, 3});
  CHECK(ldm_shapes.at("middle_block.1.proj_in.weight") == Shape{1280, 1280, 1, 1});
  CHECK(ldm_shapes.at("time_embed.0.weight") == Shape{1280, 320});
  CHECK(ldm_shapes.at("out.2.weight") == Shape{4, 320, 3, 3});
  // 12 + 3 + 12 blocks: nothing beyond them; an attention in the resnet-only block 3: no name
  CHECK(ldm_shapes.count("input_blocks.12.0.in_layers.0.weight") == 0);
  CHECK_THROWS_WITH(models::ldm_unet_name(config, "down_blocks.3.attentions.0.norm.weight"),
                    Contains("down_blocks.3.attentions.0.norm.weight"));
  CHECK_THROWS_AS(models::ldm_unet_name(config, "down_blocks.3.downsamplers.0.conv.weight"), Error);
  CHECK_THROWS_AS(models::ldm_unet_name(config, "up_blocks.0.resnets.3.conv1.weight"), Error);
  CHECK_THROWS_AS(models::ldm_unet_name(config, "up_blocks.x.resnets.0.conv1.weight"), Error);
  CHECK_THROWS_AS(models::ldm_unet_name(config, "mid_block.resnets.0.dropout.weight"), Error);
}

TEST_CASE("load_unet_single_file: a unet_tiny single file reproduces the golden output",
          "[models][unet][ldm]") {
  const test::SingleThreaded single_threaded;
  test::TempDir dir("unet_single_file");
  const std::string path = dir.file("tiny-ldm.safetensors");
  const Tensors tensors = tiny_single_file_tensors();
  write_tensors(path, tensors);
  const auto config = UNet2DConditionConfig::from_file(data_path("unet_tiny/config.json"));

  SECTION("the same parameters as the diffusers folder, the golden output") {
    auto model = models::load_unet_single_file<float>(path, config);
    const auto reference = models::load_unet<float>(data_path("unet_tiny"));
    std::map<std::string, const xt::xarray<float>*> ref_values;
    reference.for_each_parameter("", [&](const std::string& name, const nn::Parameter<float>& p) {
      ref_values.emplace(name, &p.value);
    });
    std::size_t loaded = 0;
    model.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>& p) {
      INFO(name);
      REQUIRE_CLOSE(p.value, *ref_values.at(name), 0.0, 0.0);
      ++loaded;
    });
    CHECK(loaded == 208);

    const auto inputs = io::SafetensorsFile::open(data_path("unet_tiny/inputs.safetensors"));
    const auto expected = io::SafetensorsFile::open(data_path("unet_tiny/expected.safetensors"));
    const auto t = inputs.read<std::int64_t>("timestep");
    const Tensor4<float> output =
        model.forward(inputs.read_tensor<float, 4>("sample"), std::span<const std::int64_t>(t),
                      inputs.read_tensor<float, 3>("encoder_hidden_states"));
    const double error = test::golden_error(output, expected.read<float>("output"));
    INFO("forward error " << error);
    CHECK(error <= 1e-4);
  }
  SECTION("difftrain unet --model FILE --config CONFIG.json") {
    std::vector<std::string> args = {"difftrain", "unet",
                                     "--model",   path,
                                     "--config",  data_path("unet_tiny/config.json"),
                                     "--inputs",  data_path("unet_tiny/inputs.safetensors"),
                                     "--out",     dir.file("out.safetensors"),
                                     "--threads", "1"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    CLI::App app;
    int exit_code = -1;
    tools::add_unet_command(app, exit_code);
    app.parse(int(argv.size()), argv.data());
    REQUIRE(exit_code == 0);
    const auto out = io::SafetensorsFile::open(dir.file("out.safetensors"));
    const auto expected = io::SafetensorsFile::open(data_path("unet_tiny/expected.safetensors"));
    for (const char* name : {"output", "grad_sample"}) {
      const double error = test::golden_error(out.read<float>(name), expected.read<float>(name));
      INFO(name << " error " << error);
      CHECK(error <= (name == std::string("output") ? 1e-4 : 1e-3));
    }
    // the gradients of every base parameter are keyed by diffusers names
    CHECK(out.contains("grad.down_blocks.0.downsamplers.0.conv.weight"));
  }
  SECTION("missing, unexpected and misshapen tensors are named as the file spells them") {
    Tensors broken = tensors;
    broken.erase("model.diffusion_model.output_blocks.1.1.conv.bias");
    broken["model.diffusion_model.label_emb.0.0.weight"] = {std::vector<float>(4, 0.f), {2, 2}};
    broken["model.diffusion_model.out.2.weight"].second = {4, 32, 9};
    write_tensors(path, broken);
    CHECK_THROWS_WITH(
        models::load_unet_single_file<float>(path, config),
        Contains("tiny-ldm.safetensors") &&
            Contains("1 missing: model.diffusion_model.output_blocks.1.1.conv.bias") &&
            Contains("1 unexpected: model.diffusion_model.label_emb.0.0.weight") &&
            Contains("model.diffusion_model.out.2.weight has shape [4,32,9], expected [4,32,3,3]"));
  }
  SECTION("a file without model.diffusion_model.* tensors (e.g. a diffusers file)") {
    CHECK_THROWS_WITH(models::load_unet_single_file<float>(
                          data_path("unet_tiny/diffusion_pytorch_model.safetensors"), config),
                      Contains("has no tensor named model.diffusion_model.*"));
  }
}

namespace {
// This test's own LDM table for unet_sdxl_tiny (SDXL's layout: 2 levels, layers_per_block 2,
// attention only in the deeper level, label_emb for add_embedding), written out by hand.
const std::vector<std::pair<std::string, std::string>> kSdxlTinyModules = {
    {"conv_in.", "input_blocks.0.0."},
    {"time_embedding.linear_1.", "time_embed.0."},
    {"time_embedding.linear_2.", "time_embed.2."},
    {"add_embedding.linear_1.", "label_emb.0.0."},
    {"add_embedding.linear_2.", "label_emb.0.2."},
    {"down_blocks.0.resnets.0.", "input_blocks.1.0."},
    {"down_blocks.0.resnets.1.", "input_blocks.2.0."},
    {"down_blocks.0.downsamplers.0.conv.", "input_blocks.3.0.op."},
    {"down_blocks.1.resnets.0.", "input_blocks.4.0."},
    {"down_blocks.1.attentions.0.", "input_blocks.4.1."},
    {"down_blocks.1.resnets.1.", "input_blocks.5.0."},
    {"down_blocks.1.attentions.1.", "input_blocks.5.1."},
    {"mid_block.resnets.0.", "middle_block.0."},
    {"mid_block.attentions.0.", "middle_block.1."},
    {"mid_block.resnets.1.", "middle_block.2."},
    {"up_blocks.0.resnets.0.", "output_blocks.0.0."},
    {"up_blocks.0.attentions.0.", "output_blocks.0.1."},
    {"up_blocks.0.resnets.1.", "output_blocks.1.0."},
    {"up_blocks.0.attentions.1.", "output_blocks.1.1."},
    {"up_blocks.0.resnets.2.", "output_blocks.2.0."},
    {"up_blocks.0.attentions.2.", "output_blocks.2.1."},
    {"up_blocks.0.upsamplers.0.conv.", "output_blocks.2.2.conv."},
    {"up_blocks.1.resnets.0.", "output_blocks.3.0."},
    {"up_blocks.1.resnets.1.", "output_blocks.4.0."},
    {"up_blocks.1.resnets.2.", "output_blocks.5.0."},
    {"conv_norm_out.", "out.0."},
    {"conv_out.", "out.2."}};

}  // namespace

TEST_CASE(
    "load_unet_single_file: an SDXL single file (SGM names, label_emb) gives the golden output",
    "[models][unet][ldm][sdxl]") {
  const test::SingleThreaded single_threaded;
  test::TempDir dir("unet_sdxl_single_file");
  const std::string path = dir.file("sdxl-tiny.safetensors");
  const auto weights =
      io::SafetensorsFile::open(data_path("unet_sdxl_tiny/diffusion_pytorch_model.safetensors"));
  Tensors tensors;
  for (const auto& name : weights.names())
    tensors["model.diffusion_model." + table_ldm_name(kSdxlTinyModules, name)] = {
        weights.read<float>(name), weights.info(name).shape};
  REQUIRE(tensors.size() == 428);
  // the other components of an SDXL checkpoint, which the UNet loader ignores
  tensors["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = {
      std::vector<float>(32, 1.f), {32}};
  tensors["conditioner.embedders.1.model.ln_final.weight"] = {std::vector<float>(32, 1.f), {32}};
  tensors["first_stage_model.encoder.conv_in.weight"] = {std::vector<float>(8 * 3 * 9, 0.5f),
                                                         {8, 3, 3, 3}};
  write_tensors(path, tensors);

  const auto config = UNet2DConditionConfig::from_file(data_path("unet_sdxl_tiny/config.json"));
  auto model = models::load_unet_single_file<float>(path, config);
  const auto inputs = io::SafetensorsFile::open(data_path("unet_sdxl_tiny/inputs.safetensors"));
  const auto expected = io::SafetensorsFile::open(data_path("unet_sdxl_tiny/expected.safetensors"));
  const auto t = inputs.read<std::int64_t>("timestep");
  AddedConditions<float> added{inputs.read_tensor<float, 2>("text_embeds"),
                               inputs.read_tensor<float, 2>("time_ids")};
  const Tensor4<float> output =
      model.forward(inputs.read_tensor<float, 4>("sample"), std::span<const std::int64_t>(t),
                    inputs.read_tensor<float, 3>("encoder_hidden_states"), added);
  const double error = test::golden_error(output, expected.read<float>("output"));
  INFO("forward error " << error);
  CHECK(error <= 1e-4);

  // SDXL 1.0's own checkpoint names for the preset (9 input and 9 output blocks)
  const auto sdxl = UNet2DConditionConfig::sdxl();
  CHECK(models::ldm_unet_name(sdxl, "add_embedding.linear_1.weight") == "label_emb.0.0.weight");
  CHECK(models::ldm_unet_name(sdxl,
                              "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k."
                              "weight") ==
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight");
  CHECK(models::ldm_unet_name(sdxl, "up_blocks.1.upsamplers.0.conv.weight") ==
        "output_blocks.5.2.conv.weight");
  CHECK(models::ldm_unet_name(sdxl, "up_blocks.2.resnets.2.conv_shortcut.bias") ==
        "output_blocks.8.0.skip_connection.bias");
  CHECK_THROWS_AS(
      models::ldm_unet_name(UNet2DConditionConfig::sd15(), "add_embedding.linear_1.weight"), Error);
}
