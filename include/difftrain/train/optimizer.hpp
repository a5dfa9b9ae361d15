#pragma once
// Optimizers over parameter groups: AdamW and SGD with momentum, both with PyTorch's update rules,
// and parameter groups built from a module's trainable parameters (with LoRA+).
//
// The update is elementwise: each parameter is cut into fixed chunks, the chunks are spread over
// OpenMP threads, and each chunk runs an xsimd kernel with a scalar tail. Chunk boundaries do not
// depend on the thread count, so neither does the result.
//
// The parameters are ParameterRefs (parameter_view.hpp): nn::Parameter<float>s or views of any
// model's storage (a model with trainable_parameters()); the updates are the same either way.
//
// State for checkpoints: state_dict() maps "<parameter name>.<state>" to a tensor shaped like the
// parameter (exp_avg, exp_avg_sq for AdamW; momentum_buffer for SGD); step_count() is the number
// of updates taken (AdamW's bias-correction t).
//
// What all optimizers (here, lion.hpp, adafactor.hpp, prodigy.hpp, schedule_free_adamw.hpp)
// share is written once below: detail::OptimizerBase (the groups, their chunks, the step count,
// zero_grad / param_groups / step_count, the checks of each step) and detail::StateReader (strict
// load_state_dict).

#include <algorithm>
#include <array>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <map>
#include <ranges>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>
#include <xsimd/xsimd.hpp>
#include <xtensor/xadapt.hpp>
#include <xtensor/xarray.hpp>

#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/nn/parameter.hpp"
#include "difftrain/train/parameter_view.hpp"

namespace difftrain::train {

/// A set of parameters sharing hyperparameters (PyTorch's param_groups). `names` holds one name per
/// parameter (used to key the optimizer state; a view's own name must equal it). AdamW reads lr,
/// weight_decay, betas, eps; SGD reads lr, weight_decay, momentum, nesterov.
struct ParamGroup {
  std::vector<ParameterRef> params;  // nn::Parameter<float>* or ParameterView
  std::vector<std::string> names;
  double lr = 1e-4;
  double weight_decay = 1e-2;
  std::array<double, 2> betas{0.9, 0.999};
  double eps = 1e-8;
  double momentum = 0;    // SGD
  bool nesterov = false;  // SGD
};

/// An optimizer the Trainer can drive (AdamW, Sgd, Lion, Adafactor, Prodigy, ScheduleFreeAdamW,
/// AnyOptimizer, or a type of your own). Each part is a concept of its own, so that the error for
/// a rejected type names what it lacks:
///   OptimizerStep      o.step(lr_scale): one update, every group's lr × lr_scale (the LR
///                      schedule's multiplier), from the gradients of the parameters it holds
///   HasStepCount       o.step_count(): the updates taken (checkpoints store it)
///   HasParamGroupLrs   o.param_groups(): a range of groups with a `lr` (the first one is logged)
///   HasOptimizerState  o.state_dict() → std::map<std::string, xt::xarray<float>>, and
///                      o.load_state_dict(state, step_count); a load that throws must leave the
///                      optimizer as it was (the Trainer resumes in place)
///   HasOptimizerName   o.name() or O::kName: recorded in the checkpoint manifest; a resume needs
///                      the same name
/// Optional: eval() / train() (schedule-free weights), called by Trainer::eval_weights() /
/// train_weights() when present.
template <class O>
concept OptimizerStep = requires(O& o, double lr_scale) {
  o.step(lr_scale);
};

template <class O>
concept HasStepCount = requires(const O& o) {
  { o.step_count() } -> std::convertible_to<std::int64_t>;
};

template <class O>
concept HasParamGroupLrs = requires(const O& o) {
  { o.param_groups() } -> std::ranges::input_range;
  { (*std::begin(o.param_groups())).lr } -> std::convertible_to<double>;
};

/// name → tensor, as state_dict() gives and checkpoints store (checkpoint.hpp says the same).
using TensorMap = std::map<std::string, xt::xarray<float>>;

template <class O>
concept HasOptimizerState = requires(O& o, const O& c, const TensorMap& state, std::int64_t n) {
  { c.state_dict() } -> std::convertible_to<TensorMap>;
  o.load_state_dict(state, n);
};

namespace detail {
template <class O>
concept HasNameFunction = requires(const O& o) {
  { o.name() } -> std::convertible_to<std::string_view>;
};
template <class O>
concept HasNameConstant = requires {
  { O::kName } -> std::convertible_to<std::string_view>;
};
}  // namespace detail

template <class O>
concept HasOptimizerName = detail::HasNameFunction<O> || detail::HasNameConstant<O>;

template <class O>
concept Optimizer = std::move_constructible<O> && OptimizerStep<O> && HasStepCount<O> &&
    HasParamGroupLrs<O> && HasOptimizerState<O> && HasOptimizerName<O>;

/// The name an optimizer records in checkpoints: o.name(), else O::kName.
template <HasOptimizerName O>
std::string optimizer_name(const O& o) {
  if constexpr (detail::HasNameFunction<O>)
    return std::string(o.name());
  else
    return std::string(O::kName);
}

/// LoRA+ (Hayou et al. 2024; kohya --loraplus_lr_ratio): the "B"/"up" matrices of LoRA.
inline bool is_loraplus_parameter(std::string_view name) {
  return name.find("lora_B") != std::string_view::npos ||
         name.find("lora_up") != std::string_view::npos;
}

/// A learning rate of its own for the parameters whose names start with `prefix` (kohya's
/// --text_encoder_lr: "text_encoder.").
struct PrefixLr {
  std::string prefix;
  double lr = 0;
};

/// Groups of a model's trainable parameters (an nn::Module's or trainable_parameters()'s) with the
/// hyperparameters of `hyper` (its params and names are ignored): one group per learning rate
/// (hyper.lr, and each prefix_lrs entry for the parameters named with its prefix, the first match
/// winning), each split in two with loraplus_lr_ratio != 1: the parameters named like lora_B /
/// lora_up get lr · loraplus_lr_ratio. Empty groups are dropped.
template <TrainableModel M>
std::vector<ParamGroup> make_param_groups(M& module, const ParamGroup& hyper,
                                          double loraplus_lr_ratio = 1.0,
                                          const std::vector<PrefixLr>& prefix_lrs = {}) {
  require(std::isfinite(loraplus_lr_ratio) && loraplus_lr_ratio > 0, "make_param_groups",
          "loraplus_lr_ratio is ", loraplus_lr_ratio, ", expected a finite value > 0");
  // groups [c·2 + plus]: class c = 0 (hyper.lr) or 1 + the index of the first matching prefix
  std::vector<ParamGroup> all(2 * (1 + prefix_lrs.size()), hyper);
  for (std::size_t g = 0; g < all.size(); ++g) {
    const double lr = g < 2 ? hyper.lr : prefix_lrs[g / 2 - 1].lr;
    require(std::isfinite(lr) && lr >= 0, "make_param_groups", "learning rate of '",
            g < 2 ? std::string("") : prefix_lrs[g / 2 - 1].prefix, "' is ", lr,
            ", expected a finite value >= 0");
    all[g].lr = g % 2 == 1 ? lr * loraplus_lr_ratio : lr;
    all[g].params.clear();
    all[g].names.clear();
  }
  for (auto& [name, p] : named_trainable_parameters(module)) {
    std::size_t c = 0;
    for (std::size_t i = 0; i < prefix_lrs.size() && c == 0; ++i)
      if (name.starts_with(prefix_lrs[i].prefix)) c = 1 + i;
    ParamGroup& g =
        all[2 * c + ((loraplus_lr_ratio != 1.0 && is_loraplus_parameter(name)) ? 1 : 0)];
    g.params.push_back(p);
    g.names.push_back(name);
  }
  std::vector<ParamGroup> groups;
  for (auto& g : all)
    if (!g.params.empty()) groups.push_back(std::move(g));
  return groups;
}

namespace detail {

inline constexpr std::size_t kUpdateChunk = 1 << 14;  // elements per work item (fixed)

// A slice [offset, offset + size) of parameter `slot` (groups flattened in order).
struct UpdateChunk {
  std::size_t group, slot, offset, size;
};

// Option checks, each with one message form: "<what> is <x>, expected …".
inline void require_nonnegative(std::string_view fn, const std::string& what, double x) {
  require(std::isfinite(x) && x >= 0, fn, what, " is ", x, ", expected a finite value >= 0");
}
inline void require_positive(std::string_view fn, const std::string& what, double x) {
  require(std::isfinite(x) && x > 0, fn, what, " is ", x, ", expected a finite value > 0");
}
// A decay rate β in [0, 1), or [0, 1] with `one_allowed`.
inline void require_beta(std::string_view fn, const std::string& what, double x,
                         bool one_allowed = false) {
  require(x >= 0 && (one_allowed ? x <= 1 : x < 1), fn, what, " is ", x,
          one_allowed ? ", expected in [0, 1]" : ", expected in [0, 1)");
}

// Checks the groups (pointers, trainable, names, hyperparameters) and flattens them into slots
// and fixed chunks.
inline std::vector<UpdateChunk> check_groups(const std::vector<ParamGroup>& groups,
                                             std::string_view fn, bool adam) {
  std::vector<UpdateChunk> chunks;
  std::set<std::string> seen_names;
  std::set<const void*> seen_params;
  std::size_t slot = 0;
  for (std::size_t gi = 0; gi < groups.size(); ++gi) {
    const ParamGroup& g = groups[gi];
    const std::string group = "group " + std::to_string(gi);
    require(g.names.size() == g.params.size(), fn, group, " has ", g.params.size(),
            " parameters but ", g.names.size(), " names");
    require_nonnegative(fn, group + " lr", g.lr);
    require_nonnegative(fn, group + " weight_decay", g.weight_decay);
    if (adam) {
      for (int k = 0; k < 2; ++k)
        require_beta(fn, group + " betas[" + std::to_string(k) + "]", g.betas[k]);
      require_nonnegative(fn, group + " eps", g.eps);
    } else {
      require_nonnegative(fn, group + " momentum", g.momentum);
      require(!g.nesterov || g.momentum > 0, fn, group,
              " nesterov needs momentum > 0, got momentum ", g.momentum);
    }
    for (std::size_t i = 0; i < g.params.size(); ++i, ++slot) {
      const ParameterRef& p = g.params[i];
      require(!p.is_null(), fn, "parameter '", g.names[i], "' is a null pointer");
      require(p.parameter() || p.view_name() == g.names[i], fn, "parameter view '", p.view_name(),
              "' is listed under the name '", g.names[i], "', expected its own");
      require(p.trainable(), fn, "parameter '", g.names[i], "' is frozen, expected trainable");
      require(seen_names.insert(g.names[i]).second, fn, "parameter name '", g.names[i],
              "' appears twice");
      require(!p.identity() || seen_params.insert(p.identity()).second, fn, "parameter '",
              g.names[i], "' is listed twice (in one or two groups)");
      const std::size_t n = p.value().size();
      for (std::size_t o = 0; o < n; o += kUpdateChunk)
        chunks.push_back({gi, slot, o, std::min(kUpdateChunk, n - o)});
    }
  }
  return chunks;
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

// A parameter's values and gradient at the time of a step.
struct ParamSpans {
  std::span<float> value, grad;
};

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

// A copy of `values` as a tensor of `shape` at `key`.
template <class Shape>
void export_shaped(std::map<std::string, xt::xarray<float>>& out, const std::string& key,
                   const Shape& shape, const std::vector<float>& values) {
  xt::xarray<float> t = xt::xarray<float>::from_shape(shape);
  std::copy(values.begin(), values.end(), t.begin());
  out.emplace(key, std::move(t));
}

// One state vector per parameter (slot) as "<name>.<state>", shaped like the parameter.
inline void export_state(std::map<std::string, xt::xarray<float>>& out,
                         const std::vector<ParamGroup>& groups, std::string_view state,
                         const std::vector<std::vector<float>>& values) {
  std::size_t slot = 0;
  for (const ParamGroup& g : groups)
    for (std::size_t i = 0; i < g.params.size(); ++i, ++slot)
      export_shaped(out, g.names[i] + "." + std::string(state), g.params[i].shape(), values[slot]);
}

// Strict reading of a state_dict (load_state_dict): each read notes its key as used or a problem
// (missing, wrong shape); finish() adds the keys never read and throws every problem in one
// Error. Reads go into copies, so a load that throws leaves the optimizer as it was.
class StateReader {
 public:
  StateReader(std::string_view fn, const std::map<std::string, xt::xarray<float>>& in,
              const std::vector<ParamGroup>& groups)
      : fn_(fn), in_(in), groups_(groups) {}

  // `values` ← the tensor at `key`, which must have `shape`.
  void read(const std::string& key, const std::vector<std::size_t>& shape,
            std::vector<float>& values) {
    const xt::xarray<float>* t = find(key);
    if (!t) return;
    const std::vector<std::size_t> actual(t->shape().begin(), t->shape().end());
    if (actual != shape) {
      problem(key + " has shape " + shape_string(actual) + ", expected " + shape_string(shape));
      return;
    }
    // A NaN moment turns the next update, and so the weights, into NaN; a second moment
    // (exp_avg_sq*, a running mean of squares) below 0 gives the square root of a negative.
    const bool square = key.find(".exp_avg_sq") != std::string::npos;
    for (auto it = t->begin(); it != t->end(); ++it) {
      if (std::isfinite(*it) && (!square || *it >= 0)) continue;
      problem(message(key, " element ", it - t->begin(), " is ", *it, ", expected a finite",
                      square ? " non-negative" : "", " number"));
      return;
    }
    values.assign(t->begin(), t->end());
  }

  // "<name>.<state>" of every parameter (the inverse of export_state).
  std::vector<std::vector<float>> per_parameter(std::string_view state) {
    std::vector<std::vector<float>> values;
    for (const ParamGroup& g : groups_)
      for (std::size_t i = 0; i < g.params.size(); ++i) {
        read(g.names[i] + "." + std::string(state), g.params[i].shape(), values.emplace_back());
      }
    return values;
  }

  // The double export_scalar stored at `key`; `fallback` when it is missing or malformed.
  double scalar(const std::string& key, double fallback = 0) {
    const xt::xarray<float>* t = find(key);
    if (!t) return fallback;
    if (t->dimension() != 1 || t->size() != 5) {
      problem(key + " has shape " + shape_string(t->shape()) + ", expected [5]");
      return fallback;
    }
    std::uint64_t bits = 0;
    for (std::size_t i = 0; i < 4; ++i) {
      const float piece = (*t)(i + 1);
      if (!(piece >= 0 && piece <= 65535 && piece == std::floor(piece))) {
        problem(key + " element " + std::to_string(i + 1) + " is " + std::to_string(piece) +
                ", expected an integer in [0, 65535]");
        return fallback;
      }
      bits |= std::uint64_t(piece) << (16 * i);
    }
    double value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }

  void problem(std::string text) { problems_.push_back(std::move(text)); }

  // Throws unless every read succeeded and every key was read.
  void finish() {
    for (const auto& [key, value] : in_)
      if (!used_.count(key)) problem("unexpected " + key);
    if (problems_.empty()) return;
    std::string message = std::string(fn_) + ": optimizer state does not match the parameters: ";
    for (std::size_t i = 0; i < problems_.size(); ++i) message += (i ? "; " : "") + problems_[i];
    throw Error(message);
  }

 private:
  const xt::xarray<float>* find(const std::string& key) {
    auto it = in_.find(key);
    if (it == in_.end()) {
      problem("missing " + key);
      return nullptr;
    }
    used_.insert(key);
    return &it->second;
  }

  std::string_view fn_;
  const std::map<std::string, xt::xarray<float>>& in_;
  const std::vector<ParamGroup>& groups_;
  std::set<std::string> used_;
  std::vector<std::string> problems_;
};

// What every optimizer shares: its groups, their slots (parameters numbered over the groups in
// order) cut into fixed chunks, the step count, the checks each step and load make, and
// zero_grad / param_groups / step_count. An optimizer derives from it, checks its own options,
// then calls build(); its step() starts with check_lr_scale() and checked_params().
class OptimizerBase {
 public:
  void zero_grad() {
    for (ParamGroup& g : groups_)
      for (const ParameterRef& p : g.params) p.zero_grad();
  }

  std::vector<ParamGroup>& param_groups() { return groups_; }
  const std::vector<ParamGroup>& param_groups() const { return groups_; }
  std::int64_t step_count() const { return step_count_; }

 protected:
  explicit OptimizerBase(std::vector<ParamGroup> groups) : groups_(std::move(groups)) {}

  // Checks the groups (check_groups; `adam`: betas and eps too) and cuts them into chunks.
  void build(std::string_view fn, bool adam = false) {
    chunks_ = check_groups(groups_, fn, adam);
    for (const ParamGroup& g : groups_)
      for (const ParameterRef& p : g.params) sizes_.push_back(p.value().size());
  }

  // A zero state vector per slot, sized like the parameter.
  std::vector<std::vector<float>> zero_state() const {
    std::vector<std::vector<float>> out;
    for (std::size_t n : sizes_) out.emplace_back(n, 0.0f);
    return out;
  }

  // A copy of every parameter's values, per slot.
  std::vector<std::vector<float>> parameter_values() const {
    std::vector<std::vector<float>> out;
    for (const ParamGroup& g : groups_)
      for (const ParameterRef& p : g.params) {
        const std::span<float> v = p.value();
        out.emplace_back(v.begin(), v.end());
      }
    return out;
  }

  static void check_lr_scale(std::string_view fn, double lr_scale) {
    require(std::isfinite(lr_scale) && lr_scale >= 0, fn, "lr_scale is ", lr_scale,
            ", expected a finite value >= 0");
  }

  // The parameters' spans per slot, each checked: its gradient's shape (with `gradients`) and
  // its size.
  std::vector<ParamSpans> checked_params(std::string_view fn, bool gradients = true) const {
    std::vector<ParamSpans> params;
    std::size_t slot = 0;
    for (const ParamGroup& g : groups_)
      for (std::size_t i = 0; i < g.params.size(); ++i, ++slot) {
        const ParameterRef& p = g.params[i];
        if (gradients) {
          const std::vector<std::size_t> shape = p.shape(), grad_shape = p.grad_shape();
          require(grad_shape == shape, fn, "gradient of '", g.names[i], "' has shape ",
                  shape_string(grad_shape), ", expected ", shape_string(shape));
        }
        require(p.value().size() == sizes_[slot], fn, "parameter '", g.names[i],
                "' changed size since the optimizer was built");
        params.push_back({p.value(), p.grad()});
      }
    return params;
  }

  // f(chunk) for every chunk, spread over OpenMP threads.
  template <class F>
  void for_each_chunk(F&& f) const {
    parallel_items(chunks_.size(), [&](std::size_t c) { f(chunks_[c]); });
  }

  // Starts load_state_dict(state, step_count): checks step_count, then reads through the result.
  StateReader read_state(std::string_view fn, const std::map<std::string, xt::xarray<float>>& state,
                         std::int64_t step_count) const {
    require(step_count >= 0, fn, "step_count is ", step_count, ", expected >= 0");
    return StateReader(fn, state, groups_);
  }

  std::vector<ParamGroup> groups_;
  std::vector<UpdateChunk> chunks_;
  std::vector<std::size_t> sizes_;  // elements per slot when built
  std::int64_t step_count_ = 0;
};

}  // namespace detail

/// AdamW (Loshchilov & Hutter; PyTorch torch.optim.AdamW, amsgrad off). Per update t = 1, 2, …
/// with the group's lr scaled by lr_scale (the LR schedule's multiplier):
// p ← p(1−lr·wd); m ← β1m + (1−β1)g; v ← β2v + (1−β2)g²; p ← p − lr/(1−β1^t)·m/(√v/√(1−β2^t) + ε)
class AdamW : public detail::OptimizerBase {
 public:
  static constexpr std::string_view kName = "adamw";
  // What kohya records as ss_optimizer (the Python module + "." + class).
  static constexpr std::string_view kKohyaClass = "torch.optim.adamw.AdamW";

  explicit AdamW(std::vector<ParamGroup> groups) : OptimizerBase(std::move(groups)) {
    build("AdamW", true);
    exp_avg_ = exp_avg_sq_ = zero_state();
  }

  /// One update from the current gradients, with lr = group.lr · lr_scale.
  void step(double lr_scale = 1.0) {
    check_lr_scale("AdamW::step", lr_scale);
    const std::vector<detail::ParamSpans> params = checked_params("AdamW::step");
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
    for_each_chunk([&](const detail::UpdateChunk& ch) {
      const detail::ParamSpans& p = params[ch.slot];
      detail::adamw_kernel<xsimd::default_arch>(
          p.value.data() + ch.offset, p.grad.data() + ch.offset,
          exp_avg_[ch.slot].data() + ch.offset, exp_avg_sq_[ch.slot].data() + ch.offset, ch.size,
          k[ch.group]);
    });
  }

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
    detail::StateReader in = read_state("AdamW::load_state_dict", state, step_count);
    auto m = in.per_parameter("exp_avg");
    auto v = in.per_parameter("exp_avg_sq");
    in.finish();
    exp_avg_ = std::move(m);
    exp_avg_sq_ = std::move(v);
    step_count_ = step_count;
  }

 private:
  std::vector<std::vector<float>> exp_avg_, exp_avg_sq_;
};

/// SGD with momentum (PyTorch torch.optim.SGD, dampening 0). With d = g + wd·p:
// b ← d (first update) or μ·b + d;  d ← d + μ·b (nesterov) or b (momentum > 0);  p ← p − lr·d
class Sgd : public detail::OptimizerBase {
 public:
  static constexpr std::string_view kName = "sgd";
  // What kohya records as ss_optimizer (the Python module + "." + class).
  static constexpr std::string_view kKohyaClass = "torch.optim.sgd.SGD";

  explicit Sgd(std::vector<ParamGroup> groups) : OptimizerBase(std::move(groups)) {
    build("Sgd");
    momentum_buffer_ = zero_state();
  }

  void step(double lr_scale = 1.0) {
    check_lr_scale("Sgd::step", lr_scale);
    const std::vector<detail::ParamSpans> params = checked_params("Sgd::step");
    std::vector<detail::SgdCoefficients> k(groups_.size());
    for (std::size_t gi = 0; gi < groups_.size(); ++gi) {
      const ParamGroup& g = groups_[gi];
      k[gi] = {float(g.lr * lr_scale), float(g.weight_decay), float(g.momentum), g.nesterov,
               step_count_ == 0};
    }
    for_each_chunk([&](const detail::UpdateChunk& ch) {
      const detail::ParamSpans& p = params[ch.slot];
      detail::sgd_kernel<xsimd::default_arch>(p.value.data() + ch.offset, p.grad.data() + ch.offset,
                                              momentum_buffer_[ch.slot].data() + ch.offset, ch.size,
                                              k[ch.group]);
    });
    ++step_count_;
  }

  /// "<name>.momentum_buffer" for every parameter.
  std::map<std::string, xt::xarray<float>> state_dict() const {
    std::map<std::string, xt::xarray<float>> out;
    detail::export_state(out, groups_, "momentum_buffer", momentum_buffer_);
    return out;
  }

  void load_state_dict(const std::map<std::string, xt::xarray<float>>& state,
                       std::int64_t step_count) {
    detail::StateReader in = read_state("Sgd::load_state_dict", state, step_count);
    auto b = in.per_parameter("momentum_buffer");
    in.finish();
    momentum_buffer_ = std::move(b);
    step_count_ = step_count;
  }

 private:
  std::vector<std::vector<float>> momentum_buffer_;
};

static_assert(Optimizer<AdamW>);
static_assert(Optimizer<Sgd>);

}  // namespace difftrain::train
