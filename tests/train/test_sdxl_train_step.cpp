// DiffusionTrainStep on SDXL's UNet (addition_embed_type "text_time", the golden unet_sdxl_tiny
// with LoRA adapters): the batch's added conditions reach the UNet, the step's loss is the one
// recomputed from its noisy input and target, and its adapter gradients pass a central-difference
// check of the whole step (deterministic in the step index); SDXL's two text encoders trained
// through the step (context and pooled embeddings) pass the same check.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <vector>

#include "difftrain/difftrain.hpp"
#include "difftrain/io/json_file.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/models.hpp"
#include "difftrain/models/sdxl_conditioning.hpp"
#include "difftrain/nn/init.hpp"
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

namespace {
// SDXL's two text encoders for the golden UNet (cross_attention_dim 64 = 32 + 32, pooled width
// 80 − 6·8 = 32): clip_tiny as text_encoder, clip_proj_tiny's architecture with projection_dim
// 32 (random weights) as text_encoder_2; LoRA (non-zero B) on both.
struct SdxlEncoders {
  models::ClipTextModel<float> te1 = models::load_clip_text_model<float>(data_path("clip_tiny"));
  models::ClipTextModel<float> te2 = [] {
    nlohmann::json json = io::read_json_file("test", data_path("clip_proj_tiny/config.json"));
    json["projection_dim"] = 32;
    models::ClipTextModel<float> m(models::ClipTextConfig::from_json(json));
    nn::init_like_pytorch<float>(m, RandomStream{21, 0});
    return m;
  }();
  TokenIds ids;  // [2, 2·77]: the golden ids of both encoders side by side

  SdxlEncoders() {
    auto read = [](const std::string& folder) {
      return io::SafetensorsFile::open(data_path(folder + "/inputs.safetensors"))
          .read_tensor<std::int64_t, 2>("input_ids");
    };
    ids = models::sdxl_token_ids(read("clip_tiny"), read("clip_proj_tiny"));
    lora::LoraConfig config;
    config.rank = 2;
    config.alpha = 2;
    RandomStream stream{13, 0};
    for (auto* m : {&te1, &te2}) {
      lora::inject_lora(*m, {"q_proj", "v_proj"}, config, RandomStream{6, 0});
      lora::for_each_adapter(*m, [&](const std::string&, auto& adapter) {
        auto& b = adapter.lora_B.weight.value;
        fill_normal(std::span<float>(b.data(), b.size()), stream);
        b *= 0.1f;
        stream = stream.derive(1, StreamPurpose::train_step);
      });
    }
  }
};
}  // namespace

TEST_CASE("SDXL step: both text encoders trained through context and pooled embeddings",
          "[train][sdxl]") {
  SdxlStep s;
  SdxlEncoders e;
  nn::set_trainable<float>(s.unet, false);  // the text encoders' adapters alone
  models::SdxlTextEncoders encoders(e.te1, e.te2);
  REQUIRE(encoders.is_training());
  const Tensor<float, 2> time_ids = s.added.time_ids;
  const std::size_t B = s.x0.shape()[0];
  REQUIRE(e.ids.shape()[0] == B);
  auto run = [&](std::uint64_t step_index) {
    DiffusionTrainStep<DdpmScheduler, models::UNet2DConditionModel<float>, IdentityEncoder,
                       models::SdxlTextEncoders>
        step(DdpmScheduler::sd15(), s.unet, s.identity, encoders);
    BatchExtras extras;
    extras.time_ids = &time_ids;
    nn::zero_grad<float>(encoders);
    return step.step(s.x0, e.ids, step_index, extras).loss;
  };
  // the step's loss is the frozen step's on the encoders' context and pooled output
  const double loss = run(5);
  {
    const models::SdxlPromptEmbeds embeds =
        encoders.encode(xt::view(e.ids, xt::all(), xt::range(0, 77)),
                        xt::view(e.ids, xt::all(), xt::range(77, 154)));
    AddedConditions<float> added{embeds.pooled_prompt_embeds, time_ids};
    auto step = s.make_step();
    BatchExtras extras;
    extras.added_conditions = &added;
    CHECK(step.step_latents(s.x0, embeds.prompt_embeds, 5, extras).loss ==
          Approx(loss).epsilon(1e-6));
  }
  // a batch without time ids, or with both forms of added conditions, is refused
  {
    DiffusionTrainStep<DdpmScheduler, models::UNet2DConditionModel<float>, IdentityEncoder,
                       models::SdxlTextEncoders>
        step(DdpmScheduler::sd15(), s.unet, s.identity, encoders);
    CHECK_THROWS_WITH(step.step(s.x0, e.ids, 5), Catch::Contains("has no time_ids"));
  }
  // the step hands the encoders exactly the UNet's dL/dcontext and dL/dtext_embeds: their
  // gradients equal those of an explicit backward with them (the encoder-level test below checks
  // that backward against central differences)
  run(5);
  {
    std::vector<std::vector<float>> from_step;
    encoders.for_each_parameter("", [&](const std::string&, nn::Parameter<float>& p) {
      if (p.trainable) from_step.emplace_back(p.grad.begin(), p.grad.end());
    });
    nn::zero_grad<float>(encoders);
    (void)encoders.encode_train(e.ids);
    encoders.backward(s.unet.grad_encoder_hidden_states(), s.unet.grad_text_embeds());
    std::size_t k = 0;
    encoders.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>& p) {
      if (!p.trainable) return;
      INFO(name);
      CHECK(std::vector<float>(p.grad.begin(), p.grad.end()) == from_step.at(k++));
    });
    CHECK(k == from_step.size());
  }
  // and, end to end, against central differences of the step's loss (float: the loss resolves
  // these small gradients to a few per cent only)
  run(5);
  struct Probe {
    nn::Parameter<float>* p;
    std::size_t index;
    double grad;
    std::string name;
  };
  std::vector<Probe> probes;
  encoders.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>& p) {
    if (!p.trainable) return;
    // one lora_A and one lora_B of each encoder in the context's (penultimate) layer; the
    // pooled path alone (encoder 2's last layer) is too weak in this UNet for a float central
    // difference, the encoder-level test below checks it
    for (const char* part : {"lora_A", "lora_B"}) {
      const std::string layer = "layers.1.";
      if (name.find(layer) == std::string::npos || name.find(part) == std::string::npos ||
          name.find("q_proj") == std::string::npos)
        continue;
      std::size_t best = 0;
      for (std::size_t i = 0; i < p.grad.size(); ++i)
        if (std::abs(p.grad.data()[i]) > std::abs(p.grad.data()[best])) best = i;
      probes.push_back({&p, best, p.grad.data()[best], name});
    }
  });
  REQUIRE(probes.size() == 4);
  for (const Probe& probe : probes) {
    float& w = probe.p->value.data()[probe.index];
    const float saved = w, h = 1e-2f;
    w = saved + h;
    const double plus = run(5);
    w = saved - h;
    const double minus = run(5);
    w = saved;
    const double numeric = (plus - minus) / (2.0 * h);
    INFO(probe.name << ": analytic " << probe.grad << ", numeric " << numeric);
    CHECK(probe.grad != 0);
    CHECK(std::abs(numeric - probe.grad) <= 0.2 * std::abs(probe.grad) + 2e-6);
  }
}

TEST_CASE("SdxlTextEncoders: backward splits dL/dcontext and takes dL/dpooled", "[train][sdxl]") {
  SdxlEncoders e;
  models::SdxlTextEncoders encoders(e.te1, e.te2);
  // L = Σ G·prompt_embeds + Σ H·pooled, G and H fixed random
  const Tensor3<float> context = encoders.encode(e.ids);
  Tensor3<float> G(context.shape());
  Tensor<float, 2> H(encoders.pooled_prompt_embeds().shape());
  fill_normal(std::span<float>(G.data(), G.size()), RandomStream{31, 0});
  fill_normal(std::span<float>(H.data(), H.size()), RandomStream{32, 0});
  auto loss = [&] {
    const Tensor3<float> c = encoders.encode(e.ids);
    const Tensor<float, 2>& p = encoders.pooled_prompt_embeds();
    double sum = 0;
    for (std::size_t i = 0; i < c.size(); ++i) sum += double(G.data()[i]) * c.data()[i];
    for (std::size_t i = 0; i < p.size(); ++i) sum += double(H.data()[i]) * p.data()[i];
    return sum;
  };
  nn::zero_grad<float>(encoders);
  const Tensor3<float> trained = encoders.encode_train(e.ids);
  REQUIRE_CLOSE(trained, context, 0.0, 0.0);
  encoders.backward(G, H);
  CHECK_THROWS_WITH(encoders.backward(G, H), Catch::Contains("no saved encode_train"));
  std::size_t checked = 0;
  encoders.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>& p) {
    if (!p.trainable || name.find("lora_A") == std::string::npos) return;
    // encoder 1's last layer is not used (penultimate states): zero gradient
    const bool unused =
        !name.starts_with("text_encoder_2.") && name.find("layers.2.") != std::string::npos;
    if (unused) {
      CHECK(xt::amax(xt::abs(p.grad))() == 0.0f);
      return;
    }
    float& w = p.value.data()[0];
    const float saved = w, h = 1e-2f;
    w = saved + h;
    const double plus = loss();
    w = saved - h;
    const double minus = loss();
    w = saved;
    const double numeric = (plus - minus) / (2.0 * h);
    INFO(name << ": analytic " << p.grad.data()[0] << ", numeric " << numeric);
    CHECK(std::abs(numeric - p.grad.data()[0]) <= 2e-2 * std::abs(numeric) + 1e-3);
    ++checked;
  });
  CHECK(checked == 10);  // q_proj, v_proj of 2 layers (encoder 1) and 3 layers (encoder 2)
}
