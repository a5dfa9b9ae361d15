#pragma once
// Parameters and modules. A parameter has a value, a gradient, a trainable flag; a module names
// its parameters as diffusers/PyTorch do ("to_q.weight", "norm1.bias", "to_out.0.weight") by
// visiting them: `module.for_each_parameter(prefix, visitor)` calls visitor(full_name, param).
// Backward passes accumulate (+=) into gradients; a frozen parameter has no gradient (empty),
// and layers skip computing it.

#include <cstddef>
#include <map>
#include <string>
#include <utility>
#include <vector>
#include <xtensor/xarray.hpp>
#include <xtensor/xbuilder.hpp>

#include "difftrain/concepts.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"

namespace difftrain::nn {

/// While a FrozenConstruction lives, the parameters this thread creates start frozen, without
/// gradient storage: a model loaded to be adapted, frozen or sampled never holds a gradient per
/// weight on the way (PyTorch allocates .grad lazily; here it comes with the parameter, and
/// building SD 1.5 trainable and then freezing it peaked at twice its weights).
class FrozenConstruction {
 public:
  FrozenConstruction() { ++depth(); }
  ~FrozenConstruction() { --depth(); }
  FrozenConstruction(const FrozenConstruction&) = delete;
  FrozenConstruction& operator=(const FrozenConstruction&) = delete;
  static bool active() { return depth() > 0; }

 private:
  static int& depth() {
    thread_local int d = 0;
    return d;
  }
};

template <class T>
struct Parameter {
  xt::xarray<T> value;
  xt::xarray<T> grad;  // same shape as value when trainable, shape [0] (no element) when frozen
  bool trainable = true;

  Parameter() = default;
  explicit Parameter(std::vector<std::size_t> shape, bool is_trainable = true)
      : value(xt::zeros<T>(shape)),
        grad(no_grad()),
        trainable(is_trainable && !FrozenConstruction::active()) {
    if (trainable) grad = xt::zeros<T>(shape);
  }

  void set_trainable(bool on) {
    trainable = on;
    if (on && grad.shape() != value.shape()) grad = xt::zeros<T>(value.shape());
    if (!on) grad = no_grad();
  }
  void zero_grad() {
    if (trainable) grad.fill(T(0));
  }
  std::size_t size() const { return value.size(); }

 private:
  // A default xarray is 0-dimensional with one element; a frozen gradient has none.
  static xt::xarray<T> no_grad() { return xt::xarray<T>::from_shape({0}); }
};

/// "prefix" + "." + "name", or "name" when the prefix is empty.
inline std::string join_name(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

/// (name, parameter*) for every parameter, in the module's order.
template <class T, Module M>
std::vector<std::pair<std::string, Parameter<T>*>> named_parameters(M& module) {
  std::vector<std::pair<std::string, Parameter<T>*>> out;
  module.for_each_parameter(
      "", [&](const std::string& name, Parameter<T>& p) { out.emplace_back(name, &p); });
  return out;
}

template <class T, Module M>
void zero_grad(M& module) {
  module.for_each_parameter("", [](const std::string&, Parameter<T>& p) { p.zero_grad(); });
}

/// Freezes (false) or unfreezes (true) every parameter of a module.
template <class T, Module M>
void set_trainable(M& module, bool on) {
  module.for_each_parameter("", [&](const std::string&, Parameter<T>& p) { p.set_trainable(on); });
}

/// Two modules trained as one (by reference): `first`'s parameters under their own names, then
/// `second`'s under `second_prefix` (e.g. a UNet and its text encoder under "text_encoder").
template <Module A, Module B>
struct ModulePair {
  A& first;
  B& second;
  std::string second_prefix;

  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) {
    first.for_each_parameter(prefix, visit);
    second.for_each_parameter(join_name(prefix, second_prefix), visit);
  }
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) const {
    std::as_const(first).for_each_parameter(prefix, visit);
    std::as_const(second).for_each_parameter(join_name(prefix, second_prefix), visit);
  }
};

/// name → value copies (as float for saving).
template <class T, Module M>
std::map<std::string, xt::xarray<T>> state_dict(M& module) {
  std::map<std::string, xt::xarray<T>> out;
  module.for_each_parameter(
      "", [&](const std::string& name, Parameter<T>& p) { out.emplace(name, p.value); });
  return out;
}

/// Strict load: every parameter must be present with its shape, and no key may be left over.
/// All missing, unexpected and misshapen keys are listed in one Error.
template <class T, Module M, class Source>
void load_state_dict(M& module, const std::map<std::string, Source>& values,
                     std::string_view what = "load_state_dict") {
  std::vector<std::string> missing, misshapen;
  std::map<std::string, bool> used;
  module.for_each_parameter("", [&](const std::string& name, Parameter<T>& p) {
    auto it = values.find(name);
    if (it == values.end()) {
      missing.push_back(name);
      return;
    }
    used[name] = true;
    const auto& src = it->second;
    if (!std::equal(src.shape().begin(), src.shape().end(), p.value.shape().begin(),
                    p.value.shape().end())) {
      misshapen.push_back(name + " has shape " + shape_string(src.shape()) + ", expected " +
                          shape_string(p.value.shape()));
      return;
    }
    std::copy(src.begin(), src.end(), p.value.begin());
  });
  std::vector<std::string> unexpected;
  for (const auto& [name, v] : values)
    if (!used.count(name)) unexpected.push_back(name);
  if (missing.empty() && unexpected.empty() && misshapen.empty()) return;
  std::string message(what);
  message += ": state does not match the module";
  auto list = [&](const char* title, const std::vector<std::string>& names) {
    if (names.empty()) return;
    message += "; " + std::to_string(names.size()) + " " + title + ": ";
    for (std::size_t i = 0; i < names.size(); ++i) message += (i ? ", " : "") + names[i];
  };
  list("missing", missing);
  list("unexpected", unexpected);
  list("misshapen", misshapen);
  throw Error(message);
}

}  // namespace difftrain::nn
