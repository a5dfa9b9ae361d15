// Uses the installed headers: a scheduler, the fused kernel and the loss, end to end.
#include <cmath>
#include <cstdio>
#include <difftrain/difftrain.hpp>

int main() {
  using namespace difftrain;
  const DdpmScheduler scheduler = DdpmScheduler::sd15();
  const Tensor4<float> x0 = xt::ones<float>({2, 4, 8, 8});
  const std::vector<float> a = {float(scheduler.sqrt_alpha_prod(10)),
                                float(scheduler.sqrt_alpha_prod(900))};
  const std::vector<float> s = {float(scheduler.sqrt_one_minus_alpha_prod(10)),
                                float(scheduler.sqrt_one_minus_alpha_prod(900))};
  const kernels::DiffusionCoefficients k(a, s, PredictionType::epsilon);
  Tensor4<float> x_t, target, grad;
  kernels::fused_noise_forward_target(x0, k, kernels::FusedNoise{{1, 0}, {}, 0, {}}, x_t, target);
  const std::vector<float> w = {1, 1};
  const auto loss =
      kernels::loss_and_grad(x_t, target, kernels::LossType::l2, w, {}, nullptr, &grad);
  std::printf("consumer: loss %.6f\n", loss.loss);
  return std::isfinite(loss.loss) && loss.loss > 0 ? 0 : 1;
}
