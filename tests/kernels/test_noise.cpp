// Offset noise, bilinear resize, pyramid noise and the unfused noise path.
#include <catch2/catch.hpp>
#include <cmath>
#include <vector>
#include <xtensor/xview.hpp>

#include "difftrain/kernels/forward_diffusion.hpp"
#include "difftrain/kernels/noise.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::kernels;

TEST_CASE("noise_offsets: k·N(0,1) per (sample, channel); adaptive adds scale·|mean|") {
  Tensor4<float> x0 = xt::zeros<float>({2, 3, 4, 4});
  for (std::size_t b = 0; b < 2; ++b)
    for (std::size_t c = 0; c < 3; ++c) xt::view(x0, b, c) = (c == 1 ? -1.0f : 0.5f) * float(b + 1);
  const RandomStream rs{3, 1};
  NoiseOptions options;
  REQUIRE(noise_offsets(options, x0, rs).empty());
  options.noise_offset = 0.1f;
  std::vector<float> normals(6);
  fill_normal(normals, rs.derive(0, StreamPurpose::noise_offset));
  const std::vector<float> plain = noise_offsets(options, x0, rs);
  REQUIRE(plain.size() == 6);
  for (std::size_t i = 0; i < 6; ++i) REQUIRE(plain[i] == Approx(0.1 * normals[i]));
  options.adaptive_noise_scale = 0.2f;
  const std::vector<float> adaptive = noise_offsets(options, x0, rs);
  for (std::size_t i = 0; i < 6; ++i) {
    const double mean = std::abs(x0.data()[i * 16]);
    REQUIRE(adaptive[i] == Approx((0.1 + 0.2 * mean) * normals[i]).epsilon(1e-6));
  }
  options.adaptive_noise_scale = -1.0f;  // k + scale·|mean| < 0 is clamped to 0 (kohya)
  for (float v : noise_offsets(options, x0, rs)) REQUIRE(v == 0.0f);
  options.adaptive_noise_scale = 0;
  options.noise_offset_random_strength = true;  // one U(0,1) factor for the batch
  const std::vector<float> random_strength = noise_offsets(options, x0, rs);
  const double factor = random_strength[0] / plain[0];
  REQUIRE(factor >= 0.0);
  REQUIRE(factor < 1.0);
  for (std::size_t i = 0; i < 6; ++i) REQUIRE(random_strength[i] == Approx(factor * plain[i]));
}

TEST_CASE("NoiseOptions::validate rejects negative and inconsistent settings") {
  NoiseOptions o;
  o.noise_offset = -0.1f;
  REQUIRE_THROWS_WITH(o.validate(), Catch::Contains("noise_offset is -0.1"));
  o = {};
  o.adaptive_noise_scale = 0.1f;
  REQUIRE_THROWS_WITH(o.validate(), Catch::Contains("adaptive_noise_scale needs noise_offset"));
  o = {};
  o.multires_noise_iterations = -1;
  REQUIRE_THROWS_AS(o.validate(), Error);
  o = {};
  o.input_perturbation = -0.5f;
  REQUIRE_THROWS_AS(o.validate(), Error);
}

TEST_CASE("resize_bilinear follows PyTorch's align_corners=False convention") {
  // 1-D 2 → 4 along each axis: weights (1,0), (.75,.25), (.25,.75), (0,1).
  const std::vector<float> in = {0, 4, 8, 12};  // [[0,4],[8,12]]
  std::vector<float> out(16);
  resize_bilinear(in.data(), 1, 2, 2, out.data(), 4, 4);
  const std::vector<float> row = {0, 1, 3, 4};
  const std::vector<float> col = {0, 2, 6, 8};
  for (std::size_t y = 0; y < 4; ++y)
    for (std::size_t x = 0; x < 4; ++x) REQUIRE(out[y * 4 + x] == Approx(row[x] + col[y]));
  // 1×1 → constant; identity when sizes agree.
  const std::vector<float> one = {2.5f};
  std::vector<float> out3(6);
  resize_bilinear(one.data(), 1, 1, 1, out3.data(), 2, 3);
  for (float v : out3) REQUIRE(v == 2.5f);
  std::vector<float> same(4);
  resize_bilinear(in.data(), 1, 2, 2, same.data(), 2, 2);
  REQUIRE(same == in);
}

TEST_CASE("pyramid noise: unit std, deterministic, more low-frequency energy") {
  Tensor4<float> noise = xt::zeros<float>({2, 4, 32, 32});
  fill_normal(std::span<float>(noise.data(), noise.size()), {1, 2});
  Tensor4<float> again = noise, plain = noise;
  pyramid_noise(noise, 6, 0.8f, {1, 7});
  pyramid_noise(again, 6, 0.8f, {1, 7});
  REQUIRE((noise == again));
  const double var = xt::variance(noise)() * double(noise.size()) / double(noise.size() - 1);
  REQUIRE(var == Approx(1.0).epsilon(1e-5));  // normalized by its own (unbiased) std
  // Neighbouring pixels become correlated (white noise has ~0 lag-1 correlation).
  auto lag1 = [](const Tensor4<float>& t) {
    double s = 0, n = 0;
    for (std::size_t p = 0; p < 8; ++p)
      for (std::size_t i = 0; i + 1 < 1024; ++i) {
        if ((i + 1) % 32 == 0) continue;
        s += double(t.data()[p * 1024 + i]) * t.data()[p * 1024 + i + 1];
        n += 1;
      }
    return s / n;
  };
  REQUIRE(std::abs(lag1(plain)) < 0.05);
  REQUIRE(lag1(noise) > 0.1);
  Tensor4<float> untouched = plain;
  pyramid_noise(untouched, 0, 0.3f, {1, 7});
  REQUIRE((untouched == plain));
}

TEST_CASE("sample_noise without pyramid noise gives the fused pass's eps") {
  const Tensor4<float> x0 = xt::ones<float>({2, 3, 5, 6});
  NoiseOptions options;
  options.noise_offset = 0.05f;
  const RandomStream step{42, 0};
  Tensor4<float> eps;
  sample_noise(options, x0, step, eps);
  const std::vector<float> offset = noise_offsets(options, x0, step);
  const std::vector<float> one = {1, 1}, zero = {0, 0};
  const DiffusionCoefficients k(zero, one, PredictionType::epsilon);
  Tensor4<float> x_t, target, fused_eps;
  fused_noise_forward_target(x0, k, FusedNoise{step.derive(0, StreamPurpose::noise), offset, 0, {}},
                             x_t, target, &fused_eps);
  REQUIRE((eps == fused_eps));
  REQUIRE((target == fused_eps));
}
