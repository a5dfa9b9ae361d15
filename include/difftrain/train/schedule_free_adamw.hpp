#pragma once
// Schedule-Free AdamW (Defazio et al. 2024, "The Road Less Scheduled"), as
// facebookresearch/schedule_free schedulefree/adamw_schedulefree.py (AdamWScheduleFree, the
// closure-free version) runs it; kohya sd-scripts' "AdamWScheduleFree".
//
// Three sequences: z (the SGD-like iterate, in the state), x (the average, what to evaluate and
// save) and y = (1−β1)·z + β1·x (where gradients are taken). In train mode the parameters hold y;
// eval() turns them into x and train() back into y, both by torch's lerp.
//
// State for checkpoints: "<name>.z" and "<name>.exp_avg_sq" (shaped like the parameter), and the
// scalars "schedule_free.group<i>.weight_sum", "schedule_free.group<i>.lr_max" per group and
// "schedule_free.train_mode" (1 or 0), each as optimizer.hpp's export_scalar stores a double
// (shape [5], exact). k is step_count(). Save the state together with the weights it belongs to:
// the reference saves both in eval mode (parameters = x); after loading such a pair, call train().
// Before the first step z does not exist yet (it is copied from the parameters then); a state
// saved that early holds the current parameters as z.

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

/// AdamWScheduleFree's hyperparameters (its defaults); lr comes from each group (· lr_scale,
/// normally a constant schedule). The groups' weight_decay, betas and eps are not read.
struct ScheduleFreeAdamWOptions {
  std::array<double, 2> betas{0.9, 0.999};
  double eps = 1e-8;
  double weight_decay = 0;
  std::int64_t warmup_steps = 0;
  double r = 0;
  double weight_lr_power = 2;
};

namespace detail {

// torch.lerp(self, end, weight) with a scalar weight, in float: the form depends on |weight| < 0.5.
template <class T>
T torch_lerp(const T& self, const T& end, float weight) {
  if (std::abs(weight) < 0.5f) return self + T(weight) * (end - self);
  return end - (end - self) * T(1.0f - weight);
}

template <class Arch>
void lerp_kernel(float* p, const float* end, std::size_t n, float weight) {
  using F = xsimd::batch<float, Arch>;
  constexpr std::size_t W = F::size;
  std::size_t i = 0;
  for (; i + W <= n; i += W)
    torch_lerp(F::load_unaligned(p + i), F::load_unaligned(end + i), weight).store_unaligned(p + i);
  for (; i < n; ++i) p[i] = torch_lerp(p[i], end[i], weight);
}

struct ScheduleFreeCoefficients {
  float beta2, one_minus_beta2, eps, decay, ckp1, y_step, lr;
};

template <class Arch>
void schedule_free_adamw_kernel(float* y, const float* g, float* z, float* v, std::size_t n,
                                const ScheduleFreeCoefficients& k) {
  using F = xsimd::batch<float, Arch>;
  constexpr std::size_t W = F::size;
  const F b2(k.beta2), c2(k.one_minus_beta2), eps(k.eps), decay(k.decay), y_step(k.y_step),
      lr(k.lr);
  const bool use_decay = k.decay != 0.0f;
  std::size_t i = 0;
  for (; i + W <= n; i += W) {
    const F gi = F::load_unaligned(g + i), yi = F::load_unaligned(y + i),
            zi = F::load_unaligned(z + i);
    const F vi = b2 * F::load_unaligned(v + i) + c2 * gi * gi;
    F gn = gi / (xsimd::sqrt(vi) + eps);
    if (use_decay) gn = gn + decay * yi;
    (torch_lerp(yi, zi, k.ckp1) + y_step * gn).store_unaligned(y + i);
    (zi - lr * gn).store_unaligned(z + i);
    vi.store_unaligned(v + i);
  }
  for (; i < n; ++i) {  // scalar tail: the same operations in the same order
    v[i] = k.beta2 * v[i] + k.one_minus_beta2 * g[i] * g[i];
    float gn = g[i] / (std::sqrt(v[i]) + k.eps);
    if (use_decay) gn = gn + k.decay * y[i];
    y[i] = torch_lerp(y[i], z[i], k.ckp1) + k.y_step * gn;
    z[i] = z[i] - k.lr * gn;
  }
}

}  // namespace detail

/// Schedule-Free AdamW (facebookresearch/schedule_free adamw_schedulefree.py). Update k = 0, 1, …
/// with lr_k = group.lr · lr_scale · min(1, (k+1)/warmup_steps) · √(1 − β2^(k+1)),
/// lr_max = max(lr_max, lr_k), w = (k+1)^r · lr_max^weight_lr_power, weight_sum += w,
/// c = w / weight_sum (0 when weight_sum is 0), and ĝ = g/(√v + ε) + wd·y:
// v ← β2·v + (1−β2)·g²;  y ← lerp(y, z, c) + lr_k·(β1·(1−c) − 1)·ĝ;  z ← z − lr_k·ĝ
/// Differences: the gradient is left as it was (the reference divides p.grad in place); step() in
/// eval mode throws before touching anything (the reference first updates lr_max and weight_sum).
class ScheduleFreeAdamW : public detail::OptimizerBase {
 public:
  static constexpr std::string_view kName = "adamw_schedulefree";
  // What kohya records as ss_optimizer (the Python module + "." + class).
  static constexpr std::string_view kKohyaClass =
      "schedulefree.adamw_schedulefree.AdamWScheduleFree";

  explicit ScheduleFreeAdamW(std::vector<ParamGroup> groups, ScheduleFreeAdamWOptions options = {})
      : OptimizerBase(std::move(groups)), options_(options) {
    constexpr std::string_view fn = "ScheduleFreeAdamW";
    const auto& o = options_;
    require(o.betas[0] > 0 && o.betas[0] < 1, fn, "betas[0] is ", o.betas[0],
            ", expected in (0, 1)");
    detail::require_beta(fn, "betas[1]", o.betas[1]);
    detail::require_nonnegative(fn, "eps", o.eps);
    detail::require_nonnegative(fn, "weight_decay", o.weight_decay);
    require(o.warmup_steps >= 0, fn, "warmup_steps is ", o.warmup_steps, ", expected >= 0");
    detail::require_nonnegative(fn, "r", o.r);
    detail::require_nonnegative(fn, "weight_lr_power", o.weight_lr_power);
    build(fn);
    exp_avg_sq_ = zero_state();  // z_ comes with the first step
    weight_sum_.assign(groups_.size(), 0.0);
    lr_max_.assign(groups_.size(), -1.0);
  }

  /// One update from the current gradients (taken at y), with lr = group.lr · lr_scale. Throws in
  /// eval mode.
  void step(double lr_scale = 1.0) {
    constexpr std::string_view fn = "ScheduleFreeAdamW::step";
    check_lr_scale(fn, lr_scale);
    require(train_mode_, fn, "the optimizer is in eval mode, expected train mode (call train())");
    const std::vector<detail::ParamSpans> params = checked_params(fn);
    if (!z_ready_) {
      z_ = parameter_values();
      z_ready_ = true;
    }
    const auto& o = options_;
    const double beta1 = o.betas[0], beta2 = o.betas[1], k = double(step_count_);
    std::vector<detail::ScheduleFreeCoefficients> c(groups_.size());
    for (std::size_t gi = 0; gi < groups_.size(); ++gi) {
      const double sched = step_count_ < o.warmup_steps ? (k + 1) / double(o.warmup_steps) : 1.0;
      const double bias_correction2 = 1 - std::pow(beta2, k + 1);
      const double lr = groups_[gi].lr * lr_scale * sched * std::sqrt(bias_correction2);
      lr_max_[gi] = std::max(lr, lr_max_[gi]);
      const double weight = std::pow(k + 1, o.r) * std::pow(lr_max_[gi], o.weight_lr_power);
      weight_sum_[gi] += weight;
      const double ckp1 = weight_sum_[gi] != 0 ? weight / weight_sum_[gi] : 0.0;
      c[gi] = {float(beta2), float(1 - beta2),
               float(o.eps), float(o.weight_decay),
               float(ckp1),  float(lr * (beta1 * (1 - ckp1) - 1)),
               float(lr)};
    }
    for_each_chunk([&](const detail::UpdateChunk& ch) {
      const detail::ParamSpans& p = params[ch.slot];
      detail::schedule_free_adamw_kernel<xsimd::default_arch>(
          p.value.data() + ch.offset, p.grad.data() + ch.offset, z_[ch.slot].data() + ch.offset,
          exp_avg_sq_[ch.slot].data() + ch.offset, ch.size, c[ch.group]);
    });
    ++step_count_;
  }

  /// Parameters y → x (the average, for evaluation and saving): p ← lerp(p, z, 1 − 1/β1). No-op
  /// in eval mode or before the first step.
  void eval() {
    if (!train_mode_) return;
    if (z_ready_) lerp_parameters(float(1 - 1 / options_.betas[0]));
    train_mode_ = false;
  }

  /// Parameters x → y: p ← lerp(p, z, 1 − β1). No-op in train mode or before the first step.
  void train() {
    if (train_mode_) return;
    if (z_ready_) lerp_parameters(float(1 - options_.betas[0]));
    train_mode_ = true;
  }

  bool is_train_mode() const { return train_mode_; }

  const ScheduleFreeAdamWOptions& options() const { return options_; }

  /// "<name>.z", "<name>.exp_avg_sq" for every parameter; the scalars named in the file comment.
  std::map<std::string, xt::xarray<float>> state_dict() const {
    std::map<std::string, xt::xarray<float>> out;
    if (z_ready_)
      detail::export_state(out, groups_, "z", z_);
    else  // what the first step will copy
      detail::export_state(out, groups_, "z", parameter_values());
    detail::export_state(out, groups_, "exp_avg_sq", exp_avg_sq_);
    for (std::size_t gi = 0; gi < groups_.size(); ++gi) {
      detail::export_scalar(out, group_key(gi, "weight_sum"), weight_sum_[gi]);
      detail::export_scalar(out, group_key(gi, "lr_max"), lr_max_[gi]);
    }
    detail::export_scalar(out, "schedule_free.train_mode", train_mode_ ? 1.0 : 0.0);
    return out;
  }

  /// Strict: every key of state_dict() with its shape, nothing else. Restores the mode too.
  void load_state_dict(const std::map<std::string, xt::xarray<float>>& state,
                       std::int64_t step_count) {
    detail::StateReader in = read_state("ScheduleFreeAdamW::load_state_dict", state, step_count);
    auto z = in.per_parameter("z");
    auto v = in.per_parameter("exp_avg_sq");
    std::vector<double> weight_sum(groups_.size()), lr_max(groups_.size());
    for (std::size_t gi = 0; gi < groups_.size(); ++gi) {
      weight_sum[gi] = in.scalar(group_key(gi, "weight_sum"));
      lr_max[gi] = in.scalar(group_key(gi, "lr_max"));
    }
    const double mode = in.scalar("schedule_free.train_mode", 1);
    if (mode != 0 && mode != 1)
      in.problem("schedule_free.train_mode is " + std::to_string(mode) + ", expected 0 or 1");
    in.finish();
    z_ = std::move(z);
    exp_avg_sq_ = std::move(v);
    weight_sum_ = std::move(weight_sum);
    lr_max_ = std::move(lr_max);
    train_mode_ = mode == 1;
    z_ready_ = true;
    step_count_ = step_count;
  }

 private:
  static std::string group_key(std::size_t gi, std::string_view what) {
    return "schedule_free.group" + std::to_string(gi) + "." + std::string(what);
  }

  void lerp_parameters(float weight) {
    const std::vector<detail::ParamSpans> params =
        checked_params("ScheduleFreeAdamW::eval/train", false);
    for_each_chunk([&](const detail::UpdateChunk& ch) {
      detail::lerp_kernel<xsimd::default_arch>(params[ch.slot].value.data() + ch.offset,
                                               z_[ch.slot].data() + ch.offset, ch.size, weight);
    });
  }

  ScheduleFreeAdamWOptions options_;
  std::vector<std::vector<float>> z_, exp_avg_sq_;
  std::vector<double> weight_sum_, lr_max_;  // per group, as the reference keeps them
  bool train_mode_ = true, z_ready_ = false;
};

}  // namespace difftrain::train
