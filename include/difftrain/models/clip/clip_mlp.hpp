#pragma once
// The feed-forward block of the CLIP text transformer (transformers' CLIPMLP): fc1, activation,
// fc2 (in LoRA slots, lora/inject.hpp), and CLIP's quick_gelu activation.
//
// Dims legend: R rows (B·L tokens), D hidden_size, F intermediate_size.
//   quick_gelu(x) = x·σ(1.702x) = x / (1 + e^(−1.702x))
//   quick_gelu'(x) = σ(1.702x)·(1 + 1.702x·(1 − σ(1.702x)))
//   mlp(x) = fc2(act(fc1(x))),  fc1 [F, D] + [F],  fc2 [D, F] + [D],  act quick_gelu or gelu (erf)
// forward saves fc1's output h (and each slot its input); backward returns dx.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

#include "difftrain/core/parallel.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/lora/inject.hpp"
#include "difftrain/models/clip/clip_config.hpp"
#include "difftrain/nn/activations.hpp"
#include "difftrain/nn/linear.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::models {

// quick_gelu(x) = x·σ(1.702x)
template <class T>
T quick_gelu(T x) {
  return x / (T(1) + std::exp(T(-1.702) * x));
}
// quick_gelu'(x) = σ(1.702x)·(1 + 1.702x·(1 − σ(1.702x)))
template <class T>
T quick_gelu_grad(T x) {
  const T s = T(1) / (T(1) + std::exp(T(-1.702) * x));
  return s * (T(1) + T(1.702) * x * (T(1) - s));
}

/// transformers' CLIPMLP.
template <class T = float>
class ClipMlp {
 public:
  using Scalar = T;

  lora::LinearSlot<T> fc1;  // [F, D]
  lora::LinearSlot<T> fc2;  // [D, F]

  ClipMlp() = default;
  ClipMlp(std::size_t hidden_size, std::size_t intermediate_size, ClipActivation activation)
      : fc1(nn::Linear<T>(hidden_size, intermediate_size, true)),
        fc2(nn::Linear<T>(intermediate_size, hidden_size, true)),
        activation_(activation) {}

  ClipActivation activation() const { return activation_; }

  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) {
    fc1.for_each_parameter(nn::join_name(prefix, "fc1"), visit);
    fc2.for_each_parameter(nn::join_name(prefix, "fc2"), visit);
  }
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) const {
    fc1.for_each_parameter(nn::join_name(prefix, "fc1"), visit);
    fc2.for_each_parameter(nn::join_name(prefix, "fc2"), visit);
  }
  template <class F>
  void for_each_slot(const std::string& prefix, F&& visit) {
    visit(nn::join_name(prefix, "fc1"), fc1);
    visit(nn::join_name(prefix, "fc2"), fc2);
  }

  // y = fc2(act(fc1(x))), x [B, L, D] → [B, L, D], saving for backward
  Tensor3<T> forward(const Tensor3<T>& x) {
    h_ = fc1.forward(x);
    Tensor3<T> a(h_.shape());
    activate(h_.data(), a.data(), h_.size());
    return fc2.forward(a);
  }
  // the same without saving anything
  Tensor3<T> forward_inference(const Tensor3<T>& x) const {
    Tensor3<T> h = fc1.forward_inference(x);
    activate(h.data(), h.data(), h.size());
    return fc2.forward_inference(h);
  }

  // dx = fc1'(act'(h) ⊙ fc2'(dy))
  Tensor3<T> backward(const Tensor3<T>& dy) {
    require(h_.size() > 0, "ClipMlp::backward", "no saved forward (call forward first)");
    Tensor3<T> da = fc2.backward(dy);
    T* d = da.data();
    const T* h = h_.data();
    const auto n = static_cast<std::int64_t>(da.size());
    if (activation_ == ClipActivation::quick_gelu) {
#pragma omp parallel for schedule(static) if (parallel::exceeds(n, parallel::kElementwiseSize))
      for (std::int64_t i = 0; i < n; ++i) d[i] *= quick_gelu_grad(h[i]);
    } else {
#pragma omp parallel for schedule(static) if (parallel::exceeds(n, parallel::kElementwiseSize))
      for (std::int64_t i = 0; i < n; ++i) d[i] *= nn::gelu_grad(h[i]);
    }
    return fc1.backward(da);
  }

  void clear_saved() {
    h_ = Tensor3<T>();
    fc1.clear_saved();
    fc2.clear_saved();
  }

 private:
  // y[i] = act(x[i]) (in place allowed)
  void activate(const T* x, T* y, std::size_t size) const {
    const auto n = static_cast<std::int64_t>(size);
    if (activation_ == ClipActivation::quick_gelu) {
#pragma omp parallel for schedule(static) if (parallel::exceeds(n, parallel::kElementwiseSize))
      for (std::int64_t i = 0; i < n; ++i) y[i] = quick_gelu(x[i]);
    } else {
#pragma omp parallel for schedule(static) if (parallel::exceeds(n, parallel::kElementwiseSize))
      for (std::int64_t i = 0; i < n; ++i) y[i] = nn::gelu(x[i]);
    }
  }

  ClipActivation activation_ = ClipActivation::quick_gelu;
  Tensor3<T> h_;  // fc1's output of the last forward
};

}  // namespace difftrain::models
