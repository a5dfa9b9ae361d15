// The fused noise + forward diffusion + target pass against a plain scalar reference in double.
#include <omp.h>

#include <catch2/catch.hpp>
#include <vector>

#include "difftrain/kernels/forward_diffusion.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::kernels;

namespace {
Tensor4<float> random_tensor(std::size_t b, std::size_t c, std::size_t h, std::size_t w,
                             std::uint64_t seed) {
  Tensor4<float> x = xt::zeros<float>({b, c, h, w});
  fill_normal(std::span<float>(x.data(), x.size()), {seed, 99});
  return x;
}

struct Reference {
  std::vector<double> x_t, target, eps;
};

// x_t = a·x0 + s·(eps + γ·ξ), eps = n + offset[b,c]; target by prediction type; all in double.
Reference reference(const Tensor4<float>& x0, const std::vector<float>& a,
                    const std::vector<float>& s, PredictionType type, const FusedNoise& noise) {
  const auto& sh = x0.shape();
  const std::size_t n = x0.size(), plane = sh[2] * sh[3], per_sample = sh[1] * plane;
  std::vector<float> normals(n), xi(n);
  fill_normal(normals, noise.noise);
  fill_normal(xi, noise.perturbation);
  Reference r;
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t b = i / per_sample, bc = i / plane;
    const double eps = double(normals[i]) + (noise.offset.empty() ? 0.0 : noise.offset[bc]);
    const double model_eps = eps + double(noise.input_perturbation) * xi[i];
    const double x = x0.data()[i];
    r.eps.push_back(eps);
    r.x_t.push_back(a[b] * x + s[b] * model_eps);
    switch (type) {
      case PredictionType::epsilon:
        r.target.push_back(eps);
        break;
      case PredictionType::v_prediction:
        r.target.push_back(a[b] * eps - s[b] * x);
        break;
      case PredictionType::sample:
        r.target.push_back(x);
        break;
    }
  }
  return r;
}
}  // namespace

TEST_CASE("fused_noise_forward_target matches the scalar reference") {
  const auto type =
      GENERATE(PredictionType::epsilon, PredictionType::v_prediction, PredictionType::sample);
  // Odd sizes: planes of 21 elements, so groups of 64 straddle channels and samples.
  const Tensor4<float> x0 = random_tensor(3, 5, 7, 3, 1);
  const std::vector<float> a = {0.99f, 0.5f, 0.0f}, s = {0.141f, 0.866f, 1.0f};
  std::vector<float> offset(15);
  for (std::size_t i = 0; i < offset.size(); ++i) offset[i] = 0.01f * float(i) - 0.05f;
  const float gamma = GENERATE(0.0f, 0.1f);
  const FusedNoise noise{{7, 3}, offset, gamma, {7, 4}};
  const DiffusionCoefficients k(a, s, type);
  Tensor4<float> x_t, target, eps;
  fused_noise_forward_target(x0, k, noise, x_t, target, &eps);
  const Reference ref = reference(x0, a, s, type, noise);
  // One fma against separate roundings: a few float ulps.
  REQUIRE_CLOSE(x_t, ref.x_t, 1e-6, 1e-6);
  REQUIRE_CLOSE(target, ref.target, 1e-6, 1e-6);
  REQUIRE_CLOSE(eps, ref.eps, 1.2e-7, 1e-9);  // n + offset: one float rounding
}

TEST_CASE("fused pass on a SIMD-friendly shape matches the reference; v target at ᾱ = 0 is −x0") {
  const Tensor4<float> x0 = random_tensor(2, 4, 16, 16, 2);
  const std::vector<float> a = {0.0f, 0.7f}, s = {1.0f, 0.714142842854285f};
  const FusedNoise noise{{11, 0}, {}, 0.0f, {}};
  const DiffusionCoefficients k(a, s, PredictionType::v_prediction);
  Tensor4<float> x_t, target;
  fused_noise_forward_target(x0, k, noise, x_t, target);
  const Reference ref = reference(x0, a, s, PredictionType::v_prediction, noise);
  REQUIRE_CLOSE(x_t, ref.x_t, 1e-6, 1e-6);
  REQUIRE_CLOSE(target, ref.target, 1e-6, 1e-6);
  for (std::size_t i = 0; i < 4 * 16 * 16; ++i) REQUIRE(target.data()[i] == -x0.data()[i]);
}

TEST_CASE("fused pass is bitwise identical for 1 and 2 threads") {
  const Tensor4<float> x0 = random_tensor(4, 4, 32, 33, 3);
  const std::vector<float> a = {0.9f, 0.8f, 0.3f, 0.1f}, s = {0.43f, 0.6f, 0.95f, 0.99f};
  std::vector<float> offset(16, 0.05f);
  const FusedNoise noise{{5, 1}, offset, 0.1f, {5, 2}};
  const DiffusionCoefficients k(a, s, PredictionType::v_prediction);
  Tensor4<float> x1, t1, x2, t2;
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  fused_noise_forward_target(x0, k, noise, x1, t1);
  omp_set_num_threads(2);
  fused_noise_forward_target(x0, k, noise, x2, t2);
  omp_set_num_threads(saved);
  REQUIRE((x1 == x2));
  REQUIRE((t1 == t2));
}

TEST_CASE("fused pass matches the reference when threads split planes of odd size") {
  // 157 groups of 64 (parallel above 64) over planes of 667 elements: each thread's first group
  // starts inside a plane and most groups straddle two, so the cached (sample, channel) plane is
  // exercised at every thread count, with offsets and perturbation on.
  const Tensor4<float> x0 = random_tensor(3, 5, 23, 29, 4);
  const std::vector<float> a = {0.95f, 0.6f, 0.2f}, s = {0.312f, 0.8f, 0.98f};
  std::vector<float> offset(15);
  for (std::size_t i = 0; i < offset.size(); ++i) offset[i] = 0.02f * float(i) - 0.1f;
  const FusedNoise noise{{13, 2}, offset, 0.05f, {13, 5}};
  const DiffusionCoefficients k(a, s, PredictionType::v_prediction);
  const Reference ref = reference(x0, a, s, PredictionType::v_prediction, noise);
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2, 3}) {
    INFO(threads << " threads");
    omp_set_num_threads(threads);
    Tensor4<float> x_t, target, eps;
    fused_noise_forward_target(x0, k, noise, x_t, target, &eps);
    REQUIRE_CLOSE(x_t, ref.x_t, 1e-6, 1e-6);
    REQUIRE_CLOSE(target, ref.target, 1e-6, 1e-6);
    REQUIRE_CLOSE(eps, ref.eps, 1.2e-7, 1e-9);
  }
  omp_set_num_threads(saved);
}

TEST_CASE("forward_target with a given noise tensor matches the reference and the fused pass") {
  const Tensor4<float> x0 = random_tensor(2, 3, 5, 5, 4);
  const std::vector<float> a = {0.8f, 0.25f}, s = {0.6f, 0.968245836551854f};
  const FusedNoise noise{{9, 9}, {}, 0.0f, {}};
  const DiffusionCoefficients k(a, s, PredictionType::v_prediction);
  Tensor4<float> eps = xt::zeros<float>(x0.shape());
  fill_normal(std::span<float>(eps.data(), eps.size()), noise.noise);
  Tensor4<float> x_t, target, fx_t, ftarget;
  forward_target(x0, eps, k, x_t, target);
  fused_noise_forward_target(x0, k, noise, fx_t, ftarget);
  // Same formula; SIMD body and scalar tail may round the fma differently (a few ulps).
  REQUIRE_CLOSE(x_t, fx_t, 1e-6, 1e-6);
  REQUIRE_CLOSE(target, ftarget, 1e-6, 1e-6);
  Tensor4<float> xi = eps * 0.5f, px_t, ptarget;
  forward_target(x0, eps, k, px_t, ptarget, &xi);
  for (std::size_t i = 0; i < x0.size(); ++i) {
    const std::size_t b = i / 75;
    REQUIRE(px_t.data()[i] ==
            Approx(a[b] * x0.data()[i] + s[b] * 1.5 * eps.data()[i]).margin(1e-6));
  }
  REQUIRE((ptarget == target));  // input perturbation never reaches the target
}

TEST_CASE("forward diffusion rejects mismatched inputs with named errors") {
  const Tensor4<float> x0 = random_tensor(2, 4, 8, 8, 5);
  const std::vector<float> a = {1.0f, 1.0f}, s = {0.0f, 0.0f};
  const DiffusionCoefficients k(a, s, PredictionType::epsilon);
  Tensor4<float> x_t, target;
  const Tensor4<float> bad_noise = xt::zeros<float>({2, 4, 8, 9});
  REQUIRE_THROWS_WITH(forward_target(x0, bad_noise, k, x_t, target),
                      "forward_target: noise has shape [2,4,8,9], expected [2,4,8,8]");
  const std::vector<float> three = {1, 1, 1};
  const DiffusionCoefficients k3(three, three, PredictionType::epsilon);
  REQUIRE_THROWS_WITH(forward_target(x0, x0, k3, x_t, target),
                      Catch::Contains("coefficients for 3 samples, expected 2"));
  const std::vector<float> offset(3);
  REQUIRE_THROWS_WITH(fused_noise_forward_target(x0, k, FusedNoise{{}, offset, 0, {}}, x_t, target),
                      Catch::Contains("offset has 3 entries, expected 8"));
  const std::vector<float> one = {1};
  REQUIRE_THROWS_AS(DiffusionCoefficients(a, one, PredictionType::epsilon), Error);
}
