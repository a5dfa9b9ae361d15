// nn/init.hpp: PyTorch's default initialisation, checked by its bounds and moments.

#include <catch2/catch.hpp>
#include <cmath>
#include <string>

#include "difftrain/nn/conv2d.hpp"
#include "difftrain/nn/embedding.hpp"
#include "difftrain/nn/group_norm.hpp"
#include "difftrain/nn/init.hpp"
#include "difftrain/nn/linear.hpp"

using namespace difftrain;

namespace {

// A module of each kind, named as diffusers names them.
struct Block {
  nn::Linear<float> proj{nn::LinearConfig{256, 64}};
  nn::Conv2d<float> conv{nn::Conv2dConfig{16, 32, 3}};
  nn::GroupNorm<float> norm{nn::GroupNormConfig{8, 32}};
  nn::Embedding<float> token_embedding{nn::EmbeddingConfig{100, 64}};

  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    proj.for_each_parameter(nn::join_name(prefix, "proj"), visit);
    conv.for_each_parameter(nn::join_name(prefix, "conv"), visit);
    norm.for_each_parameter(nn::join_name(prefix, "norm"), visit);
    token_embedding.for_each_parameter(nn::join_name(prefix, "token_embedding"), visit);
  }
};

// Mean and variance of a parameter's values.
std::pair<double, double> moments(const xt::xarray<float>& v) {
  double s = 0, s2 = 0;
  for (float x : v) s += x;
  const double mean = s / double(v.size());
  for (float x : v) s2 += (x - mean) * (x - mean);
  return {mean, s2 / double(v.size())};
}

void check_uniform(const xt::xarray<float>& v, std::size_t fan_in) {
  const double bound = 1 / std::sqrt(double(fan_in));
  for (float x : v) REQUIRE(std::abs(x) <= bound);
  const auto [mean, var] = moments(v);
  // U(−b, b): mean 0, variance b²/3; n ≥ 64 values, so 5 standard errors is loose but firm.
  const double n = double(v.size());
  CHECK(std::abs(mean) < 5 * bound / std::sqrt(3 * n));
  CHECK(var == Approx(bound * bound / 3).epsilon(5 * std::sqrt(0.8 / n)));
}

}  // namespace

TEST_CASE(
    "init_like_pytorch: Linear/Conv2d weights and biases U(±1/√fan_in), norms untouched, "
    "embeddings N(0,1)") {
  Block b;
  nn::init_like_pytorch<float>(b, RandomStream{42});
  check_uniform(b.proj.weight.value, 256);
  check_uniform(b.proj.bias.value, 256);
  check_uniform(b.conv.weight.value, 16 * 9);
  check_uniform(b.conv.bias.value, 16 * 9);
  for (float x : b.norm.weight.value) CHECK(x == 1.0f);
  for (float x : b.norm.bias.value) CHECK(x == 0.0f);
  const auto [mean, var] = moments(b.token_embedding.weight.value);
  CHECK(std::abs(mean) < 5 / std::sqrt(6400.0));
  CHECK(var == Approx(1.0).epsilon(0.1));
}

TEST_CASE("init_like_pytorch: a function of the seed only") {
  Block a, b, c;
  nn::init_like_pytorch<float>(a, RandomStream{1});
  nn::init_like_pytorch<float>(b, RandomStream{1});
  nn::init_like_pytorch<float>(c, RandomStream{2});
  const bool same_seed_same_values =
      a.conv.weight.value == b.conv.weight.value &&
      a.token_embedding.weight.value == b.token_embedding.weight.value;
  CHECK(same_seed_same_values);
  const bool other_seed_other_values = a.conv.weight.value != c.conv.weight.value;
  CHECK(other_seed_other_values);
  // Different parameters draw from different streams: the first values of proj.weight are not
  // those of proj.bias scaled (same bound 1/16, so equal draws would give equal values).
  CHECK(a.proj.weight.value(0, 0) != a.proj.bias.value(0));
}
