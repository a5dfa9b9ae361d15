#pragma once
// Optimizers over parameter groups: AdamW and SGD with momentum, both with PyTorch's update rules,
// and parameter groups built from a module's trainable parameters (with LoRA+).
//
// The update is elementwise: each parameter is cut into fixed chunks, the chunks are spread over
// OpenMP threads, and each chunk runs an xsimd kernel with a scalar tail. Chunk boundaries do not
// depend on the thread count, so neither does the result.
//
// State for checkpoints: state_dict() maps "<parameter name>.<state>" to a tensor shaped like the
// parameter (exp_avg, exp_avg_sq for AdamW; momentum_buffer for SGD); step_count() is the number
// of updates taken (AdamW's bias-correction t).

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>
#include <xsimd/xsimd.hpp>
#include <xtensor/xadapt.hpp>
#include <xtensor/xarray.hpp>

#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::train {

/// A set of parameters sharing hyperparameters (PyTorch's param_groups). `names` holds one name per
/// parameter (used to key the optimizer state). AdamW reads lr, weight_decay, betas, eps; SGD
/// reads lr, weight_decay, momentum, nesterov.
struct ParamGroup {
  std::vector<nn::Parameter<float>*> params;
  std::vector<std::string> names;
  double lr = 1e-4;
  double weight_decay = 1e-2;
  std::array<double, 2> betas{0.9, 0.999};
  double eps = 1e-8;
  double momentum = 0;    // SGD
  bool nesterov = false;  // SGD
};

/// LoRA+ (Hayou et al. 2024; kohya --loraplus_lr_ratio): the "B"/"up" matrices of LoRA.
inline bool is_loraplus_parameter(std::string_view name) {
  return name.find("lora_B") != std::string_view::npos ||
         name.find("lora_up") != std::string_view::npos;
}

/// Groups of a module's trainable parameters with the hyperparameters of `hyper` (its params and
/// names are ignored): one group, or with loraplus_lr_ratio != 1 a second group holding the
/// parameters named like lora_B / lora_up with lr · loraplus_lr_ratio. Empty groups are dropped.
template <nn::Module M>
std::vector<ParamGroup> make_param_groups(M& module, const ParamGroup& hyper,
                                          double loraplus_lr_ratio = 1.0) {
  require(std::isfinite(loraplus_lr_ratio) && loraplus_lr_ratio > 0, "make_param_groups",
          "loraplus_lr_ratio is ", loraplus_lr_ratio, ", expected a finite value > 0");
  ParamGroup base = hyper, plus = hyper;
  base.params.clear();
  base.names.clear();
  plus.params.clear();
  plus.names.clear();
  plus.lr = hyper.lr * loraplus_lr_ratio;
  for (auto& [name, p] : nn::named_parameters<float>(module)) {
    if (!p->trainable) continue;
    ParamGroup& g = (loraplus_lr_ratio != 1.0 && is_loraplus_parameter(name)) ? plus : base;
    g.params.push_back(p);
    g.names.push_back(name);
  }
  std::vector<ParamGroup> groups;
  if (!base.params.empty()) groups.push_back(std::move(base));
  if (!plus.params.empty()) groups.push_back(std::move(plus));
  return groups;
}

namespace detail {

inline constexpr std::size_t kUpdateChunk = 1 << 14;  // elements per work item (fixed)

// A slice [offset, offset + size) of parameter `slot` (groups flattened in order).
struct UpdateChunk {
  std::size_t group, slot, offset, size;
};

// Checks the groups (pointers, trainable, gradient shapes, names, hyperparameters) and flattens
// them into slots and fixed chunks.
inline std::vector<UpdateChunk> check_groups(const std::vector<ParamGroup>& groups,
                                             std::string_view fn, bool adam) {
  std::vector<UpdateChunk> chunks;
  std::set<std::string> seen_names;
  std::set<const void*> seen_params;
  std::size_t slot = 0;
  for (std::size_t gi = 0; gi < groups.size(); ++gi) {
    const ParamGroup& g = groups[gi];
    require(g.names.size() == g.params.size(), fn, "group ", gi, " has ", g.params.size(),
            " parameters but ", g.names.size(), " names");
    require(std::isfinite(g.lr) && g.lr >= 0, fn, "group ", gi, " lr is ", g.lr,
            ", expected a finite value >= 0");
    require(std::isfinite(g.weight_decay) && g.weight_decay >= 0, fn, "group ", gi,
            " weight_decay is ", g.weight_decay, ", expected a finite value >= 0");
    if (adam) {
      for (int k = 0; k < 2; ++k)
        require(g.betas[k] >= 0 && g.betas[k] < 1, fn, "group ", gi, " betas[", k, "] is ",
                g.betas[k], ", expected in [0, 1)");
      require(std::isfinite(g.eps) && g.eps >= 0, fn, "group ", gi, " eps is ", g.eps,
              ", expected a finite value >= 0");
    } else {
      require(std::isfinite(g.momentum) && g.momentum >= 0, fn, "group ", gi, " momentum is ",
              g.momentum, ", expected a finite value >= 0");
      require(!g.nesterov || g.momentum > 0, fn, "group ", gi,
              " nesterov needs momentum > 0, got momentum ", g.momentum);
    }
    for (std::size_t i = 0; i < g.params.size(); ++i, ++slot) {
      const nn::Parameter<float>* p = g.params[i];
      require(p != nullptr, fn, "parameter '", g.names[i], "' is a null pointer");
      require(p->trainable, fn, "parameter '", g.names[i], "' is frozen, expected trainable");
      require(seen_names.insert(g.names[i]).second, fn, "parameter name '", g.names[i],
              "' appears twice");
      require(seen_params.insert(p).second, fn, "parameter '", g.names[i],
              "' is listed twice (in one or two groups)");
      for (std::size_t o = 0; o < p->value.size(); o += kUpdateChunk)
        chunks.push_back({gi, slot, o, std::min(kUpdateChunk, p->value.size() - o)});
    }
  }
  return chunks;
}

inline void check_gradient(const nn::Parameter<float>& p, const std::string& name,
                           std::string_view fn) {
  require(p.grad.shape() == p.value.shape(), fn, "gradient of '", name, "' has shape ",
          shape_string(p.grad.shape()), ", expected ", shape_string(p.value.shape()));
}

// Scalars of one AdamW update, in float as the update runs in the parameter's precision.
struct AdamWCoefficients {
  float decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt,
      eps;
};

template <class Arch>
void adamw_kernel(float* p, const float* g, float* m, float* v, std::size_t n,
                  const AdamWCoefficients& k) {
  using F = xsimd::batch<float, Arch>;
  constexpr std::size_t W = F::size;
  const F decay(k.decay), b1(k.beta1), c1(k.one_minus_beta1), b2(k.beta2), c2(k.one_minus_beta2),
      step(k.step_size), bc2(k.bias_correction2_sqrt), eps(k.eps);
  std::size_t i = 0;
  for (; i + W <= n; i += W) {
    const F gi = F::load_unaligned(g + i);
    const F mi = b1 * F::load_unaligned(m + i) + c1 * gi;
    const F vi = b2 * F::load_unaligned(v + i) + c2 * (gi * gi);
    const F denom = xsimd::sqrt(vi) / bc2 + eps;
    const F pi = F::load_unaligned(p + i) * decay - step * (mi / denom);
    mi.store_unaligned(m + i);
    vi.store_unaligned(v + i);
    pi.store_unaligned(p + i);
  }
  for (; i < n; ++i) {  // scalar tail: the same operations in the same order
    const float gi = g[i];
    m[i] = k.beta1 * m[i] + k.one_minus_beta1 * gi;
    v[i] = k.beta2 * v[i] + k.one_minus_beta2 * (gi * gi);
    const float denom = std::sqrt(v[i]) / k.bias_correction2_sqrt + k.eps;
    p[i] = p[i] * k.decay - k.step_size * (m[i] / denom);
  }
}

struct SgdCoefficients {
  float lr, weight_decay, momentum;
  bool nesterov, first_step;
};

template <class Arch>
void sgd_kernel(float* p, const float* g, float* buf, std::size_t n, const SgdCoefficients& k) {
  using F = xsimd::batch<float, Arch>;
  constexpr std::size_t W = F::size;
  const F lr(k.lr), wd(k.weight_decay), mu(k.momentum);
  const bool use_momentum = k.momentum != 0.0f;
  std::size_t i = 0;
  for (; i + W <= n; i += W) {
    const F pi = F::load_unaligned(p + i);
    F d = F::load_unaligned(g + i) + wd * pi;
    if (use_momentum) {
      const F b = k.first_step ? d : mu * F::load_unaligned(buf + i) + d;
      b.store_unaligned(buf + i);
      d = k.nesterov ? d + mu * b : b;
    }
    (pi - lr * d).store_unaligned(p + i);
  }
  for (; i < n; ++i) {
    float d = g[i] + k.weight_decay * p[i];
    if (use_momentum) {
      const float b = k.first_step ? d : k.momentum * buf[i] + d;
      buf[i] = b;
      d = k.nesterov ? d + k.momentum * b : b;
    }
    p[i] = p[i] - k.lr * d;
  }
}

// Copies of flat state vectors as tensors shaped like their parameters, keyed "<name>.<state>".
inline void export_state(std::map<std::string, xt::xarray<float>>& out,
                         const std::vector<ParamGroup>& groups, std::string_view state,
                         const std::vector<std::vector<float>>& values) {
  std::size_t slot = 0;
  for (const ParamGroup& g : groups)
    for (std::size_t i = 0; i < g.params.size(); ++i, ++slot) {
      xt::xarray<float> t = xt::xarray<float>::from_shape(g.params[i]->value.shape());
      std::copy(values[slot].begin(), values[slot].end(), t.begin());
      out.emplace(g.names[i] + "." + std::string(state), std::move(t));
    }
}

// Reads "<name>.<state>" for every parameter into `values`; records the keys used.
inline void import_state(const std::map<std::string, xt::xarray<float>>& in,
                         const std::vector<ParamGroup>& groups, std::string_view state,
                         std::vector<std::vector<float>>& values, std::set<std::string>& used,
                         std::vector<std::string>& problems) {
  std::size_t slot = 0;
  for (const ParamGroup& g : groups)
    for (std::size_t i = 0; i < g.params.size(); ++i, ++slot) {
      const std::string key = g.names[i] + "." + std::string(state);
      auto it = in.find(key);
      if (it == in.end()) {
        problems.push_back("missing " + key);
        continue;
      }
      used.insert(key);
      if (it->second.shape() != g.params[i]->value.shape()) {
        problems.push_back(key + " has shape " + shape_string(it->second.shape()) + ", expected " +
                           shape_string(g.params[i]->value.shape()));
        continue;
      }
      values[slot].assign(it->second.begin(), it->second.end());
    }
}

inline void finish_import(std::string_view fn, const std::map<std::string, xt::xarray<float>>& in,
                          const std::set<std::string>& used, std::vector<std::string> problems) {
  for (const auto& [key, value] : in)
    if (!used.count(key)) problems.push_back("unexpected " + key);
  if (problems.empty()) return;
  std::string message = std::string(fn) + ": optimizer state does not match the parameters: ";
  for (std::size_t i = 0; i < problems.size(); ++i) message += (i ? "; " : "") + problems[i];
  throw Error(message);
}

// f(0), …, f(n − 1) spread over OpenMP threads (each call must write only its own outputs).
template <class F>
void parallel_items(std::size_t n, F&& f) {
  const auto m = static_cast<std::ptrdiff_t>(n);
#pragma omp parallel for schedule(static) if (m > 1)
  for (std::ptrdiff_t i = 0; i < m; ++i) f(std::size_t(i));
}

// Optimizer scalars (a double) in float32 state, exactly: shape [5], element 0 the value rounded
// to float (for reading), elements 1..4 the four 16-bit pieces of its binary64 bits, low first.
inline void export_scalar(std::map<std::string, xt::xarray<float>>& out, const std::string& key,
                          double value) {
  xt::xarray<float> t = xt::xarray<float>::from_shape({5});
  std::uint64_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  t(0) = float(value);
  for (std::size_t i = 0; i < 4; ++i) t(i + 1) = float((bits >> (16 * i)) & 0xffffu);
  out.emplace(key, std::move(t));
}

inline void import_scalar(const std::map<std::string, xt::xarray<float>>& in,
                          const std::string& key, double& value, std::set<std::string>& used,
                          std::vector<std::string>& problems) {
  auto it = in.find(key);
  if (it == in.end()) {
    problems.push_back("missing " + key);
    return;
  }
  used.insert(key);
  const xt::xarray<float>& t = it->second;
  if (t.dimension() != 1 || t.size() != 5) {
    problems.push_back(key + " has shape " + shape_string(t.shape()) + ", expected [5]");
    return;
  }
  std::uint64_t bits = 0;
  for (std::size_t i = 0; i < 4; ++i) {
    const float piece = t(i + 1);
    if (!(piece >= 0 && piece <= 65535 && piece == std::floor(piece))) {
      problems.push_back(key + " element " + std::to_string(i + 1) + " is " +
                         std::to_string(piece) + ", expected an integer in [0, 65535]");
      return;
    }
    bits |= std::uint64_t(piece) << (16 * i);
  }
  std::memcpy(&value, &bits, sizeof value);
}

}  // namespace detail

/// AdamW (Loshchilov & Hutter; PyTorch torch.optim.AdamW, amsgrad off). Per update t = 1, 2, …
/// with the group's lr scaled by lr_scale (the LR schedule's multiplier):
// p ← p(1−lr·wd); m ← β1m + (1−β1)g; v ← β2v + (1−β2)g²; p ← p − lr/(1−β1^t)·m/(√v/√(1−β2^t) + ε)
class AdamW {
 public:
  static constexpr std::string_view kName = "adamw";

  explicit AdamW(std::vector<ParamGroup> groups) : groups_(std::move(groups)) {
    chunks_ = detail::check_groups(groups_, "AdamW", true);
    for (const ParamGroup& g : groups_)
      for (const auto* p : g.params) {
        exp_avg_.emplace_back(p->value.size(), 0.0f);
        exp_avg_sq_.emplace_back(p->value.size(), 0.0f);
      }
  }

  /// One update from the current gradients, with lr = group.lr · lr_scale.
  void step(double lr_scale = 1.0) {
    require(std::isfinite(lr_scale) && lr_scale >= 0, "AdamW::step", "lr_scale is ", lr_scale,
            ", expected a finite value >= 0");
    check_shapes();
    ++step_count_;
    std::vector<detail::AdamWCoefficients> k(groups_.size());
    for (std::size_t gi = 0; gi < groups_.size(); ++gi) {
      const ParamGroup& g = groups_[gi];
      const double lr = g.lr * lr_scale, t = double(step_count_);
      const double bc1 = 1.0 - std::pow(g.betas[0], t), bc2 = 1.0 - std::pow(g.betas[1], t);
      k[gi] = {float(1.0 - lr * g.weight_decay),
               float(g.betas[0]),
               float(1.0 - g.betas[0]),
               float(g.betas[1]),
               float(1.0 - g.betas[1]),
               float(lr / bc1),
               float(std::sqrt(bc2)),
               float(g.eps)};
    }
    const std::vector<nn::Parameter<float>*> params = flat_params();
    const auto n = static_cast<std::ptrdiff_t>(chunks_.size());
#pragma omp parallel for schedule(static) if (n > 1)
    for (std::ptrdiff_t c = 0; c < n; ++c) {
      const detail::UpdateChunk& ch = chunks_[std::size_t(c)];
      nn::Parameter<float>& p = *params[ch.slot];
      detail::adamw_kernel<xsimd::default_arch>(
          p.value.data() + ch.offset, p.grad.data() + ch.offset,
          exp_avg_[ch.slot].data() + ch.offset, exp_avg_sq_[ch.slot].data() + ch.offset, ch.size,
          k[ch.group]);
    }
  }

  void zero_grad() {
    for (ParamGroup& g : groups_)
      for (auto* p : g.params) p->zero_grad();
  }

  std::vector<ParamGroup>& param_groups() { return groups_; }
  const std::vector<ParamGroup>& param_groups() const { return groups_; }
  std::int64_t step_count() const { return step_count_; }

  /// "<name>.exp_avg" and "<name>.exp_avg_sq" for every parameter.
  std::map<std::string, xt::xarray<float>> state_dict() const {
    std::map<std::string, xt::xarray<float>> out;
    detail::export_state(out, groups_, "exp_avg", exp_avg_);
    detail::export_state(out, groups_, "exp_avg_sq", exp_avg_sq_);
    return out;
  }

  /// Strict: every key of state_dict() with its shape, nothing else.
  void load_state_dict(const std::map<std::string, xt::xarray<float>>& state,
                       std::int64_t step_count) {
    require(step_count >= 0, "AdamW::load_state_dict", "step_count is ", step_count,
            ", expected >= 0");
    auto m = exp_avg_, v = exp_avg_sq_;
    std::set<std::string> used;
    std::vector<std::string> problems;
    detail::import_state(state, groups_, "exp_avg", m, used, problems);
    detail::import_state(state, groups_, "exp_avg_sq", v, used, problems);
    detail::finish_import("AdamW::load_state_dict", state, used, std::move(problems));
    exp_avg_ = std::move(m);
    exp_avg_sq_ = std::move(v);
    step_count_ = step_count;
  }

 private:
  std::vector<nn::Parameter<float>*> flat_params() const {
    std::vector<nn::Parameter<float>*> out;
    for (const ParamGroup& g : groups_) out.insert(out.end(), g.params.begin(), g.params.end());
    return out;
  }
  void check_shapes() const {
    std::size_t slot = 0;
    for (const ParamGroup& g : groups_)
      for (std::size_t i = 0; i < g.params.size(); ++i, ++slot) {
        detail::check_gradient(*g.params[i], g.names[i], "AdamW::step");
        require(g.params[i]->value.size() == exp_avg_[slot].size(), "AdamW::step", "parameter '",
                g.names[i], "' changed size since the optimizer was built");
      }
  }

  std::vector<ParamGroup> groups_;
  std::vector<detail::UpdateChunk> chunks_;
  std::vector<std::vector<float>> exp_avg_, exp_avg_sq_;
  std::int64_t step_count_ = 0;
};

/// SGD with momentum (PyTorch torch.optim.SGD, dampening 0). With d = g + wd·p:
// b ← d (first update) or μ·b + d;  d ← d + μ·b (nesterov) or b (momentum > 0);  p ← p − lr·d
class Sgd {
 public:
  static constexpr std::string_view kName = "sgd";

  explicit Sgd(std::vector<ParamGroup> groups) : groups_(std::move(groups)) {
    chunks_ = detail::check_groups(groups_, "Sgd", false);
    for (const ParamGroup& g : groups_)
      for (const auto* p : g.params) momentum_buffer_.emplace_back(p->value.size(), 0.0f);
  }

  void step(double lr_scale = 1.0) {
    require(std::isfinite(lr_scale) && lr_scale >= 0, "Sgd::step", "lr_scale is ", lr_scale,
            ", expected a finite value >= 0");
    std::vector<nn::Parameter<float>*> params;
    std::size_t slot = 0;
    for (const ParamGroup& g : groups_)
      for (std::size_t i = 0; i < g.params.size(); ++i, ++slot) {
        detail::check_gradient(*g.params[i], g.names[i], "Sgd::step");
        require(g.params[i]->value.size() == momentum_buffer_[slot].size(), "Sgd::step",
                "parameter '", g.names[i], "' changed size since the optimizer was built");
        params.push_back(g.params[i]);
      }
    std::vector<detail::SgdCoefficients> k(groups_.size());
    for (std::size_t gi = 0; gi < groups_.size(); ++gi) {
      const ParamGroup& g = groups_[gi];
      k[gi] = {float(g.lr * lr_scale), float(g.weight_decay), float(g.momentum), g.nesterov,
               step_count_ == 0};
    }
    const auto n = static_cast<std::ptrdiff_t>(chunks_.size());
#pragma omp parallel for schedule(static) if (n > 1)
    for (std::ptrdiff_t c = 0; c < n; ++c) {
      const detail::UpdateChunk& ch = chunks_[std::size_t(c)];
      nn::Parameter<float>& p = *params[ch.slot];
      detail::sgd_kernel<xsimd::default_arch>(p.value.data() + ch.offset, p.grad.data() + ch.offset,
                                              momentum_buffer_[ch.slot].data() + ch.offset, ch.size,
                                              k[ch.group]);
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

  /// "<name>.momentum_buffer" for every parameter.
  std::map<std::string, xt::xarray<float>> state_dict() const {
    std::map<std::string, xt::xarray<float>> out;
    detail::export_state(out, groups_, "momentum_buffer", momentum_buffer_);
    return out;
  }

  void load_state_dict(const std::map<std::string, xt::xarray<float>>& state,
                       std::int64_t step_count) {
    require(step_count >= 0, "Sgd::load_state_dict", "step_count is ", step_count,
            ", expected >= 0");
    auto b = momentum_buffer_;
    std::set<std::string> used;
    std::vector<std::string> problems;
    detail::import_state(state, groups_, "momentum_buffer", b, used, problems);
    detail::finish_import("Sgd::load_state_dict", state, used, std::move(problems));
    momentum_buffer_ = std::move(b);
    step_count_ = step_count;
  }

 private:
  std::vector<ParamGroup> groups_;
  std::vector<detail::UpdateChunk> chunks_;
  std::vector<std::vector<float>> momentum_buffer_;
  std::int64_t step_count_ = 0;
};

}  // namespace difftrain::train
