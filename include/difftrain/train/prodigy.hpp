#pragma once
// Prodigy (Mishchenko & Defazio 2023, "Prodigy: An Expeditiously Adaptive Parameter-Free
// Learner"), as prodigyopt 1.0 (konstmish/prodigy, prodigyopt/prodigy.py, slice_p = 1, no FSDP)
// runs it; kohya sd-scripts' "Prodigy". Adam with a step size d·lr where d, an estimate of the
// distance to the solution, is global: its numerator and denominator are sums over every
// parameter, taken in a fixed order (per fixed chunk, then chunks in order, then parameters in
// order), so the result does not depend on the thread count.
//
// State for checkpoints: "<name>.s", "<name>.p0", "<name>.exp_avg", "<name>.exp_avg_sq" (shaped
// like the parameter) and the scalars "prodigy.d", "prodigy.d_max", "prodigy.d_numerator",
// "prodigy.k", each as optimizer.hpp's export_scalar stores a double (shape [5], exact).
// step_count() counts the calls to step(); k counts the updates made (a step with no usable
// gradient, d_denom = 0, changes no parameter and not k, as in the reference). Before the first
// step p0 does not exist yet (it is copied from the parameters then); a state saved that early
// holds the current parameters as p0.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>
#include <xsimd/xsimd.hpp>
#include <xtensor/xarray.hpp>

#include "difftrain/core/error.hpp"
#include "difftrain/train/optimizer.hpp"

namespace difftrain::train {

/// prodigyopt's hyperparameters (its defaults); lr comes from each group (· lr_scale; Prodigy
/// wants 1.0). The groups' weight_decay, betas and eps are not read.
struct ProdigyOptions {
  std::array<double, 2> betas{0.9, 0.999};
  std::optional<double> beta3;  // none: sqrt(betas[1])
  double eps = 1e-8;
  double weight_decay = 0;
  bool decouple = true;
  bool use_bias_correction = false;
  bool safeguard_warmup = false;
  double d0 = 1e-6;
  double d_coef = 1.0;
  double growth_rate = std::numeric_limits<double>::infinity();
};

namespace detail {

struct ProdigyMomentCoefficients {
  float beta1, m_alpha, beta2, v_value, beta3, s_alpha, coupled_decay;  // coupled_decay 0: off
};

// The moments of one chunk; g is the gradient (plus coupled_decay·p).
template <class Arch>
void prodigy_moments_kernel(const float* p, const float* g, float* m, float* v, float* s,
                            std::size_t n, const ProdigyMomentCoefficients& k) {
  using F = xsimd::batch<float, Arch>;
  constexpr std::size_t W = F::size;
  const F b1(k.beta1), ma(k.m_alpha), b2(k.beta2), vv(k.v_value), b3(k.beta3), sa(k.s_alpha),
      wd(k.coupled_decay);
  const bool coupled = k.coupled_decay != 0.0f;
  std::size_t i = 0;
  for (; i + W <= n; i += W) {
    F gi = F::load_unaligned(g + i);
    if (coupled) gi = gi + wd * F::load_unaligned(p + i);
    (F::load_unaligned(m + i) * b1 + ma * gi).store_unaligned(m + i);
    (F::load_unaligned(v + i) * b2 + vv * gi * gi).store_unaligned(v + i);
    (F::load_unaligned(s + i) * b3 + sa * gi).store_unaligned(s + i);
  }
  for (; i < n; ++i) {  // scalar tail: the same operations in the same order
    float gi = g[i];
    if (coupled) gi = gi + k.coupled_decay * p[i];
    m[i] = m[i] * k.beta1 + k.m_alpha * gi;
    v[i] = v[i] * k.beta2 + k.v_value * gi * gi;
    s[i] = s[i] * k.beta3 + k.s_alpha * gi;
  }
}

struct ProdigyStepCoefficients {
  float d_eps, decoupled_decay, minus_dlr;  // decoupled_decay (−wd·dlr) 0: off
};

template <class Arch>
void prodigy_step_kernel(float* p, const float* m, const float* v, std::size_t n,
                         const ProdigyStepCoefficients& k) {
  using F = xsimd::batch<float, Arch>;
  constexpr std::size_t W = F::size;
  const F d_eps(k.d_eps), decay(k.decoupled_decay), minus_dlr(k.minus_dlr);
  const bool decoupled = k.decoupled_decay != 0.0f;
  std::size_t i = 0;
  for (; i + W <= n; i += W) {
    const F denom = xsimd::sqrt(F::load_unaligned(v + i)) + d_eps;
    F pi = F::load_unaligned(p + i);
    if (decoupled) pi = pi + decay * pi;
    (pi + minus_dlr * F::load_unaligned(m + i) / denom).store_unaligned(p + i);
  }
  for (; i < n; ++i) {
    const float denom = std::sqrt(v[i]) + k.d_eps;
    float pi = p[i];
    if (decoupled) pi = pi + k.decoupled_decay * pi;
    p[i] = pi + k.minus_dlr * m[i] / denom;
  }
}

}  // namespace detail

/// Prodigy (konstmish/prodigy prodigyopt/prodigy.py 1.0). Per update, with lr = max over groups
/// of group.lr · lr_scale (every group's lr must be that or 0), dlr = d·lr·bc (bc =
/// √(1−β2^(k+1))/(1−β1^(k+1)) with use_bias_correction, else 1) and g (+ wd·p when not
/// decouple), for every parameter of a group with lr > 0:
// m ← β1m + d(1−β1)g;  v ← β2v + d²(1−β2)g²;  s ← β3s + (d/d0)·(safeguard_warmup ? d : dlr)·g
/// with d_numerator ← β3·d_numerator + Σ (d/d0)·dlr·⟨g, p0 − p⟩ and d_denom = Σ |s|; then
/// d̂ = d_coef·d_numerator/d_denom, d ← max(d, d̂) if d = d0, d_max ← max(d_max, d̂),
/// d ← min(d_max, d·growth_rate), and for every parameter (p ← p(1 − wd·dlr) when decouple):
// p ← p − dlr·m/(√v + d·ε)
/// Differences: the sums ⟨g, p0 − p⟩ and Σ|s| accumulate in double (the reference: float32
/// torch.dot and sum); the gradient is left as it was (coupled decay is added on the fly, the
/// reference adds it to p.grad in place).
class Prodigy : public detail::OptimizerBase {
 public:
  static constexpr std::string_view kName = "prodigy";
  // What kohya records as ss_optimizer (the Python module + "." + class).
  static constexpr std::string_view kKohyaClass = "prodigyopt.prodigy.Prodigy";

  explicit Prodigy(std::vector<ParamGroup> groups, ProdigyOptions options = {})
      : OptimizerBase(std::move(groups)), options_(options) {
    constexpr std::string_view fn = "Prodigy";
    const auto& o = options_;
    for (int k = 0; k < 2; ++k)
      detail::require_beta(fn, "betas[" + std::to_string(k) + "]", o.betas[k]);
    if (o.beta3) detail::require_beta(fn, "beta3", *o.beta3, true);
    detail::require_positive(fn, "eps", o.eps);
    detail::require_nonnegative(fn, "weight_decay", o.weight_decay);
    detail::require_positive(fn, "d0", o.d0);
    detail::require_positive(fn, "d_coef", o.d_coef);
    require(o.growth_rate > 0, fn, "growth_rate is ", o.growth_rate,
            ", expected a value > 0 (inf: unlimited)");
    build(fn);
    check_group_lrs(fn);
    s_ = exp_avg_ = exp_avg_sq_ = zero_state();  // p0_ comes with the first step
    d_ = d_max_ = o.d0;
  }

  /// One update from the current gradients, with lr = group.lr · lr_scale.
  void step(double lr_scale = 1.0) {
    constexpr std::string_view fn = "Prodigy::step";
    check_lr_scale(fn, lr_scale);
    check_group_lrs(fn);
    const std::vector<detail::ParamSpans> params = checked_params(fn);
    ++step_count_;
    if (!p0_ready_) {
      p0_ = parameter_values();
      p0_ready_ = true;
    }
    const auto& o = options_;
    const double beta1 = o.betas[0], beta2 = o.betas[1];
    const double beta3 = o.beta3 ? *o.beta3 : std::sqrt(beta2);
    double lr = 0;
    for (const ParamGroup& g : groups_) lr = std::max(lr, g.lr * lr_scale);
    const double kp1 = double(k_ + 1);
    const double bias_correction =
        o.use_bias_correction ? std::sqrt(1 - std::pow(beta2, kp1)) / (1 - std::pow(beta1, kp1))
                              : 1.0;
    const double d = d_, dlr = d * lr * bias_correction;

    // Moments, s and the partial sums of every chunk of every group with lr > 0.
    const detail::ProdigyMomentCoefficients mk{float(beta1),
                                               float(d * (1 - beta1)),
                                               float(beta2),
                                               float(d * d * (1 - beta2)),
                                               float(beta3),
                                               float((d / o.d0) * (o.safeguard_warmup ? d : dlr)),
                                               o.decouple ? 0.0f : float(o.weight_decay)};
    std::vector<double> dot(chunks_.size(), 0.0), s_abs(chunks_.size(), 0.0);
    detail::parallel_items(chunks_.size(), [&](std::size_t c) {
      const detail::UpdateChunk& ch = chunks_[c];
      if (!(groups_[ch.group].lr * lr_scale > 0)) return;
      const detail::ParamSpans& p = params[ch.slot];
      const float* pv = p.value.data() + ch.offset;
      const float* gv = p.grad.data() + ch.offset;
      const float* p0 = p0_[ch.slot].data() + ch.offset;
      double sum = 0;
      for (std::size_t i = 0; i < ch.size; ++i) {
        const float gi = mk.coupled_decay != 0.0f ? gv[i] + mk.coupled_decay * pv[i] : gv[i];
        sum += double(gi) * double(p0[i] - pv[i]);
      }
      dot[c] = sum;
      float* s = s_[ch.slot].data() + ch.offset;
      detail::prodigy_moments_kernel<xsimd::default_arch>(
          pv, gv, exp_avg_[ch.slot].data() + ch.offset, exp_avg_sq_[ch.slot].data() + ch.offset, s,
          ch.size, mk);
      double abs_sum = 0;
      for (std::size_t i = 0; i < ch.size; ++i) abs_sum += std::abs(double(s[i]));
      s_abs[c] = abs_sum;
    });
    // Per parameter (chunks in order), then parameters in order, as the reference's loop.
    double d_numerator = d_numerator_ * beta3, d_denom = 0;
    for (std::size_t c = 0; c < chunks_.size();) {
      const std::size_t slot = chunks_[c].slot;
      if (!(groups_[chunks_[c].group].lr * lr_scale > 0)) {
        ++c;
        continue;
      }
      double slot_dot = 0, slot_abs = 0;
      for (; c < chunks_.size() && chunks_[c].slot == slot; ++c) {
        slot_dot += dot[c];
        slot_abs += s_abs[c];
      }
      d_numerator += (d / o.d0) * dlr * slot_dot;
      d_denom += slot_abs;
    }
    if (d_denom == 0) return;  // no progress possible (zero gradients or lr 0): as the reference

    const double d_hat = o.d_coef * d_numerator / d_denom;
    double d_new = d;
    if (d_new == o.d0) d_new = std::max(d_new, d_hat);
    d_max_ = std::max(d_max_, d_hat);
    d_new = std::min(d_max_, d_new * o.growth_rate);
    d_numerator_ = d_numerator;
    d_ = d_new;

    const float decoupled_decay =
        o.decouple && o.weight_decay != 0 ? float(-o.weight_decay * dlr) : 0.0f;
    const detail::ProdigyStepCoefficients sk{float(d_new * o.eps), decoupled_decay, float(-dlr)};
    for_each_chunk([&](const detail::UpdateChunk& ch) {
      detail::prodigy_step_kernel<xsimd::default_arch>(
          params[ch.slot].value.data() + ch.offset, exp_avg_[ch.slot].data() + ch.offset,
          exp_avg_sq_[ch.slot].data() + ch.offset, ch.size, sk);
    });
    ++k_;
  }

  const ProdigyOptions& options() const { return options_; }
  /// The current estimate d (kohya logs d·lr) and the reference's update count k.
  double d() const { return d_; }
  std::int64_t k() const { return k_; }

  /// "<name>.s", "<name>.p0", "<name>.exp_avg", "<name>.exp_avg_sq" and the prodigy.* scalars.
  std::map<std::string, xt::xarray<float>> state_dict() const {
    std::map<std::string, xt::xarray<float>> out;
    detail::export_state(out, groups_, "s", s_);
    if (p0_ready_)
      detail::export_state(out, groups_, "p0", p0_);
    else  // what the first step will copy
      detail::export_state(out, groups_, "p0", parameter_values());
    detail::export_state(out, groups_, "exp_avg", exp_avg_);
    detail::export_state(out, groups_, "exp_avg_sq", exp_avg_sq_);
    detail::export_scalar(out, "prodigy.d", d_);
    detail::export_scalar(out, "prodigy.d_max", d_max_);
    detail::export_scalar(out, "prodigy.d_numerator", d_numerator_);
    detail::export_scalar(out, "prodigy.k", double(k_));
    return out;
  }

  /// Strict: every key of state_dict() with its shape, nothing else.
  void load_state_dict(const std::map<std::string, xt::xarray<float>>& state,
                       std::int64_t step_count) {
    detail::StateReader in = read_state("Prodigy::load_state_dict", state, step_count);
    auto s = in.per_parameter("s");
    auto p0 = in.per_parameter("p0");
    auto m = in.per_parameter("exp_avg");
    auto v = in.per_parameter("exp_avg_sq");
    const double d = in.scalar("prodigy.d"), d_max = in.scalar("prodigy.d_max");
    const double d_numerator = in.scalar("prodigy.d_numerator"), k = in.scalar("prodigy.k");
    if (!(k >= 0 && k <= 9e15 && k == std::floor(k)))
      in.problem("prodigy.k is " + std::to_string(k) + ", expected an integer >= 0");
    if (!(std::isfinite(d) && d > 0))
      in.problem("prodigy.d is " + std::to_string(d) + ", expected a finite value > 0");
    in.finish();
    s_ = std::move(s);
    p0_ = std::move(p0);
    exp_avg_ = std::move(m);
    exp_avg_sq_ = std::move(v);
    d_ = d;
    d_max_ = d_max;
    d_numerator_ = d_numerator;
    k_ = std::int64_t(k);
    p0_ready_ = true;
    step_count_ = step_count;
  }

 private:
  // The reference: "Setting different lr values in different parameter groups is only supported
  // for values of 0".
  void check_group_lrs(std::string_view fn) const {
    double lr = 0;
    for (const ParamGroup& g : groups_) lr = std::max(lr, g.lr);
    for (std::size_t gi = 0; gi < groups_.size(); ++gi)
      require(groups_[gi].lr == lr || groups_[gi].lr == 0, fn, "group ", gi, " lr is ",
              groups_[gi].lr, ", expected the largest group lr (", lr,
              ") or 0: Prodigy supports no other per-group lr (no LoRA+ ratio)");
  }

  ProdigyOptions options_;
  std::vector<std::vector<float>> s_, p0_, exp_avg_, exp_avg_sq_;
  double d_ = 0, d_max_ = 0, d_numerator_ = 0;
  std::int64_t k_ = 0;
  bool p0_ready_ = false;
};

}  // namespace difftrain::train
