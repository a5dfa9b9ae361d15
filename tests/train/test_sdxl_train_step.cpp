// DiffusionTrainStep on SDXL's UNet (addition_embed_type "text_time", the golden unet_sdxl_tiny
// with LoRA adapters): the batch's added conditions reach the UNet, the step's loss is the one
// recomputed from its noisy input and target, and its adapter gradients pass a central-difference
// check of the whole step (deterministic in the step index).
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <vector>

#include "difftrain/difftrain.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/models.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using test::data_path;

namespace {
struct SdxlStep {
  models::UNet2DConditionModel<float> unet = models::load_unet<float>(data_path("unet_sdxl_tiny"));
  IdentityEncoder identity;
  NoTextEncoder no_text;
  Tensor4<float> x0;
  Tensor3<float> context;
  AddedConditions<float> added;

  SdxlStep() {
    const auto in = io::SafetensorsFile::open(data_path("unet_sdxl_tiny/inputs.safetensors"));
    x0 = in.read_tensor<float, 4>("sample");
    context = in.read_tensor<float, 3>("encoder_hidden_states");
    added.text_embeds = in.read_tensor<float, 2>("text_embeds");
    added.time_ids = in.read_tensor<float, 2>("time_ids");
    lora::LoraConfig config;
    config.rank = 2;
    config.alpha = 2;
    lora::inject_lora(unet, {"to_q", "to_k", "to_v", "to_out.0"}, config, RandomStream{5, 0});
    RandomStream stream{9, 0};
    lora::for_each_adapter(unet, [&](const std::string&, auto& adapter) {
      auto& b = adapter.lora_B.weight.value;
      fill_normal(std::span<float>(b.data(), b.size()), stream);
      stream = stream.derive(1, StreamPurpose::train_step);
    });
  }
  auto make_step() {
    return DiffusionTrainStep<DdpmScheduler, models::UNet2DConditionModel<float>, IdentityEncoder,
                              NoTextEncoder>(DdpmScheduler::sd15(), unet, identity, no_text);
  }
  double loss(std::uint64_t step_index, const AddedConditions<float>& a) {
    auto step = make_step();
    BatchExtras extras;
    extras.added_conditions = &a;
    nn::zero_grad<float>(unet);
    return step.step_latents(x0, context, step_index, extras).loss;
  }
};
}  // namespace

TEST_CASE("SDXL step: added conditions reach the UNet; loss as recomputed", "[train][sdxl]") {
  SdxlStep s;
  auto step = s.make_step();
  BatchExtras extras;
  extras.added_conditions = &s.added;
  nn::zero_grad<float>(s.unet);
  const TrainStepResult r = step.step_latents(s.x0, s.context, 3, extras);
  // recompute: the UNet on the step's own x_t and timesteps, mean squared error to its target
  const std::vector<float> t(r.timesteps.begin(), r.timesteps.end());
  const Tensor4<float> pred =
      s.unet.forward(step.noisy_latents(), std::span<const float>(t), s.context, s.added);
  const double mse = xt::mean(xt::square(xt::cast<double>(pred - step.target())))();
  CHECK(r.loss == Approx(mse).epsilon(1e-6));

  // other time ids (another original size) give another loss: the ids are used
  AddedConditions<float> other = s.added;
  other.time_ids(0, 0) = 1024;
  CHECK(std::abs(s.loss(3, other) - s.loss(3, s.added)) > 1e-6);

  // an SDXL UNet without added conditions is refused with a named error
  CHECK_THROWS_WITH(step.step_latents(s.x0, s.context, 3),
                    Catch::Contains("text_embeds and time_ids"));
}

TEST_CASE("SDXL step: adapter gradients match central differences of the step's loss",
          "[train][sdxl]") {
  SdxlStep s;
  const double base = s.loss(7, s.added);
  // the analytic gradients of the step just run
  struct Probe {
    nn::Parameter<float>* p;
    std::size_t index;
    double grad;
  };
  std::vector<Probe> probes;
  s.unet.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>& p) {
    if (!p.trainable || probes.size() >= 4) return;
    if (name.find("attn2.to_v") == std::string::npos &&
        name.find("attn1.to_q") == std::string::npos)
      return;
    // the element with the largest gradient
    std::size_t best = 0;
    for (std::size_t i = 0; i < p.grad.size(); ++i)
      if (std::abs(p.grad.data()[i]) > std::abs(p.grad.data()[best])) best = i;
    probes.push_back({&p, best, p.grad.data()[best]});
  });
  REQUIRE(probes.size() == 4);
  for (const Probe& probe : probes) {
    float& w = probe.p->value.data()[probe.index];
    const float saved = w, h = 1e-2f;
    w = saved + h;
    const double plus = s.loss(7, s.added);
    w = saved - h;
    const double minus = s.loss(7, s.added);
    w = saved;
    const double numeric = (plus - minus) / (2.0 * h);
    INFO("analytic " << probe.grad << ", numeric " << numeric << ", loss " << base);
    CHECK(probe.grad != 0);
    CHECK(std::abs(numeric - probe.grad) <= 2e-2 * std::abs(probe.grad) + 1e-6);
  }
}
