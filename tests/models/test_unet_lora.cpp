// LoRA injection into UNet2DConditionModel by module name (lora::inject_lora over the model's
// slots): the 32 attention projections of unet_tiny are found, a zero-initialised adapter leaves
// the output unchanged, a non-zero one changes it exactly as merging B·A into the weights does,
// and backward reaches the adapters while the base stays frozen; one AdamW step after a backward
// pass changes the output and leaves the base weights untouched.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "difftrain/io/safetensors.hpp"
#include "difftrain/lora/inject.hpp"
#include "difftrain/lora/lora_file.hpp"
#include "difftrain/models/models.hpp"
#include "difftrain/train/optimizer.hpp"
#include "single_threaded.hpp"
#include "support/temp_dir.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using difftrain::test::data_path;

namespace {
// The golden unet_tiny (run single-threaded), its inputs and its output before any adapter.
struct TinyUnet {
  test::SingleThreaded single_threaded;
  models::UNet2DConditionModel<float> model = models::load_unet<float>(data_path("unet_tiny"));
  io::SafetensorsFile file = io::SafetensorsFile::open(data_path("unet_tiny/inputs.safetensors"));
  Tensor4<float> sample = file.read_tensor<float, 4>("sample");
  std::vector<std::int64_t> t = file.read<std::int64_t>("timestep");
  std::span<const std::int64_t> ts{t};
  Tensor3<float> context = file.read_tensor<float, 3>("encoder_hidden_states");
  Tensor4<float> grad_output = file.read_tensor<float, 4>("grad_output");
  Tensor4<float> base = model.forward(sample, ts, context);
};
}  // namespace

TEST_CASE_METHOD(TinyUnet,
                 "UNet2DConditionModel: inject_lora adapts to_q/to_k/to_v/to_out.0 by name",
                 "[models][unet][lora]") {
  lora::LoraConfig config;
  config.rank = 4;
  config.alpha = 8;
  const auto adapted =
      lora::inject_lora(model, {"to_q", "to_k", "to_v", "to_out.0"}, config, RandomStream{7, 1});
  CHECK(adapted.size() == 32);  // 4 transformers × 2 attentions × 4 projections
  const std::set<std::string> names(adapted.begin(), adapted.end());
  CHECK(names.count("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == 1);
  CHECK(names.count("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0") == 1);
  CHECK(names.count("up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v") == 1);

  // B = 0: the adapted model is the base model
  REQUIRE_CLOSE(model.forward(sample, ts, context), base, 0.0, 0.0);

  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.f, 0.25f);
  lora::for_each_adapter(model, [&](const std::string&, auto& adapter) {
    for (auto& v : adapter.lora_B.weight.value) v = normal(rng);
  });
  const Tensor4<float> with_lora = model.forward(sample, ts, context);
  CHECK(xt::amax(xt::abs(with_lora - base))() > 1e-3f);

  model.backward(grad_output);
  std::size_t adapter_grads = 0, base_grads = 0;
  model.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>& p) {
    if (lora::is_adapter_parameter(name)) {
      REQUIRE(p.trainable);
      adapter_grads += xt::amax(xt::abs(p.grad))() > 0 ? 1 : 0;
    } else {
      base_grads += p.trainable ? 1 : 0;
    }
  });
  CHECK(adapter_grads == 64);
  CHECK(base_grads == 0);
  CHECK(model.grad_sample().size() == sample.size());

  // merged weights W + s·B·A give the same output as the adapters
  lora::merge_lora(model);
  REQUIRE_CLOSE(model.forward(sample, ts, context), with_lora, 1e-4, 1e-5);
}

TEST_CASE_METHOD(
    TinyUnet,
    "UNet2DConditionModel LoRA: B = 0 leaves the output unchanged; one AdamW step changes it",
    "[models][unet][lora]") {
  std::map<std::string, xt::xarray<float>> base_weights;
  model.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>& p) {
    base_weights.emplace(name, p.value);
  });

  lora::LoraConfig config;  // default init: A random, B zero (diffusers / kohya)
  config.rank = 4;
  config.alpha = 4;
  lora::inject_lora(model, {"to_q", "to_k", "to_v", "to_out.0"}, config, RandomStream{11, 0});
  lora::for_each_adapter(model, [&](const std::string& name, auto& adapter) {
    INFO(name);
    REQUIRE(xt::amax(xt::abs(adapter.lora_B.weight.value))() == 0.f);
  });
  const Tensor4<float> before = model.forward(sample, ts, context);
  REQUIRE_CLOSE(before, base, 0.0, 0.0);

  nn::zero_grad<float>(model);
  model.backward(grad_output);
  train::ParamGroup hyper;
  hyper.lr = 1e-3;
  hyper.weight_decay = 1e-2;
  train::AdamW optimizer(train::make_param_groups(model, hyper));
  optimizer.step();

  const Tensor4<float> after = model.forward(sample, ts, context);
  // AdamW's first step moves every B element with a non-zero gradient by ~lr, so the output moves
  CHECK(xt::amax(xt::abs(after - before))() > 1e-4f);
  std::size_t base_checked = 0, b_moved = 0;
  model.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>& p) {
    INFO(name);
    if (lora::is_adapter_parameter(name)) {
      if (name.find("lora_B") != std::string::npos && xt::amax(xt::abs(p.value))() > 0) ++b_moved;
      return;
    }
    REQUIRE_FALSE(p.trainable);
    REQUIRE_CLOSE(p.value, base_weights.at(name), 0.0, 0.0);  // frozen base: bitwise unchanged
    ++base_checked;
  });
  CHECK(base_checked == base_weights.size());
  CHECK(b_moved == 32);
}

TEST_CASE("SDXL LoRA names: kohya's SGM names read and written, PEFT alike",
          "[models][unet][lora][sdxl]") {
  auto model = models::load_unet<float>(data_path("unet_sdxl_tiny_lora"));
  const auto modules = lora::module_names(model);
  const lora::LoraComponent component = models::unet_lora_component(model);
  REQUIRE(component.kohya_names.size() == modules.size());
  // the examples of the golden README, and the non-attention modules kohya's conv LoRA adapts
  CHECK(
      component.kohya_names.at("down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0") ==
      "input_blocks_4_1_transformer_blocks_1_attn2_to_out_0");
  CHECK(component.kohya_names.at("mid_block.attentions.0.transformer_blocks.0.attn1.to_q") ==
        "middle_block_1_transformer_blocks_0_attn1_to_q");
  CHECK(component.kohya_names.at("up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_k") ==
        "output_blocks_2_1_transformer_blocks_0_attn1_to_k");
  CHECK(component.kohya_names.at("down_blocks.0.resnets.1.conv1") ==
        "input_blocks_2_0_in_layers_2");
  CHECK(component.kohya_names.at("down_blocks.0.downsamplers.0.conv") == "input_blocks_3_0_op");
  CHECK(component.kohya_names.at("up_blocks.0.upsamplers.0.conv") == "output_blocks_2_2_conv");
  CHECK(component.kohya_names.at("up_blocks.1.resnets.0.conv_shortcut") ==
        "output_blocks_3_0_skip_connection");
  // an SD 1.x UNet keeps the diffusers paths (kohya trains it with a diffusers-shaped UNet)
  auto sd1 = models::load_unet<float>(data_path("unet_tiny"));
  CHECK(models::unet_lora_component(sd1).kohya_names.empty());

  const std::string dir = data_path("unet_sdxl_tiny_lora");
  const lora::LoraState kohya =
      lora::read_lora(dir + "/lora_kohya.safetensors", modules, component);
  const lora::LoraState peft = lora::read_lora(dir + "/lora_peft.safetensors", modules, component);
  REQUIRE(kohya.size() == 96);
  REQUIRE(peft.size() == 96);
  for (const auto& [name, w] : kohya) {
    INFO(name);
    REQUIRE(peft.count(name) == 1);
    CHECK(w.alpha == peft.at(name).alpha);
    REQUIRE_CLOSE(w.down, peft.at(name).down, 0.0, 0.0);
    REQUIRE_CLOSE(w.up, peft.at(name).up, 0.0, 0.0);
  }
  // plain diffusers-path kohya names would not find these modules: the SGM names are needed
  CHECK_THROWS_WITH(lora::read_lora(dir + "/lora_kohya.safetensors", modules, lora::kLoraUnet),
                    Catch::Contains("name no module of the model"));

  // written back, the kohya file has exactly the golden file's keys and its base model version
  const test::TempDir tmp;
  const std::string written = tmp.file("sdxl_kohya.safetensors");
  lora::LoraSaveOptions options;
  options.base_model_version = "sdxl_base_v1-0";
  lora::save_lora(written, {{component, kohya, modules}}, lora::LoraFormat::kohya, options);
  const auto golden = io::SafetensorsFile::open(dir + "/lora_kohya.safetensors");
  const auto ours = io::SafetensorsFile::open(written);
  auto sorted = [](std::vector<std::string> v) {
    std::sort(v.begin(), v.end());
    return v;
  };
  CHECK(sorted(ours.names()) == sorted(golden.names()));
  CHECK(ours.metadata().at("ss_base_model_version") == "sdxl_base_v1-0");
  const lora::LoraState again = lora::read_lora(written, modules, component);
  for (const auto& [name, w] : kohya) {
    INFO(name);
    REQUIRE(again.count(name) == 1);
    CHECK(again.at(name).alpha == w.alpha);
    REQUIRE_CLOSE(again.at(name).up, w.up, 0.0, 0.0);
  }
}
