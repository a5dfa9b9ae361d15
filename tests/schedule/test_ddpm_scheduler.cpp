// DdpmScheduler: golden values of diffusers' DDPMScheduler, the closed-form reference table,
// invariants of the tables, and DdpmSchedulerConfig parsing (good and bad configs).
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "difftrain/concepts.hpp"
#include "difftrain/schedule/schedule.hpp"
#include "schedule/scheduler_golden.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using Catch::Matchers::Contains;
using nlohmann::json;

static_assert(Scheduler<DdpmScheduler>);

namespace {

using test::float32_value;
using test::golden;
using test::T;

DdpmScheduler make_scheduler(BetaSchedule schedule, double b0, double b1, bool zsnr) {
  DdpmSchedulerConfig config;
  config.beta_schedule = schedule;
  config.beta_start = b0;
  config.beta_end = b1;
  config.rescale_betas_zero_snr = zsnr;
  return DdpmScheduler(config);
}

// A value printed with a few digits, e.g. "0.27767" or "4.0358e-5", and half a unit of its last
// digit: the rounding the printed number may carry.
struct Printed {
  double value;
  double half_unit;
};
Printed printed(std::string_view text) {
  const auto e = text.find('e');
  const std::string_view mantissa = text.substr(0, e);
  const int exponent = e == std::string_view::npos ? 0 : std::stoi(std::string(text.substr(e + 1)));
  const auto dot = mantissa.find('.');
  const int decimals =
      dot == std::string_view::npos ? 0 : static_cast<int>(mantissa.size() - dot - 1);
  return {std::stod(std::string(text)), 0.5 * std::pow(10.0, exponent - decimals)};
}

void check_printed(double actual, std::string_view text) {
  const auto p = printed(text);
  INFO("expected " << text << " (± " << p.half_unit << "), got " << actual);
  CHECK(std::abs(actual - p.value) <= p.half_unit);
}

// A scratch folder removed at the end of the test.
struct ScratchDir {
  std::filesystem::path path = std::filesystem::temp_directory_path() /
                               ("difftrain_test_schedule_" + std::to_string(::getpid()));
  ScratchDir() { std::filesystem::create_directories(path); }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string write(const std::string& name, const std::string& text) const {
    const auto file = path / name;
    std::ofstream(file) << text;
    return file.string();
  }
};

}  // namespace

// Upstream computes in float32, we in double. Tolerances (u = 2^-24, a float32 ulp just below 1):
// - alphas_cumprod: relative T·u ≈ 6e-5, the worst-case relative drift of a float32 product of T
//   factors (each multiply rounds by ≤ u). The rescale's r − r_{T−1} and the cosine's 1 − 0.999
//   amplify the relative error near t = T−1; observed ≤ 1.9e-5 (typical ≤ 1e-6).
// - snr = ᾱ/(1 − ᾱ): δsnr/snr = δᾱ/ᾱ + δᾱ/(1 − ᾱ). Near t = 0, 1 − ᾱ ≈ 1e-4 is exact in
//   float32 but carries the absolute error of ᾱ (a few u), so upstream's SNR has only ~3 digits
//   there (observed 9e-4 relative). Allowed: snr·(T·u + 8u/(1 − ᾱ)).
TEST_CASE("DdpmScheduler matches diffusers' DDPMScheduler (golden, float32)",
          "[schedule][ddpm][golden]") {
  const auto& g = golden();
  const double u = std::ldexp(1.0, -24);
  const double rtol_abar = T * u;
  REQUIRE(g.at("schedules").size() == 10);
  for (const auto& [name, schedule] : g.at("schedules").items()) {
    DYNAMIC_SECTION(name) {
      // The golden configs are diffusers' own, inference-only keys included: they must parse.
      const auto config = DdpmSchedulerConfig::from_json(schedule.at("config"));
      const bool zsnr = config.rescale_betas_zero_snr;
      CHECK(zsnr == schedule.at("config").at("rescale_betas_zero_snr").get<bool>());
      CHECK(config.prediction_type == PredictionType::epsilon);
      const DdpmScheduler s(config);
      REQUIRE(s.num_train_timesteps() == T);
      REQUIRE(s.alphas_cumprod().size() == static_cast<std::size_t>(T));

      std::vector<double> abar, abar_expected;
      for (const char* key : {"edge_timesteps", "loss_timesteps"}) {
        const auto& expected = key == std::string_view("edge_timesteps")
                                   ? schedule.at("alphas_cumprod")
                                   : schedule.at("alphas_cumprod_at_loss_timesteps");
        for (std::size_t k = 0; k < g.at(key).size(); ++k) {
          abar.push_back(s.alphas_cumprod()[g.at(key)[k].get<std::size_t>()]);
          abar_expected.push_back(float32_value(expected[k]));
        }
      }
      REQUIRE_CLOSE(abar, abar_expected, rtol_abar, 0.0);

      const auto& edge = g.at("edge_timesteps");
      for (std::size_t k = 0; k < edge.size(); ++k) {
        const auto t = edge[k].get<std::int64_t>();
        const double expected = float32_value(schedule.at("snr")[k]);
        const double abar_t = float32_value(schedule.at("alphas_cumprod")[k]);
        const double tolerance = expected * (rtol_abar + 8 * u / (1.0 - abar_t));
        INFO("t = " << t << ": snr " << s.snr(t) << ", expected " << expected << " ± "
                    << tolerance);
        CHECK(std::abs(s.snr(t) - expected) <= tolerance);
      }

      if (zsnr) {  // exact in both float32 and double
        CHECK(s.alphas_cumprod()[T - 1] == 0.0);
        CHECK(s.betas()[T - 1] == 1.0);
        CHECK(s.snr(T - 1) == 0.0);
        CHECK(s.sqrt_alpha_prod(T - 1) == 0.0);
        CHECK(s.sqrt_one_minus_alpha_prod(T - 1) == 1.0);
        CHECK(float32_value(schedule.at("alphas_cumprod")[edge.size() - 1]) == 0.0);
      }
    }
  }
}

// REFERENCE-training-step.md §2.3: values computed in float64 from the definitions, printed
// with a few digits; each must hold to half a unit of its last printed digit. sigmoid is not in
// the golden file, so this table is its reference.
TEST_CASE("DdpmScheduler reproduces the closed-form reference table", "[schedule][ddpm]") {
  struct Row {
    const char* name;
    DdpmScheduler scheduler;
    const char* abar[3];  // t = 0, 499, 999
    const char* snr[3];
  };
  const Row rows[] = {
      {"scaled_linear",
       make_scheduler(BetaSchedule::scaled_linear, 0.00085, 0.012, false),
       {"0.99915", "0.27767", "0.0046601"},
       {"1175.47", "0.38441", "0.0046819"}},
      {"scaled_linear + zero SNR",
       make_scheduler(BetaSchedule::scaled_linear, 0.00085, 0.012, true),
       {"0.99915", "0.24236", "0"},
       {"1175.47", "0.31989", "0"}},
      {"linear",
       make_scheduler(BetaSchedule::linear, 1e-4, 0.02, false),
       {"0.9999", "0.078587", "4.0358e-5"},
       {"9999", "0.08529", "4.036e-5"}},
      {"squaredcos_cap_v2",
       make_scheduler(BetaSchedule::squaredcos_cap_v2, 1e-4, 0.02, false),
       {"0.9999587", "0.49384", "2.4288e-9"},
       {"24221", "0.97567", "2.43e-9"}},
      {"sigmoid",
       make_scheduler(BetaSchedule::sigmoid, 1e-4, 0.02, false),
       {"0.9998508", "0.30193", "3.968e-5"},
       {"6701", "0.43252", "3.97e-5"}},
  };
  for (const auto& row : rows) {
    INFO(row.name);
    const std::int64_t ts[3] = {0, 499, 999};
    for (int k = 0; k < 3; ++k) {
      INFO("t = " << ts[k]);
      check_printed(row.scheduler.alphas_cumprod()[static_cast<std::size_t>(ts[k])], row.abar[k]);
      check_printed(row.scheduler.snr(ts[k]), row.snr[k]);
    }
  }
  // Exact zeros of the zero-terminal-SNR row, the cosine cap, SNR[998] ≈ 1.97e-7.
  CHECK(rows[1].scheduler.alphas_cumprod()[999] == 0.0);
  CHECK(rows[1].scheduler.snr(999) == 0.0);
  check_printed(rows[1].scheduler.snr(998), "1.97e-7");
  CHECK(rows[3].scheduler.betas()[999] == 0.999);

  // SD schedule: the first t with SNR < 5 is 147, with SNR < 1 is 354.
  const auto sd = DdpmScheduler::sd15();
  auto first_below = [&](double level) {
    std::int64_t t = 0;
    while (t < T && sd.snr(t) >= level) ++t;
    return t;
  };
  CHECK(first_below(5.0) == 147);
  CHECK(first_below(1.0) == 354);
}

TEST_CASE("DdpmScheduler tables are consistent", "[schedule][ddpm]") {
  for (auto schedule : {BetaSchedule::linear, BetaSchedule::scaled_linear,
                        BetaSchedule::squaredcos_cap_v2, BetaSchedule::sigmoid}) {
    for (bool zsnr : {false, true}) {
      DYNAMIC_SECTION(to_string(schedule) << (zsnr ? " zsnr" : "")) {
        const auto s = make_scheduler(schedule, 0.00085, 0.012, zsnr);
        const auto betas = s.betas();
        const auto abar = s.alphas_cumprod();
        REQUIRE(betas.size() == static_cast<std::size_t>(T));
        double product = 1.0;
        for (std::int64_t t = 0; t < T; ++t) {
          const auto i = static_cast<std::size_t>(t);
          INFO("t = " << t);
          product *= 1.0 - betas[i];
          REQUIRE(abar[i] == product);
          if (t > 0) REQUIRE(abar[i] < abar[i - 1]);  // strictly decreasing
          const double a = s.sqrt_alpha_prod(t), sigma = s.sqrt_one_minus_alpha_prod(t);
          REQUIRE(a >= 0.0);
          REQUIRE(sigma > 0.0);
          REQUIRE(a * a == Approx(abar[i]).epsilon(1e-14).margin(1e-300));
          REQUIRE(a * a + sigma * sigma == Approx(1.0).epsilon(1e-14));
          REQUIRE(s.snr(t) == Approx(a * a / (sigma * sigma)).epsilon(1e-12));
          if (t > 0) REQUIRE(s.snr(t) < s.snr(t - 1));
        }
      }
    }
  }
}

TEST_CASE("DdpmScheduler defaults, presets and trained_betas", "[schedule][ddpm]") {
  const DdpmScheduler plain;  // diffusers' DDPMScheduler defaults: linear 1e-4..0.02, epsilon
  CHECK(plain.num_train_timesteps() == 1000);
  CHECK(plain.prediction_type() == PredictionType::epsilon);
  CHECK(plain.config().beta_schedule == BetaSchedule::linear);
  CHECK(plain.betas()[0] == 1e-4);
  CHECK(plain.betas()[999] == 0.02);

  const auto sd = DdpmScheduler::sd15();
  CHECK(sd.prediction_type() == PredictionType::epsilon);
  CHECK(sd.config().beta_schedule == BetaSchedule::scaled_linear);
  CHECK(sd.config().beta_start == 0.00085);
  CHECK(sd.config().beta_end == 0.012);
  CHECK_FALSE(sd.config().rescale_betas_zero_snr);
  const auto v = DdpmScheduler::sd21_v();
  CHECK(v.prediction_type() == PredictionType::v_prediction);
  CHECK(std::vector<double>(v.betas().begin(), v.betas().end()) ==
        std::vector<double>(sd.betas().begin(), sd.betas().end()));

  // trained_betas replace the schedule; the rescale still applies on top.
  DdpmSchedulerConfig trained;
  trained.trained_betas = make_betas(BetaSchedule::scaled_linear, T, 0.00085, 0.012);
  trained.beta_schedule = BetaSchedule::squaredcos_cap_v2;  // ignored
  const DdpmScheduler from_trained(trained);
  CHECK(std::vector<double>(from_trained.alphas_cumprod().begin(),
                            from_trained.alphas_cumprod().end()) ==
        std::vector<double>(sd.alphas_cumprod().begin(), sd.alphas_cumprod().end()));
  trained.rescale_betas_zero_snr = true;
  CHECK(DdpmScheduler(trained).alphas_cumprod()[999] == 0.0);

  // A short schedule: T = 4 linear 0.1..0.4, ᾱ = .9, .72, .504, .3024.
  DdpmSchedulerConfig small;
  small.num_train_timesteps = 4;
  small.beta_start = 0.1;
  small.beta_end = 0.4;
  const DdpmScheduler s4(small);
  const std::vector<double> expected{0.9, 0.72, 0.504, 0.3024};
  REQUIRE_CLOSE(s4.alphas_cumprod(), expected, 1e-15, 0.0);
  CHECK(s4.snr(3) == Approx(0.3024 / 0.6976).epsilon(1e-14));
}

TEST_CASE("DdpmScheduler refuses out-of-range timesteps and bad configs", "[schedule][ddpm]") {
  const auto s = DdpmScheduler::sd15();
  REQUIRE_THROWS_AS(s.snr(1000), Error);
  REQUIRE_THROWS_WITH(s.snr(1000), "DdpmScheduler::snr: timestep 1000 out of range [0, 1000)");
  REQUIRE_THROWS_WITH(s.snr(-1), "DdpmScheduler::snr: timestep -1 out of range [0, 1000)");
  REQUIRE_THROWS_WITH(s.sqrt_alpha_prod(1000), Contains("DdpmScheduler::sqrt_alpha_prod"));
  REQUIRE_THROWS_WITH(s.sqrt_one_minus_alpha_prod(-3),
                      Contains("DdpmScheduler::sqrt_one_minus_alpha_prod: timestep -3"));
  CHECK_NOTHROW(s.snr(0));
  CHECK_NOTHROW(s.snr(999));

  DdpmSchedulerConfig config;
  config.num_train_timesteps = 1;
  REQUIRE_THROWS_WITH(DdpmScheduler(config),
                      Contains("DdpmScheduler") && Contains("num_train_timesteps is 1"));
  config = {};
  config.beta_start = -0.1;
  REQUIRE_THROWS_WITH(DdpmScheduler(config), Contains("beta_start is -0.1"));
  config = {};
  config.trained_betas = {0.1, 0.2};
  REQUIRE_THROWS_WITH(DdpmScheduler(config),
                      Contains("trained_betas has 2 values") && Contains("1000"));
  config.num_train_timesteps = 2;
  config.trained_betas = {0.1, 1.5};
  REQUIRE_THROWS_WITH(DdpmScheduler(config), Contains("trained_betas[1] = 1.5"));
}

TEST_CASE("DdpmSchedulerConfig reads the scheduler configs SD checkpoints ship",
          "[schedule][config]") {
  const ScratchDir dir;
  // runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (PNDM).
  const auto sd15_path = dir.write("sd15_scheduler_config.json", R"({
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
})");
  const auto sd15 = DdpmSchedulerConfig::from_file(sd15_path);
  CHECK(sd15.num_train_timesteps == 1000);
  CHECK(sd15.beta_schedule == BetaSchedule::scaled_linear);
  CHECK(sd15.beta_start == 0.00085);
  CHECK(sd15.beta_end == 0.012);
  CHECK(sd15.trained_betas.empty());
  CHECK(sd15.prediction_type == PredictionType::epsilon);
  CHECK_FALSE(sd15.rescale_betas_zero_snr);
  const auto preset = DdpmScheduler::sd15();
  const DdpmScheduler loaded(sd15);
  CHECK(std::vector<double>(loaded.alphas_cumprod().begin(), loaded.alphas_cumprod().end()) ==
        std::vector<double>(preset.alphas_cumprod().begin(), preset.alphas_cumprod().end()));

  // stabilityai/stable-diffusion-2-1 (DDIM, v-prediction).
  const auto sd21 = DdpmSchedulerConfig::from_json(json::parse(R"({
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": false,
    "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null})"));
  CHECK(sd21.prediction_type == PredictionType::v_prediction);
  CHECK(sd21.beta_schedule == BetaSchedule::scaled_linear);

  // stabilityai/stable-diffusion-xl-base-1.0 (Euler), with a zero-SNR flag set.
  const auto sdxl = DdpmSchedulerConfig::from_json(json::parse(R"({
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": false, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": false,
    "skip_prk_steps": true, "steps_offset": 1, "timestep_spacing": "leading",
    "trained_betas": null, "use_karras_sigmas": false, "rescale_betas_zero_snr": true,
    "timestep_type": "discrete", "final_sigmas_type": "zero", "sigma_min": null})"));
  CHECK(sdxl.rescale_betas_zero_snr);

  // An empty object is diffusers' DDPMScheduler defaults; unknown keys at null/false pass.
  const auto defaults = DdpmSchedulerConfig::from_json(
      json::parse(R"({"some_future_flag": false, "some_future_option": null, "_x": [1]})"));
  CHECK(defaults.num_train_timesteps == 1000);
  CHECK(defaults.beta_start == 1e-4);
  CHECK(defaults.beta_end == 0.02);
  CHECK(defaults.beta_schedule == BetaSchedule::linear);

  // trained_betas given in the config.
  const auto with_betas = DdpmSchedulerConfig::from_json(
      json::parse(R"({"num_train_timesteps": 3, "trained_betas": [0.1, 0.2, 0.3]})"));
  CHECK(with_betas.trained_betas == std::vector<double>{0.1, 0.2, 0.3});
  CHECK(DdpmScheduler(with_betas).alphas_cumprod()[2] == Approx(0.9 * 0.8 * 0.7).epsilon(1e-15));
}

TEST_CASE("DdpmSchedulerConfig refuses bad configs, naming the key and value",
          "[schedule][config]") {
  struct Bad {
    const char* text;
    std::vector<std::string> needles;  // all must appear in the message
  };
  const Bad cases[] = {
      {R"({"beta_start": "0.00085"})", {"beta_start", "\"0.00085\""}},
      {R"({"beta_start": 0})", {"beta_start", "value 0", "positive"}},
      {R"({"beta_end": -0.02})", {"beta_end", "-0.02"}},
      {R"({"beta_end": null})", {"beta_end", "null"}},
      {R"({"num_train_timesteps": 1})", {"num_train_timesteps", "value 1,"}},
      {R"({"num_train_timesteps": -1000})", {"num_train_timesteps", "-1000"}},
      {R"({"num_train_timesteps": 1000.5})", {"num_train_timesteps", "1000.5"}},
      {R"({"num_train_timesteps": 1000.0})", {"num_train_timesteps", "1000.0"}},
      {R"({"num_train_timesteps": "1000"})", {"num_train_timesteps", "\"1000\""}},
      {R"({"num_train_timesteps": 18446744073709551615})",
       {"num_train_timesteps", "18446744073709551615"}},
      {R"({"beta_schedule": "cosine"})", {"beta_schedule", "'cosine'", "squaredcos_cap_v2"}},
      {R"({"beta_schedule": 2})", {"beta_schedule", "value 2"}},
      {R"({"prediction_type": "x0"})", {"prediction_type", "'x0'", "v_prediction"}},
      {R"({"prediction_type": null})", {"prediction_type", "null"}},
      {R"({"rescale_betas_zero_snr": "yes"})", {"rescale_betas_zero_snr", "\"yes\""}},
      {R"({"rescale_betas_zero_snr": 1})", {"rescale_betas_zero_snr", "value 1"}},
      {R"({"trained_betas": "none"})", {"trained_betas", "\"none\""}},
      {R"({"trained_betas": []})", {"trained_betas", "[]"}},
      {R"({"num_train_timesteps": 2, "trained_betas": [0.1, 2.0]})",
       {"trained_betas", "2.0", "index 1"}},
      {R"({"num_train_timesteps": 2, "trained_betas": [0.1, "a"]})", {"trained_betas", "\"a\""}},
      {R"({"trained_betas": [0.1, 0.2]})", {"trained_betas has 2 values", "1000"}},
      {R"({"shift": 3.0})", {"unknown key 'shift'", "3.0"}},
      {R"({"use_dynamic_shifting": true})", {"unknown key 'use_dynamic_shifting'", "true"}},
      {R"({"beta_max": 20})", {"unknown key 'beta_max'", "20"}},
      {R"({"flow_shift": "x"})", {"unknown key 'flow_shift'", "\"x\""}},
      {R"([1, 2])", {"DdpmSchedulerConfig::from_json", "object", "array"}},
  };
  for (const auto& bad : cases) {
    INFO(bad.text);
    const auto parsed = json::parse(bad.text);
    REQUIRE_THROWS_AS(DdpmSchedulerConfig::from_json(parsed), Error);
    try {
      (void)DdpmSchedulerConfig::from_json(parsed);
    } catch (const Error& e) {
      const std::string message = e.what();
      INFO("message: " << message);
      CHECK_THAT(message, Contains("DdpmSchedulerConfig::from_json"));
      for (const auto& needle : bad.needles) CHECK_THAT(message, Contains(needle));
    }
  }
}

TEST_CASE("DdpmSchedulerConfig::from_file names the path of a missing or broken file",
          "[schedule][config]") {
  const ScratchDir dir;
  const std::string missing = (dir.path / "no_such_scheduler_config.json").string();
  REQUIRE_THROWS_WITH(DdpmSchedulerConfig::from_file(missing),
                      Contains("DdpmSchedulerConfig::from_file") && Contains(missing) &&
                          Contains("does not exist"));
  const auto broken = dir.write("broken.json", R"({"beta_start": 0.00085,)");
  REQUIRE_THROWS_WITH(DdpmSchedulerConfig::from_file(broken),
                      Contains(broken) && Contains("not valid JSON"));
  const auto empty = dir.write("empty.json", "");
  REQUIRE_THROWS_WITH(DdpmSchedulerConfig::from_file(empty),
                      Contains(empty) && Contains("not valid JSON"));
  REQUIRE_THROWS_WITH(DdpmSchedulerConfig::from_file(dir.path.string()),
                      Contains(dir.path.string()) && Contains("not a regular file"));
  // A valid file with a bad value: both the path and the key are named.
  const auto bad_value = dir.write("bad_value.json", R"({"beta_schedule": "cosine"})");
  REQUIRE_THROWS_WITH(DdpmSchedulerConfig::from_file(bad_value),
                      Contains(bad_value) && Contains("beta_schedule") && Contains("'cosine'"));
}
