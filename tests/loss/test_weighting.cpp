// Loss weightings: closed forms, documented limits, and finiteness over every t of every schedule.
#include <catch2/catch.hpp>
#include <cmath>

#include "difftrain/difftrain.hpp"

using namespace difftrain;

namespace {
std::vector<DdpmScheduler> all_schedules() {
  std::vector<DdpmScheduler> out;
  for (auto schedule : {BetaSchedule::linear, BetaSchedule::scaled_linear,
                        BetaSchedule::squaredcos_cap_v2, BetaSchedule::sigmoid})
    for (bool zero_snr : {false, true})
      for (auto betas : {std::pair{1e-4, 0.02}, std::pair{0.00085, 0.012}}) {
        DdpmSchedulerConfig c;
        c.beta_schedule = schedule;
        c.beta_start = betas.first;
        c.beta_end = betas.second;
        c.rescale_betas_zero_snr = zero_snr;
        out.emplace_back(c);
      }
  return out;
}
constexpr PredictionType kTypes[] = {PredictionType::epsilon, PredictionType::v_prediction,
                                     PredictionType::sample};
}  // namespace

TEST_CASE("every weighting is finite and non-negative for every t of every schedule") {
  const loss::Uniform uniform;
  const loss::MinSnr min_snr(5.0);
  const loss::DebiasedEstimation debiased;
  const loss::P2 p2(1.0);
  const loss::ScaleVPredLikeNoisePred v_like;
  const loss::Product<loss::MinSnr, loss::DebiasedEstimation> stacked{min_snr, debiased};
  for (const DdpmScheduler& scheduler : all_schedules())
    for (std::int64_t t = 0; t < scheduler.num_train_timesteps(); ++t) {
      const double snr = scheduler.snr(t);
      REQUIRE(snr >= 0);
      for (PredictionType type : kTypes) {
        for (double w :
             {uniform.weight(snr, type), min_snr.weight(snr, type), debiased.weight(snr, type),
              p2.weight(snr, type), stacked.weight(snr, type)}) {
          INFO("t=" << t << " snr=" << snr << " type=" << to_string(type));
          REQUIRE(std::isfinite(w));
          REQUIRE(w >= 0);
        }
      }
      REQUIRE(std::isfinite(v_like.weight(snr, PredictionType::v_prediction)));
    }
}

TEST_CASE("Min-SNR: formulas and the reference values of the SD schedule") {
  const DdpmScheduler sd = DdpmScheduler::sd15();
  const loss::MinSnr m(5.0);
  const auto eps = PredictionType::epsilon, v = PredictionType::v_prediction;
  // REFERENCE-training-step.md §2.3 (float64 values from the definitions).
  REQUIRE(m.weight(sd.snr(0), eps) == Approx(0.0042536).epsilon(1e-4));
  REQUIRE(m.weight(sd.snr(100), eps) == Approx(0.59144).epsilon(1e-4));
  REQUIRE(m.weight(sd.snr(100), v) == Approx(0.52888).epsilon(1e-4));
  REQUIRE(m.weight(sd.snr(200), eps) == 1.0);
  REQUIRE(m.weight(sd.snr(200), v) == Approx(0.75369).epsilon(1e-4));
  REQUIRE(m.weight(sd.snr(500), v) == Approx(0.27633).epsilon(1e-4));
  REQUIRE(m.weight(sd.snr(999), v) == Approx(0.0046601).epsilon(1e-4));
  // x0 target: min(S, γ); limits at S = 0: eps 1, v 0, x0 0.
  REQUIRE(m.weight(2.0, PredictionType::sample) == 2.0);
  REQUIRE(m.weight(9.0, PredictionType::sample) == 5.0);
  REQUIRE(m.weight(0.0, eps) == 1.0);
  REQUIRE(m.weight(0.0, v) == 0.0);
  REQUIRE(m.weight(0.0, PredictionType::sample) == 0.0);
  REQUIRE(m.weight(INFINITY, eps) == 0.0);
  REQUIRE_THROWS_WITH(loss::MinSnr(0.0),
                      Catch::Contains("gamma is 0, expected a finite value > 0"));
  REQUIRE_THROWS_AS(loss::MinSnr(NAN), Error);
}

TEST_CASE("Debiased estimation, P2 and scale-v-like-eps: closed forms and limits") {
  const loss::DebiasedEstimation d;
  const auto eps = PredictionType::epsilon, v = PredictionType::v_prediction;
  REQUIRE(d.weight(4.0, eps) == Approx(0.5));
  REQUIRE(d.weight(4.0, v) == Approx(0.2));
  REQUIRE(d.weight(4.0, PredictionType::sample) == Approx(2.0));
  REQUIRE(d.weight(1e6, eps) == Approx(1 / std::sqrt(1000.0)));     // kohya's ceiling
  REQUIRE(d.weight(0.0, eps) == Approx(std::sqrt(1000.0)));         // our floor 1e-3
  REQUIRE(d.weight(0.0047, eps) == Approx(1 / std::sqrt(0.0047)));  // untouched on SD's range
  const loss::P2 p2(0.5);
  REQUIRE(p2.weight(3.0, eps) == Approx(0.5));
  REQUIRE(p2.weight(2.0, v) == Approx(0.5));
  REQUIRE(p2.weight(3.0, PredictionType::sample) == Approx(1.5));
  REQUIRE(p2.weight(0.0, eps) == 1.0);
  REQUIRE_THROWS_AS(loss::P2(-1.0), Error);
  const loss::ScaleVPredLikeNoisePred s;
  REQUIRE(s.weight(3.0, v) == Approx(0.75));
  REQUIRE(s.weight(0.0, v) == 0.0);
  REQUIRE(s.weight(1e9, v) == Approx(1000.0 / 1001.0));
  REQUIRE_THROWS_WITH(s.weight(1.0, eps), Catch::Contains("expected v_prediction"));
  // v-MSE × S/(S+1) = eps-MSE (the relation the weighting is named after).
  const double snr = 2.5, e2 = 0.3;  // ‖ê − e‖²
  REQUIRE(e2 * (snr + 1) / snr * s.weight(snr, v) == Approx(e2));
}

TEST_CASE("v_pred_like_loss: loss + loss/w·λ with w = S'/(S'+1), as kohya adds it") {
  // kohya add_v_prediction_like_loss: loss + loss / (S'/(S'+1)) · λ, S' = min(S, 1000).
  const loss::VPredLikeLoss v(0.5);
  CHECK(v.weight(3.0, PredictionType::epsilon) == Approx(1.0 + 0.5 * 4.0 / 3.0).epsilon(1e-15));
  CHECK(v.weight(3.0, PredictionType::v_prediction) == v.weight(3.0, PredictionType::epsilon));
  CHECK(v.weight(5000.0, PredictionType::epsilon) ==
        Approx(1.0 + 0.5 * 1001.0 / 1000.0).epsilon(1e-15));
  CHECK(loss::VPredLikeLoss(0.0).weight(0.25, PredictionType::epsilon) == 1.0);
  CHECK_THROWS_WITH(v.weight(0.0, PredictionType::epsilon), Catch::Contains("SNR 0"));
  CHECK_THROWS_WITH(loss::VPredLikeLoss(-1.0), Catch::Contains("v_pred_like_loss is -1"));

  // Stacked after Min-SNR in ConfiguredWeighting: the product.
  loss::WeightingOptions o;
  o.snr_gamma = 5.0;
  o.v_pred_like_loss = 0.5;
  const loss::ConfiguredWeighting w(o);
  CHECK(!w.uniform());
  for (double S : {0.01, 0.7, 4.0, 30.0, 2000.0})
    CHECK(w.weight(S, PredictionType::epsilon) ==
          Approx(loss::MinSnr(5.0).weight(S, PredictionType::epsilon) *
                 (1.0 + 0.5 * (std::min(S, 1000.0) + 1.0) / std::min(S, 1000.0)))
              .epsilon(1e-14));
}
