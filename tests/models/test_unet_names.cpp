// Parameter names and shapes of UNet2DConditionModel (diffusers' state-dict keys), the
// shapes-only construction, module access for LoRA, and strict loading from safetensors.

#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/models.hpp"
#include "support/temp_dir.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using difftrain::test::data_path;
using models::Allocation;
using models::UNet2DConditionConfig;
using models::UNet2DConditionModel;

namespace {

using NamedShapes = std::vector<std::pair<std::string, std::vector<std::size_t>>>;

// "<key> [d0,d1,...]" lines of the golden key list, comments skipped
NamedShapes read_key_file(const std::string& path) {
  std::ifstream in(path);
  REQUIRE(in.good());
  NamedShapes out;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream fields(line);
    std::string name, shape_text;
    fields >> name >> shape_text;
    std::vector<std::size_t> shape;
    std::string inner = shape_text.substr(1, shape_text.size() - 2);
    std::istringstream dims(inner);
    std::string dim;
    while (std::getline(dims, dim, ',')) shape.push_back(std::stoul(dim));
    out.emplace_back(name, shape);
  }
  return out;
}

template <class T>
NamedShapes declared_shapes(const UNet2DConditionModel<T>& model) {
  NamedShapes out;
  model.for_each_parameter_shape(
      "", [&](const std::string& name, const std::vector<std::size_t>& shape) {
        out.emplace_back(name, shape);
      });
  return out;
}

template <class T>
NamedShapes allocated_shapes(UNet2DConditionModel<T>& model) {
  NamedShapes out;
  model.for_each_parameter("", [&](const std::string& name, nn::Parameter<T>& p) {
    out.emplace_back(name,
                     std::vector<std::size_t>(p.value.shape().begin(), p.value.shape().end()));
  });
  return out;
}

std::size_t parameter_count(const NamedShapes& shapes) {
  std::size_t total = 0;
  for (const auto& [name, shape] : shapes) {
    std::size_t n = 1;
    for (auto d : shape) n *= d;
    total += n;
  }
  return total;
}

// Several structurally different small configs (all built for real in the tests below).
std::vector<std::pair<std::string, nlohmann::json>> small_configs() {
  std::vector<std::pair<std::string, nlohmann::json>> out;
  nlohmann::json tiny;
  {
    std::ifstream in(data_path("unet_tiny/config.json"));
    tiny = nlohmann::json::parse(in);
  }
  out.emplace_back("unet_tiny", tiny);
  nlohmann::json wide = tiny;  // three levels, linear projection, lists, 2 transformer layers
  wide["block_out_channels"] = {8, 16, 24};
  wide["down_block_types"] = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"};
  wide["up_block_types"] = {"CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"};
  wide["layers_per_block"] = {1, 2, 1};
  wide["attention_head_dim"] = {2, 4, 3};
  wide["transformer_layers_per_block"] = {2, 1, 1};
  wide["norm_num_groups"] = 4;
  wide["cross_attention_dim"] = 12;
  wide["use_linear_projection"] = true;
  wide["downsample_padding"] = 0;
  wide["time_embedding_dim"] = 20;
  out.emplace_back("wide", wide);
  nlohmann::json no_mid = tiny;
  no_mid["mid_block_type"] = nullptr;
  no_mid["block_out_channels"] = {8, 8};
  no_mid["norm_num_groups"] = 2;
  out.emplace_back("no_mid", no_mid);
  return out;
}

}  // namespace

TEST_CASE("UNet2DConditionModel (SD 1.5, shapes only) has diffusers' 686 keys and shapes",
          "[models][unet][names]") {
  const NamedShapes expected = read_key_file(data_path("sd15_unet_diffusers_keys.txt"));
  REQUIRE(expected.size() == 686);
  const UNet2DConditionModel<float> model(UNet2DConditionConfig::sd15(), Allocation::shapes_only);
  const NamedShapes got = declared_shapes(model);
  REQUIRE(got.size() == expected.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    INFO("entry " << i << ": got " << got[i].first << " " << shape_string(got[i].second)
                  << ", expected " << expected[i].first << " " << shape_string(expected[i].second));
    REQUIRE(got[i] == expected[i]);  // same names, same shapes, in the same (forward) order
  }
  CHECK(parameter_count(got) == 859'520'964);

  // no storage: every layer is default-constructed, and nothing hands out those empty layers
  std::size_t stored = 0;
  UNet2DConditionModel<float> mutable_model(UNet2DConditionConfig::sd15(), Allocation::shapes_only);
  mutable_model.walk(mutable_model, "", [&](const std::string&, auto& layer, const auto&) {
    layer.for_each_parameter("", [&](const std::string&, nn::Parameter<float>& p) {
      stored += p.value.dimension() > 0 ? p.value.size() : 0;
      stored += p.grad.dimension() > 0 ? p.grad.size() : 0;
    });
  });
  CHECK(stored == 0);
  CHECK_THROWS_AS(mutable_model.for_each_parameter("", [](const std::string&, auto&) {}), Error);
  CHECK_THROWS_AS(mutable_model.for_each_linear("", [](const std::string&, auto&) {}), Error);
  Tensor4<float> x = xt::zeros<float>(std::array<std::size_t, 4>{1, 4, 8, 8});
  Tensor3<float> ctx = xt::zeros<float>(std::array<std::size_t, 3>{1, 77, 768});
  std::vector<std::int64_t> t{10};
  CHECK_THROWS_AS(mutable_model.forward(x, std::span<const std::int64_t>(t), ctx), Error);
}

TEST_CASE("UNet2DConditionModel (SD 2.1, shapes only): linear projections, 1024-wide context",
          "[models][unet][names]") {
  const UNet2DConditionModel<float> model(UNet2DConditionConfig::sd21(), Allocation::shapes_only);
  std::map<std::string, std::vector<std::size_t>> shapes;
  for (auto& [name, shape] : declared_shapes(model)) shapes.emplace(name, shape);
  CHECK(shapes.size() == 686);
  using V = std::vector<std::size_t>;
  CHECK(shapes.at("down_blocks.0.attentions.0.proj_in.weight") == V{320, 320});
  CHECK(shapes.at("up_blocks.3.attentions.2.proj_out.weight") == V{320, 320});
  CHECK(shapes.at("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight") ==
        V{1280, 1024});
  CHECK(shapes.at("down_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj.weight") ==
        V{10240, 1280});
}

TEST_CASE("UNet2DConditionModel: declared shapes equal the allocated parameters",
          "[models][unet][names]") {
  for (const auto& [label, json] : small_configs()) {
    INFO("config " << label << ": " << json.dump());
    UNet2DConditionModel<float> model(UNet2DConditionConfig::from_json(json));
    const NamedShapes declared = declared_shapes(model);
    const NamedShapes allocated = allocated_shapes(model);
    REQUIRE(declared.size() == allocated.size());
    for (std::size_t i = 0; i < declared.size(); ++i) {
      INFO("entry " << i << ": declared " << declared[i].first << " "
                    << shape_string(declared[i].second) << ", allocated " << allocated[i].first
                    << " " << shape_string(allocated[i].second));
      REQUIRE(declared[i] == allocated[i]);
    }
    std::set<std::string> unique;
    for (const auto& [name, shape] : declared) unique.insert(name);
    CHECK(unique.size() == declared.size());
  }
  // the golden checkpoint has exactly these 208 tensors
  UNet2DConditionModel<float> tiny(
      UNet2DConditionConfig::from_file(data_path("unet_tiny/config.json")));
  const auto file =
      io::SafetensorsFile::open(data_path("unet_tiny/diffusion_pytorch_model.safetensors"));
  const auto shapes = allocated_shapes(tiny);
  CHECK(shapes.size() == 208);
  for (const auto& [name, shape] : shapes) {
    INFO(name);
    REQUIRE(file.contains(name));
    CHECK(file.info(name).shape == shape);
  }
}

TEST_CASE("UNet2DConditionModel: specific structure of the wide config", "[models][unet][names]") {
  UNet2DConditionModel<float> model(UNet2DConditionConfig::from_json(small_configs()[1].second));
  std::map<std::string, std::vector<std::size_t>> shapes;
  for (auto& [name, shape] : allocated_shapes(model)) shapes.emplace(name, shape);
  using V = std::vector<std::size_t>;
  // down block 2: 24 channels, 3 heads of 8, linear projection, context 12
  CHECK(shapes.at("down_blocks.2.attentions.0.proj_in.weight") == V{24, 24});
  CHECK(shapes.at("down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k.weight") ==
        V{24, 12});
  CHECK(shapes.count("down_blocks.2.downsamplers.0.conv.weight") == 0);
  CHECK(shapes.at("down_blocks.0.downsamplers.0.conv.weight") == V{8, 8, 3, 3});
  // transformer_layers_per_block [2, 1, 1]: down 0 has two blocks, up 2 (reversed) too
  CHECK(shapes.count("down_blocks.0.attentions.0.transformer_blocks.1.norm1.weight") == 1);
  CHECK(shapes.count("up_blocks.2.attentions.0.transformer_blocks.1.norm1.weight") == 1);
  CHECK(shapes.count("up_blocks.0.attentions.0.transformer_blocks.1.norm1.weight") == 0);
  // layers_per_block [1, 2, 1]: up block 1 (reversed entry 2) has 3 resnets
  CHECK(shapes.count("up_blocks.1.resnets.2.conv1.weight") == 1);
  CHECK(shapes.count("up_blocks.1.resnets.3.conv1.weight") == 0);
  CHECK(shapes.count("up_blocks.0.resnets.1.conv1.weight") == 1);
  CHECK(shapes.count("up_blocks.0.resnets.2.conv1.weight") == 0);
  // resnet inputs: up 0 resnet 0 = 24 (mid) + 24 (skip); up 2 last resnet = 8 + 8 (conv_in skip)
  CHECK(shapes.at("up_blocks.0.resnets.0.conv1.weight") == V{24, 48, 3, 3});
  CHECK(shapes.at("up_blocks.2.resnets.1.conv1.weight") == V{8, 16, 3, 3});
  CHECK(shapes.at("up_blocks.1.resnets.2.conv1.weight") == V{16, 24, 3, 3});
  // time_embedding_dim 20
  CHECK(shapes.at("time_embedding.linear_1.weight") == V{20, 8});
  CHECK(shapes.at("mid_block.resnets.1.time_emb_proj.weight") == V{24, 20});
}

TEST_CASE("UNet2DConditionModel: for_each_linear / for_each_conv2d reach the layers by name",
          "[models][unet][names]") {
  UNet2DConditionModel<float> model(
      UNet2DConditionConfig::from_file(data_path("unet_tiny/config.json")));
  std::map<std::string, float*> weights;
  model.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>& p) {
    weights.emplace(name, p.value.data());
  });
  std::set<std::string> linears, convs;
  model.for_each_linear("", [&](const std::string& name, nn::Linear<float>& layer) {
    INFO(name);
    REQUIRE(weights.count(name + ".weight") == 1);
    CHECK(weights.at(name + ".weight") == layer.weight.value.data());  // the model's own layer
    linears.insert(name);
  });
  model.for_each_conv2d("", [&](const std::string& name, nn::Conv2d<float>& layer) {
    INFO(name);
    REQUIRE(weights.count(name + ".weight") == 1);
    CHECK(weights.at(name + ".weight") == layer.weight.value.data());
    convs.insert(name);
  });
  for (const char* name : {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                           "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                           "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
                           "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0",
                           "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
                           "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
                           "time_embedding.linear_1", "down_blocks.1.resnets.0.time_emb_proj"}) {
    INFO(name);
    CHECK(linears.count(name) == 1);
  }
  // 4 transformers × (8 attention projections + 2 ff) + 2 time embedding + 8 resnets
  CHECK(linears.size() == 4 * 10 + 2 + 8);
  for (const char* name : {"conv_in", "conv_out", "down_blocks.0.attentions.0.proj_in",
                           "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv",
                           "up_blocks.1.resnets.1.conv_shortcut"}) {
    INFO(name);
    CHECK(convs.count(name) == 1);
  }
}

// ---- loading ----

namespace {

using test::TempDir;

// the golden unet_tiny tensors as (name → values, shape)
std::map<std::string, std::pair<std::vector<float>, std::vector<std::size_t>>> tiny_tensors() {
  const auto file =
      io::SafetensorsFile::open(data_path("unet_tiny/diffusion_pytorch_model.safetensors"));
  std::map<std::string, std::pair<std::vector<float>, std::vector<std::size_t>>> out;
  for (const auto& name : file.names()) out[name] = {file.read<float>(name), file.info(name).shape};
  return out;
}

template <class Map>
void write_tensors(const std::string& path, const Map& tensors, io::Dtype dtype = io::Dtype::F32) {
  std::vector<io::TensorToWrite> list;
  for (const auto& [name, entry] : tensors)
    list.push_back(io::TensorToWrite::from_span(name, std::span<const float>(entry.first),
                                                entry.second, dtype));
  io::save_safetensors(path, list);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no Error thrown)";
}

}  // namespace

TEST_CASE("load_unet: sharded and F16 checkpoints load; every strict-loading error is named",
          "[models][unet][load]") {
  const auto reference = models::load_unet<float>(data_path("unet_tiny"));
  std::map<std::string, const xt::xarray<float>*> ref_values;
  reference.for_each_parameter("", [&](const std::string& name, const nn::Parameter<float>& p) {
    ref_values.emplace(name, &p.value);
  });
  const auto tensors = tiny_tensors();
  TempDir dir("unet_load");
  std::filesystem::copy_file(data_path("unet_tiny/config.json"), dir.path() / "config.json");

  SECTION("sharded via diffusion_pytorch_model.safetensors.index.json") {
    std::map<std::string, std::pair<std::vector<float>, std::vector<std::size_t>>> a, b;
    nlohmann::json index;
    for (const auto& [name, entry] : tensors) {
      const bool first = name.rfind("down_blocks", 0) == 0;
      (first ? a : b)[name] = entry;
      index["weight_map"][name] = first ? "shard-1.safetensors" : "shard-2.safetensors";
    }
    write_tensors((dir.path() / "shard-1.safetensors").string(), a);
    write_tensors((dir.path() / "shard-2.safetensors").string(), b);
    std::ofstream((dir.path() / "diffusion_pytorch_model.safetensors.index.json").string())
        << index.dump();
    auto model = models::load_unet<float>(dir.str());
    model.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>& p) {
      INFO(name);
      REQUIRE_CLOSE(p.value, *ref_values.at(name), 0.0, 0.0);
    });
  }
  SECTION("F16 and BF16 weights are converted to float") {
    for (io::Dtype dtype : {io::Dtype::F16, io::Dtype::BF16}) {
      write_tensors((dir.path() / "diffusion_pytorch_model.safetensors").string(), tensors, dtype);
      auto model = models::load_unet<float>(dir.str());
      model.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>& p) {
        INFO(name);
        // rounding to 11 (F16) or 8 (BF16) significant bits; tiny values may be subnormal in F16
        REQUIRE_CLOSE(p.value, *ref_values.at(name), dtype == io::Dtype::F16 ? 1e-3 : 8e-3, 1e-6);
      });
    }
  }
  SECTION("missing, unexpected and misshapen keys are all listed in one Error") {
    auto broken = tensors;
    broken.erase("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight");
    broken.erase("conv_out.bias");
    broken["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"] = {
        std::vector<float>(4 * 32, 0.f), {4, 32}};
    broken["conv_in.weight"].second = {32, 4, 9};  // same count, wrong shape
    write_tensors((dir.path() / "diffusion_pytorch_model.safetensors").string(), broken);
    const std::string message = error_of([&] { models::load_unet<float>(dir.str()); });
    INFO(message);
    CHECK(message.find("2 missing") != std::string::npos);
    CHECK(message.find("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight") !=
          std::string::npos);
    CHECK(message.find("conv_out.bias") != std::string::npos);
    CHECK(message.find("1 unexpected") != std::string::npos);
    CHECK(message.find("attn1.to_q.lora_A.weight") != std::string::npos);
    CHECK(message.find("conv_in.weight has shape [32,4,9], expected [32,4,3,3]") !=
          std::string::npos);
  }
  SECTION("a folder without weights or with a broken index") {
    CHECK_THAT(error_of([&] { models::load_unet<float>(dir.str()); }),
               Catch::Contains("has neither diffusion_pytorch_model.safetensors"));
    nlohmann::json index;
    index["weight_map"]["conv_in.weight"] = "missing.safetensors";
    std::ofstream((dir.path() / "diffusion_pytorch_model.safetensors.index.json").string())
        << index.dump();
    CHECK_THAT(error_of([&] { models::load_unet<float>(dir.str()); }),
               Catch::Contains("missing.safetensors"));
  }
}
