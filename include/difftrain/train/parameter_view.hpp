#pragma once
// What the training loop trains: a model's trainable parameters as views (a name, the values and
// the gradient as flat float spans, the shape), so that any model fits, not only an nn::Module:
//
//   struct MyModel {                       // weights in std::vector<float>, no nn::Parameter
//     std::vector<float> w, w_grad;
//     std::vector<train::ParameterView> trainable_parameters() {
//       return {{"w", w, w_grad, {w.size()}}};
//     }
//   };
//
// TrainableModel admits such a model and every nn::Module (its trainable nn::Parameter<float>s,
// in the module's order, under their names). Optimizers, EMA, clipping and the Trainer hold each
// parameter as a ParameterRef: an nn::Parameter<float> is read through its pointer at every use
// (its arrays may be reassigned between steps, and its trainable flag and gradient shape are
// checked as before); a view's storage must stay in place while they use it.

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <functional>
#include <optional>
#include <ranges>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::train {

/// One trainable parameter: its name (the key of checkpoints and optimizer state), its values and
/// gradient (flat, row-major, as many elements as the product of `shape`) and its shape.
struct ParameterView {
  std::string name;
  std::span<float> value;
  std::span<float> grad;
  std::vector<std::size_t> shape;
};

/// A range whose elements convert to ParameterView (what trainable_parameters() returns).
template <class R>
concept ParameterViewRange = std::ranges::input_range<R> &&
    std::convertible_to<std::ranges::range_reference_t<R>, ParameterView>;

/// A model that lists its trainable parameters itself: `model.trainable_parameters()` returns a
/// range of ParameterView (a hand-written model with std::vector<float> weights, host mirrors of
/// GPU buffers, …). The views' storage must stay in place while a Trainer or optimizer uses it.
template <class M>
concept HasTrainableParameters = requires(M& m) {
  { m.trainable_parameters() } -> ParameterViewRange;
};

/// What the Trainer, make_param_groups and EmaModel::from_module train: a model with
/// trainable_parameters() (preferred when a type has both) or an nn::Module.
template <class M>
concept TrainableModel = HasTrainableParameters<M> || nn::Module<M>;

/// An optimizer's (and the Trainer's) handle on one parameter: an nn::Parameter<float> or a
/// ParameterView (see the top of the file). Implicit from both, so `group.params = {&p}` and
/// `group.params = {view}` read naturally.
class ParameterRef {
 public:
  ParameterRef(nn::Parameter<float>* p) : param_(p) {}  // NOLINT(google-explicit-constructor)
  ParameterRef(ParameterView v) : view_(std::move(v)) {
    std::size_t n = 1;
    for (std::size_t d : view_->shape) n *= d;
    require(n == view_->value.size(), "ParameterRef", "parameter '", view_->name, "' has ",
            view_->value.size(), " values, expected ", n, " (its shape ",
            shape_string(view_->shape), ")");
  }

  bool is_null() const { return param_ == nullptr && !view_; }
  std::span<float> value() const {
    return param_ ? std::span<float>(param_->value.data(), param_->value.size()) : view_->value;
  }
  std::span<float> grad() const {
    return param_ ? std::span<float>(param_->grad.data(), param_->grad.size()) : view_->grad;
  }
  std::vector<std::size_t> shape() const {
    return param_ ? std::vector<std::size_t>(param_->value.shape().begin(),
                                             param_->value.shape().end())
                  : view_->shape;
  }
  /// The gradient's shape: an nn::Parameter's own; a view's is its value's when the sizes match,
  /// else [grad.size()] (a span has no shape).
  std::vector<std::size_t> grad_shape() const {
    if (param_) return {param_->grad.shape().begin(), param_->grad.shape().end()};
    if (view_->grad.size() == view_->value.size()) return view_->shape;
    return {view_->grad.size()};
  }
  /// An nn::Parameter's flag; a view is trainable when its gradient has its value's size.
  bool trainable() const {
    return param_ ? param_->trainable : view_->grad.size() == view_->value.size();
  }
  void zero_grad() const {
    if (param_)
      param_->zero_grad();
    else if (trainable())
      std::fill(view_->grad.begin(), view_->grad.end(), 0.0f);
  }
  /// A view's own name ("" for an nn::Parameter, whose name its group or owner keeps).
  const std::string& view_name() const {
    static const std::string none;
    return view_ ? view_->name : none;
  }
  /// What identifies the parameter (its nn::Parameter, or a view's first value); null if none.
  const void* identity() const {
    return param_ ? static_cast<const void*>(param_)
                  : (view_ ? static_cast<const void*>(view_->value.data()) : nullptr);
  }
  /// The nn::Parameter referred to, or null for a view.
  nn::Parameter<float>* parameter() const { return param_; }

  friend bool operator==(const ParameterRef& r, const nn::Parameter<float>* p) {
    return r.param_ != nullptr && r.param_ == p;
  }

  /// The current view under `name`.
  ParameterView view(std::string name) const { return {std::move(name), value(), grad(), shape()}; }

 private:
  nn::Parameter<float>* param_ = nullptr;
  std::optional<ParameterView> view_;
};

/// A named parameter (name, handle), in a model's order.
using NamedParameter = std::pair<std::string, ParameterRef>;

/// The trainable parameters of a model: trainable_parameters()'s views, or an nn::Module's
/// trainable nn::Parameter<float>s (in its order, under its names).
template <TrainableModel M>
std::vector<NamedParameter> named_trainable_parameters(M& model) {
  std::vector<NamedParameter> out;
  if constexpr (HasTrainableParameters<M>) {
    for (auto&& v : model.trainable_parameters()) {
      ParameterView view = v;
      std::string name = view.name;
      out.emplace_back(std::move(name), ParameterRef(std::move(view)));
    }
  } else {
    for (auto& [name, p] : nn::named_parameters<float>(model))
      if (p->trainable) out.emplace_back(name, ParameterRef(p));
  }
  return out;
}

}  // namespace difftrain::train
