// EMA decay sequence and shadow values against diffusers' EMAModel formula, tracked in double.
#include <catch2/catch.hpp>
#include <cmath>
#include <string>
#include <vector>

#include "difftrain/train/ema.hpp"

using namespace difftrain;
using namespace difftrain::train;

namespace {
struct TwoParams {
  nn::Parameter<float> w{{3}}, frozen{{2}, false};
  template <class V>
  void for_each_parameter(const std::string& prefix, V&& visit) {
    visit(nn::join_name(prefix, "w"), w);
    visit(nn::join_name(prefix, "frozen"), frozen);
  }
};
// One parameter of 3 × kElementwiseSize values: EMA's update runs in parallel.
struct BigParam {
  nn::Parameter<float> w{{3 * parallel::kElementwiseSize}};
  template <class V>
  void for_each_parameter(const std::string& prefix, V&& visit) {
    visit(nn::join_name(prefix, "w"), w);
  }
};
}  // namespace

TEST_CASE("EMA decay: 0 for the first update, then (1+k)/(10+k) clamped to [min_decay, decay]") {
  TwoParams m;
  EmaOptions o;  // defaults: decay 0.9999, update_after_step 0, no warmup
  const EmaModel ema = EmaModel::from_module(m, o);
  REQUIRE(ema.get_decay(1) == 0.0);
  REQUIRE(ema.get_decay(2) == Approx(2.0 / 11.0));  // k = 1
  REQUIRE(ema.get_decay(3) == Approx(3.0 / 12.0));
  REQUIRE(ema.get_decay(101) == Approx(101.0 / 110.0));
  REQUIRE(ema.get_decay(1000000) == 0.9999);  // (1+k)/(10+k) > 0.9999: capped
  o.update_after_step = 3;
  o.decay = 0.5;
  o.min_decay = 0.2;
  const EmaModel late = EmaModel::from_module(m, o);
  for (int n = 1; n <= 4; ++n) REQUIRE(late.get_decay(n) == 0.0);  // k = n − 4 <= 0
  REQUIRE(late.get_decay(5) == Approx(0.2));                       // k = 1: 2/11 < min_decay
  REQUIRE(late.get_decay(8) == Approx(5.0 / 14.0));                // k = 4
  REQUIRE(late.get_decay(20) == 0.5);                              // k = 16: 17/26 > decay
}

TEST_CASE("EMA warmup: 1 − (1 + k/inv_gamma)^(−power)") {
  TwoParams m;
  EmaOptions o;
  o.use_ema_warmup = true;
  o.inv_gamma = 2.0;
  o.power = 0.75;
  const EmaModel ema = EmaModel::from_module(m, o);
  REQUIRE(ema.get_decay(1) == 0.0);
  REQUIRE(ema.get_decay(2) == Approx(1 - std::pow(1.5, -0.75)));
  REQUIRE(ema.get_decay(11) == Approx(1 - std::pow(6.0, -0.75)));
}

TEST_CASE("EMA shadow follows shadow − (1 − d)(shadow − p); copy_to, store, restore") {
  TwoParams m;
  m.w.value = xt::xarray<float>({1.0f, -2.0f, 0.5f});
  EmaModel ema = EmaModel::from_module(m, {});
  std::vector<double> shadow = {1.0, -2.0, 0.5};
  for (int n = 1; n <= 6; ++n) {
    for (std::size_t i = 0; i < 3; ++i) m.w.value(i) += float(0.25 * n * (i + 1));
    const double d = n == 1 ? 0.0 : (1.0 + (n - 1)) / (10.0 + (n - 1));
    REQUIRE(ema.step() == Approx(d));
    for (std::size_t i = 0; i < 3; ++i) shadow[i] -= (1 - d) * (shadow[i] - m.w.value(i));
  }
  REQUIRE(ema.optimization_step() == 6);
  const auto state = ema.state_dict();
  REQUIRE(state.size() == 1);  // the frozen parameter has no shadow
  for (std::size_t i = 0; i < 3; ++i) REQUIRE(state.at("w")(i) == Approx(shadow[i]).epsilon(1e-6));

  const xt::xarray<float> live = m.w.value;
  ema.store();
  ema.copy_to();
  REQUIRE((m.w.value == state.at("w")));
  ema.restore();
  REQUIRE((m.w.value == live));
  REQUIRE_THROWS_WITH(ema.restore(), Catch::Contains("nothing stored"));

  EmaModel other = EmaModel::from_module(m, {});
  other.load_state_dict(state, 6);
  REQUIRE(other.optimization_step() == 6);
  REQUIRE((other.state_dict().at("w") == state.at("w")));
  REQUIRE_THROWS_WITH(other.load_state_dict({}, 1), Catch::Contains("missing w"));
  EmaOptions bad;
  bad.min_decay = 2;
  REQUIRE_THROWS_WITH(EmaModel::from_module(m, bad), Catch::Contains("min_decay is 2"));
}

TEST_CASE("EMA of a parameter above the parallel threshold: the same on 1, 2 and 3 threads") {
  // Also what scripts/tsan (ThreadSanitizer) needs to see EMA's loop on several threads.
  auto shadow = [](int threads) {
#ifdef _OPENMP
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
#endif
    BigParam m;
    for (std::size_t i = 0; i < m.w.value.size(); ++i) m.w.value(i) = float(i % 97) / 7.0f;
    EmaModel ema = EmaModel::from_module(m, {});
    for (int n = 1; n <= 3; ++n) {
      m.w.value += float(n) * 0.125f;
      ema.step();
    }
#ifdef _OPENMP
    omp_set_num_threads(saved);
#endif
    return ema.state_dict().at("w");
  };
  const xt::xarray<float> one = shadow(1);
  REQUIRE((shadow(2) == one));
  REQUIRE((shadow(3) == one));
}
