#pragma once
// Injecting LoRA adapters into a model by module name (PEFT target_modules semantics).
//
// Mechanism (small on purpose):
//  - A model holds each adaptable layer in a LoraSlot<Base> (LinearSlot<T>, Conv2dSlot<T>): a
//    plain layer, or that layer wrapped in a LoraLayer. The slot forwards forward/backward and
//    names its parameters exactly like the plain layer (`weight`, `bias`), plus `lora_A.weight`,
//    `lora_B.weight` once adapted.
//  - A model exposes its slots with `for_each_slot(prefix, visitor)`, calling
//    visitor(full_dotted_name, slot) for each (a generic visitor: slots differ in type), in the
//    same recursive style as for_each_parameter. A slot's own for_each_slot visits itself.
//  - inject_lora(model, targets, config, stream) freezes every parameter of the model, adapts the
//    slots whose name equals a target or ends with "." + target (e.g. "to_q", "to_out.0"), and
//    returns the adapted names in visit order. Each adapter's stream is derived from its name, so
//    its init and dropout masks do not depend on which other modules are targeted.
//  - adapter_parameters(model) / base_parameters(model) are views satisfying nn::Module: the
//    adapters only (to save a LoRA file or build an optimizer) and the base only (to strictly
//    load base weights into an adapted model).

#include <cstddef>
#include <cstdint>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "difftrain/concepts.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/lora/lora_conv2d.hpp"
#include "difftrain/lora/lora_linear.hpp"
#include "difftrain/nn/conv2d.hpp"
#include "difftrain/nn/linear.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::lora {

template <class Base>
class LoraSlot {
 public:
  using Scalar = typename Base::Scalar;
  using T = Scalar;
  using Adapted = LoraLayer<Base>;

  LoraSlot() = default;
  explicit LoraSlot(Base layer) : impl_(std::move(layer)) {}

  bool has_adapter() const { return std::holds_alternative<Adapted>(impl_); }
  Base& base() { return has_adapter() ? std::get<Adapted>(impl_).base : std::get<Base>(impl_); }
  const Base& base() const {
    return has_adapter() ? std::get<Adapted>(impl_).base : std::get<Base>(impl_);
  }
  Adapted& adapter() {
    require(has_adapter(), "LoraSlot::adapter", "the slot has no adapter");
    return std::get<Adapted>(impl_);
  }
  const Adapted& adapter() const {
    require(has_adapter(), "LoraSlot::adapter", "the slot has no adapter");
    return std::get<Adapted>(impl_);
  }

  /// Wraps the layer in a fresh adapter (base frozen, adapters trainable).
  void inject(const LoraConfig& config, RandomStream rs) {
    require(!has_adapter(), "LoraSlot::inject", "the slot already has an adapter");
    Base layer = std::move(std::get<Base>(impl_));
    impl_.template emplace<Adapted>(std::move(layer), config, rs);
  }
  /// Back to the plain layer; with merge = true its weight keeps the adapter's delta.
  void remove_adapter(bool merge) {
    Adapted& a = adapter();
    if (merge && !a.merged()) a.merge();
    if (!merge && a.merged()) a.unmerge();
    Base layer = std::move(a.base);
    impl_.template emplace<Base>(std::move(layer));
  }

  template <class X>
  X forward(const X& x) {
    return std::visit([&](auto& layer) { return X(layer.forward(x)); }, impl_);
  }
  template <class X>
  X forward_inference(const X& x) const {
    return std::visit([&](const auto& layer) { return X(layer.forward_inference(x)); }, impl_);
  }
  template <class X>
  X backward(const X& dy, bool input_grad = true) {
    return std::visit([&](auto& layer) { return X(layer.backward(dy, input_grad)); }, impl_);
  }

  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    std::visit([&](auto& layer) { layer.for_each_parameter(prefix, visit); }, impl_);
  }
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) const {
    std::visit([&](const auto& layer) { layer.for_each_parameter(prefix, visit); }, impl_);
  }
  void clear_saved() {
    std::visit([](auto& layer) { layer.clear_saved(); }, impl_);
  }

  template <class Visitor>
  void for_each_slot(const std::string& prefix, Visitor&& visit) {
    visit(prefix, *this);
  }

 private:
  std::variant<Base, Adapted> impl_;
};

template <class T = float>
using LinearSlot = LoraSlot<nn::Linear<T>>;
template <class T = float>
using Conv2dSlot = LoraSlot<nn::Conv2d<T>>;

/// PEFT target_modules rule: name == target, or name ends with "." + target.
inline bool matches_target(std::string_view name, std::string_view target) {
  if (target.empty()) return false;
  if (name == target) return true;
  return name.size() > target.size() && name.ends_with(target) &&
         name[name.size() - target.size() - 1] == '.';
}

/// True for the names of adapter parameters ("…lora_A.weight", "…lora_B.weight").
inline bool is_adapter_parameter(std::string_view name) {
  for (std::string_view leaf : {"lora_A.weight", "lora_B.weight"})
    if (name == leaf || (name.ends_with(leaf) && name[name.size() - leaf.size() - 1] == '.'))
      return true;
  return false;
}

/// Adapts every slot matching a target (all parameters but the adapters are frozen) and returns
/// the adapted names. Throws if a target matches nothing or a matching slot is already adapted.
/// Calls stack: adapters of an earlier call stay trainable (e.g. convs at another rank).
template <class M>
requires HasLoraSlots<M> && nn::Module<M> std::vector<std::string> inject_lora(
    M& model, const std::vector<std::string>& targets, const LoraConfig& config, RandomStream rs) {
  config.validate("inject_lora");
  require(!targets.empty(), "inject_lora", "no target modules given");
  model.for_each_parameter("", [](const std::string& name, auto& p) {
    if (!is_adapter_parameter(name)) p.set_trainable(false);
  });
  std::vector<std::string> adapted;
  std::set<std::string> used;
  model.for_each_slot("", [&](const std::string& name, auto& slot) {
    bool hit = false;
    for (const auto& target : targets) {
      if (matches_target(name, target)) {
        used.insert(target);
        hit = true;
      }
    }
    if (!hit) return;
    require(!slot.has_adapter(), "inject_lora", "module ", name, " already has an adapter");
    slot.inject(config, lora_detail::substream(rs, lora_detail::name_hash(name),
                                               StreamPurpose::lora_adapter));
    adapted.push_back(name);
  });
  std::string unmatched;
  for (const auto& target : targets)
    if (!used.count(target)) unmatched += (unmatched.empty() ? "" : ", ") + target;
  require(unmatched.empty(), "inject_lora", "target modules not found in the model: ", unmatched);
  return adapted;
}

/// kohya networks.lora's targets in an SD UNet (LoRANetwork.UNET_TARGET_REPLACE_MODULE): every
/// Linear and 1×1 convolution inside the Transformer2DModel blocks.
inline std::vector<std::string> kohya_transformer_targets() {
  return {"proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"};
}
/// With kohya's conv_dim (LoCon, UNET_TARGET_REPLACE_MODULE_CONV2D_3X3: ResnetBlock2D,
/// Downsample2D, Upsample2D): their Linear and 1×1 convolutions take the network's rank, …
inline std::vector<std::string> kohya_resnet_targets() {
  return {"time_emb_proj", "conv_shortcut"};
}
/// … their 3×3 convolutions take conv_dim / conv_alpha.
inline std::vector<std::string> kohya_conv3x3_targets() { return {"conv1", "conv2", "conv"}; }

/// kohya's text-encoder targets (TEXT_ENCODER_TARGET_REPLACE_MODULE: CLIPAttention, CLIPMLP):
/// every Linear of the attention and the MLP.
inline std::vector<std::string> kohya_text_encoder_targets() {
  return {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"};
}
/// diffusers' text-encoder LoRA targets (the DreamBooth LoRA script's text_lora_config).
inline std::vector<std::string> diffusers_text_encoder_targets() {
  return {"q_proj", "k_proj", "v_proj", "out_proj"};
}

/// The targets that match at least one of `modules` (a preset set on a model lacking some, e.g.
/// a UNet without conv_shortcut).
inline std::vector<std::string> present_targets(const std::vector<std::string>& targets,
                                                const std::vector<std::string>& modules) {
  std::vector<std::string> out;
  for (const auto& t : targets)
    for (const auto& m : modules)
      if (matches_target(m, t)) {
        out.push_back(t);
        break;
      }
  return out;
}

/// Calls f(name, adapter) for every adapted slot.
template <HasLoraSlots M, class F>
void for_each_adapter(M& model, F&& f) {
  model.for_each_slot("", [&](const std::string& name, auto& slot) {
    if (slot.has_adapter()) f(name, slot.adapter());
  });
}

/// Selects the dropout masks of training step `step` in every adapter, for a batch whose rows b
/// are rows global_rows[b] of the step's whole batch (a data-parallel shard; empty: 0..B−1).
template <HasLoraSlots M>
void set_lora_step(M& model, std::uint64_t step, std::span<const std::uint64_t> global_rows = {}) {
  for_each_adapter(model, [&](const std::string&, auto& a) { a.set_step(step, global_rows); });
}
/// Training (dropout options active) or eval mode for every adapter.
template <HasLoraSlots M>
void set_lora_training(M& model, bool training) {
  for_each_adapter(model, [&](const std::string&, auto& a) { a.training = training; });
}
template <HasLoraSlots M>
void set_lora_multiplier(M& model, double multiplier) {
  for_each_adapter(model, [&](const std::string&, auto& a) { a.set_multiplier(multiplier); });
}
template <HasLoraSlots M>
void merge_lora(M& model) {
  for_each_adapter(model, [&](const std::string&, auto& a) { a.merge(); });
}
template <HasLoraSlots M>
void unmerge_lora(M& model) {
  for_each_adapter(model, [&](const std::string&, auto& a) { a.unmerge(); });
}
/// Removes every adapter (merging its delta into the base weight when merge is true).
template <HasLoraSlots M>
void remove_lora(M& model, bool merge) {
  model.for_each_slot("", [&](const std::string&, auto& slot) {
    if (slot.has_adapter()) slot.remove_adapter(merge);
  });
}

/// nn::Module view of a model's adapter parameters only.
template <class M>
struct AdapterParameters {
  M* model;
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    model->for_each_slot(prefix, [&](const std::string& name, auto& slot) {
      if (slot.has_adapter()) slot.adapter().for_each_adapter_parameter(name, visit);
    });
  }
};
/// nn::Module view of a model's base parameters only (every parameter but the adapters).
template <class M>
struct BaseParameters {
  M* model;
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    model->for_each_parameter(prefix, [&](const std::string& name, auto& p) {
      if (!is_adapter_parameter(name)) visit(name, p);
    });
  }
};
template <HasLoraSlots M>
AdapterParameters<M> adapter_parameters(M& model) {
  return {&model};
}
template <nn::Module M>
BaseParameters<M> base_parameters(M& model) {
  return {&model};
}

}  // namespace difftrain::lora
