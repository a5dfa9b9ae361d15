#pragma once
// A model as a tree of named nn layers, walked once per block; shapes without allocation.
//
// Every UNet block describes its structure in one place, a static `walk(self, prefix, f)` that
// calls f(full_name, layer, layer_config) for each leaf layer it owns (lora::LinearSlot,
// lora::Conv2dSlot, nn::GroupNorm, nn::LayerNorm, nn::TimestepEmbedding), in diffusers' order,
// and forwards f to the walks of its child blocks. Linear and Conv2d layers live in LoRA slots
// (lora/inject.hpp): plain layers until inject_lora adapts them by name. CompositeModule<Derived>
// derives from that single walk:
//   for_each_parameter(prefix, visit(name, Parameter&))     the nn::Module interface
//   for_each_parameter_shape(prefix, visit(name, shape))    from the layer configs only
//   for_each_slot(prefix, visit(name, slot&))               lora::HasLoraSlots (inject_lora)
//   for_each_linear(prefix, f(name, nn::Linear&))           the base layers by module name
//   for_each_conv2d(prefix, f(name, nn::Conv2d&))
// A block built with Allocation::shapes_only keeps its layer configs but default-constructs
// its layers (no parameter storage), so the 860M-parameter SD 1.5 UNet can be enumerated with
// names and shapes for a few kilobytes; UNet2DConditionModel built so refuses forward and the
// visitors that would hand out its empty layers. for_each_parameter_shape lists the base
// model's parameters (LoRA adapters injected later are not part of the config).
//
// parameter_shapes(layer_config, prefix, visit) restates, for each nn layer, the names and
// shapes its constructor creates; the tests compare both enumerations on allocated models.

#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "difftrain/core/function_ref.hpp"
#include "difftrain/lora/inject.hpp"
#include "difftrain/nn/conv2d.hpp"
#include "difftrain/nn/group_norm.hpp"
#include "difftrain/nn/layer_norm.hpp"
#include "difftrain/nn/linear.hpp"
#include "difftrain/nn/parameter.hpp"
#include "difftrain/nn/timestep_embedding.hpp"

namespace difftrain::models {

/// Whether a model allocates its parameters or only records their shapes.
enum class Allocation { parameters, shapes_only };

using ParameterShape = std::vector<std::size_t>;

// ---- names and shapes each nn layer creates, from its config ----

template <class V>
void parameter_shapes(const nn::LinearConfig& c, const std::string& prefix, V&& visit) {
  visit(nn::join_name(prefix, "weight"), ParameterShape{c.out_features, c.in_features});
  if (c.bias) visit(nn::join_name(prefix, "bias"), ParameterShape{c.out_features});
}
template <class V>
void parameter_shapes(const nn::Conv2dConfig& c, const std::string& prefix, V&& visit) {
  visit(nn::join_name(prefix, "weight"),
        ParameterShape{c.out_channels, c.in_channels, c.kernel_size, c.kernel_size});
  if (c.bias) visit(nn::join_name(prefix, "bias"), ParameterShape{c.out_channels});
}
template <class V>
void parameter_shapes(const nn::GroupNormConfig& c, const std::string& prefix, V&& visit) {
  if (!c.affine) return;
  visit(nn::join_name(prefix, "weight"), ParameterShape{c.num_channels});
  visit(nn::join_name(prefix, "bias"), ParameterShape{c.num_channels});
}
template <class V>
void parameter_shapes(const nn::LayerNormConfig& c, const std::string& prefix, V&& visit) {
  if (!c.elementwise_affine) return;
  visit(nn::join_name(prefix, "weight"), ParameterShape{c.normalized_shape});
  visit(nn::join_name(prefix, "bias"), ParameterShape{c.normalized_shape});
}
template <class V>
void parameter_shapes(const nn::TimestepEmbeddingConfig& c, const std::string& prefix, V&& visit) {
  const std::size_t out = c.out_dim != 0 ? c.out_dim : c.time_embed_dim;
  parameter_shapes(nn::LinearConfig{c.in_channels, c.time_embed_dim, c.sample_proj_bias},
                   nn::join_name(prefix, "linear_1"), visit);
  parameter_shapes(nn::LinearConfig{c.time_embed_dim, out, c.sample_proj_bias},
                   nn::join_name(prefix, "linear_2"), visit);
}

/// A layer built from its config, or left default-constructed (no storage) when shapes_only.
template <class Layer, class Config>
Layer make_layer(const Config& config, Allocation allocation) {
  return allocation == Allocation::parameters ? Layer(config) : Layer();
}
/// A LoRA slot holding a plain layer built from its config (empty when shapes_only).
template <class Slot, class Config>
Slot make_slot(const Config& config, Allocation allocation) {
  using Base = std::remove_cvref_t<decltype(std::declval<Slot&>().base())>;
  return allocation == Allocation::parameters ? Slot(Base(config)) : Slot();
}

// The scalar type of a model template M<T>, read without M<T> being complete (CompositeModule's
// members name it while the derived class is still being defined).
template <class M>
struct model_scalar;
template <template <class> class M, class T>
struct model_scalar<M<T>> {
  using type = T;
};

/// The interfaces derived from Derived::walk (see the header comment). Each for_each_* passes its
/// visitor on as a FunctionRef to a visit_* member that is not a template: the walk is compiled
/// once per model rather than once per lambda (src/models/ instantiates the UNet's).
template <class Derived>
class CompositeModule {
  using T = typename model_scalar<Derived>::type;

 public:
  using ParameterVisitor = FunctionRef<void(const std::string&, nn::Parameter<T>&)>;
  using ConstParameterVisitor = FunctionRef<void(const std::string&, const nn::Parameter<T>&)>;
  using ShapeVisitor = FunctionRef<void(const std::string&, const ParameterShape&)>;
  using LinearVisitor = FunctionRef<void(const std::string&, nn::Linear<T>&)>;
  using Conv2dVisitor = FunctionRef<void(const std::string&, nn::Conv2d<T>&)>;
  /// One callable seen as a visitor of both slot types.
  struct SlotVisitor {
    FunctionRef<void(const std::string&, lora::LinearSlot<T>&)> linear;
    FunctionRef<void(const std::string&, lora::Conv2dSlot<T>&)> conv2d;
  };

  template <class V>
  void for_each_parameter(const std::string& prefix, V&& visit) {
    visit_parameters(prefix, ParameterVisitor(visit));
  }
  template <class V>
  void for_each_parameter(const std::string& prefix, V&& visit) const {
    visit_parameters(prefix, ConstParameterVisitor(visit));
  }
  /// visit(name, std::vector<std::size_t> shape) for every parameter, allocated or not.
  template <class V>
  void for_each_parameter_shape(const std::string& prefix, V&& visit) const {
    visit_parameter_shapes(prefix, ShapeVisitor(visit));
  }
  /// visit(module name, lora::LinearSlot<T>& or lora::Conv2dSlot<T>&) for every slot.
  template <class V>
  void for_each_slot(const std::string& prefix, V&& visit) {
    visit_slots(prefix, SlotVisitor{visit, visit});
  }
  /// f(module name, nn::Linear<T>&) for every Linear (a slot's base; time_embedding's too).
  template <class F>
  void for_each_linear(const std::string& prefix, F&& f) {
    visit_linears(prefix, LinearVisitor(f));
  }
  /// f(module name, nn::Conv2d<T>&) for every Conv2d (a slot's base).
  template <class F>
  void for_each_conv2d(const std::string& prefix, F&& f) {
    visit_conv2ds(prefix, Conv2dVisitor(f));
  }

  void visit_parameters(const std::string& prefix, ParameterVisitor visit);
  void visit_parameters(const std::string& prefix, ConstParameterVisitor visit) const;
  void visit_parameter_shapes(const std::string& prefix, ShapeVisitor visit) const;
  void visit_slots(const std::string& prefix, SlotVisitor visit);
  void visit_linears(const std::string& prefix, LinearVisitor f);
  void visit_conv2ds(const std::string& prefix, Conv2dVisitor f);

 protected:
  CompositeModule() = default;

 private:
  Derived& self() { return static_cast<Derived&>(*this); }
  const Derived& self() const { return static_cast<const Derived&>(*this); }
};

template <class Derived>
void CompositeModule<Derived>::visit_parameters(const std::string& prefix, ParameterVisitor visit) {
  Derived::walk(self(), prefix, [&](const std::string& name, auto& layer, const auto&) {
    layer.for_each_parameter(name, visit);
  });
}
template <class Derived>
void CompositeModule<Derived>::visit_parameters(const std::string& prefix,
                                                ConstParameterVisitor visit) const {
  Derived::walk(self(), prefix, [&](const std::string& name, const auto& layer, const auto&) {
    layer.for_each_parameter(name, visit);
  });
}
template <class Derived>
void CompositeModule<Derived>::visit_parameter_shapes(const std::string& prefix,
                                                      ShapeVisitor visit) const {
  Derived::walk(self(), prefix, [&](const std::string& name, const auto&, const auto& config) {
    parameter_shapes(config, name, visit);
  });
}
template <class Derived>
void CompositeModule<Derived>::visit_slots(const std::string& prefix, SlotVisitor visit) {
  Derived::walk(self(), prefix, [&](const std::string& name, auto& layer, const auto&) {
    using Layer = std::remove_cvref_t<decltype(layer)>;
    if constexpr (std::is_same_v<Layer, lora::LinearSlot<T>>) visit.linear(name, layer);
    if constexpr (std::is_same_v<Layer, lora::Conv2dSlot<T>>) visit.conv2d(name, layer);
  });
}
template <class Derived>
void CompositeModule<Derived>::visit_linears(const std::string& prefix, LinearVisitor f) {
  Derived::walk(self(), prefix, [&](const std::string& name, auto& layer, const auto&) {
    using Layer = std::remove_cvref_t<decltype(layer)>;
    if constexpr (std::is_same_v<Layer, lora::LinearSlot<T>>) {
      f(name, layer.base());
    } else if constexpr (requires { layer.for_each_linear(name, f); }) {
      layer.for_each_linear(name, f);
    }
  });
}
template <class Derived>
void CompositeModule<Derived>::visit_conv2ds(const std::string& prefix, Conv2dVisitor f) {
  Derived::walk(self(), prefix, [&](const std::string& name, auto& layer, const auto&) {
    if constexpr (std::is_same_v<std::remove_cvref_t<decltype(layer)>, lora::Conv2dSlot<T>>)
      f(name, layer.base());
  });
}

}  // namespace difftrain::models
