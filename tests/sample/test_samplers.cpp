// DDIM and Euler-discrete schedulers: timestep grids against values worked out by hand from
// diffusers' set_timesteps (numpy rounding included), DDIM and Euler steps against their closed
// forms, and the config keys.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <vector>

#include "difftrain/schedule/ddim_scheduler.hpp"
#include "difftrain/schedule/euler_discrete_scheduler.hpp"
#include "difftrain/schedule/sampling_config.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;

namespace {

SamplingConfig config_with(TimestepSpacing spacing, std::int64_t steps_offset = 0) {
  SamplingConfig c;  // DDPM defaults: linear betas 1e-4..0.02, T = 1000
  c.timestep_spacing = spacing;
  c.steps_offset = steps_offset;
  return c;
}

std::vector<std::int64_t> ddim_timesteps(const SamplingConfig& c, std::int64_t n) {
  DdimScheduler s(c);
  s.set_timesteps(n);
  return {s.timesteps().begin(), s.timesteps().end()};
}

// ᾱ_t of the linear schedule, straight from its definition (independent of betas.hpp).
double linear_alpha_bar(std::int64_t t) {
  double a = 1.0;
  for (std::int64_t s = 0; s <= t; ++s) a *= 1.0 - (1e-4 + (0.02 - 1e-4) * double(s) / 999.0);
  return a;
}

Tensor4<float> tensor(std::vector<float> v) {
  Tensor4<float> x(std::array<std::size_t, 4>{1, 1, 1, v.size()});
  std::copy(v.begin(), v.end(), x.data());
  return x;
}

}  // namespace

TEST_CASE("DDIM timesteps follow diffusers' spacings", "[sample]") {
  using V = std::vector<std::int64_t>;
  // leading: i·(T div n) (+ steps_offset)
  CHECK(ddim_timesteps(config_with(TimestepSpacing::leading), 10) ==
        V{900, 800, 700, 600, 500, 400, 300, 200, 100, 0});
  CHECK(ddim_timesteps(config_with(TimestepSpacing::leading, 1), 10) ==
        V{901, 801, 701, 601, 501, 401, 301, 201, 101, 1});
  CHECK(ddim_timesteps(config_with(TimestepSpacing::leading, 1), 7) ==
        V{853, 711, 569, 427, 285, 143, 1});  // 1000 div 7 = 142
  // trailing: round(T − i·T/n) − 1, steps_offset ignored
  CHECK(ddim_timesteps(config_with(TimestepSpacing::trailing, 1), 10) ==
        V{999, 899, 799, 699, 599, 499, 399, 299, 199, 99});
  CHECK(ddim_timesteps(config_with(TimestepSpacing::trailing), 3) == V{999, 666, 332});
  // T/n = 62.5: the halves round to even (937.5 → 938, 812.5 → 812, ...)
  CHECK(ddim_timesteps(config_with(TimestepSpacing::trailing), 16) ==
        V{999, 937, 874, 811, 749, 687, 624, 561, 499, 437, 374, 311, 249, 187, 124, 61});
  // linspace: (T − 1)·i/(n − 1) rounded, steps_offset ignored
  CHECK(ddim_timesteps(config_with(TimestepSpacing::linspace, 1), 10) ==
        V{999, 888, 777, 666, 555, 444, 333, 222, 111, 0});
  // 999/6 = 166.5: 166.5 → 166, 499.5 → 500, 832.5 → 832 (half to even)
  CHECK(ddim_timesteps(config_with(TimestepSpacing::linspace), 7) ==
        V{999, 832, 666, 500, 333, 166, 0});
  const auto t30 = ddim_timesteps(config_with(TimestepSpacing::linspace), 30);
  REQUIRE(t30.size() == 30);
  CHECK(t30[0] == 999);
  CHECK(t30[1] == 965);  // 28·999/29 = 964.55
  CHECK(t30[27] == 69);  // 2·999/29 = 68.90
  CHECK(t30[28] == 34);  // 999/29 = 34.45
  CHECK(t30[29] == 0);
  CHECK(ddim_timesteps(config_with(TimestepSpacing::linspace), 1) == V{0});
  CHECK(ddim_timesteps(config_with(TimestepSpacing::leading), 1) == V{0});
  CHECK(ddim_timesteps(config_with(TimestepSpacing::trailing), 1) == V{999});
}

TEST_CASE("set_timesteps refuses impossible step counts", "[sample]") {
  DdimScheduler ddim(config_with(TimestepSpacing::leading));
  CHECK_THROWS_AS(ddim.set_timesteps(0), Error);
  CHECK_THROWS_AS(ddim.set_timesteps(1001), Error);
  ddim.set_timesteps(1000);
  CHECK(ddim.timesteps().front() == 999);
  // leading + steps_offset 1 with n = T puts the first timestep at T: out of range
  DdimScheduler shifted(config_with(TimestepSpacing::leading, 1));
  CHECK_THROWS_WITH(shifted.set_timesteps(1000), Catch::Contains("out of range"));
  // step before set_timesteps
  DdimScheduler fresh(config_with(TimestepSpacing::leading));
  auto x = tensor({1.0f});
  CHECK_THROWS_AS(fresh.step(tensor({0.0f}), 10, x), Error);
}

TEST_CASE("DDIM step matches the closed form for each prediction type", "[sample]") {
  const std::int64_t t = 500, prev = 400;  // 10 leading steps: t' = t − 100
  const double a = std::sqrt(linear_alpha_bar(t)), s = std::sqrt(1.0 - linear_alpha_bar(t));
  const double ap = std::sqrt(linear_alpha_bar(prev)), sp = std::sqrt(1.0 - linear_alpha_bar(prev));
  const std::vector<float> xs = {0.3f, -1.2f, 2.5f}, ms = {0.7f, 0.1f, -0.9f};
  for (const auto type :
       {PredictionType::epsilon, PredictionType::v_prediction, PredictionType::sample}) {
    INFO(to_string(type));
    auto c = config_with(TimestepSpacing::leading);
    c.train.prediction_type = type;
    DdimScheduler ddim(c);
    ddim.set_timesteps(10);
    CHECK(ddim.prev_timestep(t) == prev);
    auto x = tensor(xs);
    ddim.step(tensor(ms), t, x);
    std::vector<double> expected;
    for (std::size_t i = 0; i < xs.size(); ++i) {
      const double xi = xs[i], m = ms[i];
      double x0 = m, eps = m;
      if (type == PredictionType::epsilon) x0 = (xi - s * m) / a;
      if (type == PredictionType::v_prediction) x0 = a * xi - s * m, eps = a * m + s * xi;
      if (type == PredictionType::sample) eps = (xi - a * m) / s;
      expected.push_back(ap * x0 + sp * eps);
    }
    REQUIRE_CLOSE(x, expected, 1e-6, 1e-6);
  }
}

TEST_CASE("DDIM with the exact model output moves x_t to x_t' exactly", "[sample]") {
  // x_t = a·x0 + s·ε with the true ε / v / x0 as model output lands on a'·x0 + s'·ε.
  const std::vector<float> x0 = {0.5f, -0.25f, 1.0f}, eps = {-1.0f, 0.3f, 0.8f};
  for (const auto spacing :
       {TimestepSpacing::leading, TimestepSpacing::trailing, TimestepSpacing::linspace}) {
    for (const auto type :
         {PredictionType::epsilon, PredictionType::v_prediction, PredictionType::sample}) {
      INFO(to_string(spacing) << " " << to_string(type));
      auto c = config_with(spacing, 1);
      c.train.prediction_type = type;
      DdimScheduler ddim(c);
      ddim.set_timesteps(7);
      const auto alpha_bar = ddim.alphas_cumprod();
      for (const std::int64_t t : ddim.timesteps()) {
        const double a = std::sqrt(alpha_bar[t]), s = std::sqrt(1.0 - alpha_bar[t]);
        const std::int64_t p = ddim.prev_timestep(t);
        const double abar_p = p >= 0 ? alpha_bar[p] : 1.0;  // set_alpha_to_one
        Tensor4<float> x = tensor(x0), out = tensor(x0);
        std::vector<double> expected;
        for (std::size_t i = 0; i < x0.size(); ++i) {
          x.data()[i] = float(a * x0[i] + s * eps[i]);
          const double v = a * eps[i] - s * x0[i];
          out.data()[i] = float(type == PredictionType::epsilon        ? eps[i]
                                : type == PredictionType::v_prediction ? v
                                                                       : x0[i]);
          expected.push_back(std::sqrt(abar_p) * x0[i] + std::sqrt(1.0 - abar_p) * eps[i]);
        }
        ddim.step(out, t, x);
        // ε from a sample prediction divides by s ≈ 0.01 at t = 1: float inputs lose ~1e-5
        REQUIRE_CLOSE(x, expected, 1e-4, 1e-4);
      }
    }
  }
}

TEST_CASE("DDIM final step with set_alpha_to_one and clip_sample", "[sample]") {
  auto c = config_with(TimestepSpacing::leading);
  const double a0 = std::sqrt(linear_alpha_bar(0)), s0 = std::sqrt(1.0 - linear_alpha_bar(0));
  {
    DdimScheduler ddim(c);  // set_alpha_to_one: the last step returns x̂0
    ddim.set_timesteps(10);
    auto x = tensor({0.4f});
    ddim.step(tensor({0.2f}), 0, x);
    REQUIRE_CLOSE(x, std::vector<double>{(0.4 - s0 * 0.2) / a0}, 1e-6, 1e-7);
  }
  {
    c.set_alpha_to_one = false;  // ᾱ_0 after the last step
    DdimScheduler ddim(c);
    ddim.set_timesteps(10);
    auto x = tensor({0.4f});
    ddim.step(tensor({0.2f}), 0, x);
    REQUIRE_CLOSE(x, std::vector<double>{a0 * (0.4 - s0 * 0.2) / a0 + s0 * 0.2}, 1e-6, 1e-7);
  }
  {
    c.set_alpha_to_one = true;
    c.clip_sample = true;
    c.clip_sample_range = 0.5;
    c.train.prediction_type = PredictionType::sample;
    DdimScheduler ddim(c);
    ddim.set_timesteps(10);
    const double a = std::sqrt(linear_alpha_bar(300)), s = std::sqrt(1.0 - linear_alpha_bar(300));
    const double ap = std::sqrt(linear_alpha_bar(200)), sp = std::sqrt(1.0 - linear_alpha_bar(200));
    auto x = tensor({0.9f, 0.1f});
    ddim.step(tensor({2.0f, -0.3f}), 300, x);
    // x̂0 clamped to ±0.5; ε is computed from the unclamped prediction (as diffusers)
    REQUIRE_CLOSE(x,
                  (std::vector<double>{ap * 0.5 + sp * (0.9 - a * 2.0) / s,
                                       ap * -0.3 + sp * (0.1 - a * -0.3) / s}),
                  1e-6, 1e-6);
  }
}

TEST_CASE("DDIM with zero terminal SNR", "[sample]") {
  auto c = config_with(TimestepSpacing::trailing);
  c.train.rescale_betas_zero_snr = true;
  c.train.prediction_type = PredictionType::v_prediction;
  DdimScheduler ddim(c);
  ddim.set_timesteps(10);
  REQUIRE(ddim.timesteps().front() == 999);
  REQUIRE(ddim.alphas_cumprod()[999] == 0.0);
  // ᾱ = 0: x̂0 = −v̂, ε̂ = x
  const double abar = ddim.alphas_cumprod()[899];
  auto x = tensor({1.5f, -0.5f});
  ddim.step(tensor({0.2f, 0.4f}), 999, x);
  REQUIRE_CLOSE(x,
                (std::vector<double>{std::sqrt(abar) * -0.2 + std::sqrt(1 - abar) * 1.5,
                                     std::sqrt(abar) * -0.4 + std::sqrt(1 - abar) * -0.5}),
                1e-6, 1e-6);
  c.train.prediction_type = PredictionType::epsilon;
  DdimScheduler eps(c);
  eps.set_timesteps(10);
  auto y = tensor({1.0f});
  CHECK_THROWS_WITH(eps.step(tensor({0.0f}), 999, y), Catch::Contains("zero terminal SNR"));
}

TEST_CASE("Euler sigmas with init_noise_sigma and model-input scaling", "[sample]") {
  const auto sigma_of = [](double t) {
    const double abar = linear_alpha_bar(static_cast<std::int64_t>(t));
    return std::sqrt((1 - abar) / abar);
  };
  {
    EulerDiscreteScheduler euler(config_with(TimestepSpacing::leading, 1));
    euler.set_timesteps(10);
    const std::vector<std::int64_t> ts = {901, 801, 701, 601, 501, 401, 301, 201, 101, 1};
    REQUIRE(std::vector<std::int64_t>(euler.timesteps().begin(), euler.timesteps().end()) == ts);
    std::vector<double> expected;
    for (auto t : ts) expected.push_back(sigma_of(double(t)));
    expected.push_back(0.0);
    REQUIRE_CLOSE(euler.sigmas(), expected, 1e-9, 0);
    // leading: √(σ_max² + 1)
    CHECK(euler.init_noise_sigma() == Approx(std::sqrt(expected[0] * expected[0] + 1)));
    auto x = tensor({2.0f});
    euler.scale_model_input(x, 501);
    REQUIRE_CLOSE(x, std::vector<double>{2.0 / std::sqrt(sigma_of(501) * sigma_of(501) + 1)}, 1e-6,
                  0);
    CHECK_THROWS_WITH(euler.scale_model_input(x, 500), Catch::Contains("not one of"));
  }
  {
    EulerDiscreteScheduler euler(config_with(TimestepSpacing::trailing));
    euler.set_timesteps(10);
    CHECK(euler.timesteps().front() == 999);
    // trailing and linspace: σ_max itself
    CHECK(euler.init_noise_sigma() == Approx(sigma_of(999)).epsilon(1e-12));
  }
  {
    // linspace keeps fractional timesteps for σ: 832.5 is interpolated between 832 and 833;
    // the model gets the rounded timestep.
    EulerDiscreteScheduler euler(config_with(TimestepSpacing::linspace));
    euler.set_timesteps(7);
    CHECK(std::vector<std::int64_t>(euler.timesteps().begin(), euler.timesteps().end()) ==
          std::vector<std::int64_t>{999, 832, 666, 500, 333, 166, 0});
    CHECK(euler.sigmas()[1] == Approx(0.5 * (sigma_of(832) + sigma_of(833))).epsilon(1e-12));
    CHECK(euler.sigmas()[3] == Approx(0.5 * (sigma_of(499) + sigma_of(500))).epsilon(1e-12));
    CHECK(euler.sigmas()[2] == Approx(sigma_of(666)).epsilon(1e-12));
    CHECK(euler.sigmas()[7] == 0.0);
  }
}

TEST_CASE("Euler step matches the closed form and is exact for an exact x0", "[sample]") {
  for (const auto type :
       {PredictionType::epsilon, PredictionType::v_prediction, PredictionType::sample}) {
    INFO(to_string(type));
    auto c = config_with(TimestepSpacing::trailing);
    c.train.prediction_type = type;
    EulerDiscreteScheduler euler(c);
    euler.set_timesteps(10);
    const auto sig = euler.sigmas();
    // x = x0 + σ·ε with the exact model output lands on x0 + σ_next·ε.
    const std::vector<float> x0 = {0.5f, -0.25f}, eps = {-1.0f, 0.3f};
    for (std::size_t k = 0; k < euler.timesteps().size(); ++k) {
      const std::int64_t t = euler.timesteps()[k];
      const double sigma = sig[k], c_in = 1.0 / std::sqrt(sigma * sigma + 1);
      Tensor4<float> x = tensor(x0), out = tensor(x0);
      std::vector<double> expected;
      for (std::size_t i = 0; i < x0.size(); ++i) {
        x.data()[i] = float(x0[i] + sigma * eps[i]);
        // VP view: x_t = c_in·x, √ᾱ = c_in, √(1−ᾱ) = σ·c_in; v = √ᾱ·ε − √(1−ᾱ)·x0
        const double v = c_in * eps[i] - sigma * c_in * x0[i];
        out.data()[i] = float(type == PredictionType::epsilon        ? eps[i]
                              : type == PredictionType::v_prediction ? v
                                                                     : x0[i]);
        expected.push_back(x0[i] + sig[k + 1] * eps[i]);
      }
      euler.step(out, t, x);
      REQUIRE_CLOSE(x, expected, 1e-5, 1e-4);
    }
  }
  {
    // One step by hand: σ = σ(999), next σ(899), epsilon: x ← x + (σ' − σ)·ε̂
    EulerDiscreteScheduler euler(config_with(TimestepSpacing::trailing));
    euler.set_timesteps(10);
    const double s1 = std::sqrt((1 - linear_alpha_bar(999)) / linear_alpha_bar(999));
    const double s2 = std::sqrt((1 - linear_alpha_bar(899)) / linear_alpha_bar(899));
    auto x = tensor({100.0f});
    euler.step(tensor({0.5f}), 999, x);
    REQUIRE_CLOSE(x, std::vector<double>{100.0 + (s2 - s1) * 0.5}, 1e-6, 0);
  }
}

TEST_CASE("Euler with zero terminal SNR keeps σ_max finite", "[sample]") {
  auto c = config_with(TimestepSpacing::trailing);
  c.train.rescale_betas_zero_snr = true;
  c.train.prediction_type = PredictionType::v_prediction;
  EulerDiscreteScheduler euler(c);
  euler.set_timesteps(10);
  // ᾱ_{T−1} = 2^-24 → σ = √((1 − 2^-24)·2^24)
  CHECK(euler.sigmas()[0] == Approx(std::sqrt((1.0 - 0x1p-24) * 0x1p24)).epsilon(1e-12));
  CHECK(euler.init_noise_sigma() == Approx(euler.sigmas()[0]));
}

TEST_CASE("SamplingConfig reads scheduler_config.json", "[sample]") {
  // Stable Diffusion 1.5's scheduler/scheduler_config.json (PNDM)
  const auto sd15 = nlohmann::json::parse(R"({
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
    "steps_offset": 1, "trained_betas": null, "clip_sample": false})");
  const auto c = SamplingConfig::from_json(sd15);
  // No timestep_spacing key: each scheduler's own default, as in diffusers (DDIMScheduler
  // "leading", EulerDiscreteScheduler "linspace"; difftrain used leading for both before).
  CHECK_FALSE(c.timestep_spacing.has_value());
  DdimScheduler ddim(c);
  EulerDiscreteScheduler euler(c);
  CHECK(ddim.config().timestep_spacing == TimestepSpacing::leading);
  CHECK(euler.config().timestep_spacing == TimestepSpacing::linspace);
  ddim.set_timesteps(10);
  euler.set_timesteps(10);
  CHECK(ddim.timesteps()[0] == 901);   // leading: 9·100 + steps_offset 1
  CHECK(euler.timesteps()[0] == 999);  // linspace(0, 999, 10), descending
  CHECK(euler.timesteps()[1] == 888);
  CHECK(euler.init_noise_sigma() == Approx(euler.sigma(999)));  // linspace: max σ, no √(σ²+1)
  CHECK(c.steps_offset == 1);
  CHECK_FALSE(c.set_alpha_to_one);
  CHECK_FALSE(c.clip_sample);
  CHECK(c.train.beta_schedule == BetaSchedule::scaled_linear);
  CHECK(c.train.beta_end == 0.012);

  const auto v = SamplingConfig::from_json(nlohmann::json::parse(
      R"({"timestep_spacing": "trailing", "prediction_type": "v_prediction",
          "rescale_betas_zero_snr": true, "clip_sample": true, "clip_sample_range": 2.0,
          "use_karras_sigmas": false})"));
  CHECK(v.timestep_spacing == TimestepSpacing::trailing);
  CHECK(v.train.prediction_type == PredictionType::v_prediction);
  CHECK(v.train.rescale_betas_zero_snr);
  CHECK(v.clip_sample);
  CHECK(v.clip_sample_range == 2.0);

  CHECK_THROWS_WITH(
      SamplingConfig::from_json(nlohmann::json::parse(R"({"timestep_spacing": "x"})")),
      Catch::Contains("timestep_spacing") && Catch::Contains("'x'"));
  CHECK_THROWS_WITH(SamplingConfig::from_json(nlohmann::json::parse(R"({"steps_offset": -1})")),
                    Catch::Contains("steps_offset"));
  CHECK_THROWS_WITH(SamplingConfig::from_json(nlohmann::json::parse(R"({"set_alpha_to_one": 1})")),
                    Catch::Contains("set_alpha_to_one"));
  CHECK_THROWS_WITH(SamplingConfig::from_json(nlohmann::json::parse(R"({"beta_start": -1})")),
                    Catch::Contains("beta_start"));
  CHECK_THROWS_WITH(SamplingConfig::from_file("/nonexistent/scheduler_config.json"),
                    Catch::Contains("/nonexistent/scheduler_config.json"));
}
