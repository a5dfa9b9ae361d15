// Beta schedules and the zero-terminal-SNR rescale: closed forms, invariants, the golden betas
// of diffusers (float32) and bad input.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <numbers>
#include <string>
#include <vector>

#include "difftrain/schedule/betas.hpp"
#include "schedule/scheduler_golden.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using Catch::Matchers::Contains;

namespace {

using test::float32_value;
using test::golden;
using test::T;

// ᾱ_t = Π_{s≤t} (1 − β_s), written out here so that the tests do not depend on DdpmScheduler.
std::vector<double> cumprod_of_one_minus(const std::vector<double>& betas) {
  std::vector<double> out(betas.size());
  double p = 1.0;
  for (std::size_t i = 0; i < betas.size(); ++i) out[i] = p *= 1.0 - betas[i];
  return out;
}

// The GLIDE ᾱ(t) = cos²((t + 0.008)/1.008·π/2), written independently of the header.
double glide_alpha_bar(double t) {
  return std::pow(std::cos((t + 0.008) / 1.008 * std::numbers::pi / 2.0), 2);
}

}  // namespace

TEST_CASE("BetaSchedule names round-trip and unknown names are refused", "[schedule][betas]") {
  for (auto s : {BetaSchedule::linear, BetaSchedule::scaled_linear, BetaSchedule::squaredcos_cap_v2,
                 BetaSchedule::sigmoid}) {
    CHECK(parse_beta_schedule(to_string(s)) == s);
  }
  CHECK(to_string(BetaSchedule::squaredcos_cap_v2) == "squaredcos_cap_v2");
  REQUIRE_THROWS_AS(parse_beta_schedule("cosine"), Error);
  REQUIRE_THROWS_WITH(parse_beta_schedule("cosine"),
                      Contains("'cosine'") && Contains("linear") && Contains("scaled_linear") &&
                          Contains("squaredcos_cap_v2") && Contains("sigmoid"));
  REQUIRE_THROWS_AS(parse_beta_schedule(""), Error);
  REQUIRE_THROWS_AS(parse_beta_schedule("Linear"), Error);  // names are case-sensitive
}

TEST_CASE("linear betas: exact ends and equal steps", "[schedule][betas]") {
  const double b0 = 1e-4, b1 = 0.02;
  const auto betas = make_betas(BetaSchedule::linear, T, b0, b1);
  REQUIRE(betas.size() == static_cast<std::size_t>(T));
  CHECK(betas.front() == b0);
  CHECK(betas.back() == b1);
  const double step = (b1 - b0) / static_cast<double>(T - 1);
  for (std::size_t i = 1; i < betas.size(); ++i) {
    INFO("i = " << i);
    REQUIRE(betas[i] > betas[i - 1]);
    REQUIRE(betas[i] - betas[i - 1] == Approx(step).epsilon(1e-9));
  }
  CHECK(betas[499] == Approx(b0 + 499.0 * step).epsilon(1e-14));
}

TEST_CASE("scaled_linear betas: square roots equally spaced", "[schedule][betas]") {
  const double b0 = 0.00085, b1 = 0.012;
  const auto betas = make_betas(BetaSchedule::scaled_linear, T, b0, b1);
  CHECK(betas.front() == Approx(b0).epsilon(1e-15));
  CHECK(betas.back() == Approx(b1).epsilon(1e-15));
  const double step = (std::sqrt(b1) - std::sqrt(b0)) / static_cast<double>(T - 1);
  for (std::size_t i = 1; i < betas.size(); ++i) {
    INFO("i = " << i);
    REQUIRE(betas[i] > betas[i - 1]);
    REQUIRE(std::sqrt(betas[i]) - std::sqrt(betas[i - 1]) == Approx(step).epsilon(1e-9));
  }
}

TEST_CASE("sigmoid betas: logistic closed form and point symmetry", "[schedule][betas]") {
  const double b0 = 1e-4, b1 = 0.02;
  const auto betas = make_betas(BetaSchedule::sigmoid, T, b0, b1);
  // sigmoid(x) + sigmoid(−x) = 1 and the grid −6..6 is symmetric, so β_i + β_{T−1−i} = b0 + b1.
  for (std::size_t i = 0; i < betas.size(); ++i) {
    INFO("i = " << i);
    REQUIRE(betas[i] + betas[betas.size() - 1 - i] == Approx(b0 + b1).epsilon(1e-14));
    if (i > 0) REQUIRE(betas[i] > betas[i - 1]);
  }
  // Inverting the logistic recovers the grid: logit((β − b0)/(b1 − b0)) = −6 + 12·i/(T−1).
  for (std::size_t i : {0u, 1u, 250u, 499u, 500u, 998u, 999u}) {
    const double p = (betas[i] - b0) / (b1 - b0);
    INFO("i = " << i);
    CHECK(std::log(p / (1.0 - p)) ==
          Approx(-6.0 + 12.0 * static_cast<double>(i) / 999.0).margin(1e-9));
  }
  CHECK(betas[499] + betas[500] == Approx(b0 + b1).epsilon(1e-14));
}

TEST_CASE("squaredcos_cap_v2 betas telescope to the GLIDE alpha_bar", "[schedule][betas]") {
  // β ignores beta_start/beta_end; Π_{s≤t}(1 − β_s) = f((t+1)/T)/f(0) while no β is capped.
  const auto betas = make_betas(BetaSchedule::squaredcos_cap_v2, T, 1e-4, 0.02);
  const auto alphas_cumprod = cumprod_of_one_minus(betas);
  for (std::size_t t = 0; t + 1 < betas.size(); ++t) {
    INFO("t = " << t);
    REQUIRE(betas[t] < cosine_max_beta);
    REQUIRE(alphas_cumprod[t] ==
            Approx(glide_alpha_bar(static_cast<double>(t + 1) / 1000.0) / glide_alpha_bar(0.0))
                .epsilon(1e-11));
    if (t > 0) REQUIRE(betas[t] >= betas[t - 1]);
  }
  // f(1) = cos²(π/2) ≈ 0 would make β_{T−1} = 1: diffusers caps it at exactly 0.999.
  CHECK(betas.back() == cosine_max_beta);
  CHECK(make_betas(BetaSchedule::squaredcos_cap_v2, T, 0.5, 0.9) == betas);
}

TEST_CASE("make_betas works for small T", "[schedule][betas]") {
  const auto two = make_betas(BetaSchedule::linear, 2, 0.1, 0.2);
  REQUIRE(two.size() == 2);
  CHECK(two[0] == 0.1);
  CHECK(two[1] == 0.2);
  const auto five = make_betas(BetaSchedule::scaled_linear, 5, 0.01, 0.09);  // √: .1 .15 .2 .25 .3
  REQUIRE(five.size() == 5);
  CHECK(five[2] == Approx(0.04).epsilon(1e-14));
  CHECK(five[3] == Approx(0.0625).epsilon(1e-14));
}

TEST_CASE("make_betas refuses bad arguments", "[schedule][betas]") {
  REQUIRE_THROWS_WITH(make_betas(BetaSchedule::linear, 1, 1e-4, 0.02),
                      Contains("make_betas") && Contains("num_train_timesteps is 1"));
  REQUIRE_THROWS_AS(make_betas(BetaSchedule::linear, 0, 1e-4, 0.02), Error);
  REQUIRE_THROWS_AS(make_betas(BetaSchedule::linear, -5, 1e-4, 0.02), Error);
  REQUIRE_THROWS_WITH(make_betas(BetaSchedule::linear, max_train_timesteps + 1, 1e-4, 0.02),
                      Contains("num_train_timesteps"));
  REQUIRE_THROWS_WITH(make_betas(BetaSchedule::linear, T, 0.0, 0.02), Contains("beta_start is 0"));
  REQUIRE_THROWS_WITH(make_betas(BetaSchedule::scaled_linear, T, -1e-4, 0.02),
                      Contains("beta_start"));
  REQUIRE_THROWS_WITH(make_betas(BetaSchedule::linear, T, 1e-4, std::nan("")),
                      Contains("beta_end"));
  REQUIRE_THROWS_WITH(make_betas(BetaSchedule::sigmoid, T, 1e-4, INFINITY), Contains("beta_end"));
  // β beyond 1: named with the schedule, the index and the value.
  // β beyond 1, named with the schedule, the first bad index and its value: linear 0.5..1.5
  // passes 1 after i = 999/2; scaled_linear 0.5..2 when √0.5 + (√2 − √0.5)·i/999 > 1, i.e.
  // i > 999·(√2 − 1) ≈ 413.8.
  REQUIRE_THROWS_WITH(make_betas(BetaSchedule::linear, T, 0.5, 1.5),
                      Contains("linear betas[500] = 1.0005") && Contains("(0, 1]"));
  REQUIRE_THROWS_WITH(make_betas(BetaSchedule::scaled_linear, T, 0.5, 2.0),
                      Contains("scaled_linear betas[414] = 1.000"));
  REQUIRE_THROWS_AS(make_betas(static_cast<BetaSchedule>(17), T, 1e-4, 0.02), Error);
}

TEST_CASE("rescale_zero_terminal_snr: Lin et al. Alg. 1 properties", "[schedule][betas]") {
  for (auto schedule : {BetaSchedule::linear, BetaSchedule::scaled_linear,
                        BetaSchedule::squaredcos_cap_v2, BetaSchedule::sigmoid}) {
    DYNAMIC_SECTION(to_string(schedule)) {
      const auto betas = make_betas(schedule, T, 0.00085, 0.012);
      const auto rescaled = rescale_zero_terminal_snr(betas);
      REQUIRE(rescaled.size() == betas.size());
      const auto before = cumprod_of_one_minus(betas);
      const auto after = cumprod_of_one_minus(rescaled);
      // Exact: the shifted r_{T−1} is exactly 0, so α_{T−1} = 0/ᾱ_{T−2} = 0 and β_{T−1} = 1.
      CHECK(rescaled.back() == 1.0);
      CHECK(after.back() == 0.0);
      CHECK(after.front() == Approx(before.front()).epsilon(1e-14));  // ᾱ_0 is kept
      // √ᾱ' is the affine map of √ᾱ fixing r_0 and sending r_{T−1} to 0.
      const double r0 = std::sqrt(before.front()), r_last = std::sqrt(before.back());
      for (std::size_t t = 0; t + 1 < betas.size(); ++t) {
        INFO("t = " << t);
        REQUIRE(rescaled[t] > 0.0);
        REQUIRE(rescaled[t] < 1.0);
        const double expected = (std::sqrt(before[t]) - r_last) * r0 / (r0 - r_last);
        REQUIRE(std::sqrt(after[t]) == Approx(expected).epsilon(1e-9).margin(1e-15));
        if (t > 0) REQUIRE(after[t] < after[t - 1]);
      }
      // Rescaling a zero-terminal-SNR schedule changes nothing (r_{T−1} is already 0).
      REQUIRE_CLOSE(rescale_zero_terminal_snr(rescaled), rescaled, 1e-10, 1e-15);
    }
  }
}

TEST_CASE("rescale_zero_terminal_snr refuses bad betas", "[schedule][betas]") {
  const std::vector<double> one{0.1};
  REQUIRE_THROWS_WITH(rescale_zero_terminal_snr(one),
                      Contains("rescale_zero_terminal_snr") && Contains("1 values"));
  REQUIRE_THROWS_AS(rescale_zero_terminal_snr(std::vector<double>{}), Error);
  REQUIRE_THROWS_WITH(rescale_zero_terminal_snr(std::vector<double>{0.1, 0.0, 0.2}),
                      Contains("betas[1] = 0"));
  REQUIRE_THROWS_WITH(rescale_zero_terminal_snr(std::vector<double>{0.1, 1.2, 0.2}),
                      Contains("betas[1] = 1.2"));
  REQUIRE_THROWS_AS(rescale_zero_terminal_snr(std::vector<double>{0.1, std::nan(""), 0.2}), Error);
  REQUIRE_THROWS_WITH(rescale_zero_terminal_snr(std::vector<double>{0.1, 1.0, 0.2}),
                      Contains("betas[1] = 1 before the last timestep"));
  // Already zero terminal SNR: unchanged up to the rounding of √x·√x.
  const std::vector<double> terminal{0.1, 0.2, 1.0};
  REQUIRE_CLOSE(rescale_zero_terminal_snr(terminal), terminal, 1e-14, 0.0);
}

// diffusers computes β in float32 (linspace, sqrt and square in float32; the cosine in float64,
// then stored as float32) and the rescale in float32; we compute in double. Tolerances:
// - plain betas: relative 1e-6. The stored float32 β is within half an ulp (3e-8 relative) of
//   the float32 computation, whose few roundings add a few ulps; observed ≤ 2.4e-7.
// - rescaled betas: β = 1 − ᾱ_t/ᾱ_{t−1} from float32 numbers near 1 has an *absolute* error of a
//   few float32 ulps of 1 (2^-24 each; 8 allowed, observed ≤ 3.3 ulps), and the ratio inherits
//   the relative drift of the float32 cumprod, at most T·2^-24 ≈ 6e-5 (observed ≤ 5.3e-6 at
//   t = 998, where β ≈ 0.75).
TEST_CASE("betas match diffusers' DDPMScheduler (golden, float32)", "[schedule][betas][golden]") {
  const auto& g = golden();
  const auto& edge = g.at("edge_timesteps");
  REQUIRE(g.at("num_train_timesteps").get<std::int64_t>() == T);
  REQUIRE(g.at("schedules").size() == 10);
  const double ulp_near_one = std::ldexp(1.0, -24);
  for (const auto& [name, schedule] : g.at("schedules").items()) {
    DYNAMIC_SECTION(name) {
      const auto& config = schedule.at("config");
      auto betas =
          make_betas(parse_beta_schedule(config.at("beta_schedule").get<std::string>()),
                     config.at("num_train_timesteps").get<std::int64_t>(),
                     config.at("beta_start").get<double>(), config.at("beta_end").get<double>());
      const bool zsnr = config.at("rescale_betas_zero_snr").get<bool>();
      if (zsnr) betas = rescale_zero_terminal_snr(betas);
      std::vector<double> actual, expected;
      for (std::size_t k = 0; k < edge.size(); ++k) {
        actual.push_back(betas.at(edge[k].get<std::size_t>()));
        expected.push_back(float32_value(schedule.at("betas")[k]));
      }
      if (zsnr) {
        REQUIRE_CLOSE(actual, expected, T * ulp_near_one, 8 * ulp_near_one);
        CHECK(betas.back() == 1.0);  // and upstream's float32 is exactly 1 as well
        CHECK(expected.back() == 1.0);
      } else {
        REQUIRE_CLOSE(actual, expected, 1e-6, 0.0);
      }
    }
  }
}
