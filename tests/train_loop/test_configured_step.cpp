// make_train_step: every timestep, noise, loss-type and weighting option of TrainerOptions reaches
// the DiffusionTrainStep it builds, checked against the policies, the samplers' stated
// distributions and the losses' closed forms; bad values throw difftrain::Error.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>
#include <xtensor/xview.hpp>

#include "difftrain/difftrain.hpp"
#include "difftrain/train/trainer.hpp"
#include "support/tensor_match.hpp"
#include "train_loop/zero_text.hpp"

using namespace difftrain;
using namespace difftrain::train;
using difftrain::test::ZeroText;

namespace {

// pred = 0.5·x_t + 0.3: a fixed, known prediction (no parameters).
struct AffineDenoiser {
  Tensor4<float> forward(const Tensor4<float>& x_t, std::span<const std::int64_t>,
                         const Tensor3<float>&) const {
    return 0.5f * x_t + 0.3f;
  }
  void backward(const Tensor4<float>&) {}
};

Tensor4<float> images(std::size_t n) {
  Tensor4<float> x = xt::zeros<float>({n, std::size_t{4}, std::size_t{8}, std::size_t{8}});
  fill_normal(std::span<float>(x.data(), x.size()), RandomStream{77, 1});
  return x;
}

DdpmScheduler ztsnr_scheduler() {
  DdpmSchedulerConfig c = DdpmScheduler::sd15().config();
  c.rescale_betas_zero_snr = true;
  return DdpmScheduler(c);
}

// The step's random sub-streams of step s (diffusion_train_step.hpp).
RandomStream step_stream(std::uint64_t seed, std::uint64_t s, StreamPurpose purpose) {
  return RandomStream{seed, 0}.derive(s, 0).derive(0, static_cast<std::uint32_t>(purpose));
}

struct Fixture {
  AffineDenoiser unet;
  IdentityEncoder vae;
  ZeroText text;
};

}  // namespace

TEST_CASE("ConfiguredWeighting equals the direct policy at every t (SD and zero terminal SNR)") {
  const PredictionType types[] = {PredictionType::epsilon, PredictionType::v_prediction,
                                  PredictionType::sample};
  for (const DdpmScheduler& sched : {DdpmScheduler::sd15(), ztsnr_scheduler()}) {
    REQUIRE((sched.snr(999) == 0) == sched.config().rescale_betas_zero_snr);
    loss::WeightingOptions min_snr, debiased, p2, scale_v, stacked;
    min_snr.snr_gamma = 5.0;
    debiased.debiased_estimation_loss = true;
    p2.p2_gamma = 0.5;
    scale_v.scale_v_pred_loss_like_noise_pred = true;
    stacked.snr_gamma = 2.0;
    stacked.debiased_estimation_loss = true;
    const loss::ConfiguredWeighting none{}, w_min{min_snr}, w_deb{debiased}, w_p2{p2}, w_v{scale_v},
        w_stack{stacked};
    REQUIRE(none.uniform());
    REQUIRE(!w_stack.uniform());
    for (std::int64_t t = 0; t < sched.num_train_timesteps(); ++t) {
      const double S = sched.snr(t);
      for (PredictionType type : types) {
        INFO("t = " << t << ", " << to_string(type));
        REQUIRE(none.weight(S, type) == 1.0);
        REQUIRE(w_min.weight(S, type) == loss::MinSnr(5.0).weight(S, type));
        REQUIRE(w_deb.weight(S, type) == loss::DebiasedEstimation{}.weight(S, type));
        REQUIRE(w_p2.weight(S, type) == loss::P2(0.5).weight(S, type));
        const double product =
            loss::MinSnr(2.0).weight(S, type) * loss::DebiasedEstimation{}.weight(S, type);
        REQUIRE(w_stack.weight(S, type) == Approx(product).epsilon(1e-15));
        REQUIRE(std::isfinite(w_stack.weight(S, type)));
      }
      REQUIRE(w_v.weight(S, PredictionType::v_prediction) ==
              loss::ScaleVPredLikeNoisePred{}.weight(S, PredictionType::v_prediction));
    }
  }
  // Min-SNR at one t by hand: eps weight min(S, γ)/S.
  const double S = DdpmScheduler::sd15().snr(500);
  loss::WeightingOptions o;
  o.snr_gamma = 0.1;
  REQUIRE(S > 0.1);
  REQUIRE(loss::ConfiguredWeighting(o).weight(S, PredictionType::epsilon) == Approx(0.1 / S));
}

TEST_CASE("make_train_step: the weighting and the prediction type reach the step") {
  Fixture f;
  TrainerOptions o;
  o.seed = 9;
  o.weighting.snr_gamma = 5.0;
  o.weighting.debiased_estimation_loss = true;
  const DdpmScheduler sched = DdpmScheduler::sd15();
  auto step = make_train_step(sched, f.unet, f.vae, f.text, o);
  static_assert(std::is_same_v<decltype(step), ConfiguredTrainStep<DdpmScheduler, AffineDenoiser,
                                                                   IdentityEncoder, ZeroText>>);
  const Tensor4<float> x = images(6);
  const TrainStepResult r = step.step(x, xt::zeros<std::int64_t>({6, 2}), 3);
  REQUIRE(r.weights.size() == 6);
  for (std::size_t b = 0; b < 6; ++b) {
    const double S = sched.snr(static_cast<std::int64_t>(r.timesteps[b]));
    REQUIRE(r.weights[b] == Approx(loss::MinSnr(5.0).weight(S, PredictionType::epsilon) /
                                   std::sqrt(std::clamp(S, 1e-3, 1000.0))));
  }
  // v_prediction from the options: the target is v = √ᾱ·eps − √(1−ᾱ)·x0 with the same eps.
  auto eps_step = make_train_step(sched, f.unet, f.vae, f.text, TrainerOptions{});
  TrainerOptions v = TrainerOptions{};
  v.prediction_type = PredictionType::v_prediction;
  v.weighting.scale_v_pred_loss_like_noise_pred = true;
  auto v_step = make_train_step(sched, f.unet, f.vae, f.text, v);
  REQUIRE(v_step.prediction_type() == PredictionType::v_prediction);
  const TokenIds ids = xt::zeros<std::int64_t>({6, 2});
  eps_step.step(x, ids, 4);
  const TrainStepResult rv = v_step.step(x, ids, 4);
  const Tensor4<float> eps = eps_step.target();
  Tensor4<float> expected = eps;
  for (std::size_t b = 0; b < 6; ++b) {
    const auto t = static_cast<std::int64_t>(rv.timesteps[b]);
    const double S = sched.snr(t);
    REQUIRE(rv.weights[b] == Approx(S / (S + 1)));  // scale_v_pred_loss_like_noise_pred
    auto e = xt::view(expected, b);
    e = float(sched.sqrt_alpha_prod(t)) * xt::view(eps, b) -
        float(sched.sqrt_one_minus_alpha_prod(t)) * xt::view(x, b);
  }
  REQUIRE_CLOSE(v_step.target(), expected, 1e-5, 1e-6);
}

TEST_CASE("timestep options: kohya's range and diffusers' bias give the stated distributions") {
  const std::int64_t T = 1000;
  const std::size_t N = 40000;
  std::vector<std::int64_t> t(N);
  auto fraction_in = [&](std::int64_t lo, std::int64_t hi) {
    double n = 0;
    for (std::int64_t v : t) n += (lo <= v && v < hi) ? 1 : 0;
    return n / double(N);
  };
  // 5σ of a binomial proportion: the draws are fixed by the stream, the bound is generous.
  auto tolerance = [&](double p) { return 5 * std::sqrt(p * (1 - p) / double(N)); };

  TrainerOptions o;
  o.min_timestep = 200;
  o.max_timestep = 210;
  timestep_sampler(o, T).sample(t, RandomStream{1, 2});
  std::vector<int> hits(10, 0);
  for (std::int64_t v : t) {
    REQUIRE(200 <= v);
    REQUIRE(v < 210);
    ++hits[std::size_t(v - 200)];
  }
  for (int h : hits) REQUIRE(std::abs(h / double(N) - 0.1) < tolerance(0.1));

  struct Case {
    const char* strategy;
    double multiplier, portion;
    std::int64_t begin, end;  // range only
    std::int64_t lo, hi;      // the biased slice
  };
  for (const Case& c :
       {Case{"later", 3.0, 0.25, 0, 1000, 750, 1000}, Case{"earlier", 0.5, 0.5, 0, 1000, 0, 500},
        Case{"range", 10.0, 0.25, 100, 200, 100, 200}}) {
    TrainerOptions b;
    b.timestep_bias_strategy = c.strategy;
    b.timestep_bias_multiplier = c.multiplier;
    b.timestep_bias_portion = c.portion;
    b.timestep_bias_begin = c.begin;
    b.timestep_bias_end = c.end;
    timestep_sampler(b, T).sample(t, RandomStream{3, 4});
    // P(slice) = m·n / (m·n + T − n) for a slice of n timesteps.
    const double n = double(c.hi - c.lo), m = c.multiplier;
    const double expected = m * n / (m * n + double(T) - n);
    INFO(c.strategy << ": expected P(slice) " << expected << ", got " << fraction_in(c.lo, c.hi));
    REQUIRE(std::abs(fraction_in(c.lo, c.hi) - expected) < tolerance(expected));
    // Inside the slice and outside it, t stays uniform: two halves of the slice match.
    const std::int64_t mid = (c.lo + c.hi) / 2;
    REQUIRE(std::abs(fraction_in(c.lo, mid) - fraction_in(mid, c.hi)) < 2 * tolerance(expected));
  }

  // The step draws its timesteps with that sampler, from its timesteps stream.
  Fixture f;
  TrainerOptions s;
  s.seed = 4;
  s.timestep_bias_strategy = "later";
  s.timestep_bias_multiplier = 5;
  auto step = make_train_step(DdpmScheduler::sd15(), f.unet, f.vae, f.text, s);
  const TrainStepResult r = step.step(images(8), xt::zeros<std::int64_t>({8, 2}), 11);
  std::vector<std::int64_t> expected(8);
  timestep_sampler(s, T).sample(expected, step_stream(4, 11, StreamPurpose::step_timesteps));
  REQUIRE(r.timesteps == std::vector<double>(expected.begin(), expected.end()));
  s = {};
  s.min_timestep = 990;
  auto late = make_train_step(DdpmScheduler::sd15(), f.unet, f.vae, f.text, s);
  for (std::uint64_t k = 0; k < 4; ++k)
    for (double v : late.step(images(8), xt::zeros<std::int64_t>({8, 2}), k).timesteps)
      REQUIRE((990 <= v && v < 1000));
}

TEST_CASE("noise options reach the step: offset, adaptive, pyramid, input perturbation") {
  Fixture f;
  const Tensor4<float> x = images(4);
  const TokenIds ids = xt::zeros<std::int64_t>({4, 2});
  auto eps_of = [&](const TrainerOptions& o, std::uint64_t s) {
    auto step = make_train_step(DdpmScheduler::sd15(), f.unet, f.vae, f.text, o);
    step.step(x, ids, s);
    return Tensor4<float>(step.target());  // epsilon prediction: the target is eps
  };
  TrainerOptions plain;
  plain.seed = 21;
  const Tensor4<float> eps_plain = eps_of(plain, 2);

  SECTION("offset noise, random strength and adaptive scale") {
    TrainerOptions o = plain;
    o.noise.noise_offset = 0.1f;
    o.noise.noise_offset_random_strength = true;
    o.noise.adaptive_noise_scale = 0.05f;
    const Tensor4<float> eps = eps_of(o, 2);
    Tensor4<float> expected;
    kernels::sample_noise(train_step_options(o).noise, x,
                          step_stream(21, 2, StreamPurpose::step_noise), expected);
    REQUIRE_CLOSE(eps, expected, 1e-6, 1e-6);
    // eps − eps_plain is constant over each (b, c) plane: the offset k_bc·n_bc.
    const Tensor4<float> d = eps - eps_plain;
    double spread = 0, size = 0;
    for (std::size_t b = 0; b < 4; ++b)
      for (std::size_t c = 0; c < 4; ++c) {
        auto plane = xt::view(d, b, c);
        spread = std::max(spread, double(xt::amax(plane)() - xt::amin(plane)()));
        size = std::max(size, double(std::abs(plane(0, 0))));
      }
    REQUIRE(spread < 1e-5);
    REQUIRE(size > 1e-3);
  }
  SECTION("pyramid noise") {
    TrainerOptions o = plain;
    o.noise.multires_noise_iterations = 3;
    o.noise.multires_noise_discount = 0.4f;
    const Tensor4<float> eps = eps_of(o, 2);
    Tensor4<float> expected;
    kernels::sample_noise(train_step_options(o).noise, x,
                          step_stream(21, 2, StreamPurpose::step_noise), expected);
    REQUIRE_CLOSE(eps, expected, 0.0, 0.0);
    // normalised to unit standard deviation over the whole tensor (kohya)
    const double mean = xt::mean(eps)();
    const double var = xt::sum(xt::square(eps - mean))() / double(eps.size() - 1);
    REQUIRE(var == Approx(1.0).epsilon(1e-5));
    REQUIRE(xt::amax(xt::abs(eps - eps_plain))() > 0.1f);
  }
  SECTION("input perturbation: the model input moves by √(1−ᾱ)·γ·ξ, the target does not") {
    TrainerOptions o = plain;
    o.noise.input_perturbation = 0.25f;
    auto step = make_train_step(DdpmScheduler::sd15(), f.unet, f.vae, f.text, o);
    const TrainStepResult r = step.step(x, ids, 2);
    REQUIRE_CLOSE(step.target(), eps_plain, 0.0, 0.0);
    auto base = make_train_step(DdpmScheduler::sd15(), f.unet, f.vae, f.text, plain);
    base.step(x, ids, 2);
    const DdpmScheduler sched = DdpmScheduler::sd15();
    double sum_sq = 0;
    for (std::size_t b = 0; b < 4; ++b) {
      const double s = sched.sqrt_one_minus_alpha_prod(static_cast<std::int64_t>(r.timesteps[b]));
      const Tensor<float, 3> xi =
          (xt::view(step.noisy_latents(), b) - xt::view(base.noisy_latents(), b)) / float(s);
      sum_sq += xt::sum(xt::square(xi))();
    }
    // γ·ξ with ξ ~ N(0, I): the std of 1024 draws is γ within a few percent.
    REQUIRE(std::sqrt(sum_sq / double(x.size())) == Approx(0.25).epsilon(0.1));
  }
}

TEST_CASE("loss options reach the step: huber / smooth_l1 against the closed forms") {
  Fixture f;
  const DdpmScheduler sched = DdpmScheduler::sd15();
  const Tensor4<float> x = images(4);
  const TokenIds ids = xt::zeros<std::int64_t>({4, 2});
  // Per-sample mean over C,H,W of ℓ(pred − target), pred = 0.5·x_t + 0.3, in double.
  auto per_sample = [&](const auto& step, auto&& ell) {
    std::vector<double> out;
    const Tensor4<float> pred = 0.5f * step.noisy_latents() + 0.3f;
    const std::size_t n = x.size() / 4;
    for (std::size_t b = 0; b < 4; ++b) {
      double sum = 0;
      for (std::size_t i = 0; i < n; ++i) {
        const double d = double(pred.data()[b * n + i]) - double(step.target().data()[b * n + i]);
        sum += ell(d, b);
      }
      out.push_back(sum / double(n));
    }
    return out;
  };
  TrainerOptions o;
  o.seed = 13;
  SECTION("huber with c → ∞ is l2 (constant schedule, c·scale = 10⁴)") {
    o.loss_type = "huber";
    o.huber_schedule = "constant";
    o.huber_c = 1.0;
    o.huber_scale = 1e4;
    auto step = make_train_step(sched, f.unet, f.vae, f.text, o);
    const TrainStepResult r = step.step(x, ids, 1);
    const auto l2 = per_sample(step, [](double d, std::size_t) { return d * d; });
    REQUIRE_CLOSE(r.per_sample_loss, l2, 1e-5, 0.0);
    TrainerOptions plain = o;
    plain.loss_type = "l2";
    auto l2_step = make_train_step(sched, f.unet, f.vae, f.text, plain);
    REQUIRE(l2_step.step(x, ids, 1).loss == Approx(r.loss).epsilon(1e-5));
  }
  SECTION("huber, snr schedule: 2c_t(√(d²+c_t²) − c_t), c_t = (1−c)/(1+σ_t)² + c") {
    o.loss_type = "huber";
    o.huber_c = 0.2;
    auto step = make_train_step(sched, f.unet, f.vae, f.text, o);
    const TrainStepResult r = step.step(x, ids, 1);
    std::vector<double> c(4);
    for (std::size_t b = 0; b < 4; ++b) {
      const double abar = sched.alphas_cumprod()[std::size_t(r.timesteps[b])];
      const double sigma = std::sqrt((1 - abar) / abar);
      c[b] = (1 - 0.2) / ((1 + sigma) * (1 + sigma)) + 0.2;
    }
    const auto expected = per_sample(step, [&](double d, std::size_t b) {
      return 2 * c[b] * (std::sqrt(d * d + c[b] * c[b]) - c[b]);
    });
    REQUIRE_CLOSE(r.per_sample_loss, expected, 1e-4, 0.0);
    double mean = 0;
    for (std::size_t b = 0; b < 4; ++b) mean += r.weights[b] * expected[b] / 4;
    REQUIRE(r.loss == Approx(mean).epsilon(1e-4));
  }
  SECTION("smooth_l1, exponential schedule: 2(√(d²+c_t²) − c_t), c_t = scale·c^(t/T)") {
    o.loss_type = "smooth_l1";
    o.huber_schedule = "exponential";
    o.huber_c = 0.1;
    o.huber_scale = 2.0;
    auto step = make_train_step(sched, f.unet, f.vae, f.text, o);
    const TrainStepResult r = step.step(x, ids, 1);
    const auto expected = per_sample(step, [&](double d, std::size_t b) {
      const double ct = 2.0 * std::pow(0.1, double(r.timesteps[b]) / 1000.0);
      return 2 * (std::sqrt(d * d + ct * ct) - ct);
    });
    REQUIRE_CLOSE(r.per_sample_loss, expected, 1e-4, 0.0);
  }
}

TEST_CASE("make_train_step: bad option values throw difftrain::Error naming them") {
  Fixture f;
  auto make = [&](const TrainerOptions& o) {
    return make_train_step(DdpmScheduler::sd15(), f.unet, f.vae, f.text, o);
  };
  auto fails = [&](auto&& edit, const char* message) {
    TrainerOptions o;
    edit(o);
    INFO("expected: " << message);
    REQUIRE_THROWS_AS(make(o), Error);
    REQUIRE_THROWS_WITH(make(o), Catch::Contains(message));
  };
  fails([](TrainerOptions& o) { o.weighting.snr_gamma = 0.0; }, "MinSnr: gamma is 0");
  fails([](TrainerOptions& o) { o.weighting.p2_gamma = -1.0; }, "P2: gamma is -1");
  fails([](TrainerOptions& o) { o.weighting.scale_v_pred_loss_like_noise_pred = true; },
        "scale_v_pred_loss_like_noise_pred needs prediction_type v_prediction, got epsilon");
  fails([](TrainerOptions& o) { o.loss_type = "l3"; }, "loss_type: unknown value 'l3'");
  fails([](TrainerOptions& o) { o.huber_schedule = "cosine"; },
        "huber_schedule: unknown value 'cosine'");
  fails(
      [](TrainerOptions& o) {
        o.loss_type = "huber";
        o.huber_c = 0;
      },
      "huber_c is 0, expected a value in (0, 1]");
  fails(
      [](TrainerOptions& o) {
        o.loss_type = "smooth_l1";
        o.huber_scale = -1;
      },
      "huber_scale is -1");
  fails(
      [](TrainerOptions& o) {
        o.min_timestep = 10;
        o.max_timestep = 10;
      },
      "range [10, 10) is not inside [0, 1000) or is empty");
  fails([](TrainerOptions& o) { o.max_timestep = 1001; }, "range [0, 1001)");
  fails([](TrainerOptions& o) { o.min_timestep = -1; }, "range [-1, 1000)");
  fails([](TrainerOptions& o) { o.timestep_bias_strategy = "middle"; },
        "timestep_bias_strategy: unknown value 'middle'");
  fails(
      [](TrainerOptions& o) {
        o.timestep_bias_strategy = "later";
        o.min_timestep = 100;
      },
      "min_timestep / max_timestep cannot be combined with timestep_bias_strategy");
  fails(
      [](TrainerOptions& o) {
        o.timestep_bias_strategy = "earlier";
        o.timestep_bias_multiplier = 0;
      },
      "multiplier is 0, expected > 0");
  fails(
      [](TrainerOptions& o) {
        o.timestep_bias_strategy = "later";
        o.timestep_bias_portion = 1.5;
      },
      "portion is 1.5, expected a value in (0, 1]");
  fails(
      [](TrainerOptions& o) {
        o.timestep_bias_strategy = "range";
        o.timestep_bias_begin = 900;
        o.timestep_bias_end = 100;
      },
      "range [900, 100) is not inside [0, 1000) or is empty");
  fails([](TrainerOptions& o) { o.noise.noise_offset = -0.1f; }, "noise_offset is -0.1");
  fails([](TrainerOptions& o) { o.noise.adaptive_noise_scale = 0.1f; },
        "adaptive_noise_scale needs noise_offset > 0");
  fails([](TrainerOptions& o) { o.noise.multires_noise_iterations = -2; },
        "multires_noise_iterations is -2, expected >= 0");
  fails([](TrainerOptions& o) { o.noise.multires_noise_discount = -0.3f; },
        "multires_noise_discount is -0.3");
  fails([](TrainerOptions& o) { o.noise.input_perturbation = NAN; }, "input_perturbation is nan");
  // Defaults build, and so does every option at a legal value.
  REQUIRE_NOTHROW(make(TrainerOptions{}));
  TrainerOptions all;
  all.weighting.snr_gamma = 5;
  all.weighting.debiased_estimation_loss = true;
  all.weighting.p2_gamma = 1;
  all.loss_type = "smooth_l1";
  all.noise.noise_offset = 0.1f;
  all.noise.noise_offset_random_strength = true;
  all.noise.adaptive_noise_scale = 0.02f;
  all.noise.multires_noise_iterations = 6;
  all.noise.input_perturbation = 0.1f;
  all.noise.input_perturbation_random_strength = true;
  all.timestep_bias_strategy = "range";
  all.timestep_bias_begin = 200;
  all.timestep_bias_end = 800;
  all.timestep_bias_multiplier = 2;
  auto step = make(all);
  const TrainStepResult r = step.step(images(2), xt::zeros<std::int64_t>({2, 2}), 0);
  REQUIRE(std::isfinite(r.loss));
}
