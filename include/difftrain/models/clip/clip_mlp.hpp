#pragma once
// The feed-forward block of the CLIP text transformer (transformers' CLIPMLP): fc1, activation,
// fc2, and CLIP's quick_gelu activation.
//
// Dims legend: R rows (B·L tokens), D hidden_size, F intermediate_size.
//   quick_gelu(x) = x·σ(1.702x) = x / (1 + e^(−1.702x))
//   mlp(x) = fc2(act(fc1(x))),  fc1 [F, D] + [F],  fc2 [D, F] + [D],  act quick_gelu or gelu (erf)
// Forward only (the text encoder is frozen).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

#include "difftrain/core/parallel.hpp"
#include "difftrain/core/tensor.hpp"
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

/// transformers' CLIPMLP, forward only.
template <class T = float>
class ClipMlp {
 public:
  using Scalar = T;

  nn::Linear<T> fc1;  // [F, D]
  nn::Linear<T> fc2;  // [D, F]

  ClipMlp() = default;
  ClipMlp(std::size_t hidden_size, std::size_t intermediate_size, ClipActivation activation)
      : fc1(hidden_size, intermediate_size, true),
        fc2(intermediate_size, hidden_size, true),
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

  // y = fc2(act(fc1(x))), x [B, L, D] → [B, L, D]
  Tensor3<T> forward(const Tensor3<T>& x) const {
    Tensor3<T> h = fc1.forward_inference(x);
    T* data = h.data();
    const auto n = static_cast<std::int64_t>(h.size());
    if (activation_ == ClipActivation::quick_gelu) {
#pragma omp parallel for schedule(static) if (parallel::exceeds(n, parallel::kElementwiseSize))
      for (std::int64_t i = 0; i < n; ++i) data[i] = quick_gelu(data[i]);
    } else {
#pragma omp parallel for schedule(static) if (parallel::exceeds(n, parallel::kElementwiseSize))
      for (std::int64_t i = 0; i < n; ++i) data[i] = nn::gelu(data[i]);
    }
    return fc2.forward_inference(h);
  }

 private:
  ClipActivation activation_ = ClipActivation::quick_gelu;
};

}  // namespace difftrain::models
