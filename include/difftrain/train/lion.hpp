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
#include <set>
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
class Lion {
 public:
  static constexpr std::string_view kName = "lion";

  explicit Lion(std::vector<ParamGroup> groups, LionOptions options = {})
      : groups_(std::move(groups)), options_(options) {
    for (int k = 0; k < 2; ++k)
      require(options_.betas[k] >= 0 && options_.betas[k] <= 1, "Lion", "betas[", k, "] is ",
              options_.betas[k], ", expected in [0, 1]");
    chunks_ = detail::check_groups(groups_, "Lion", false);
    for (const ParamGroup& g : groups_)
      for (const auto* p : g.params) exp_avg_.emplace_back(p->value.size(), 0.0f);
  }

  /// One update from the current gradients, with lr = group.lr · lr_scale.
  void step(double lr_scale = 1.0) {
    require(std::isfinite(lr_scale) && lr_scale >= 0, "Lion::step", "lr_scale is ", lr_scale,
            ", expected a finite value >= 0");
    std::vector<nn::Parameter<float>*> params;
    std::size_t slot = 0;
    for (const ParamGroup& g : groups_)
      for (std::size_t i = 0; i < g.params.size(); ++i, ++slot) {
        detail::check_gradient(*g.params[i], g.names[i], "Lion::step");
        require(g.params[i]->value.size() == exp_avg_[slot].size(), "Lion::step", "parameter '",
                g.names[i], "' changed size since the optimizer was built");
        params.push_back(g.params[i]);
      }
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
    const auto n = static_cast<std::ptrdiff_t>(chunks_.size());
#pragma omp parallel for schedule(static) if (n > 1)
    for (std::ptrdiff_t c = 0; c < n; ++c) {
      const detail::UpdateChunk& ch = chunks_[std::size_t(c)];
      nn::Parameter<float>& p = *params[ch.slot];
      detail::lion_kernel<xsimd::default_arch>(
          p.value.data() + ch.offset, p.grad.data() + ch.offset,
          exp_avg_[ch.slot].data() + ch.offset, ch.size, k[ch.group]);
    }
    ++step_count_;
  }

  void zero_grad() {
    for (ParamGroup& g : groups_)
      for (auto* p : g.params) p->zero_grad();
  }

  std::vector<ParamGroup>& param_groups() { return groups_; }
  const std::vector<ParamGroup>& param_groups() const { return groups_; }
  std::int64_t step_count() const { return step_count_; }
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
    require(step_count >= 0, "Lion::load_state_dict", "step_count is ", step_count,
            ", expected >= 0");
    auto m = exp_avg_;
    std::set<std::string> used;
    std::vector<std::string> problems;
    detail::import_state(state, groups_, "exp_avg", m, used, problems);
    detail::finish_import("Lion::load_state_dict", state, used, std::move(problems));
    exp_avg_ = std::move(m);
    step_count_ = step_count;
  }

 private:
  std::vector<ParamGroup> groups_;
  LionOptions options_;
  std::vector<detail::UpdateChunk> chunks_;
  std::vector<std::vector<float>> exp_avg_;
  std::int64_t step_count_ = 0;
};

}  // namespace difftrain::train
