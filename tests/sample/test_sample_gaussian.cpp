// sample_latents on data whose optimal denoiser is known in closed form: x0 ~ N(μ, σ0²)
// elementwise. With x_t = a·x0 + s·ε (a = √ᾱ_t, s = √(1 − ᾱ_t)) and V = a²σ0² + s²:
//   ε̂ = E[ε | x_t] = s·(x_t − a·μ)/V,   x̂0 = μ + a·σ0²·(x_t − a·μ)/V,   v̂ = a·ε̂ − s·x̂0.
// DDIM and Euler driven by this exact denoiser must produce samples with mean μ and variance σ0².
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>
#include <xtensor/xview.hpp>

#include "difftrain/schedule/ddpm_scheduler.hpp"
#include "difftrain/schedule/sample.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;

namespace {

/// The exact denoiser of N(μ_b, σ0²) data; μ_b is context[b, 0, 0] (so that conditioning
/// matters), ᾱ_t from the training schedule of the sampler's config.
struct GaussianDenoiser {
  DdpmScheduler schedule;
  double sigma0 = 0.5;
  std::int64_t calls = 0;

  Tensor4<float> forward(const Tensor4<float>& x_t, std::span<const std::int64_t> t,
                         const Tensor3<float>& context) {
    ++calls;
    REQUIRE(t.size() == x_t.shape()[0]);
    REQUIRE(context.shape()[0] == x_t.shape()[0]);
    Tensor4<float> out(x_t.shape());
    const std::size_t per = x_t.size() / x_t.shape()[0];
    for (std::size_t b = 0; b < x_t.shape()[0]; ++b) {
      const double abar = schedule.alphas_cumprod()[static_cast<std::size_t>(t[b])];
      const double a = std::sqrt(abar), s = std::sqrt(1.0 - abar), mu = context(b, 0, 0);
      const double var = a * a * sigma0 * sigma0 + s * s;
      for (std::size_t i = b * per; i < (b + 1) * per; ++i) {
        const double r = (x_t.data()[i] - a * mu) / var;
        const double eps = s * r, x0 = mu + a * sigma0 * sigma0 * r;
        double pred = eps;
        if (schedule.prediction_type() == PredictionType::v_prediction) pred = a * eps - s * x0;
        if (schedule.prediction_type() == PredictionType::sample) pred = x0;
        out.data()[i] = static_cast<float>(pred);
      }
    }
    return out;
  }
  void backward(const Tensor4<float>&) {}
};
static_assert(Denoiser<GaussianDenoiser>);
static_assert(SamplingScheduler<DdimScheduler> && SamplingScheduler<EulerDiscreteScheduler>);

Tensor3<float> contexts(std::vector<float> mus) {
  Tensor3<float> c(std::array<std::size_t, 3>{mus.size(), 2, 3});
  c.fill(0.0f);
  for (std::size_t b = 0; b < mus.size(); ++b) c(b, 0, 0) = mus[b];
  return c;
}

struct Moments {
  double mean = 0, var = 0;
};
Moments moments_of_image(const Tensor4<float>& x, std::size_t b) {
  const std::size_t per = x.size() / x.shape()[0];
  Moments m;
  for (std::size_t i = b * per; i < (b + 1) * per; ++i) m.mean += x.data()[i];
  m.mean /= double(per);
  for (std::size_t i = b * per; i < (b + 1) * per; ++i)
    m.var += (x.data()[i] - m.mean) * (x.data()[i] - m.mean);
  m.var /= double(per - 1);
  return m;
}

template <class S>
Tensor4<float> run(S scheduler, const SamplingConfig& config, const Tensor3<float>& cond,
                   const Tensor3<float>& uncond, double guidance, std::int64_t steps, double sigma0,
                   std::int64_t* calls = nullptr, std::int64_t size = 48) {
  GaussianDenoiser denoiser{DdpmScheduler(config.train), sigma0};
  SampleOptions o;
  o.num_inference_steps = steps;
  o.guidance_scale = guidance;
  o.seed = 7;
  o.channels = 2;
  o.height = size;
  o.width = size;
  auto x = sample_latents(denoiser, scheduler, cond, uncond, o);
  if (calls) *calls = denoiser.calls;
  return x;
}

}  // namespace

TEST_CASE("DDIM and Euler with the exact Gaussian denoiser reproduce mean and variance",
          "[sample]") {
  const auto sampler = GENERATE(as<std::string>{}, "ddim", "euler");
  const auto type =
      GENERATE(PredictionType::epsilon, PredictionType::v_prediction, PredictionType::sample);
  INFO(sampler << " " << to_string(type));
  SamplingConfig config;
  config.train.prediction_type = type;
  config.timestep_spacing = TimestepSpacing::trailing;
  if (type == PredictionType::epsilon) {
    // DDPM's linear betas: ᾱ_{T−1} = 4e-5, so starting from N(0, I) instead of the true
    // N(√ᾱ·μ, ·) biases the mean by about σ0·√ᾱ·μ < 0.003.
  } else {
    // SD's betas with zero terminal SNR: x_T is pure noise, exactly the distribution at T − 1.
    config.train.beta_schedule = BetaSchedule::scaled_linear;
    config.train.beta_start = 0.00085;
    config.train.beta_end = 0.012;
    config.train.rescale_betas_zero_snr = true;
  }
  // "Enough steps": every training timestep. The samplers' discretisation shrinks the variance
  // (each DDIM step maps x_t affinely with a factor below the exact one, by Cauchy–Schwarz):
  // with SD's betas it is 12% low after 50 steps, 3.4% after 200 and 0.5% after 1000.
  const std::int64_t steps = 1000;
  const double sigma0 = 0.5;
  const std::vector<float> mus = {0.8f, -0.4f};
  const auto cond = contexts(mus);
  const Tensor4<float> x = sampler == "ddim" ? run(DdimScheduler(config), config, cond, cond, 1.0,
                                                   steps, sigma0, nullptr, 64)
                                             : run(EulerDiscreteScheduler(config), config, cond,
                                                   cond, 1.0, steps, sigma0, nullptr, 64);
  const double n = double(x.size() / x.shape()[0]);  // 2·64·64 = 8192 values per image
  for (std::size_t b = 0; b < mus.size(); ++b) {
    const Moments m = moments_of_image(x, b);
    INFO("image " << b << ": mean " << m.mean << " (mu " << mus[b] << "), variance " << m.var
                  << " (sigma0^2 " << sigma0 * sigma0 << ")");
    // 4 standard errors (σ0/√n for the mean, σ0²·√(2/n) for the variance) plus the
    // discretisation and start bias above.
    CHECK(std::abs(m.mean - mus[b]) < 4 * sigma0 / std::sqrt(n) + 0.005);
    CHECK(std::abs(m.var / (sigma0 * sigma0) - 1) < 4 * std::sqrt(2 / n) + 0.01);
  }
}

TEST_CASE("classifier-free guidance", "[sample]") {
  SamplingConfig config;
  config.timestep_spacing = TimestepSpacing::trailing;
  const auto cond = contexts({0.8f, -0.4f});
  std::int64_t calls_unguided = 0, calls_guided = 0;
  const auto plain = run(DdimScheduler(config), config, cond, cond, 1.0, 20, 0.5, &calls_unguided);

  SECTION("identical cond and uncond equal no guidance") {
    const auto guided = run(DdimScheduler(config), config, cond, cond, 7.5, 20, 0.5, &calls_guided);
    CHECK(calls_unguided == 20);
    CHECK(calls_guided == 20);  // one forward per step on the doubled batch
    REQUIRE_CLOSE(guided, plain, 0, 0);
  }
  SECTION("u + g(c - u) of the exact denoiser is the denoiser of mu_u + g(mu_c - mu_u)") {
    // ε̂ is affine in μ, so guidance with μ_c, μ_u samples as μ_g = μ_u + g·(μ_c − μ_u).
    const double g = 3.0;
    const auto uncond = contexts({0.1f});  // one row, broadcast to both images
    const auto guided = run(DdimScheduler(config), config, cond, uncond, g, 20, 0.5);
    const auto target = contexts({float(0.1 + g * (0.8 - 0.1)), float(0.1 + g * (-0.4 - 0.1))});
    const auto expected = run(DdimScheduler(config), config, target, target, 1.0, 20, 0.5);
    REQUIRE_CLOSE(guided, expected, 1e-4, 1e-4);
    // and the guided mean moved to μ_g (the conditional samples differ from the unguided ones)
    CHECK(moments_of_image(guided, 0).mean == Approx(0.1 + g * 0.7).margin(0.05));
  }
  SECTION("uncond rows must be 1 or B") {
    const auto bad = contexts({0.1f, 0.2f, 0.3f});
    CHECK_THROWS_WITH(run(DdimScheduler(config), config, cond, bad, 2.0, 5, 0.5),
                      Catch::Contains("uncond_context has 3 rows"));
  }
}

TEST_CASE("sample_latents is deterministic in the seed", "[sample]") {
  SamplingConfig config;
  const auto cond = contexts({0.3f});
  const auto a = run(EulerDiscreteScheduler(config), config, cond, cond, 1.0, 5, 0.5);
  const auto b = run(EulerDiscreteScheduler(config), config, cond, cond, 1.0, 5, 0.5);
  REQUIRE_CLOSE(a, b, 0, 0);
  // image 0 of a larger batch is the same image
  const auto two = contexts({0.3f, 0.9f});
  const auto c = run(EulerDiscreteScheduler(config), config, two, two, 1.0, 5, 0.5);
  REQUIRE_CLOSE(xt::view(c, 0), xt::view(a, 0), 0, 0);
  // the noise is standard normal × init_noise_sigma
  SampleOptions o;
  o.seed = 3;
  const auto noise = initial_latents(2, o, 2.0);
  Moments m;
  for (float v : noise) m.mean += v;
  m.mean /= double(noise.size());
  for (float v : noise) m.var += (v - m.mean) * (v - m.mean);
  m.var /= double(noise.size() - 1);
  CHECK(std::abs(m.mean) < 0.05);
  CHECK(m.var == Approx(4.0).epsilon(0.05));
}

namespace {
/// The exact velocity E[eps − x0 | x_σ] of N(μ_b, σ0²) data, x_σ = (1 − σ)·x0 + σ·ε:
/// −μ + (σ − (1 − σ)σ0²)/V·(x_σ − (1 − σ)μ), V = (1 − σ)²σ0² + σ² (σ = t/1000, float timesteps).
struct GaussianVelocity {
  double sigma0 = 0.5;
  Tensor4<float> forward(const Tensor4<float>& x, std::span<const float> t,
                         const Tensor3<float>& context) {
    Tensor4<float> out(x.shape());
    const std::size_t per = x.size() / x.shape()[0];
    for (std::size_t b = 0; b < x.shape()[0]; ++b) {
      const double sigma = double(t[b]) / 1000.0, mu = context(b, 0, 0);
      const double var = (1 - sigma) * (1 - sigma) * sigma0 * sigma0 + sigma * sigma;
      const double k = (sigma - (1 - sigma) * sigma0 * sigma0) / var;
      for (std::size_t i = b * per; i < (b + 1) * per; ++i)
        out.data()[i] = float(-mu + k * (x.data()[i] - (1 - sigma) * mu));
    }
    return out;
  }
  void backward(const Tensor4<float>&) {}
};
static_assert(FloatTimestepDenoiser<GaussianVelocity> &&
              !IntegerTimestepDenoiser<GaussianVelocity>);
}  // namespace

TEST_CASE("sample_latents with flow Euler and the exact velocity reproduces N(μ, σ0²)",
          "[sample]") {
  // From σ = 1 (pure noise, exactly the data's distribution there) the exact ODE ends at N(μ, σ0²);
  // Euler's error shrinks with the step (shift 3 and dynamic shifting place the steps differently).
  const bool dynamic = GENERATE(false, true);
  FlowMatchEulerDiscreteSchedulerConfig config;
  config.shift = 3.0;
  config.use_dynamic_shifting = dynamic;
  const std::vector<float> mus = {0.8f, -0.4f};
  const auto cond = contexts(mus);
  const double sigma0 = 0.5;
  GaussianVelocity velocity{sigma0};
  SampleOptions o;
  o.num_inference_steps = 500;
  o.guidance_scale = 1.0;
  o.seed = 7;
  o.channels = 2;
  o.height = o.width = 64;
  FlowMatchEulerDiscreteScheduler scheduler(config);
  const Tensor4<float> x = sample_latents(velocity, scheduler, cond, cond, o);
  if (dynamic)  // mu = calculate_shift((64/2)·(64/2) = 1024 tokens)
    CHECK(scheduler.sigmas()[1] ==
          Approx(time_shift(TimeShiftType::exponential, calculate_shift(1024.0), 1.0,
                            1.0 - 1.0 / 1000.0 * (1000.0 - 1.0) / 499.0))
              .epsilon(1e-9));
  const double n = double(x.size() / x.shape()[0]);
  for (std::size_t b = 0; b < mus.size(); ++b) {
    const Moments m = moments_of_image(x, b);
    INFO("image " << b << ": mean " << m.mean << ", variance " << m.var);
    CHECK(std::abs(m.mean - mus[b]) < 4 * sigma0 / std::sqrt(n) + 0.005);
    CHECK(std::abs(m.var / (sigma0 * sigma0) - 1) < 4 * std::sqrt(2 / n) + 0.01);
  }
  // Guidance with identical cond and uncond is no guidance.
  o.guidance_scale = 5.0;
  o.num_inference_steps = 10;
  FlowMatchEulerDiscreteScheduler again(config);
  const Tensor4<float> guided = sample_latents(velocity, again, cond, cond, o);
  o.guidance_scale = 1.0;
  FlowMatchEulerDiscreteScheduler plain(config);
  REQUIRE_CLOSE(guided, sample_latents(velocity, plain, cond, cond, o), 0, 0);
}
