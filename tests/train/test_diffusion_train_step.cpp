// DiffusionTrainStep against independent recomputation of each stage.
#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "difftrain/difftrain.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;

namespace {
// A denoiser that predicts a fixed tensor (zeros, or what the test sets) and records its calls.
struct RecordingDenoiser {
  Tensor4<float> prediction;  // empty: predict zeros
  Tensor4<float> seen_input, seen_grad;
  std::vector<double> seen_timesteps;
  Tensor4<float> forward(const Tensor4<float>& x_t, std::span<const std::int64_t> t,
                         const Tensor3<float>&) {
    seen_input = x_t;
    seen_timesteps.assign(t.begin(), t.end());
    if (prediction.size() == 0) return xt::zeros<float>(x_t.shape());
    return prediction;
  }
  void backward(const Tensor4<float>& grad) { seen_grad = grad; }
};

// An "oracle" denoiser knowing x0 and the schedule: recovers the exact target from x_t.
struct OracleDenoiser {
  const Tensor4<float>* x0;
  const DdpmScheduler* scheduler;
  PredictionType type;
  Tensor4<float> forward(const Tensor4<float>& x_t, std::span<const std::int64_t> t,
                         const Tensor3<float>&) {
    Tensor4<float> out = xt::zeros<float>(x_t.shape());
    const std::size_t per = x_t.size() / x_t.shape()[0];
    for (std::size_t i = 0; i < x_t.size(); ++i) {
      const std::int64_t tb = t[i / per];
      const double a = scheduler->sqrt_alpha_prod(tb), s = scheduler->sqrt_one_minus_alpha_prod(tb);
      const double x = x0->data()[i];
      const double eps = (x_t.data()[i] - a * x) / s;
      out.data()[i] = float(type == PredictionType::epsilon        ? eps
                            : type == PredictionType::v_prediction ? a * eps - s * x
                                                                   : x);
    }
    return out;
  }
  void backward(const Tensor4<float>&) {}
};

struct ZeroText {
  using input_type = TokenIds;
  using output_type = Tensor3<float>;
  Tensor3<float> encode(const TokenIds& ids) const {
    return Tensor3<float>(xt::zeros<float>({ids.shape()[0], std::size_t{3}, std::size_t{2}}));
  }
};

Tensor4<float> latents(std::size_t b = 4) {
  Tensor4<float> x = xt::zeros<float>({b, std::size_t{4}, std::size_t{8}, std::size_t{8}});
  fill_normal(std::span<float>(x.data(), x.size()), {123, 0});
  return x;
}
const Tensor3<float> context4 = xt::zeros<float>({4, 3, 2});
}  // namespace

TEST_CASE("step: zero prediction gives the weighted mean of target², Min-SNR weights, dL/dpred") {
  const PredictionType type = GENERATE(PredictionType::epsilon, PredictionType::v_prediction);
  DdpmSchedulerConfig config = DdpmScheduler::sd15().config();
  config.prediction_type = type;
  const DdpmScheduler scheduler(config);
  RecordingDenoiser model;
  IdentityEncoder vae;
  ZeroText text;
  DiffusionTrainStep step(scheduler, model, vae, text, loss::MinSnr(5.0));
  const Tensor4<float> x0 = latents();
  const TrainStepResult r = step.step_latents(x0, context4, 7);
  REQUIRE(model.seen_timesteps == r.timesteps);
  REQUIRE((model.seen_input == step.noisy_latents()));
  const Tensor4<float>& target = step.target();
  double expected = 0;
  const std::size_t per = 4 * 8 * 8;
  for (std::size_t b = 0; b < 4; ++b) {
    const auto t = static_cast<std::int64_t>(r.timesteps[b]);
    REQUIRE((0 <= t && t < 1000));
    const double snr = scheduler.snr(t);
    const double w =
        type == PredictionType::epsilon ? std::min(snr, 5.0) / snr : std::min(snr, 5.0) / (snr + 1);
    REQUIRE(r.weights[b] == Approx(w).epsilon(1e-12));
    double sum = 0;
    for (std::size_t i = 0; i < per; ++i)
      sum += double(target.data()[b * per + i]) * target.data()[b * per + i];
    REQUIRE(r.per_sample_loss[b] == Approx(sum / per).epsilon(1e-6));
    expected += w * sum / per / 4;
    // dL/dpred = 2·w·(0 − target)/(B·CHW)
    for (std::size_t i = 0; i < per; i += 31)
      REQUIRE(
          model.seen_grad.data()[b * per + i] ==
          Approx(-2 * w * target.data()[b * per + i] / (4.0 * per)).epsilon(1e-5).margin(1e-12));
  }
  REQUIRE(r.loss == Approx(expected).epsilon(1e-6));
}

TEST_CASE("step: x_t and the target are consistent with x0 (an oracle denoiser gets ~0 loss)") {
  const PredictionType type =
      GENERATE(PredictionType::epsilon, PredictionType::v_prediction, PredictionType::sample);
  DdpmSchedulerConfig config = DdpmScheduler::sd15().config();
  config.prediction_type = type;
  const DdpmScheduler scheduler(config);
  const Tensor4<float> x0 = latents();
  OracleDenoiser oracle{&x0, &scheduler, type};
  IdentityEncoder vae;
  ZeroText text;
  TrainStepOptions options;
  options.noise.noise_offset = 0.1f;  // offset noise is part of eps, in input and target alike
  DiffusionTrainStep step(scheduler, oracle, vae, text, loss::Uniform{}, options,
                          UniformTimesteps(1000, 0, 900));
  const TrainStepResult r = step.step_latents(x0, context4, 3);
  for (auto t : r.timesteps) REQUIRE(t < 900);
  // Recovering eps divides by s_t (≥ 0.029 here): float rounding of x_t is amplified by a/s.
  REQUIRE(r.loss < 1e-6);
}

TEST_CASE("step: deterministic in (seed, step); different steps and seeds differ") {
  const DdpmScheduler scheduler = DdpmScheduler::sd15();
  RecordingDenoiser m1, m2;
  IdentityEncoder vae;
  ZeroText text;
  DiffusionTrainStep s1(scheduler, m1, vae, text);
  DiffusionTrainStep s2(scheduler, m2, vae, text);
  const Tensor4<float> x0 = latents();
  const auto a = s1.step_latents(x0, context4, 5);
  const Tensor4<float> input_a = m1.seen_input;
  const auto b = s2.step_latents(x0, context4, 5);
  REQUIRE(a.timesteps == b.timesteps);
  REQUIRE((m2.seen_input == input_a));
  REQUIRE(a.loss == b.loss);
  const auto c = s1.step_latents(x0, context4, 6);
  REQUIRE((m1.seen_input != input_a));
  TrainStepOptions other_seed;
  other_seed.seed = 99;
  DiffusionTrainStep s3(scheduler, m2, vae, text, loss::Uniform{}, other_seed);
  s3.step_latents(x0, context4, 5);
  REQUIRE((m2.seen_input != input_a));
  (void)c;
}

TEST_CASE("step: per-sample weights (prior preservation) multiply the loss weights") {
  const DdpmScheduler scheduler = DdpmScheduler::sd15();
  RecordingDenoiser model;
  IdentityEncoder vae;
  ZeroText text;
  DiffusionTrainStep step(scheduler, model, vae, text);
  const Tensor4<float> x0 = latents();
  BatchExtras extras;
  extras.sample_weights = {1, 1, 0.5f, 0.5f};
  const auto r = step.step_latents(x0, context4, 1, extras);
  REQUIRE(r.weights == std::vector<double>{1, 1, 0.5, 0.5});
  const double expected = (r.per_sample_loss[0] + r.per_sample_loss[1] +
                           0.5 * r.per_sample_loss[2] + 0.5 * r.per_sample_loss[3]) /
                          4;
  REQUIRE(r.loss == Approx(expected).epsilon(1e-12));
}

TEST_CASE("step: pyramid noise, input perturbation and huber run through the unfused path") {
  const DdpmScheduler scheduler = DdpmScheduler::sd15();
  RecordingDenoiser model;
  IdentityEncoder vae;
  ZeroText text;
  TrainStepOptions options;
  options.noise.multires_noise_iterations = 4;
  options.noise.input_perturbation = 0.1f;
  options.loss_type = kernels::LossType::huber;
  DiffusionTrainStep step(scheduler, model, vae, text, loss::Uniform{}, options);
  const Tensor4<float> x0 = latents();
  const auto r = step.step_latents(x0, context4, 2);
  // eps target has unit std (pyramid noise is renormalised); huber with c ≤ 1 is below l2.
  const double var = xt::variance(step.target())();
  REQUIRE(var == Approx(1.0).epsilon(0.01));
  double l2 = 0;
  for (float v : step.target()) l2 += double(v) * v;
  l2 /= double(step.target().size());
  REQUIRE(r.loss < l2);
  REQUIRE(r.loss > 0);
}

TEST_CASE("step: bad input throws named errors") {
  const DdpmScheduler scheduler = DdpmScheduler::sd15();
  RecordingDenoiser model;
  IdentityEncoder vae;
  ZeroText text;
  DiffusionTrainStep step(scheduler, model, vae, text);
  const Tensor4<float> x0 = latents();
  const Tensor3<float> context3 = xt::zeros<float>({3, 3, 2});
  REQUIRE_THROWS_WITH(step.step_latents(x0, context3, 0),
                      Catch::Contains("context has shape [3,3,2], expected batch 4"));
  model.prediction = xt::zeros<float>({4, 4, 8, 7});
  REQUIRE_THROWS_WITH(
      step.step_latents(x0, context4, 0),
      "DiffusionTrainStep::step: prediction has shape [4,4,8,7], expected [4,4,8,8]");
  model.prediction = xt::zeros<float>({4, 4, 8, 8});
  model.prediction(1, 2, 3, 4) = NAN;
  REQUIRE_THROWS_WITH(step.step_latents(x0, context4, 0), Catch::Contains("loss is nan"));
  BatchExtras extras;
  extras.sample_weights = {1, 1};
  model.prediction = Tensor4<float>();
  REQUIRE_THROWS_WITH(step.step_latents(x0, context4, 0, extras),
                      Catch::Contains("sample_weights has 2 entries, expected 4"));
  TrainStepOptions bad;
  bad.noise.noise_offset = -1;
  REQUIRE_THROWS_WITH(DiffusionTrainStep(scheduler, model, vae, text, loss::Uniform{}, bad),
                      Catch::Contains("noise_offset is -1"));
  REQUIRE_THROWS_AS(UniformTimesteps(1000, 10, 10), Error);
  REQUIRE_THROWS_AS(UniformTimesteps(1000, 0, 1001), Error);
  REQUIRE_THROWS_AS(loss::MinSnr(0.0), Error);
  REQUIRE_THROWS_AS(loss::MinSnr(-5.0), Error);
}
