// Forward diffusion, targets, MSE and Min-SNR losses and their gradients against diffusers'
// own float32 values (tests/data/scheduler, from shared/golden/scheduler): 10 schedules × 2
// prediction types.
#include <catch2/catch.hpp>
#include <fstream>
#include <nlohmann/json.hpp>

#include "difftrain/difftrain.hpp"
#include "difftrain/io/safetensors.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;

namespace {
const nlohmann::json& cases() {
  static const nlohmann::json json = [] {
    std::ifstream in(test::data_path("scheduler/scheduler_cases.json"));
    return nlohmann::json::parse(in);
  }();
  return json;
}
const io::SafetensorsFile& tensors() {
  static const io::SafetensorsFile file =
      io::SafetensorsFile::open(test::data_path("scheduler/scheduler_cases.safetensors"));
  return file;
}

kernels::DiffusionCoefficients coefficients(const DdpmScheduler& scheduler,
                                            const std::vector<std::int64_t>& timesteps,
                                            PredictionType type) {
  std::vector<float> a, s;
  for (auto t : timesteps) {
    a.push_back(float(scheduler.sqrt_alpha_prod(t)));
    s.push_back(float(scheduler.sqrt_one_minus_alpha_prod(t)));
  }
  return {a, s, type};
}
}  // namespace

TEST_CASE("golden: add_noise and get_velocity at the edge timesteps, all schedules") {
  const auto timesteps = tensors().read<std::int64_t>("edge.timesteps");
  const auto x0 = tensors().read_tensor<float, 4>("edge.x0");
  const auto noise = tensors().read_tensor<float, 4>("edge.noise");
  for (const auto& [name, schedule] : cases()["schedules"].items()) {
    INFO("schedule " << name);
    const DdpmScheduler scheduler(DdpmSchedulerConfig::from_json(schedule["config"]));
    Tensor4<float> x_t, v;
    kernels::forward_target(
        x0, noise, coefficients(scheduler, timesteps, PredictionType::v_prediction), x_t, v);
    // diffusers computes ᾱ as a float32 cumprod (1000 roundings) and the zero-SNR rescale in
    // float32 (with a cancellation in r − r_T); we compute in double. Upstream's coefficients
    // then carry relative errors up to ~1e-5 (measured max 1.4e-5 at ZTSNR), hence 2e-5 of the
    // largest |value|.
    const auto add_noise = tensors().read<float>(name + ".add_noise");
    const auto velocity = tensors().read<float>(name + ".get_velocity");
    REQUIRE_CLOSE(x_t, add_noise, 0, 2e-5 * xt::amax(xt::abs(x_t))());
    REQUIRE_CLOSE(v, velocity, 0, 2e-5 * xt::amax(xt::abs(v))());
  }
}

TEST_CASE("golden: targets, MSE and Min-SNR losses and gradients, all schedules") {
  const auto timesteps = tensors().read<std::int64_t>("loss.timesteps");
  const auto x0 = tensors().read_tensor<float, 4>("loss.x0");
  const auto noise = tensors().read_tensor<float, 4>("loss.noise");
  const auto pred = tensors().read_tensor<float, 4>("loss.model_pred");
  const double gamma = cases()["snr_gamma"];
  for (const auto& [name, schedule] : cases()["schedules"].items()) {
    const DdpmScheduler scheduler(DdpmSchedulerConfig::from_json(schedule["config"]));
    for (const PredictionType type : {PredictionType::epsilon, PredictionType::v_prediction}) {
      const std::string key = name + "." + std::string(to_string(type));
      INFO(key);
      Tensor4<float> x_t, target, grad;
      kernels::forward_target(x0, noise, coefficients(scheduler, timesteps, type), x_t, target);
      const auto expected_target = tensors().read<float>(key + ".target");
      REQUIRE_CLOSE(target, expected_target, 0, 2e-5 * xt::amax(xt::abs(target))());  // as above

      const std::vector<float> ones(timesteps.size(), 1.0f);
      const auto mse = kernels::loss_and_grad(pred, target, kernels::LossType::l2, ones);
      REQUIRE(mse.loss == Approx(tensors().read<float>(key + ".loss_mse")[0]).epsilon(1e-5));

      const loss::MinSnr min_snr(gamma);
      std::vector<float> w;
      for (auto t : timesteps) w.push_back(float(min_snr.weight(scheduler.snr(t), type)));
      const auto weighted =
          kernels::loss_and_grad(pred, target, kernels::LossType::l2, w, {}, nullptr, &grad);
      REQUIRE(weighted.loss ==
              Approx(tensors().read<float>(key + ".loss_minsnr")[0]).epsilon(1e-5));
      const auto expected_grad = tensors().read<float>(key + ".grad_model_pred_minsnr");
      REQUIRE_CLOSE(grad, expected_grad, 0, 2e-5 * xt::amax(xt::abs(grad))());
    }
  }
}

TEST_CASE("golden: Min-SNR weights at the edge timesteps; the ZTSNR epsilon limit is 1") {
  const auto timesteps = cases()["edge_timesteps"].get<std::vector<std::int64_t>>();
  const loss::MinSnr min_snr(cases()["snr_gamma"].get<double>());
  for (const auto& [name, schedule] : cases()["schedules"].items()) {
    const DdpmScheduler scheduler(DdpmSchedulerConfig::from_json(schedule["config"]));
    for (const PredictionType type : {PredictionType::epsilon, PredictionType::v_prediction}) {
      const auto& expected = schedule[std::string(to_string(type))]["minsnr_weights"];
      for (std::size_t i = 0; i < timesteps.size(); ++i) {
        INFO(name << " " << to_string(type) << " t=" << timesteps[i]);
        const double w = min_snr.weight(scheduler.snr(timesteps[i]), type);
        REQUIRE(std::isfinite(w));
        if (expected[i].is_null()) {  // upstream 0/0 at SNR = 0: our documented limit
          REQUIRE(type == PredictionType::epsilon);
          REQUIRE(scheduler.snr(timesteps[i]) == 0.0);
          REQUIRE(w == 1.0);
        } else {
          // Upstream's float32 SNR = ᾱ/(1 − ᾱ) carries the float32 rounding of 1 − ᾱ, a relative
          // error of about 2^-24/(1 − ᾱ) (2.7e-4 at t = 1 of the linear schedule), on top of
          // the cumprod drift (≤ 2e-5): the tolerance is both.
          const double abar = scheduler.alphas_cumprod()[std::size_t(timesteps[i])];
          const double rtol = 2e-5 + 4 * 0x1p-24 / (1 - abar);
          REQUIRE(w == Approx(expected[i].get<double>()).epsilon(rtol).margin(1e-7));
        }
      }
    }
  }
}
