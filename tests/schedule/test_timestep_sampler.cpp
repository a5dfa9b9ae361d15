// Timestep samplers: range, uniformity (chi-square), diffusers' bias probabilities, determinism.
#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "difftrain/schedule/timestep_sampler.hpp"

using namespace difftrain;

namespace {
// Pearson's chi-square of counts against expected probabilities.
double chi_square(const std::vector<std::size_t>& counts, const std::vector<double>& p,
                  std::size_t n) {
  double chi = 0;
  for (std::size_t i = 0; i < counts.size(); ++i) {
    const double e = p[i] * double(n);
    chi += (double(counts[i]) - e) * (double(counts[i]) - e) / e;
  }
  return chi;
}
}  // namespace

TEST_CASE("UniformTimesteps: inside [min, max), uniform, deterministic in the stream") {
  const UniformTimesteps sampler(1000, 100, 300);
  const std::size_t n = 200000;
  std::vector<std::int64_t> t(n);
  sampler.sample(t, {1, 2});
  std::vector<std::size_t> counts(200, 0);
  for (auto v : t) {
    REQUIRE((100 <= v && v < 300));
    ++counts[std::size_t(v - 100)];
  }
  // 199 degrees of freedom: mean 199, sd √398 ≈ 20; 199 + 6·20 = 319 fails a correct sampler with
  // probability < 1e-7 (and the stream is fixed, so the test is deterministic).
  REQUIRE(chi_square(counts, std::vector<double>(200, 1.0 / 200), n) < 319);
  std::vector<std::int64_t> again(n);
  sampler.sample(again, {1, 2});
  REQUIRE(again == t);
  sampler.sample(again, {1, 3});
  REQUIRE(again != t);
  const UniformTimesteps full(1000);
  REQUIRE(full.min_timestep == 0);
  REQUIRE(full.max_timestep == 1000);
  REQUIRE_THROWS_WITH(UniformTimesteps(1000, 500, 500), Catch::Contains("range [500, 500)"));
  REQUIRE_THROWS_AS(UniformTimesteps(1000, -1, 10), Error);
}

TEST_CASE(
    "BiasedTimesteps: diffusers' weights for later/earlier/range, and sampling follows them") {
  TimestepBiasOptions later;
  later.strategy = TimestepBiasStrategy::later;
  later.multiplier = 2.0;
  later.portion = 0.25;
  const BiasedTimesteps sampler(1000, later);
  // 750 weights 1 and 250 weights 2: total 1250.
  REQUIRE(sampler.probabilities()[0] == Approx(1.0 / 1250));
  REQUIRE(sampler.probabilities()[749] == Approx(1.0 / 1250));
  REQUIRE(sampler.probabilities()[750] == Approx(2.0 / 1250));
  REQUIRE(sampler.probabilities()[999] == Approx(2.0 / 1250));
  const std::size_t n = 200000;
  std::vector<std::int64_t> t(n);
  sampler.sample(t, {5, 5});
  std::size_t late = 0;
  for (auto v : t) {
    REQUIRE((0 <= v && v < 1000));
    late += v >= 750;
  }
  // P(t ≥ 750) = 0.4: binomial sd √(n·0.24) ≈ 219; allow 6 sd.
  REQUIRE(std::abs(double(late) - 0.4 * n) < 6 * 219);

  TimestepBiasOptions earlier = later;
  earlier.strategy = TimestepBiasStrategy::earlier;
  earlier.multiplier = 0.5;
  const BiasedTimesteps early(1000, earlier);
  REQUIRE(early.probabilities()[0] == Approx(0.5 / 875));
  REQUIRE(early.probabilities()[250] == Approx(1.0 / 875));

  TimestepBiasOptions range;
  range.strategy = TimestepBiasStrategy::range;
  range.begin = 200;
  range.end = 300;
  range.multiplier = 3;
  const BiasedTimesteps ranged(1000, range);
  REQUIRE(ranged.probabilities()[199] == Approx(1.0 / 1200));
  REQUIRE(ranged.probabilities()[200] == Approx(3.0 / 1200));
  REQUIRE(ranged.probabilities()[300] == Approx(1.0 / 1200));

  TimestepBiasOptions none;
  const BiasedTimesteps flat(1000, none);
  REQUIRE(flat.probabilities()[123] == Approx(1e-3));
  range.end = 1001;
  REQUIRE_THROWS_WITH(BiasedTimesteps(1000, range), Catch::Contains("range [200, 1001)"));
  later.multiplier = 0;
  REQUIRE_THROWS_WITH(BiasedTimesteps(1000, later), Catch::Contains("multiplier is 0"));
  later.multiplier = 2;
  later.portion = 1.5;
  REQUIRE_THROWS_AS(BiasedTimesteps(1000, later), Error);
  REQUIRE_THROWS_AS(parse_timestep_bias_strategy("middle"), Error);
}
