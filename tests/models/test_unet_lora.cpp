// LoRA injection into UNet2DConditionModel by module name (lora::inject_lora over the model's
// slots): the 32 attention projections of unet_tiny are found, a zero-initialised adapter leaves
// the output unchanged, a non-zero one changes it exactly as merging B·A into the weights does,
// and backward reaches the adapters while the base stays frozen.

#include <catch2/catch.hpp>
#include <cstdint>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "difftrain/io/safetensors.hpp"
#include "difftrain/lora/inject.hpp"
#include "difftrain/models/models.hpp"
#include "single_threaded.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using difftrain::test::data_path;

TEST_CASE("UNet2DConditionModel: inject_lora adapts to_q/to_k/to_v/to_out.0 by name",
          "[models][unet][lora]") {
  const test::SingleThreaded single_threaded;
  auto model = models::load_unet<float>(data_path("unet_tiny"));
  const auto inputs = io::SafetensorsFile::open(data_path("unet_tiny/inputs.safetensors"));
  const auto sample = inputs.read_tensor<float, 4>("sample");
  const auto t = inputs.read<std::int64_t>("timestep");
  const auto context = inputs.read_tensor<float, 3>("encoder_hidden_states");
  const auto grad_output = inputs.read_tensor<float, 4>("grad_output");
  const std::span<const std::int64_t> ts(t);
  const Tensor4<float> base = model.forward(sample, ts, context);

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
