#pragma once
// Exponential moving average of the trainable parameters with diffusers' EMAModel semantics
// (training_utils.py): a shadow copy updated after every optimizer step, copied into the model
// for validation or export (store → copy_to → … → restore).
//
// At update n (1-based), k = max(0, n − update_after_step − 1):
//   d = 0 if k <= 0; else 1 − (1 + k/inv_gamma)^(−power) (use_ema_warmup) or (1 + k)/(10 + k);
//   d ← clamp(d, min_decay, decay);  shadow ← shadow − (1 − d)·(shadow − p)
// so the first update copies the weights. A parameter frozen at update time is copied.
// The parameters are ParameterRefs (parameter_view.hpp): nn::Parameter<float>s or views of any
// model's storage.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>
#include <xtensor/xarray.hpp>

#include "difftrain/core/error.hpp"
#include "difftrain/core/parallel.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/nn/parameter.hpp"
#include "difftrain/train/parameter_view.hpp"

namespace difftrain::train {

struct EmaOptions {
  double decay = 0.9999;
  double min_decay = 0.0;
  std::int64_t update_after_step = 0;
  bool use_ema_warmup = false;
  double inv_gamma = 1.0;
  double power = 2.0 / 3.0;

  void validate() const {
    constexpr const char* fn = "EmaOptions";
    require(decay >= 0 && decay <= 1, fn, "decay is ", decay, ", expected in [0, 1]");
    require(min_decay >= 0 && min_decay <= decay, fn, "min_decay is ", min_decay,
            ", expected in [0, decay = ", decay, "]");
    require(update_after_step >= 0, fn, "update_after_step is ", update_after_step,
            ", expected >= 0");
    require(std::isfinite(inv_gamma) && inv_gamma > 0, fn, "inv_gamma is ", inv_gamma,
            ", expected a finite value > 0");
    require(std::isfinite(power) && power > 0, fn, "power is ", power,
            ", expected a finite value > 0");
  }
};

class EmaModel {
 public:
  /// Shadows of the given (name, parameter) pairs, initialised to their current values.
  EmaModel(std::vector<NamedParameter> params, EmaOptions options)
      : params_(std::move(params)), options_(options) {
    options_.validate();
    for (const auto& [name, p] : params_) {
      require(!p.is_null(), "EmaModel", "parameter '", name, "' is a null pointer");
      xt::xarray<float> shadow = xt::xarray<float>::from_shape(p.shape());
      std::copy(p.value().begin(), p.value().end(), shadow.begin());
      shadow_.push_back(std::move(shadow));
    }
  }

  /// Shadows of the model's trainable parameters (an nn::Module's or trainable_parameters()'s).
  template <TrainableModel M>
  static EmaModel from_module(M& module, EmaOptions options = {}) {
    return EmaModel(named_trainable_parameters(module), options);
  }

  /// d at update n (1-based); formula at the top of the file.
  double get_decay(std::int64_t optimization_step) const {
    const std::int64_t k =
        std::max<std::int64_t>(0, optimization_step - options_.update_after_step - 1);
    if (k <= 0) return 0.0;
    const double kd = double(k);
    const double d = options_.use_ema_warmup
                         ? 1.0 - std::pow(1.0 + kd / options_.inv_gamma, -options_.power)
                         : (1.0 + kd) / (10.0 + kd);
    return std::max(std::min(d, options_.decay), options_.min_decay);
  }

  /// One update after an optimizer step; returns the decay used.
  double step() {
    ++optimization_step_;
    const double d = get_decay(optimization_step_);
    const float one_minus_decay = static_cast<float>(1.0 - d);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const ParameterRef& p = params_[i].second;
      check_shape(i, "EmaModel::step");
      float* s = shadow_[i].data();
      const float* v = p.value().data();
      const auto n = static_cast<std::ptrdiff_t>(p.value().size());
      if (!p.trainable()) {
        std::copy(v, v + n, s);
        continue;
      }
#pragma omp parallel for simd schedule(static) if (parallel::exceeds(n, parallel::kElementwiseSize))
      for (std::ptrdiff_t j = 0; j < n; ++j) s[j] -= one_minus_decay * (s[j] - v[j]);
    }
    return d;
  }

  /// Parameters ← shadow (e.g. before validation or export).
  void copy_to() {
    for (std::size_t i = 0; i < params_.size(); ++i) {
      check_shape(i, "EmaModel::copy_to");
      std::copy(shadow_[i].begin(), shadow_[i].end(), params_[i].second.value().begin());
    }
  }
  /// Saves the parameters' current values (to put them back with restore after copy_to).
  void store() {
    stored_.clear();
    for (const auto& [name, p] : params_) stored_.emplace_back(p.value().begin(), p.value().end());
  }
  void restore() {
    require(stored_.size() == params_.size(), "EmaModel::restore",
            "nothing stored; call store() first");
    for (std::size_t i = 0; i < params_.size(); ++i) {
      check_shape(i, "EmaModel::restore");
      std::copy(stored_[i].begin(), stored_[i].end(), params_[i].second.value().begin());
    }
    stored_.clear();
  }

  std::int64_t optimization_step() const { return optimization_step_; }
  const EmaOptions& options() const { return options_; }

  /// name → shadow tensor.
  std::map<std::string, xt::xarray<float>> state_dict() const {
    std::map<std::string, xt::xarray<float>> out;
    for (std::size_t i = 0; i < params_.size(); ++i) out.emplace(params_[i].first, shadow_[i]);
    return out;
  }
  /// Strict: every shadow with its shape, nothing else.
  void load_state_dict(const std::map<std::string, xt::xarray<float>>& state,
                       std::int64_t optimization_step) {
    require(optimization_step >= 0, "EmaModel::load_state_dict", "optimization_step is ",
            optimization_step, ", expected >= 0");
    std::vector<std::string> problems;
    std::vector<xt::xarray<float>> loaded = shadow_;
    std::size_t used = 0;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      auto it = state.find(params_[i].first);
      if (it == state.end()) {
        problems.push_back("missing " + params_[i].first);
        continue;
      }
      ++used;
      if (it->second.shape() != shadow_[i].shape()) {
        problems.push_back(params_[i].first + " has shape " + shape_string(it->second.shape()) +
                           ", expected " + shape_string(shadow_[i].shape()));
        continue;
      }
      loaded[i] = it->second;
    }
    if (used != state.size())
      problems.push_back(std::to_string(state.size() - used) + " unexpected tensors");
    if (!problems.empty()) {
      std::string message = "EmaModel::load_state_dict: state does not match the shadow: ";
      for (std::size_t i = 0; i < problems.size(); ++i) message += (i ? "; " : "") + problems[i];
      throw Error(message);
    }
    shadow_ = std::move(loaded);
    optimization_step_ = optimization_step;
  }

 private:
  void check_shape(std::size_t i, const char* fn) const {
    const std::vector<std::size_t> shape = params_[i].second.shape();
    require(std::equal(shape.begin(), shape.end(), shadow_[i].shape().begin(),
                       shadow_[i].shape().end()),
            fn, "parameter '", params_[i].first, "' has shape ", shape_string(shape), ", expected ",
            shape_string(shadow_[i].shape()), " as its shadow");
  }

  std::vector<NamedParameter> params_;
  EmaOptions options_;
  std::vector<xt::xarray<float>> shadow_;
  std::vector<std::vector<float>> stored_;
  std::int64_t optimization_step_ = 0;
};

}  // namespace difftrain::train
