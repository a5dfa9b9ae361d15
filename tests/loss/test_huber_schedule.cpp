// The huber c schedules against REFERENCE-training-step.md §2.3 (SD schedule, c = 0.1).
#include <catch2/catch.hpp>

#include "difftrain/difftrain.hpp"

using namespace difftrain;

TEST_CASE("huber_c: snr, exponential and constant schedules") {
  const DdpmScheduler sd = DdpmScheduler::sd15();
  loss::HuberOptions o;  // snr, c = 0.1
  REQUIRE(loss::huber_c(o, sd, 0) == Approx(0.94971).epsilon(1e-4));
  REQUIRE(loss::huber_c(o, sd, 100) == Approx(0.5983).epsilon(1e-4));
  REQUIRE(loss::huber_c(o, sd, 500) == Approx(0.23128).epsilon(1e-4));
  REQUIRE(loss::huber_c(o, sd, 999) == Approx(0.10369).epsilon(1e-4));
  o.schedule = loss::HuberSchedule::exponential;
  REQUIRE(loss::huber_c(o, sd, 100) == Approx(0.79433).epsilon(1e-4));
  REQUIRE(loss::huber_c(o, sd, 500) == Approx(0.31623).epsilon(1e-4));
  REQUIRE(loss::huber_c(o, sd, 999) == Approx(0.10023).epsilon(1e-4));
  o.schedule = loss::HuberSchedule::constant;
  o.huber_scale = 2;
  REQUIRE(loss::huber_c(o, sd, 500) == Approx(0.2));
  // Zero terminal SNR: ᾱ = 0 at t = 999, σ = ∞, c_t = c.
  DdpmSchedulerConfig z = sd.config();
  z.rescale_betas_zero_snr = true;
  o.schedule = loss::HuberSchedule::snr;
  REQUIRE(loss::huber_c(o, DdpmScheduler(z), 999) == 0.1);
  REQUIRE_THROWS_AS(loss::parse_huber_schedule("cosine"), Error);
  o.huber_c = 0;
  REQUIRE_THROWS_WITH(o.validate(), Catch::Contains("huber_c is 0"));
}
