// LoRA injection into UNet2DConditionModel by module name (lora::inject_lora over the model's
// slots): the 32 attention projections of unet_tiny are found, a zero-initialised adapter leaves
// the output unchanged, a non-zero one changes it exactly as merging B·A into the weights does,
// and backward reaches the adapters while the base stays frozen; one AdamW step after a backward
// pass changes the output and leaves the base weights untouched.

#include <catch2/catch.hpp>
#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "difftrain/io/safetensors.hpp"
#include "difftrain/lora/inject.hpp"
#include "difftrain/models/models.hpp"
#include "difftrain/train/optimizer.hpp"
#include "single_threaded.hpp"
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
