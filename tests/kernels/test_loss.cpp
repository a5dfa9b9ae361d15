// loss_and_grad against a scalar double reference and central differences.
#include <omp.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "difftrain/core/random.hpp"
#include "difftrain/kernels/loss.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::kernels;

namespace {
Tensor4<float> random_tensor(std::vector<std::size_t> shape, std::uint64_t seed, float scale = 1) {
  Tensor4<float> x = xt::zeros<float>(shape);
  fill_normal(std::span<float>(x.data(), x.size()), {seed, 5});
  return x * scale;
}

double elementwise(LossType type, double d, double c) {
  switch (type) {
    case LossType::l2:
      return d * d;
    case LossType::l1:
      return std::abs(d);
    case LossType::huber:
      return 2 * c * (std::sqrt(d * d + c * c) - c);
    case LossType::smooth_l1:
      return 2 * (std::sqrt(d * d + c * c) - c);
  }
  return 0;
}

// L = (1/B) Σ_b w_b·(1/CHW) Σ m·ℓ(pred − target), in double.
double reference_loss(const std::vector<double>& pred, const Tensor4<float>& target, LossType type,
                      const std::vector<float>& w, const std::vector<float>& c,
                      const Tensor4<float>* mask, std::vector<double>* per_sample = nullptr) {
  const auto& sh = target.shape();
  const std::size_t plane = sh[2] * sh[3], per = sh[1] * plane;
  double total = 0;
  for (std::size_t b = 0; b < sh[0]; ++b) {
    double sum = 0;
    for (std::size_t i = 0; i < per; ++i) {
      const std::size_t k = b * per + i;
      double m = 1;
      if (mask) m = mask->shape()[1] == 1 ? mask->data()[b * plane + i % plane] : mask->data()[k];
      sum += m * elementwise(type, pred[k] - target.data()[k], c.empty() ? 0 : c[b]);
    }
    if (per_sample) per_sample->push_back(sum / double(per));
    total += w[b] * sum / double(per);
  }
  return total / double(sh[0]);
}
}  // namespace

TEST_CASE("loss_and_grad matches the reference loss and central differences") {
  const LossType type = GENERATE(LossType::l2, LossType::l1, LossType::huber, LossType::smooth_l1);
  const int mask_kind = GENERATE(0, 1, 2);  // none, [B,1,H,W], [B,C,H,W]
  const std::vector<std::size_t> shape = {3, 5, 7, 9};
  const Tensor4<float> pred = random_tensor(shape, 1), target = random_tensor(shape, 2);
  Tensor4<float> mask;
  if (mask_kind == 1) mask = random_tensor({3, 1, 7, 9}, 3) * 0.5f + 1.0f;
  if (mask_kind == 2) mask = random_tensor(shape, 4) * 0.5f + 1.0f;
  const std::vector<float> w = {0.5f, 1.0f, 2.5f}, c = {0.1f, 0.3f, 1.0f};
  const std::vector<float> no_c;
  const auto& cc = uses_huber_c(type) ? c : no_c;
  Tensor4<float> grad;
  const LossResult r = loss_and_grad(pred, target, type, w, cc, mask_kind ? &mask : nullptr, &grad);
  std::vector<double> p(pred.begin(), pred.end()), per_sample;
  const double expected =
      reference_loss(p, target, type, w, cc, mask_kind ? &mask : nullptr, &per_sample);
  REQUIRE(r.loss == Approx(expected).epsilon(1e-6));
  REQUIRE_CLOSE(r.per_sample, per_sample, 1e-6, 0);
  // dL/dpred by central differences in double at a spread of elements.
  for (std::size_t k = 0; k < pred.size(); k += 37) {
    const double h = 1e-4;
    std::vector<double> plus = p, minus = p;
    plus[k] += h;
    minus[k] -= h;
    const double numeric =
        (reference_loss(plus, target, type, w, cc, mask_kind ? &mask : nullptr) -
         reference_loss(minus, target, type, w, cc, mask_kind ? &mask : nullptr)) /
        (2 * h);
    INFO("element " << k);
    REQUIRE(grad.data()[k] == Approx(numeric).epsilon(1e-4).margin(1e-9));
  }
}

TEST_CASE("loss_and_grad closed forms: l2 of a constant difference, huber limits") {
  const std::vector<std::size_t> shape = {2, 4, 8, 8};
  const Tensor4<float> target = xt::zeros<float>(shape);
  const Tensor4<float> pred = xt::ones<float>(shape) * 0.5f;
  const std::vector<float> w = {1.0f, 3.0f};
  Tensor4<float> grad;
  // l2: ℓ = 0.25 everywhere; L = (1·0.25 + 3·0.25)/2 = 0.5; dL/dpred = w·2·0.5/(2·256).
  LossResult r = loss_and_grad(pred, target, LossType::l2, w, {}, nullptr, &grad);
  REQUIRE(r.loss == Approx(0.5).epsilon(1e-12));
  REQUIRE(grad(0, 0, 0, 0) == Approx(1.0 / 512).epsilon(1e-6));
  REQUIRE(grad(1, 3, 7, 7) == Approx(3.0 / 512).epsilon(1e-6));
  // huber with c ≫ d is ≈ d² (2c(√(d²+c²) − c) = d² − d⁴/(4c²) + …); smooth_l1 with c ≪ d is
  // ≈ 2|d| − 2c.
  const std::vector<float> big_c = {1000.0f, 1000.0f}, small_c = {1e-3f, 1e-3f};
  r = loss_and_grad(pred, target, LossType::huber, w, big_c);
  REQUIRE(r.per_sample[0] == Approx(0.25).epsilon(1e-4));
  r = loss_and_grad(pred, target, LossType::smooth_l1, w, small_c);
  REQUIRE(r.per_sample[1] == Approx(2 * 0.5 - 2e-3).epsilon(1e-4));
}

TEST_CASE("loss_and_grad is bitwise identical for 1 and 2 threads") {
  const std::vector<std::size_t> shape = {4, 4, 64, 65};
  const Tensor4<float> pred = random_tensor(shape, 7), target = random_tensor(shape, 8);
  const std::vector<float> w = {1, 2, 3, 4}, c = {0.1f, 0.2f, 0.3f, 0.4f};
  Tensor4<float> g1, g2;
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const LossResult r1 = loss_and_grad(pred, target, LossType::huber, w, c, nullptr, &g1);
  omp_set_num_threads(2);
  const LossResult r2 = loss_and_grad(pred, target, LossType::huber, w, c, nullptr, &g2);
  omp_set_num_threads(saved);
  REQUIRE(r1.loss == r2.loss);
  REQUIRE(r1.per_sample == r2.per_sample);
  REQUIRE((g1 == g2));
}

TEST_CASE("loss_and_grad rejects bad input with named errors") {
  const std::vector<std::size_t> shape = {2, 4, 8, 8};
  const Tensor4<float> pred = random_tensor(shape, 1);
  const Tensor4<float> target = xt::zeros<float>({2, 4, 8, 9});
  const std::vector<float> w2 = {1, 1}, w3 = {1, 1, 1}, c_bad = {0.1f, 0.0f};
  REQUIRE_THROWS_WITH(loss_and_grad(pred, target, LossType::l2, w2),
                      "loss_and_grad: target has shape [2,4,8,9], expected [2,4,8,8]");
  REQUIRE_THROWS_WITH(loss_and_grad(pred, pred, LossType::l2, w3),
                      "loss_and_grad: weights has 3 entries, expected 2");
  REQUIRE_THROWS_WITH(loss_and_grad(pred, pred, LossType::huber, w2),
                      Catch::Contains("huber_c has 0 entries, expected 2"));
  REQUIRE_THROWS_WITH(loss_and_grad(pred, pred, LossType::huber, w2, c_bad),
                      Catch::Contains("huber_c[1] is 0, expected > 0"));
  const Tensor4<float> bad_mask = xt::ones<float>({2, 1, 8, 7});
  REQUIRE_THROWS_WITH(loss_and_grad(pred, pred, LossType::l2, w2, {}, &bad_mask),
                      "loss_and_grad: mask has shape [2,1,8,7], expected [2,1,8,8]");
  REQUIRE_THROWS_AS(parse_loss_type("l3"), Error);
}
