#pragma once
// Gradient checkpointing of a chain of units (diffusers' gradient_checkpointing, which wraps each
// resnet and each transformer block of the UNet in torch.utils.checkpoint).
//
// Off, a unit's forward saves what its backward needs, as always. On, forward keeps only the
// unit's input x_j (and the block's conditioning c, once) and frees what the unit saved
// (unit.clear_saved()); backward first reruns unit.forward(x_j, c), which rebuilds the saved state
// with the same arithmetic, back-propagates, and frees it again. The gradients are bitwise those
// of a run without checkpointing (a recomputation, not an approximation; random masks depend only
// on the step, so they repeat) for one more forward of each unit; the memory held between forward
// and backward is the units' inputs, and during backward the saved state of one unit at a time.

#include <cstddef>
#include <utility>
#include <vector>

#include "difftrain/core/error.hpp"

namespace difftrain::nn {

template <class Input, class Condition>
class Checkpoints {
 public:
  bool enabled() const { return enabled_; }
  void set_enabled(bool on) {
    enabled_ = on;
    if (!on) {
      inputs_ = std::vector<Input>();
      condition_ = Condition();
    }
  }

  /// Starts a forward of the chain with conditioning c (kept when enabled).
  void begin(const Condition& c) {
    if (!enabled_) return;
    condition_ = c;
    for (auto& x : inputs_) x = Input();
  }

  // y = unit.forward(x, c); keeps x as input j and frees the unit's saved state when enabled
  template <class Unit>
  Input forward(Unit& unit, std::size_t j, const Input& x, const Condition& c) {
    Input y = unit.forward(x, c);
    if (enabled_) {
      if (inputs_.size() <= j) inputs_.resize(j + 1);
      inputs_[j] = x;
      unit.clear_saved();
    }
    return y;
  }

  // unit.backward(args…), after recomputing unit j's forward when enabled (freed again after)
  template <class Unit, class... Args>
  auto backward(Unit& unit, std::size_t j, Args&&... args) {
    if (!enabled_) return unit.backward(std::forward<Args>(args)...);
    require(j < inputs_.size() && inputs_[j].size() > 0, "gradient checkpointing",
            "no kept input for unit ", j, " (call forward first)");
    unit.forward(inputs_[j], condition_);
    auto dx = unit.backward(std::forward<Args>(args)...);
    unit.clear_saved();
    inputs_[j] = Input();
    return dx;
  }

 private:
  bool enabled_ = false;
  std::vector<Input> inputs_;
  Condition condition_{};
};

}  // namespace difftrain::nn
