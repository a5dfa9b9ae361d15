// AutoencoderKL from other weight layouts: an original single-file checkpoint
// (first_stage_model.* LDM names, attention weights as 1×1 convs) built here from the golden
// vae_tiny weights by this test's own renaming table, a VAE-only LDM file, and a sharded diffusers
// folder (.safetensors.index.json) with an F16 shard.

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "clip/clip_test_support.hpp"  // test::TempDir
#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/ldm_names.hpp"
#include "difftrain/models/vae/vae_load.hpp"
#include "support/tensor_match.hpp"
#include "vae/vae_test_support.hpp"

using namespace difftrain;
using Catch::Matchers::Contains;
using difftrain::test::data_path;
using difftrain::test::relative_max_error;
using difftrain::test::vae_tiny;

namespace {

using Shape = std::vector<std::size_t>;
using Tensors = std::map<std::string, std::pair<std::vector<float>, Shape>>;

// This test's own LDM table for vae_tiny (3 blocks, layers_per_block 1: the decoder's up blocks
// have 2 resnets and are numbered from the shallowest in LDM).
const std::vector<std::pair<std::string, std::string>> kTinyModules = {
    {"encoder.down_blocks.0.resnets.0.", "encoder.down.0.block.0."},
    {"encoder.down_blocks.0.downsamplers.0.conv.", "encoder.down.0.downsample.conv."},
    {"encoder.down_blocks.1.resnets.0.", "encoder.down.1.block.0."},
    {"encoder.down_blocks.1.downsamplers.0.conv.", "encoder.down.1.downsample.conv."},
    {"encoder.down_blocks.2.resnets.0.", "encoder.down.2.block.0."},
    {"encoder.mid_block.resnets.0.", "encoder.mid.block_1."},
    {"encoder.mid_block.attentions.0.", "encoder.mid.attn_1."},
    {"encoder.mid_block.resnets.1.", "encoder.mid.block_2."},
    {"encoder.conv_norm_out.", "encoder.norm_out."},
    {"decoder.mid_block.resnets.0.", "decoder.mid.block_1."},
    {"decoder.mid_block.attentions.0.", "decoder.mid.attn_1."},
    {"decoder.mid_block.resnets.1.", "decoder.mid.block_2."},
    {"decoder.up_blocks.0.resnets.0.", "decoder.up.2.block.0."},
    {"decoder.up_blocks.0.resnets.1.", "decoder.up.2.block.1."},
    {"decoder.up_blocks.0.upsamplers.0.conv.", "decoder.up.2.upsample.conv."},
    {"decoder.up_blocks.1.resnets.0.", "decoder.up.1.block.0."},
    {"decoder.up_blocks.1.resnets.1.", "decoder.up.1.block.1."},
    {"decoder.up_blocks.1.upsamplers.0.conv.", "decoder.up.1.upsample.conv."},
    {"decoder.up_blocks.2.resnets.0.", "decoder.up.0.block.0."},
    {"decoder.up_blocks.2.resnets.1.", "decoder.up.0.block.1."},
    {"decoder.conv_norm_out.", "decoder.norm_out."},
    // alike in both
    {"encoder.conv_in.", "encoder.conv_in."},
    {"encoder.conv_out.", "encoder.conv_out."},
    {"decoder.conv_in.", "decoder.conv_in."},
    {"decoder.conv_out.", "decoder.conv_out."},
    {"quant_conv.", "quant_conv."},
    {"post_quant_conv.", "post_quant_conv."}};
const std::vector<std::pair<std::string, std::string>> kLeaves = {
    {"conv_shortcut.", "nin_shortcut."},
    {"group_norm.", "norm."},
    {"to_q.", "q."},
    {"to_k.", "k."},
    {"to_v.", "v."},
    {"to_out.0.", "proj_out."}};

// (LDM name, LDM shape) of a diffusers name and shape
std::pair<std::string, Shape> tiny_ldm(const std::string& name, Shape shape) {
  for (const auto& [module, ldm] : kTinyModules) {
    if (!name.starts_with(module)) continue;
    std::string rest = name.substr(module.size());
    for (const auto& [leaf, ldm_leaf] : kLeaves)
      if (rest.starts_with(leaf)) {
        rest = ldm_leaf + rest.substr(leaf.size());
        // LDM's attention projections are 1×1 convs
        if (module.ends_with("attentions.0.") && leaf != "group_norm." && shape.size() == 2)
          shape = {shape[0], shape[1], 1, 1};
        break;
      }
    return {ldm + rest, shape};
  }
  FAIL("parameter without an LDM name in the test's table: " << name);
  return {};
}

Tensors tiny_tensors() {
  const auto file =
      io::SafetensorsFile::open(data_path("vae_tiny/diffusion_pytorch_model.safetensors"));
  Tensors out;
  for (const auto& name : file.names()) out[name] = {file.read<float>(name), file.info(name).shape};
  return out;
}

// the vae_tiny weights under LDM names below `prefix`
Tensors tiny_ldm_tensors(const std::string& prefix) {
  Tensors out;
  for (const auto& [name, entry] : tiny_tensors()) {
    auto [ldm, shape] = tiny_ldm(name, entry.second);
    out[prefix + ldm] = {entry.first, shape};
  }
  return out;
}

void write_tensors(const std::string& path, const Tensors& tensors,
                   io::Dtype dtype = io::Dtype::F32) {
  std::vector<io::TensorToWrite> list;
  for (const auto& [name, entry] : tensors)
    list.push_back(io::TensorToWrite::from_span(name, std::span<const float>(entry.first),
                                                entry.second, dtype));
  io::save_safetensors(path, list);
}

// every parameter of `got` equals vae_tiny's within rtol
void check_same_parameters(models::AutoencoderKL<float>& got, double rtol) {
  std::map<std::string, xt::xarray<float>> expected;
  vae_tiny().for_each_parameter("", [&](const std::string& name, const nn::Parameter<float>& p) {
    expected.emplace(name, p.value);
  });
  std::size_t n = 0;
  got.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>& p) {
    INFO(name);
    REQUIRE_CLOSE(p.value, expected.at(name), rtol, rtol == 0 ? 0.0 : 1e-6);
    ++n;
  });
  CHECK(n == expected.size());
}

}  // namespace

TEST_CASE("ldm_vae_name: the SD 1.5 VAE's names in original checkpoints", "[vae][ldm]") {
  const auto config = models::AutoencoderKLConfig::sd15();  // 4 blocks, 2 layers per block
  const std::vector<std::pair<std::string, std::string>> pairs = {
      {"encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
       "encoder.down.1.block.0.nin_shortcut.weight"},
      {"encoder.down_blocks.2.downsamplers.0.conv.bias", "encoder.down.2.downsample.conv.bias"},
      {"encoder.mid_block.attentions.0.group_norm.weight", "encoder.mid.attn_1.norm.weight"},
      {"encoder.mid_block.resnets.1.conv2.weight", "encoder.mid.block_2.conv2.weight"},
      {"encoder.conv_norm_out.bias", "encoder.norm_out.bias"},
      {"decoder.up_blocks.0.upsamplers.0.conv.weight", "decoder.up.3.upsample.conv.weight"},
      {"decoder.up_blocks.3.resnets.2.norm1.bias", "decoder.up.0.block.2.norm1.bias"},
      {"decoder.up_blocks.2.resnets.0.conv_shortcut.weight",
       "decoder.up.1.block.0.nin_shortcut.weight"},
      {"decoder.mid_block.attentions.0.to_out.0.weight", "decoder.mid.attn_1.proj_out.weight"},
      {"decoder.mid_block.attentions.0.to_v.bias", "decoder.mid.attn_1.v.bias"},
      {"post_quant_conv.weight", "post_quant_conv.weight"}};
  for (const auto& [diffusers, ldm] : pairs) {
    INFO(diffusers);
    CHECK(models::ldm_vae_name(config, diffusers) == ldm);
  }
  // the last encoder block has no downsampler, the first decoder block is the deepest (3 resnets)
  CHECK_THROWS_AS(models::ldm_vae_name(config, "encoder.down_blocks.3.downsamplers.0.conv.weight"),
                  Error);
  CHECK_THROWS_AS(models::ldm_vae_name(config, "decoder.up_blocks.3.upsamplers.0.conv.weight"),
                  Error);
  CHECK_THROWS_AS(models::ldm_vae_name(config, "decoder.up_blocks.0.resnets.3.conv1.weight"),
                  Error);
  CHECK_THROWS_AS(models::ldm_vae_name(config, "encoder.down_blocks.0.resnets.2.conv1.weight"),
                  Error);
  CHECK_THROWS_AS(models::ldm_vae_name(config, "encoder.mid_block.attentions.0.query.weight"),
                  Error);
}

TEST_CASE("load_vae_single_file: a vae_tiny single file reproduces the golden outputs",
          "[vae][ldm][load]") {
  test::TempDir dir("vae_single_file");
  const auto config = vae_tiny().config();
  const auto inputs = io::SafetensorsFile::open(data_path("vae_tiny/inputs.safetensors"));
  const auto expected = io::SafetensorsFile::open(data_path("vae_tiny/expected.safetensors"));
  const Tensor4<float> image = inputs.read_tensor<float, 4>("image");

  SECTION("first_stage_model.* among the other components' tensors") {
    Tensors tensors = tiny_ldm_tensors("first_stage_model.");
    REQUIRE(tensors.at("first_stage_model.decoder.mid.attn_1.q.weight").second ==
            Shape{64, 64, 1, 1});
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = {std::vector<float>(8, 1.f), {8}};
    tensors["cond_stage_model.transformer.text_model.final_layer_norm.bias"] = {
        std::vector<float>(4, 0.f), {4}};
    tensors["model_ema.decay"] = {{0.9999f}, {}};
    write_tensors(dir.file("ldm.safetensors"), tensors);
    auto vae = models::load_vae_single_file<float>(dir.file("ldm.safetensors"), config);
    check_same_parameters(vae, 0.0);
    const auto posterior = vae.encode(image);
    const double error = relative_max_error(posterior.mean, expected.read_tensor<float, 4>("mean"));
    INFO("mean error " << error);
    CHECK(error <= 1e-4);
    CHECK(relative_max_error(posterior.logvar, expected.read_tensor<float, 4>("logvar")) <= 1e-4);
  }
  SECTION("a VAE-only LDM file (no prefix), F16") {
    write_tensors(dir.file("vae-only.safetensors"), tiny_ldm_tensors(""), io::Dtype::F16);
    auto vae = models::load_vae_single_file<float>(dir.file("vae-only.safetensors"), config);
    check_same_parameters(vae, 1e-3);
  }
  SECTION("missing, unexpected and misshapen tensors are named as the file spells them") {
    Tensors tensors = tiny_ldm_tensors("first_stage_model.");
    tensors.erase("first_stage_model.encoder.mid.attn_1.k.bias");
    tensors["first_stage_model.encoder.down.2.downsample.conv.weight"] = {
        std::vector<float>(4, 0.f), {2, 2}};
    tensors["first_stage_model.decoder.norm_out.weight"].second = {2, 16};
    write_tensors(dir.file("broken.safetensors"), tensors);
    CHECK_ERROR_WITH(
        models::load_vae_single_file<float>(dir.file("broken.safetensors"), config),
        Contains("broken.safetensors") &&
            Contains("1 missing: first_stage_model.encoder.mid.attn_1.k.bias") &&
            Contains("1 unexpected: first_stage_model.encoder.down.2.downsample.conv.weight") &&
            Contains("first_stage_model.decoder.norm_out.weight has shape [2,16], expected [32]"));
  }
}

TEST_CASE("load_vae: a sharded diffusers folder (.safetensors.index.json), F16 shard",
          "[vae][load]") {
  test::TempDir dir("vae_sharded");
  std::filesystem::copy_file(data_path("vae_tiny/config.json"), dir.path() / "config.json");
  Tensors encoder, rest;
  nlohmann::json index;
  index["metadata"]["total_size"] = 0;
  for (const auto& [name, entry] : tiny_tensors()) {
    const bool first = name.starts_with("encoder.");
    (first ? encoder : rest)[name] = entry;
    index["weight_map"][name] = first ? "diffusion_pytorch_model-00001-of-00002.safetensors"
                                      : "diffusion_pytorch_model-00002-of-00002.safetensors";
  }
  write_tensors(dir.file("diffusion_pytorch_model-00001-of-00002.safetensors"), encoder);
  write_tensors(dir.file("diffusion_pytorch_model-00002-of-00002.safetensors"), rest);
  std::ofstream(dir.file("diffusion_pytorch_model.safetensors.index.json")) << index.dump();
  {
    auto vae = models::load_vae<float>(dir.path().string());
    check_same_parameters(vae, 0.0);
  }
  write_tensors(dir.file("diffusion_pytorch_model-00002-of-00002.safetensors"), rest,
                io::Dtype::F16);
  {
    auto vae = models::load_vae<float>(dir.path().string());
    check_same_parameters(vae, 1e-3);
  }
  // a tensor in no shard: named in the error
  rest.erase("decoder.conv_out.bias");
  write_tensors(dir.file("diffusion_pytorch_model-00002-of-00002.safetensors"), rest);
  CHECK_ERROR_WITH(models::load_vae<float>(dir.path().string()),
                   Contains("1 missing: decoder.conv_out.bias"));
}
