#pragma once
// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), as lucidrains'
// lion-pytorch (lion_pytorch/lion_pytorch.py, update_fn) and kohya sd-scripts' "Lion" run it.
// Same interface, chunking and thread-count independence as AdamW (optimizer.hpp).
//
// State for checkpoints: "<name>.exp_avg" (shaped like the parameter); step_count() counts the
// updates (Lion itself does not use it).

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>
#include <xsimd/xsimd.hpp>
#include <xtensor/xarray.hpp>

#include "difftrain/core/error.hpp"
#include "difftrain/train/optimizer.hpp"

namespace difftrain::train {

/// Lion's hyperparameters besides lr and weight_decay, which come from each group.
struct LionOptions {
  std::array<double, 2> betas{0.9, 0.99};
};

namespace detail {

struct LionCoefficients {
  float decay, lr, beta1, one_minus_beta1, beta2, one_minus_beta2;
};

template <class Arch>
void lion_kernel(float* p, const float* g, float* m, std::size_t n, const LionCoefficients& k) {
  using F = xsimd::batch<float, Arch>;
  constexpr std::size_t W = F::size;
  const F decay(k.decay), lr(k.lr), b1(k.beta1), c1(k.one_minus_beta1), b2(k.beta2),
      c2(k.one_minus_beta2), zero(0.0f), one(1.0f), minus_one(-1.0f);
  std::size_t i = 0;
  for (; i + W <= n; i += W) {
    const F gi = F::load_unaligned(g + i), mi = F::load_unaligned(m + i);
    const F c = b1 * mi + c1 * gi;
    const F sign = xsimd::select(c > zero, one, xsimd::select(c < zero, minus_one, zero));
    (F::load_unaligned(p + i) * decay - lr * sign).store_unaligned(p + i);
    (b2 * mi + c2 * gi).store_unaligned(m + i);
  }
  for (; i < n; ++i) {  // scalar tail: the same operations in the same order
    const float c = k.beta1 * m[i] + k.one_minus_beta1 * g[i];
    const float sign = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
    p[i] = p[i] * k.decay - k.lr * sign;
    m[i] = k.beta2 * m[i] + k.one_minus_beta2 * g[i];
  }
}

}  // namespace detail

/// Lion (lucidrains/lion-pytorch lion_pytorch.py; kohya "Lion"), decoupled_weight_decay off.
/// lr and weight_decay from each group (lr · lr_scale), betas from LionOptions. sign(0) = 0 as
/// torch.sign. With c = β1·m + (1−β1)·g:
// p ← p·(1 − lr·wd) − lr·sign(c);  m ← β2·m + (1 − β2)·g
class Lion : public detail::OptimizerBase {
 public:
  static constexpr std::string_view kName = "lion";
  // What kohya records as ss_optimizer (the Python module + "." + class).
  static constexpr std::string_view kKohyaClass = "lion_pytorch.lion_pytorch.Lion";

  explicit Lion(std::vector<ParamGroup> groups, LionOptions options = {})
      : OptimizerBase(std::move(groups)), options_(options) {
    for (int k = 0; k < 2; ++k)
      detail::require_beta("Lion", "betas[" + std::to_string(k) + "]", options_.betas[k], true);
    build("Lion");
    exp_avg_ = zero_state();
  }

  /// One update from the current gradients, with lr = group.lr · lr_scale.
  void step(double lr_scale = 1.0) {
    check_lr_scale("Lion::step", lr_scale);
    const std::vector<detail::ParamSpans> params = checked_params("Lion::step");
    std::vector<detail::LionCoefficients> k(groups_.size());
    const double b1 = options_.betas[0], b2 = options_.betas[1];
    for (std::size_t gi = 0; gi < groups_.size(); ++gi) {
      const double lr = groups_[gi].lr * lr_scale;
      k[gi] = {float(1.0 - lr * groups_[gi].weight_decay),
               float(lr),
               float(b1),
               float(1.0 - b1),
               float(b2),
               float(1.0 - b2)};
    }
    for_each_chunk([&](const detail::UpdateChunk& ch) {
      const detail::ParamSpans& p = params[ch.slot];
      detail::lion_kernel<xsimd::default_arch>(
          p.value.data() + ch.offset, p.grad.data() + ch.offset,
          exp_avg_[ch.slot].data() + ch.offset, ch.size, k[ch.group]);
    });
    ++step_count_;
  }

  const LionOptions& options() const { return options_; }

  /// "<name>.exp_avg" for every parameter.
  std::map<std::string, xt::xarray<float>> state_dict() const {
    std::map<std::string, xt::xarray<float>> out;
    detail::export_state(out, groups_, "exp_avg", exp_avg_);
    return out;
  }

  /// Strict: every key of state_dict() with its shape, nothing else.
  void load_state_dict(const std::map<std::string, xt::xarray<float>>& state,
                       std::int64_t step_count) {
    detail::StateReader in = read_state("Lion::load_state_dict", state, step_count);
    auto m = in.per_parameter("exp_avg");
    in.finish();
    exp_avg_ = std::move(m);
    step_count_ = step_count;
  }

 private:
  LionOptions options_;
  std::vector<std::vector<float>> exp_avg_;
};

}  // namespace difftrain::train
