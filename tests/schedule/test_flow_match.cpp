// Flow matching: FlowMatchEulerDiscreteScheduler's sigmas against values worked out by hand from
// diffusers' scheduling_flow_match_euler_discrete.py (__init__, set_timesteps, time_shift,
// stretch_shift_to_terminal) and pipeline_flux.py calculate_shift; the training densities against
// their closed-form distributions (diffusers training_utils.py
// compute_density_for_timestep_sampling, kohya flux_train_utils.py
// get_noisy_model_input_and_timesteps, OneTrainer ModelSetupNoiseMixin._get_timestep_discrete);
// compute_loss_weighting_for_sd3; the per-sample coefficients; the Euler sampler driven by the
// exact velocity of Gaussian data; config parsing and its errors.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <numbers>
#include <string>
#include <tuple>
#include <vector>

#include "difftrain/schedule/flow_match.hpp"
#include "support/error_of.hpp"
#include "support/temp_dir.hpp"

using namespace difftrain;

// Named, not anonymous: the test executable is a unity build with the other schedule tests.
namespace flow_match_test {

constexpr double kPi = std::numbers::pi;

// Standard normal quantiles z_q (Φ(z_q) = q).
struct Quantile {
  double q, z;
};
constexpr Quantile kNormalQuantiles[] = {{0.025, -1.959963984540054}, {0.1, -1.2815515655446004},
                                         {0.25, -0.6744897501960817}, {0.5, 0.0},
                                         {0.75, 0.6744897501960817},  {0.9, 1.2815515655446004},
                                         {0.975, 1.959963984540054}};

double logistic(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// The fraction of xs that are <= x.
double fraction_at_most(const std::vector<double>& xs, double x) {
  std::size_t k = 0;
  for (double v : xs) k += v <= x;
  return double(k) / double(xs.size());
}

// An empirical probability against p: 5 binomial standard errors (a correct sampler fails with
// probability < 1e-6 per check, and the streams are fixed, so the tests are deterministic).
void check_probability(double empirical, double p, std::size_t n) {
  INFO("empirical " << empirical << ", expected " << p);
  CHECK(std::abs(empirical - p) <= 5 * std::sqrt(p * (1 - p) / double(n)) + 1e-12);
}

std::vector<double> draw(const FlowMatchTimesteps& sampler, std::size_t n, RandomStream rs,
                         std::int64_t h = 0, std::int64_t w = 0) {
  std::vector<double> sigmas(n);
  sampler.sample(sigmas, rs, h, w);
  return sigmas;
}

FlowMatchEulerDiscreteScheduler scheduler_with_shift(double shift) {
  FlowMatchEulerDiscreteSchedulerConfig config;
  config.shift = shift;
  return FlowMatchEulerDiscreteScheduler(config);
}

// The mode density's f(u) = 1 − u − s·(cos²(πu/2) − 1 + u) (SD3 paper, section 3.1) and its inverse
// by bisection (f decreases from 1 to 0 for s in [−1, 2/(π − 2)]).
double mode_f(double u, double s) {
  const double c = std::cos(kPi * u / 2);
  return 1 - u - s * (c * c - 1 + u);
}
double mode_f_inverse(double y, double s) {
  double lo = 0, hi = 1;
  for (int i = 0; i < 100; ++i) {
    const double mid = (lo + hi) / 2;
    (mode_f(mid, s) > y ? lo : hi) = mid;
  }
  return (lo + hi) / 2;
}

struct Moments {
  double mean = 0, var = 0;
};
Moments moments(const float* x, std::size_t n) {
  Moments m;
  for (std::size_t i = 0; i < n; ++i) m.mean += x[i];
  m.mean /= double(n);
  for (std::size_t i = 0; i < n; ++i) m.var += (x[i] - m.mean) * (x[i] - m.mean);
  m.var /= double(n - 1);
  return m;
}

// The exact velocity of N(mu, s²) data: with x_σ = (1 − σ)·x0 + σ·eps, x_σ and v = eps − x0 are
// jointly Gaussian: E[x_σ] = (1 − σ)·mu, Var x_σ = V = (1 − σ)²s² + σ², E[v] = −mu,
// Cov(v, x_σ) = σ − (1 − σ)s², so v*(x, σ) = E[v | x_σ = x] = −mu + (σ − (1 − σ)s²)/V·(x − (1 −
// σ)mu). The ODE dx/dσ = v*(x, σ) is solved by x(σ) = (1 − σ)·mu + √V(σ)·z (dx/dσ = −mu +
// V'/(2√V)·z), so integrating from σ = 1 (x = z, pure noise) to σ = 0 gives exactly x = mu + s·z.
double optimal_velocity(double x, double sigma, double mu, double s) {
  const double a = 1 - sigma;
  const double V = a * a * s * s + sigma * sigma;
  return -mu + (sigma - a * s * s) / V * (x - a * mu);
}

// Runs the scheduler's Euler sampler from x = z with the exact velocity.
Tensor4<float> sample_gaussian(FlowMatchEulerDiscreteScheduler& scheduler, const Tensor4<float>& z,
                               double mu, double s) {
  Tensor4<float> x = z;
  Tensor4<float> v(x.shape());
  for (std::int64_t k = 0; k < scheduler.num_inference_steps(); ++k) {
    const double sigma = scheduler.sigmas()[std::size_t(k)];
    for (std::size_t i = 0; i < x.size(); ++i)
      v.data()[i] = float(optimal_velocity(x.data()[i], sigma, mu, s));
    scheduler.step(v, k, x);
  }
  return x;
}

Tensor4<float> standard_normal(std::size_t h, std::size_t w, RandomStream rs) {
  Tensor4<float> z(std::array<std::size_t, 4>{1, 2, h, w});
  fill_normal(std::span<float>(z.data(), z.size()), rs);
  return z;
}

}  // namespace flow_match_test

using namespace flow_match_test;

TEST_CASE("flow matching: per-sample coefficients, SNR and loss weightings", "[flow_match]") {
  // x_t = (1 − σ)·x0 + σ·eps, target eps − x0, timestep σ·1000, SNR ((1 − σ)/σ)².
  const TrainingCoefficients c = flow_match_coefficients(0.25);
  CHECK(c.x0_coef == 0.75);
  CHECK(c.eps_coef == 0.25);
  CHECK(c.target_x0_coef == -1.0);
  CHECK(c.target_eps_coef == 1.0);
  CHECK(c.model_timestep == 250.0);
  CHECK(c.snr == Approx(9.0).epsilon(1e-15));
  CHECK(flow_match_coefficients(0.6).snr == Approx(4.0 / 9.0).epsilon(1e-15));
  CHECK(flow_match_coefficients(1.0).snr == 0.0);  // pure noise
  CHECK(flow_match_coefficients(0.125, 2000).model_timestep == 250.0);
  CHECK(flow_match_snr(0.5) == 1.0);
  CHECK_THROWS_WITH(flow_match_coefficients(0.0), Catch::Contains("sigma is 0"));
  CHECK_THROWS_WITH(flow_match_coefficients(1.5), Catch::Contains("sigma is 1.5"));

  // compute_loss_weighting_for_sd3: sigma_sqrt σ^-2, cosmap 2/(π(1 − 2σ + 2σ²)), otherwise 1.
  using S = FlowWeightingScheme;
  CHECK(compute_loss_weighting_for_sd3(S::sigma_sqrt, 0.5) == 4.0);
  CHECK(compute_loss_weighting_for_sd3(S::sigma_sqrt, 0.1) == Approx(100.0).epsilon(1e-14));
  CHECK(compute_loss_weighting_for_sd3(S::cosmap, 0.5) == Approx(4.0 / kPi).epsilon(1e-15));
  CHECK(compute_loss_weighting_for_sd3(S::cosmap, 1.0) == Approx(2.0 / kPi).epsilon(1e-15));
  CHECK(compute_loss_weighting_for_sd3(S::cosmap, 0.25) ==
        Approx(2.0 / (kPi * 0.625)).epsilon(1e-15));  // 1 − 0.5 + 0.125
  CHECK(compute_loss_weighting_for_sd3(S::none, 0.3) == 1.0);
  CHECK(compute_loss_weighting_for_sd3(S::logit_normal, 0.3) == 1.0);
  CHECK(compute_loss_weighting_for_sd3(S::mode, 0.3) == 1.0);
  // Through the SNR: SNR 9 is σ = 1/4.
  const FlowMatchLossWeighting sigma_sqrt{S::sigma_sqrt};
  CHECK(sigma_sqrt.weight(9.0, PredictionType::epsilon) == Approx(16.0).epsilon(1e-14));
  CHECK(sigma_sqrt.weight(0.0, PredictionType::epsilon) == 1.0);  // σ = 1
  CHECK(sigma_sqrt.weight_for_sigma(0.5) == 4.0);

  CHECK(parse_flow_weighting_scheme("cosmap") == S::cosmap);
  CHECK(to_string(S::logit_normal) == "logit_normal");
  CHECK_THROWS_WITH(parse_flow_weighting_scheme("lognorm"),
                    Catch::Contains("weighting_scheme") && Catch::Contains("'lognorm'"));
}

TEST_CASE("flow matching: shift, time_shift and calculate_shift", "[flow_match]") {
  // shift·σ/(1 + (shift − 1)·σ)
  CHECK(flow_shift(3.0, 0.5) == 0.75);
  CHECK(flow_shift(3.0, 0.25) == 0.5);
  CHECK(flow_shift(1.0, 0.3) == 0.3);
  CHECK(flow_shift(3.0, 1.0) == 1.0);
  // Shifts compose multiplicatively: shift 3 twice is shift 9.
  CHECK(flow_shift(3.0, flow_shift(3.0, 0.2)) == Approx(flow_shift(9.0, 0.2)).epsilon(1e-15));

  // time_shift exponential e^mu/(e^mu + (1/t − 1)^sigma): mu = ln 3 at t = 1/2 is 3/4, at
  // t = 1/4 is 3/6; exponent 2 at t = 1/4 is 3/12.
  const double ln3 = std::log(3.0);
  CHECK(time_shift(TimeShiftType::exponential, ln3, 1.0, 0.5) == Approx(0.75).epsilon(1e-15));
  CHECK(time_shift(TimeShiftType::exponential, ln3, 1.0, 0.25) == Approx(0.5).epsilon(1e-15));
  CHECK(time_shift(TimeShiftType::exponential, ln3, 2.0, 0.25) == Approx(0.25).epsilon(1e-15));
  CHECK(time_shift(TimeShiftType::exponential, 0.0, 1.0, 0.3) == Approx(0.3).epsilon(1e-15));
  CHECK(time_shift(TimeShiftType::exponential, 1.15, 1.0, 1.0) == 1.0);
  CHECK(time_shift(TimeShiftType::exponential, 1.15, 1.0, 0.0) == 0.0);
  // ... and with mu = ln(shift) it is the static shift.
  CHECK(time_shift(TimeShiftType::exponential, ln3, 1.0, 0.37) ==
        Approx(3 * 0.37 / (1 + 2 * 0.37)).epsilon(1e-14));
  // linear mu/(mu + (1/t − 1)^sigma)
  CHECK(time_shift(TimeShiftType::linear, 3.0, 1.0, 0.5) == 0.75);
  CHECK(time_shift(TimeShiftType::linear, 1.15, 1.0, 0.25) == Approx(1.15 / 4.15).epsilon(1e-15));
  CHECK_THROWS_WITH(time_shift(TimeShiftType::linear, -0.5, 1.0, 0.5),
                    Catch::Contains("mu is -0.5"));
  CHECK_THROWS_WITH(time_shift(TimeShiftType::exponential, 1.0, 1.0, 1.5),
                    Catch::Contains("t is 1.5"));

  // calculate_shift: the line through (256, 0.5) and (4096, 1.15).
  CHECK(calculate_shift(256) == Approx(0.5).epsilon(1e-15));
  CHECK(calculate_shift(4096) == Approx(1.15).epsilon(1e-15));
  CHECK(calculate_shift(1536) == Approx(0.5 + 0.65 / 3).epsilon(1e-15));
  CHECK(calculate_shift(1024, 256, 8192, 0.5, 0.9) ==
        Approx(0.5 + 0.4 * 768 / 7936).epsilon(1e-15));  // Qwen-Image's line
  CHECK_THROWS_AS(calculate_shift(100, 256, 256), Error);
  // kohya's flux_shift: (h//2)·(w//2) tokens of the latent.
  CHECK(FlowMatchTimesteps::flux_shift_mu(128, 128) == Approx(1.15).epsilon(1e-15));
  CHECK(FlowMatchTimesteps::flux_shift_mu(64, 96) == Approx(0.5 + 0.65 / 3).epsilon(1e-15));
  CHECK(FlowMatchTimesteps::flux_shift_mu(65, 97) == FlowMatchTimesteps::flux_shift_mu(64, 96));
  CHECK(FlowMatchTimesteps::flux_shift_mu(32, 32) == Approx(0.5).epsilon(1e-15));

  CHECK(parse_time_shift_type("linear") == TimeShiftType::linear);
  CHECK_THROWS_WITH(parse_time_shift_type("cubic"), Catch::Contains("time_shift_type"));
}

TEST_CASE("FlowMatchEulerDiscreteScheduler: training sigmas and timesteps", "[flow_match]") {
  // __init__: timesteps = linspace(1, T, T)[::-1]; sigmas = timesteps/T shifted; timesteps =
  // sigmas·T.
  SECTION("shift 1") {
    const FlowMatchEulerDiscreteScheduler s;
    REQUIRE(s.train_sigmas().size() == 1000);
    CHECK(s.train_sigmas()[0] == 1.0);
    CHECK(s.train_sigmas()[500] == 0.5);
    CHECK(s.train_sigmas()[999] == 0.001);
    CHECK(s.train_timesteps()[0] == 1000.0);
    CHECK(s.train_timesteps()[999] == Approx(1.0).epsilon(1e-15));
    CHECK(s.sigma_max() == 1.0);
    CHECK(s.sigma_min() == 0.001);
  }
  SECTION("shift 3 (SD3)") {
    const auto s = FlowMatchEulerDiscreteScheduler::sd3();
    CHECK(s.train_sigmas()[0] == 1.0);
    CHECK(s.train_sigmas()[500] == Approx(0.75).epsilon(1e-15));  // 1.5/2
    CHECK(s.train_sigmas()[750] == Approx(0.5).epsilon(1e-15));   // 0.75/1.5
    CHECK(s.train_timesteps()[750] == Approx(500.0).epsilon(1e-15));
    CHECK(s.sigma_min() == Approx(0.003 / 1.002).epsilon(1e-15));
    for (std::size_t i = 1; i < 1000; ++i) REQUIRE(s.train_sigmas()[i] < s.train_sigmas()[i - 1]);
  }
  SECTION("dynamic shifting (Flux): unshifted at training") {
    const auto s = FlowMatchEulerDiscreteScheduler::flux();
    CHECK(s.config().use_dynamic_shifting);
    CHECK(s.train_sigmas()[500] == 0.5);
    CHECK(s.sigma_min() == 0.001);
  }
}

TEST_CASE("FlowMatchEulerDiscreteScheduler::set_timesteps", "[flow_match]") {
  SECTION("shift 1: linspace(1000, 1, n)/1000 and a final 0") {
    FlowMatchEulerDiscreteScheduler s;
    s.set_timesteps(4);
    REQUIRE(s.num_inference_steps() == 4);
    REQUIRE(s.sigmas().size() == 5);
    const double expected[] = {1.0, 0.667, 0.334, 0.001, 0.0};
    for (std::size_t k = 0; k < 5; ++k) CHECK(s.sigmas()[k] == Approx(expected[k]).epsilon(1e-14));
    REQUIRE(s.timesteps().size() == 4);
    CHECK(s.timesteps()[1] == Approx(667.0).epsilon(1e-14));
    CHECK(s.timesteps()[3] == Approx(1.0).epsilon(1e-13));
  }
  SECTION("shift 3: the linspace between the shifted ends is shifted again (as diffusers)") {
    auto s = FlowMatchEulerDiscreteScheduler::sd3();
    s.set_timesteps(3);
    // ends σ_max = 1, σ_min = 0.003/1.002; middle (1 + σ_min)/2 = 0.501497005988..., shift 3:
    // 1.504491017964/2.002994011976 = 0.75112107623...; last shift 3 twice = shift 9 of 0.001.
    CHECK(s.sigmas()[0] == 1.0);
    CHECK(s.sigmas()[1] == Approx(0.7511210762331838).epsilon(1e-13));
    CHECK(s.sigmas()[2] == Approx(0.009 / 1.008).epsilon(1e-13));
    CHECK(s.sigmas()[3] == 0.0);
    CHECK(s.timesteps()[2] == Approx(9.0 / 1.008).epsilon(1e-13));
  }
  SECTION("dynamic shifting, exponential: time_shift(mu, 1, linspace(1, 0.001, n))") {
    auto s = FlowMatchEulerDiscreteScheduler::flux();
    const double mu = s.calculate_shift(4096);  // 1.15
    CHECK(mu == Approx(1.15).epsilon(1e-15));
    s.set_timesteps(3, mu);
    // t = 0.5005: e^1.15/(e^1.15 + 0.4995/0.5005); t = 0.001: e^1.15/(e^1.15 + 999).
    const double e = std::exp(1.15);
    CHECK(s.sigmas()[0] == 1.0);
    CHECK(s.sigmas()[1] == Approx(e / (e + 0.4995 / 0.5005)).epsilon(1e-13));
    CHECK(s.sigmas()[1] == Approx(0.7598760356125212).epsilon(1e-13));
    CHECK(s.sigmas()[2] == Approx(e / (e + 999)).epsilon(1e-12));
    CHECK(s.sigmas()[3] == 0.0);
    CHECK_THROWS_WITH(s.set_timesteps(3), Catch::Contains("mu is required"));
  }
  SECTION("dynamic shifting, linear: mu/(mu + 1/t − 1)") {
    FlowMatchEulerDiscreteSchedulerConfig config;
    config.use_dynamic_shifting = true;
    config.time_shift_type = TimeShiftType::linear;
    FlowMatchEulerDiscreteScheduler s(config);
    s.set_timesteps(3, 1.15);
    CHECK(s.sigmas()[1] == Approx(1.15 / (1.15 + 0.4995 / 0.5005)).epsilon(1e-13));
    CHECK(s.sigmas()[2] == Approx(1.15 / 1000.15).epsilon(1e-12));
    CHECK_THROWS_WITH(s.set_timesteps(3, -1.0), Catch::Contains("mu is -1"));
  }
  SECTION("custom sigmas (the Flux pipeline's linspace(1, 1/n, n)) with mu") {
    auto s = FlowMatchEulerDiscreteScheduler::flux();
    const std::vector<double> sigmas = {1.0, 0.75, 0.5, 0.25};
    s.set_timesteps(sigmas, std::log(3.0));  // mu = ln 3: the shift-3 map
    const double expected[] = {1.0, 0.9, 0.75, 0.5, 0.0};
    for (std::size_t k = 0; k < 5; ++k) CHECK(s.sigmas()[k] == Approx(expected[k]).epsilon(1e-14));
    const std::vector<double> bad = {1.0, 0.0};
    CHECK_THROWS_WITH(s.set_timesteps(bad, 1.0), Catch::Contains("sigmas[1] is 0"));
  }
  SECTION("shift_terminal stretches the last sigma to it (Qwen-Image's config)") {
    FlowMatchEulerDiscreteSchedulerConfig config;
    config.use_dynamic_shifting = true;
    config.max_shift = 0.9;
    config.max_image_seq_len = 8192;
    config.shift_terminal = 0.02;
    FlowMatchEulerDiscreteScheduler s(config);
    const double mu = s.calculate_shift(1024);
    CHECK(mu == Approx(0.5 + 0.4 * 768 / 7936).epsilon(1e-15));
    s.set_timesteps(4, mu);
    // before: time_shift(mu, 1, {1, 0.667, 0.334, 0.001}); after: 1 − (1 − s)·0.98/(1 − s_last).
    const double e = std::exp(mu);
    const double last = e / (e + 999.0);
    const double before_2 = e / (e + 0.666 / 0.334);
    CHECK(s.sigmas()[0] == 1.0);
    CHECK(s.sigmas()[2] == Approx(1 - (1 - before_2) * 0.98 / (1 - last)).epsilon(1e-13));
    CHECK(s.sigmas()[2] == Approx(0.47206406305287874).epsilon(1e-13));
    CHECK(s.sigmas()[3] == Approx(0.02).epsilon(1e-13));
    CHECK(s.sigmas()[4] == 0.0);
  }
  SECTION("errors") {
    FlowMatchEulerDiscreteScheduler s;
    CHECK_THROWS_WITH(s.set_timesteps(0), Catch::Contains("num_inference_steps is 0"));
    Tensor4<float> x(std::array<std::size_t, 4>{1, 1, 2, 2});
    x.fill(0.0f);
    CHECK_THROWS_WITH(s.step(x, 0, x), Catch::Contains("set_timesteps was not called"));
    s.set_timesteps(2);
    CHECK_THROWS_WITH(s.step(x, 2, x), Catch::Contains("step_index is 2"));
    Tensor4<float> other(std::array<std::size_t, 4>{1, 1, 2, 3});
    CHECK_THROWS_AS(s.step(other, 0, x), Error);
  }
}

TEST_CASE("FlowMatchEulerDiscreteScheduler::step is x + (sigma_next - sigma)·v", "[flow_match]") {
  FlowMatchEulerDiscreteScheduler s;
  s.set_timesteps(4);  // 1, 0.667, 0.334, 0.001, 0
  Tensor4<float> x(std::array<std::size_t, 4>{1, 1, 1, 2});
  Tensor4<float> v(x.shape());
  x.data()[0] = 1.0f;
  x.data()[1] = -2.0f;
  v.data()[0] = 3.0f;
  v.data()[1] = 0.5f;
  s.step(v, 0, x);
  CHECK(x.data()[0] == Approx(1.0 - 0.333 * 3.0).epsilon(1e-6));
  CHECK(x.data()[1] == Approx(-2.0 - 0.333 * 0.5).epsilon(1e-6));
  s.step(v, 3, x);  // 0.001 → 0
  CHECK(x.data()[0] == Approx(1.0 - 0.333 * 3.0 - 0.001 * 3.0).epsilon(1e-6));
}

TEST_CASE("flow Euler sampler with the exact velocity of Gaussian data", "[flow_match]") {
  const double mu = 0.8, s = 0.5;
  const auto z = standard_normal(64, 64, RandomStream{11, 3});
  const std::size_t n = z.size();  // 8192

  SECTION("many steps: samples of N(mu, s²), each close to the exact ODE solution mu + s·z") {
    const auto config = GENERATE(as<std::string>{}, "shift3", "flux", "linear");
    INFO(config);
    FlowMatchEulerDiscreteSchedulerConfig c;
    std::optional<double> m;
    if (config == "shift3") c.shift = 3.0;
    if (config != "shift3") {
      c.use_dynamic_shifting = true;
      m = calculate_shift(4096);
    }
    if (config == "linear") c.time_shift_type = TimeShiftType::linear;
    FlowMatchEulerDiscreteScheduler scheduler(c);
    scheduler.set_timesteps(1000, m);
    const auto x = sample_gaussian(scheduler, z, mu, s);
    const Moments got = moments(x.data(), n);
    INFO("mean " << got.mean << ", variance " << got.var);
    // 4 standard errors (s/√n for the mean, s²·√(2/n) for the variance) plus the Euler error.
    CHECK(std::abs(got.mean - mu) < 4 * s / std::sqrt(double(n)) + 0.005);
    CHECK(std::abs(got.var / (s * s) - 1) < 4 * std::sqrt(2.0 / double(n)) + 0.01);
    double max_error = 0;
    for (std::size_t i = 0; i < n; ++i)
      max_error = std::max(max_error, std::abs(x.data()[i] - (mu + s * z.data()[i])));
    INFO("max |x - (mu + s z)| = " << max_error);
    CHECK(max_error < 0.01);
  }

  SECTION("few steps: the Euler recurrence, converging to the exact solution at order 1") {
    double previous_error = 0;
    for (const std::int64_t steps : {4, 8, 16, 32, 64}) {
      auto scheduler = FlowMatchEulerDiscreteScheduler::sd3();
      scheduler.set_timesteps(steps);
      const auto x = sample_gaussian(scheduler, z, mu, s);
      // The recurrence x_{k+1} = x_k + (σ_{k+1} − σ_k)·v*(x_k, σ_k) in double, on the sigmas
      // of set_timesteps (tested above).
      const auto sigmas = scheduler.sigmas();
      double recurrence_error = 0, exact_error = 0;
      for (std::size_t i = 0; i < n; ++i) {
        double xi = z.data()[i];
        for (std::size_t k = 0; k + 1 < sigmas.size(); ++k)
          xi += (sigmas[k + 1] - sigmas[k]) * optimal_velocity(xi, sigmas[k], mu, s);
        recurrence_error = std::max(recurrence_error, std::abs(x.data()[i] - xi));
        exact_error = std::max(exact_error, std::abs(x.data()[i] - (mu + s * z.data()[i])));
      }
      INFO(steps << " steps: max error vs recurrence " << recurrence_error << ", vs exact "
                 << exact_error);
      CHECK(recurrence_error < 1e-5);
      if (steps >= 16) {
        // Halving the step halves the global error of a first-order method.
        CHECK(exact_error / previous_error > 0.35);
        CHECK(exact_error / previous_error < 0.65);
      }
      previous_error = exact_error;
    }
  }
}

TEST_CASE("flow densities: diffusers' compute_density_for_timestep_sampling", "[flow_match]") {
  const std::size_t n = 100000;
  std::vector<double> u(n);

  SECTION("logit_normal: logit(u) ~ N(logit_mean, logit_std²)") {
    compute_density_for_timestep_sampling(FlowWeightingScheme::logit_normal, u, {3, 1}, 0.3, 1.2);
    std::vector<double> logits(n);
    for (std::size_t b = 0; b < n; ++b) {
      REQUIRE((u[b] > 0 && u[b] < 1));
      logits[b] = std::log(u[b] / (1 - u[b]));
    }
    double mean = 0, var = 0;
    for (double l : logits) mean += l;
    mean /= double(n);
    for (double l : logits) var += (l - mean) * (l - mean);
    var /= double(n - 1);
    INFO("mean " << mean << ", sd " << std::sqrt(var));
    CHECK(std::abs(mean - 0.3) < 5 * 1.2 / std::sqrt(double(n)));
    CHECK(std::abs(std::sqrt(var) - 1.2) < 5 * 1.2 / std::sqrt(2.0 * double(n)));
    // and its quantiles: P(u <= sigmoid(mean + std·z_q)) = q.
    for (const auto& [q, z] : kNormalQuantiles)
      check_probability(fraction_at_most(u, logistic(0.3 + 1.2 * z)), q, n);
  }
  SECTION("mode: P(u <= f(u0)) = 1 − u0 (f decreasing)") {
    for (const double scale : {1.29, -0.5, kMaxModeScale}) {
      compute_density_for_timestep_sampling(FlowWeightingScheme::mode, u, {3, 2}, 0, 1, scale);
      for (double v : u) REQUIRE((v > 0 && v < 1));
      for (const double u0 : {0.05, 0.2, 0.4, 0.5, 0.7, 0.9})
        check_probability(fraction_at_most(u, mode_f(u0, scale)), 1 - u0, n);
    }
    // mode 1.29 puts less mass at the ends than uniform: P(u <= 0.1) = 1 − f⁻¹(0.1).
    CHECK(1 - mode_f_inverse(0.1, 1.29) < 0.1);
  }
  SECTION("uniform for none, sigma_sqrt and cosmap") {
    for (const auto scheme : {FlowWeightingScheme::none, FlowWeightingScheme::sigma_sqrt,
                              FlowWeightingScheme::cosmap}) {
      compute_density_for_timestep_sampling(scheme, u, {3, 4});
      for (double v : u) REQUIRE((v > 0 && v < 1));
      for (const double q : {0.01, 0.25, 0.5, 0.8, 0.99})
        check_probability(fraction_at_most(u, q), q, n);
    }
  }
  SECTION("errors name the flag") {
    CHECK_THROWS_WITH(
        compute_density_for_timestep_sampling(FlowWeightingScheme::logit_normal, u, {1, 1}, 0, -1),
        Catch::Contains("--logit_std is -1"));
    CHECK_THROWS_WITH(
        compute_density_for_timestep_sampling(FlowWeightingScheme::mode, u, {1, 1}, 0, 1, 2.0),
        Catch::Contains("--mode_scale is 2"));
  }
}

TEST_CASE("flow densities: kohya's --timestep_sampling sigma maps u to the scheduler's sigmas",
          "[flow_match]") {
  const std::size_t n = 100000;
  const auto scheme = GENERATE(FlowWeightingScheme::none, FlowWeightingScheme::logit_normal,
                               FlowWeightingScheme::mode, FlowWeightingScheme::cosmap);
  const double shift = GENERATE(1.0, 3.0);
  INFO(to_string(scheme) << ", shift " << shift);
  const auto scheduler = scheduler_with_shift(shift);
  FlowMatchTimestepOptions options;
  options.weighting_scheme = scheme;
  options.logit_mean = -0.2;
  const FlowMatchTimesteps sampler(scheduler, options);
  const RandomStream rs{5, 6};
  const auto sigmas = draw(sampler, n, rs);
  std::vector<double> u(n);
  compute_density_for_timestep_sampling(scheme, u, rs, -0.2, 1.0, 1.29);
  for (std::size_t b = 0; b < n; ++b) {
    // indices = (u·T).long(); sigma = sigmas[indices]: sigmas[i] = shift((1000 − i)/1000).
    const double i = std::floor(u[b] * 1000);
    const double expected = shift * (1000 - i) / 1000 / (1 + (shift - 1) * (1000 - i) / 1000);
    REQUIRE(sigmas[b] == Approx(expected).epsilon(1e-14));
    REQUIRE((sigmas[b] > 0 && sigmas[b] <= 1));
  }
  if (scheme == FlowWeightingScheme::none && shift == 1.0) {
    // σ uniform on {1/1000, ..., 1}: P(σ <= 0.3) = 0.3.
    check_probability(fraction_at_most(sigmas, 0.3), 0.3, n);
  }
}

TEST_CASE("flow densities: kohya's uniform, sigmoid, shift and flux_shift", "[flow_match]") {
  const std::size_t n = 100000;
  const FlowMatchEulerDiscreteScheduler scheduler;
  FlowMatchTimestepOptions options;

  SECTION("uniform") {
    options.timestep_sampling = FlowTimestepSampling::uniform;
    const auto sigmas = draw(FlowMatchTimesteps(scheduler, options), n, {8, 1});
    for (double v : sigmas) REQUIRE((v > 0 && v < 1));
    for (const double q : {0.001, 0.1, 0.5, 0.9})
      check_probability(fraction_at_most(sigmas, q), q, n);
  }
  SECTION("sigmoid: P(σ <= sigmoid(scale·z_q)) = q") {
    options.timestep_sampling = FlowTimestepSampling::sigmoid;
    options.sigmoid_scale = 1.7;
    const auto sigmas = draw(FlowMatchTimesteps(scheduler, options), n, {8, 2});
    for (double v : sigmas) REQUIRE((v > 0 && v < 1));
    for (const auto& [q, z] : kNormalQuantiles)
      check_probability(fraction_at_most(sigmas, logistic(1.7 * z)), q, n);
  }
  SECTION("shift: P(σ <= shift(sigmoid(scale·z_q))) = q") {
    options.timestep_sampling = FlowTimestepSampling::shift;
    options.discrete_flow_shift = 3.1582;
    options.sigmoid_scale = 1.0;
    const auto sigmas = draw(FlowMatchTimesteps(scheduler, options), n, {8, 3});
    for (double v : sigmas) REQUIRE((v > 0 && v < 1));
    for (const auto& [q, z] : kNormalQuantiles) {
      const double x = logistic(z);
      check_probability(fraction_at_most(sigmas, 3.1582 * x / (1 + 2.1582 * x)), q, n);
    }
  }
  SECTION("flux_shift: P(σ <= time_shift(mu, sigmoid(scale·z_q))) = q, mu from (h/2)·(w/2)") {
    options.timestep_sampling = FlowTimestepSampling::flux_shift;
    const FlowMatchTimesteps sampler(scheduler, options);
    for (const auto& [h, w, m] : {std::tuple{128, 128, 1.15}, std::tuple{64, 96, 0.5 + 0.65 / 3}}) {
      const auto sigmas = draw(sampler, n, {8, 4}, h, w);
      for (double v : sigmas) REQUIRE((v > 0 && v < 1));
      for (const auto& [q, z] : kNormalQuantiles) {
        const double t = logistic(z);
        check_probability(fraction_at_most(sigmas, std::exp(m) / (std::exp(m) + 1 / t - 1)), q, n);
      }
    }
    std::vector<double> one(1);
    CHECK_THROWS_WITH(sampler.sample(one, {1, 1}), Catch::Contains("flux_shift needs"));
  }
  SECTION("errors name the flag") {
    options.timestep_sampling = FlowTimestepSampling::shift;
    options.discrete_flow_shift = -3;
    CHECK_THROWS_WITH(FlowMatchTimesteps(scheduler, options),
                      Catch::Contains("--discrete_flow_shift is -3"));
    options.discrete_flow_shift = 3;
    options.sigmoid_scale = 0;
    CHECK_THROWS_WITH(FlowMatchTimesteps(scheduler, options),
                      Catch::Contains("--sigmoid_scale is 0"));
    options.timestep_sampling = FlowTimestepSampling::sigma;
    options.weighting_scheme = FlowWeightingScheme::mode;
    options.mode_scale = -1.5;
    CHECK_THROWS_WITH(FlowMatchTimesteps(scheduler, options),
                      Catch::Contains("--mode_scale is -1.5"));
    options.weighting_scheme = FlowWeightingScheme::logit_normal;
    options.logit_std = std::numeric_limits<double>::infinity();
    CHECK_THROWS_WITH(FlowMatchTimesteps(scheduler, options), Catch::Contains("--logit_std"));
  }
  CHECK(parse_flow_timestep_sampling("flux_shift") == FlowTimestepSampling::flux_shift);
  CHECK(to_string(FlowTimestepSampling::inverted_parabola) == "inverted_parabola");
  CHECK_THROWS_WITH(parse_flow_timestep_sampling("logit"),
                    Catch::Contains("timestep_sampling") && Catch::Contains("heavy_tail"));
}

TEST_CASE("flow densities: OneTrainer's heavy_tail and inverted_parabola", "[flow_match]") {
  const std::size_t n = 100000;
  const FlowMatchEulerDiscreteScheduler scheduler;
  FlowMatchTimestepOptions options;

  SECTION("heavy_tail: t = int(shift(f(u)·T)), σ = (t + 1)/T") {
    options.timestep_sampling = FlowTimestepSampling::heavy_tail;
    options.noising_weight = 0.5;
    for (const double shift : {1.0, 3.0}) {
      options.timestep_shift = shift;
      const auto sigmas = draw(FlowMatchTimesteps(scheduler, options), n, {9, 1});
      for (double v : sigmas) {
        REQUIRE((v > 0 && v <= 1));
        REQUIRE(v * 1000 == Approx(std::round(v * 1000)).margin(1e-9));  // (t + 1)/T
      }
      // σ <= (k + 1)/T ⟺ t <= k ⟺ shift(f(u)) < (k + 1)/T ⟺ f(u) < y = x/(shift − (shift − 1)x)
      // for x = (k + 1)/T ⟺ u > f⁻¹(y): probability 1 − f⁻¹(y).
      for (const int k : {49, 199, 499, 799, 949}) {
        const double x = (k + 1) / 1000.0;
        const double y = x / (shift - (shift - 1) * x);
        INFO("shift " << shift << ", k " << k);
        check_probability(fraction_at_most(sigmas, x + 1e-12), 1 - mode_f_inverse(y, 0.5), n);
      }
    }
    options.noising_weight = 3.0;
    CHECK_THROWS_WITH(FlowMatchTimesteps(scheduler, options),
                      Catch::Contains("noising_weight is 3"));
  }

  SECTION("inverted_parabola: P(t = k) ∝ max(0, 2 − w·(x_k − b − ½)²), σ = (t + 1)/T") {
    options.timestep_sampling = FlowTimestepSampling::inverted_parabola;
    options.noising_weight = 7.0;
    options.noising_bias = 0.1;
    const FlowMatchTimesteps sampler(scheduler, options);
    REQUIRE(sampler.probabilities().size() == 1000);
    // x_k = k/999; the weights vanish where (x − 0.6)² > 2/7, i.e. x < 0.6 − 0.5345 = 0.0655.
    double total = 0;
    std::vector<double> w(1000);
    for (int k = 0; k < 1000; ++k) {
      const double d = k / 999.0 - 0.6;
      w[std::size_t(k)] = std::max(0.0, 2 - 7 * d * d);
      total += w[std::size_t(k)];
    }
    for (const int k : {0, 60, 70, 599, 999}) {
      INFO("k " << k);
      CHECK(sampler.probabilities()[std::size_t(k)] ==
            Approx(w[std::size_t(k)] / total).epsilon(1e-12).margin(1e-300));
    }
    CHECK(sampler.probabilities()[0] == 0.0);
    const auto sigmas = draw(sampler, n, {9, 2});
    std::vector<double> bins(10, 0.0);
    for (double v : sigmas) {
      const double t = v * 1000 - 1;
      REQUIRE(t == Approx(std::round(t)).margin(1e-9));
      REQUIRE((t >= 0 && t < 1000));
    }
    for (int edge = 100; edge <= 900; edge += 200) {
      double p = 0;
      for (int k = 0; k < edge; ++k) p += w[std::size_t(k)] / total;
      INFO("P(t < " << edge << ")");
      check_probability(fraction_at_most(sigmas, edge / 1000.0 + 1e-12), p, n);
    }
  }

  SECTION("inverted_parabola with a shift and a strength range") {
    options.timestep_sampling = FlowTimestepSampling::inverted_parabola;
    options.noising_weight = 2.0;
    options.timestep_shift = 3.0;
    options.min_noising_strength = 0.1;
    options.max_noising_strength = 0.9;
    const FlowMatchTimesteps sampler(scheduler, options);
    CHECK(sampler.min_timestep() == 100);
    CHECK(sampler.max_timestep() == 900);
    REQUIRE(sampler.probabilities().size() == 800);
    // x = k/799, x' = x/(3 − 2x), bucket size 3/(3 − 2x)², weight max(0, 2 − 2(x' − ½)²).
    double total = 0;
    std::vector<double> w(800);
    for (int k = 0; k < 800; ++k) {
      const double x = k / 799.0, xs = x / (3 - 2 * x);
      w[std::size_t(k)] = (2 - 2 * (xs - 0.5) * (xs - 0.5)) * 3 / ((3 - 2 * x) * (3 - 2 * x));
      total += w[std::size_t(k)];
    }
    for (const int k : {0, 400, 799})
      CHECK(sampler.probabilities()[std::size_t(k)] ==
            Approx(w[std::size_t(k)] / total).epsilon(1e-12));
    for (double v : draw(sampler, 10000, {9, 3})) REQUIRE((v >= 0.101 - 1e-12 && v <= 0.9 + 1e-12));
    // A parabola that is negative everywhere on [0, 1] leaves nothing to draw.
    options.noising_weight = 100;
    options.noising_bias = 10;
    CHECK_THROWS_WITH(FlowMatchTimesteps(scheduler, options),
                      Catch::Contains("every timestep weight 0"));
    options.noising_bias = 0;
    options.min_noising_strength = 0.9;
    CHECK_THROWS_WITH(FlowMatchTimesteps(scheduler, options),
                      Catch::Contains("min_noising_strength is 0.9"));
  }
}

TEST_CASE("flow densities: deterministic in the stream, per sample, for every method",
          "[flow_match]") {
  const auto method = GENERATE(
      FlowTimestepSampling::sigma, FlowTimestepSampling::uniform, FlowTimestepSampling::sigmoid,
      FlowTimestepSampling::shift, FlowTimestepSampling::flux_shift,
      FlowTimestepSampling::inverted_parabola, FlowTimestepSampling::heavy_tail);
  const auto scheme = GENERATE(FlowWeightingScheme::none, FlowWeightingScheme::logit_normal,
                               FlowWeightingScheme::mode);
  INFO(to_string(method) << " " << to_string(scheme));
  FlowMatchTimestepOptions options;
  options.timestep_sampling = method;
  options.weighting_scheme = scheme;
  options.noising_weight = 1.0;
  const FlowMatchTimesteps sampler(FlowMatchEulerDiscreteScheduler::sd3(), options);
  const auto a = draw(sampler, 100, {4, 4}, 64, 64);
  CHECK(a == draw(sampler, 100, {4, 4}, 64, 64));
  CHECK(a != draw(sampler, 100, {4, 5}, 64, 64));
  CHECK(a != draw(sampler, 100, {5, 4}, 64, 64));
  // Sample b depends on element b only: a smaller batch is a prefix.
  const auto head = draw(sampler, 7, {4, 4}, 64, 64);
  CHECK(std::vector<double>(a.begin(), a.begin() + 7) == head);
  for (double v : a) CHECK((v > 0 && v <= 1));
}

TEST_CASE("FlowMatchEulerDiscreteSchedulerConfig::from_json / from_file", "[flow_match]") {
  using nlohmann::json;
  using Config = FlowMatchEulerDiscreteSchedulerConfig;

  SECTION("SD3, Flux and Qwen-Image configs") {
    const json sd3 = json::parse(R"({"_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": "0.29.0.dev0", "num_train_timesteps": 1000, "shift": 3.0})");
    CHECK(is_flow_match_scheduler_config(sd3));
    const Config a = Config::from_json(sd3);
    CHECK(a.shift == 3.0);
    CHECK_FALSE(a.use_dynamic_shifting);
    CHECK(FlowMatchEulerDiscreteScheduler(a).train_sigmas()[500] == Approx(0.75).epsilon(1e-15));

    const json flux = json::parse(R"({"_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": "0.30.0.dev0", "base_image_seq_len": 256, "base_shift": 0.5,
        "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": true})");
    const Config b = Config::from_json(flux);
    CHECK(b.use_dynamic_shifting);
    CHECK(b.max_shift == 1.15);
    CHECK(b.time_shift_type == TimeShiftType::exponential);

    const json qwen = json::parse(R"({"_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": "0.34.0.dev0", "base_image_seq_len": 256, "base_shift": 0.5,
        "invert_sigmas": false, "max_image_seq_len": 8192, "max_shift": 0.9,
        "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
        "stochastic_sampling": false, "time_shift_type": "exponential", "use_beta_sigmas": false,
        "use_dynamic_shifting": true, "use_exponential_sigmas": false,
        "use_karras_sigmas": false})");
    const Config c = Config::from_json(qwen);
    CHECK(c.max_image_seq_len == 8192);
    REQUIRE(c.shift_terminal);
    CHECK(*c.shift_terminal == 0.02);
    CHECK_FALSE(Config::from_json(json::parse(R"({"shift_terminal": null})")).shift_terminal);
    CHECK(Config::from_json(json::parse(R"({"time_shift_type": "linear"})")).time_shift_type ==
          TimeShiftType::linear);
    CHECK_FALSE(is_flow_match_scheduler_config(json::parse(R"({"_class_name": "DDPMScheduler"})")));
  }

  SECTION("bad values name the key") {
    const auto error = [](const char* text) {
      return test::error_of([&] { Config::from_json(json::parse(text)); });
    };
    CHECK_THAT(error(R"({"shift": -1})"),
               Catch::Contains("key 'shift' has value -1, expected a positive number"));
    CHECK_THAT(error(R"({"shift": "3"})"), Catch::Contains("key 'shift'"));
    CHECK_THAT(error(R"({"num_train_timesteps": 1000.0})"),
               Catch::Contains("key 'num_train_timesteps'"));
    CHECK_THAT(error(R"({"num_train_timesteps": 1})"),
               Catch::Contains("key 'num_train_timesteps'"));
    CHECK_THAT(error(R"({"use_dynamic_shifting": 1})"),
               Catch::Contains("key 'use_dynamic_shifting'"));
    CHECK_THAT(error(R"({"time_shift_type": "cubic"})"),
               Catch::Contains("time_shift_type") && Catch::Contains("'cubic'"));
    CHECK_THAT(error(R"({"base_image_seq_len": 5000})"),
               Catch::Contains("base_image_seq_len is 5000"));
    CHECK_THAT(error(R"({"max_image_seq_len": -2})"), Catch::Contains("key 'max_image_seq_len'"));
    CHECK_THAT(error(R"({"base_shift": null})"), Catch::Contains("key 'base_shift'"));
    CHECK_THAT(error(R"({"shift_terminal": 1.0})"), Catch::Contains("key 'shift_terminal'"));
    CHECK_THAT(error(R"({"use_karras_sigmas": true})"),
               Catch::Contains("use_karras_sigmas") && Catch::Contains("does not implement"));
    CHECK_THAT(error(R"({"stochastic_sampling": true})"), Catch::Contains("stochastic_sampling"));
    CHECK_THAT(error(R"({"beta_start": 0.00085})"), Catch::Contains("unknown key 'beta_start'"));
    CHECK_THAT(error("[1, 2]"), Catch::Contains("expected a JSON object"));
    // Unknown keys with null or false change nothing.
    CHECK_NOTHROW(Config::from_json(json::parse(R"({"some_future_flag": false, "x": null})")));
  }

  SECTION("the constructor validates too") {
    Config config;
    config.shift = -1;
    CHECK_THROWS_WITH(FlowMatchEulerDiscreteScheduler(config), Catch::Contains("shift is -1"));
    config.shift = 1;
    config.num_train_timesteps = 1;
    CHECK_THROWS_WITH(FlowMatchEulerDiscreteScheduler(config),
                      Catch::Contains("num_train_timesteps is 1"));
    config.num_train_timesteps = 1000;
    config.shift_terminal = -0.1;
    CHECK_THROWS_WITH(FlowMatchEulerDiscreteScheduler(config),
                      Catch::Contains("shift_terminal is -0.1"));
  }

  SECTION("from_file") {
    const test::TempDir dir("flow_match");
    dir.write("scheduler_config.json", R"({"_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": true})");
    const Config c = Config::from_file(dir / "scheduler_config.json");
    CHECK(c.shift == 3.0);
    CHECK(c.use_dynamic_shifting);
    dir.write("bad.json", R"({"shift": 0})");
    CHECK_THAT(test::error_of([&] { Config::from_file(dir / "bad.json"); }),
               Catch::Contains("from_file") && Catch::Contains("bad.json") &&
                   Catch::Contains("key 'shift'"));
    CHECK_THAT(test::error_of([&] { Config::from_file(dir / "missing.json"); }),
               Catch::Contains("missing.json"));
  }
}
