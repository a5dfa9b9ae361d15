// DiffusionTrainStep with schedules other than DDPM: flow matching (x_t = (1 − σ)·x0 + σ·eps,
// target eps − x0, model timestep σ·1000) and a user's own schedule, against recomputation from
// the formulas; unconditional steps (NoTextEncoder).
#include <catch2/catch.hpp>
#include <cmath>
#include <numbers>
#include <vector>

#include "difftrain/difftrain.hpp"

using namespace difftrain;

namespace {
// Predicts zeros, records what it was given; float timesteps (fractional for flow matching).
struct FloatRecorder {
  Tensor4<float> seen_input, seen_grad;
  Tensor3<float> seen_context;
  std::vector<float> seen_timesteps;
  Tensor4<float> forward(const Tensor4<float>& x_t, std::span<const float> t,
                         const Tensor3<float>& context) {
    seen_input = x_t;
    seen_context = context;
    seen_timesteps.assign(t.begin(), t.end());
    return xt::zeros<float>(x_t.shape());
  }
  void backward(const Tensor4<float>& grad) { seen_grad = grad; }
};

// Knows x0: returns the exact velocity eps − x0 = (x_t − x0)/σ with σ = t/1000.
struct VelocityOracle {
  const Tensor4<float>* x0;
  Tensor4<float> forward(const Tensor4<float>& x_t, std::span<const float> t,
                         const Tensor3<float>&) {
    Tensor4<float> out(x_t.shape());
    const std::size_t per = x_t.size() / x_t.shape()[0];
    for (std::size_t i = 0; i < x_t.size(); ++i) {
      const double sigma = double(t[i / per]) / 1000.0;
      out.data()[i] = float((double(x_t.data()[i]) - double(x0->data()[i])) / sigma);
    }
    return out;
  }
  void backward(const Tensor4<float>&) {}
};

struct EmptyText {
  using input_type = TokenIds;
  using output_type = Tensor3<float>;
  Tensor3<float> encode(const TokenIds& ids) const {
    return xt::zeros<float>({ids.shape()[0], std::size_t{2}, std::size_t{3}});
  }
};

Tensor4<float> flow_latents(std::size_t b = 4) {
  Tensor4<float> x = xt::zeros<float>({b, std::size_t{4}, std::size_t{8}, std::size_t{8}});
  fill_normal(std::span<float>(x.data(), x.size()), {321, 0});
  return x;
}

template <class W>
concept WeighsCoefficients = requires(const W& w, const TrainingCoefficients& c) {
  w.weight(c);
};

RandomStream time_stream(std::uint64_t seed, std::uint64_t step) {
  return RandomStream{seed, 0}
      .derive(step, StreamPurpose::train_step)
      .derive(0, StreamPurpose::step_timesteps);
}
}  // namespace

static_assert(TrainingSchedule<FlowMatchEulerDiscreteScheduler>);
static_assert(TrainingSchedule<DdpmScheduler> && Scheduler<DdpmScheduler>);
static_assert(!Scheduler<FlowMatchEulerDiscreteScheduler>);  // no DDPM ᾱ_t
static_assert(TimestepSamplerOf<FlowMatchTimesteps, double>);
static_assert(LossWeighting<FlowMatchLossWeighting>);

TEST_CASE("flow step: x_t = (1−σ)·x0 + σ·eps, target eps − x0, timesteps σ·1000, SD3 weights") {
  const auto scheme = GENERATE(FlowWeightingScheme::none, FlowWeightingScheme::sigma_sqrt,
                               FlowWeightingScheme::cosmap);
  const FlowMatchEulerDiscreteScheduler scheduler = FlowMatchEulerDiscreteScheduler::sd3();
  FlowMatchTimestepOptions o;
  o.weighting_scheme = FlowWeightingScheme::logit_normal;  // diffusers' default density
  const FlowMatchTimesteps sampler(scheduler, o);
  FloatRecorder model;
  IdentityEncoder vae;
  EmptyText text;
  TrainStepOptions options;
  options.seed = 5;
  DiffusionTrainStep step(scheduler, model, vae, text, FlowMatchLossWeighting{scheme}, options,
                          sampler);
  const Tensor4<float> x0 = flow_latents();
  const TrainStepResult r = step.step(x0, xt::zeros<std::int64_t>({4, 1}), 9);

  std::vector<double> sigmas(4);
  sampler.sample(sigmas, time_stream(5, 9));
  const std::size_t per = 4 * 8 * 8;
  const Tensor4<float>& x_t = step.noisy_latents();
  const Tensor4<float>& target = step.target();
  double loss = 0;
  for (std::size_t b = 0; b < 4; ++b) {
    const double sigma = sigmas[b];
    REQUIRE(r.timesteps[b] == sigma * 1000.0);
    REQUIRE(model.seen_timesteps[b] == float(sigma * 1000.0));
    const double w = compute_loss_weighting_for_sd3(scheme, sigma);
    REQUIRE(r.weights[b] == Approx(w).epsilon(1e-12));
    double sum = 0;
    for (std::size_t i = b * per; i < (b + 1) * per; ++i) {
      // eps from x_t and target (x_t = eps − (1 − σ)·target): then x0 = eps − target must be
      // the input.
      const double eps = x_t.data()[i] + (1 - sigma) * target.data()[i];
      REQUIRE(eps - target.data()[i] == Approx(x0.data()[i]).margin(2e-6));
      sum += double(target.data()[i]) * target.data()[i];
    }
    REQUIRE(r.per_sample_loss[b] == Approx(sum / per).epsilon(1e-6));
    loss += w * sum / per / 4;
  }
  REQUIRE(r.loss == Approx(loss).epsilon(1e-6));
  REQUIRE(model.seen_grad.shape() == x0.shape());
}

TEST_CASE("flow step: the exact velocity gives ~0 loss for every density") {
  const auto sampling = GENERATE(FlowTimestepSampling::sigma, FlowTimestepSampling::uniform,
                                 FlowTimestepSampling::shift, FlowTimestepSampling::flux_shift,
                                 FlowTimestepSampling::heavy_tail);
  const FlowMatchEulerDiscreteScheduler scheduler;
  FlowMatchTimestepOptions o;
  o.timestep_sampling = sampling;
  const Tensor4<float> x0 = flow_latents();
  VelocityOracle oracle{&x0};
  IdentityEncoder vae;
  EmptyText text;
  DiffusionTrainStep step(scheduler, oracle, vae, text, loss::Uniform{}, {},
                          FlowMatchTimesteps(scheduler, o));
  for (std::uint64_t k = 0; k < 3; ++k) {
    const TrainStepResult r = step.step(x0, xt::zeros<std::int64_t>({4, 1}), k);
    // (x_t − x0)/σ loses float precision as σ → 0: relative error ~ 1e-7/σ.
    REQUIRE(r.loss < 1e-5);
  }
}

TEST_CASE("flow step: flux_shift draws σ for the latent size; sampler and step agree") {
  const FlowMatchEulerDiscreteScheduler scheduler = FlowMatchEulerDiscreteScheduler::flux();
  FlowMatchTimestepOptions o;
  o.timestep_sampling = FlowTimestepSampling::flux_shift;
  const FlowMatchTimesteps sampler(scheduler, o);
  FloatRecorder model;
  IdentityEncoder vae;
  EmptyText text;
  DiffusionTrainStep step(scheduler, model, vae, text, loss::Uniform{}, {}, sampler);
  for (const std::size_t size : {8, 32}) {
    Tensor4<float> x0 = xt::zeros<float>({std::size_t{3}, std::size_t{4}, size, size});
    const TrainStepResult r = step.step(x0, xt::zeros<std::int64_t>({3, 1}), 2);
    std::vector<double> expected(3);
    sampler.sample(expected, time_stream(0, 2), std::int64_t(size), std::int64_t(size));
    for (std::size_t b = 0; b < 3; ++b) REQUIRE(r.timesteps[b] == expected[b] * 1000.0);
  }
}

TEST_CASE("flow step: prediction_type is refused; DDPM weightings need a prediction type") {
  const FlowMatchEulerDiscreteScheduler scheduler;
  FloatRecorder model;
  IdentityEncoder vae;
  EmptyText text;
  TrainStepOptions options;
  options.prediction_type = PredictionType::v_prediction;
  const FlowMatchTimesteps sampler(scheduler, {});
  using Step = DiffusionTrainStep<FlowMatchEulerDiscreteScheduler, FloatRecorder, IdentityEncoder,
                                  EmptyText, loss::Uniform, FlowMatchTimesteps>;
  REQUIRE_THROWS_WITH(
      Step(scheduler, model, vae, text, {}, options, sampler),
      Catch::Contains("prediction_type is v_prediction") && Catch::Contains("no prediction type"));
  // Min-SNR is defined per DDPM prediction type: not a weighting of a flow step.
  STATIC_REQUIRE(!WeighsCoefficients<loss::MinSnr>);
  STATIC_REQUIRE(WeighsCoefficients<FlowMatchLossWeighting> && WeighsCoefficients<loss::Uniform>);
}

namespace {
// A user's schedule in a few lines: the cosine ("trigonometric") interpolation
// x_t = cos(πσ/2)·x0 + sin(πσ/2)·eps with the velocity target d x_t/dσ ∝ cos·eps − sin·x0.
struct CosineFlow {
  using time_type = double;
  std::int64_t num_train_timesteps() const { return 1000; }
  TrainingCoefficients training_coefficients(double sigma) const {
    const double c = std::cos(std::numbers::pi / 2 * sigma),
                 s = std::sin(std::numbers::pi / 2 * sigma);
    return {c, s, -s, c, sigma * 1000.0, (c * c) / (s * s)};
  }
};
struct UniformSigma {
  void sample(std::span<double> out, RandomStream rs) const {
    for (std::size_t b = 0; b < out.size(); ++b) out[b] = uniform_open(rs, b);
  }
};
}  // namespace

TEST_CASE("step: a user's own schedule and sampler define x_t and the target") {
  FloatRecorder model;
  IdentityEncoder vae;
  EmptyText text;
  DiffusionTrainStep step(CosineFlow{}, model, vae, text, loss::Uniform{}, {}, UniformSigma{});
  const Tensor4<float> x0 = flow_latents(2);
  const TrainStepResult r = step.step(x0, xt::zeros<std::int64_t>({2, 1}), 1);
  const std::size_t per = 4 * 8 * 8;
  for (std::size_t b = 0; b < 2; ++b) {
    const double sigma = r.timesteps[b] / 1000.0;
    REQUIRE(sigma == uniform_open(time_stream(0, 1), b));
    const double c = std::cos(std::numbers::pi / 2 * sigma),
                 s = std::sin(std::numbers::pi / 2 * sigma);
    for (std::size_t i = b * per; i < (b + 1) * per; i += 7) {
      // [x_t; target] = [[c, s], [−s, c]]·[x0; eps]: a rotation, so x0 = c·x_t − s·target.
      const double x = c * step.noisy_latents().data()[i] - s * step.target().data()[i];
      REQUIRE(x == Approx(x0.data()[i]).margin(2e-6));
    }
  }
}

TEST_CASE("step: NoTextEncoder gives the denoiser an empty context of the batch's rows") {
  const DdpmScheduler scheduler = DdpmScheduler::sd15();
  FloatRecorder model;
  IdentityEncoder vae;
  NoTextEncoder none;
  DiffusionTrainStep step(scheduler, model, vae, none);
  const TokenIds no_tokens(std::array<std::size_t, 2>{0, 0});
  const TrainStepResult r = step.step(flow_latents(3), no_tokens, 4);
  REQUIRE(r.per_sample_loss.size() == 3);
  REQUIRE(model.seen_context.shape() == std::array<std::size_t, 3>{3, 0, 0});
  // DDPM timesteps reach a float denoiser exactly.
  for (std::size_t b = 0; b < 3; ++b) REQUIRE(double(model.seen_timesteps[b]) == r.timesteps[b]);
}
