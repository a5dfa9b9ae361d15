// LR multipliers at chosen steps against diffusers' closed forms (w = 10 warmup, N = 110 total).
#include <catch2/catch.hpp>
#include <cmath>
#include <numbers>

#include "difftrain/train/lr_schedule.hpp"

using namespace difftrain;
using namespace difftrain::train;

namespace {
LrSchedule make(const char* name, double cycles = -1) {
  LrScheduleOptions o;
  o.num_warmup_steps = 10;
  o.num_training_steps = 110;
  o.num_cycles = cycles;
  return get_scheduler(name, o);
}
constexpr double pi = std::numbers::pi;
}  // namespace

TEST_CASE("constant ignores warmup; constant_with_warmup ramps s/w") {
  const LrSchedule c = make("constant"), cw = make("constant_with_warmup");
  for (std::int64_t s : {0, 1, 5, 10, 50, 500}) REQUIRE(c.multiplier(s) == 1.0);
  REQUIRE(cw.multiplier(0) == 0.0);
  REQUIRE(cw.multiplier(3) == Approx(0.3));
  REQUIRE(cw.multiplier(9) == Approx(0.9));
  REQUIRE(cw.multiplier(10) == 1.0);
  REQUIRE(cw.multiplier(1000) == 1.0);
}

TEST_CASE("linear: warmup then (N − s)/(N − w), floored at 0") {
  const LrSchedule l = make("linear");
  REQUIRE(l.multiplier(4) == Approx(0.4));
  REQUIRE(l.multiplier(10) == Approx(1.0));
  REQUIRE(l.multiplier(35) == Approx(75.0 / 100.0));
  REQUIRE(l.multiplier(109) == Approx(0.01));
  REQUIRE(l.multiplier(110) == 0.0);
  REQUIRE(l.multiplier(200) == 0.0);
}

TEST_CASE("cosine: ½(1 + cos(π·p)) after warmup") {
  const LrSchedule c = make("cosine");
  REQUIRE(c.multiplier(5) == Approx(0.5));
  REQUIRE(c.multiplier(10) == Approx(1.0));
  REQUIRE(c.multiplier(60) == Approx(0.5));  // p = 0.5: cos(π/2) = 0
  REQUIRE(c.multiplier(35) == Approx(0.5 * (1 + std::cos(pi * 0.25))));
  REQUIRE(c.multiplier(110) == Approx(0.0).margin(1e-15));
  // diffusers' get_scheduler and kohya give num_cycles to cosine_with_restarts only: cosine never
  // climbs back (a full cycle would give ½ at p = 0.75 and 1 at the end).
  for (double cycles : {1.0, 2.0, 3.5})
    for (std::int64_t s : {0, 5, 10, 35, 60, 85, 100, 110, 150})
      REQUIRE(make("cosine", cycles).multiplier(s) == c.multiplier(s));
  REQUIRE(make("cosine", 1.0).multiplier(85) == Approx(0.5 * (1 + std::cos(pi * 0.75))));
}

TEST_CASE("cosine_with_restarts: ½(1 + cos(π·((c·p) mod 1))), 0 once p ≥ 1") {
  const LrSchedule one = make("cosine_with_restarts");  // default one cycle
  REQUIRE(one.multiplier(60) == Approx(0.5));
  REQUIRE(one.multiplier(35) == Approx(0.5 * (1 + std::cos(pi * 0.25))));
  const LrSchedule two = make("cosine_with_restarts", 2.0);
  REQUIRE(two.multiplier(35) == Approx(0.5));  // c·p = 0.5
  REQUIRE(two.multiplier(60) == Approx(1.0));  // c·p = 1 → restart
  REQUIRE(two.multiplier(85) == Approx(0.5));  // 1.5 mod 1
  REQUIRE(two.multiplier(98) == Approx(0.5 * (1 + std::cos(pi * 0.76))));
  REQUIRE(two.multiplier(110) == 0.0);
  REQUIRE(two.multiplier(7) == Approx(0.7));
}

TEST_CASE("polynomial: ((lr0 − lr_end)(1 − p)^power + lr_end)/lr0") {
  LrScheduleOptions o;
  o.num_warmup_steps = 10;
  o.num_training_steps = 110;
  o.power = 2.0;
  o.lr_init = 1e-3;
  o.lr_end = 1e-4;
  const LrSchedule p = get_scheduler("polynomial", o);
  REQUIRE(p.multiplier(5) == Approx(0.5));
  REQUIRE(p.multiplier(10) == Approx(1.0));
  REQUIRE(p.multiplier(60) == Approx((9e-4 * 0.25 + 1e-4) / 1e-3));
  REQUIRE(p.multiplier(110) == Approx(0.1));
  REQUIRE(p.multiplier(500) == Approx(0.1));
  o.lr_end = 2e-3;
  REQUIRE_THROWS_WITH(get_scheduler("polynomial", o),
                      Catch::Contains("lr_end is 0.002, expected in [0, lr_init = 0.001]"));
}

TEST_CASE("schedule names, bad arguments, scale_lr") {
  REQUIRE(parse_lr_scheduler("cosine_with_restarts") == LrSchedulerType::cosine_with_restarts);
  REQUIRE(to_string(LrSchedulerType::constant_with_warmup) == "constant_with_warmup");
  REQUIRE_THROWS_WITH(parse_lr_scheduler("piecewise"),
                      Catch::Contains("unknown lr_scheduler 'piecewise'"));
  LrScheduleOptions o;
  o.num_training_steps = 0;
  REQUIRE_THROWS_WITH(get_scheduler("linear", o),
                      Catch::Contains("linear needs num_training_steps > 0, got 0"));
  REQUIRE_NOTHROW(get_scheduler("constant", o));
  REQUIRE_THROWS_WITH(make("linear").multiplier(-1), Catch::Contains("step is -1"));
  REQUIRE(scale_lr(1e-4, 4, 2) == Approx(8e-4));
  REQUIRE(scale_lr(1e-4, 2, 3, 2) == Approx(1.2e-3));
  REQUIRE_THROWS_WITH(scale_lr(1e-4, 0, 1), Catch::Contains("expected all > 0"));
}
