#pragma once
// Activations: SiLU, GELU (exact erf form and tanh approximation), GEGLU (diffusers FeedForward's
// gated projection `ff.net.0`).
//
// Dims legend: any shape, elementwise; GEGLU: R rows (leading dims flattened), I dim_in,
// O dim_out, its projection Linear I → 2·O named "proj" (key `ff.net.0.proj.weight`).
//   silu(x)      = x·σ(x)                                  silu'(x) = σ(x)·(1 + x·(1 − σ(x)))
//   gelu(x)      = x·Φ(x) = ½x(1 + erf(x/√2))              gelu'(x) = Φ(x) + x·φ(x)
//   gelu_tanh(x) = ½x(1 + tanh(u)), u = √(2/π)(x + 0.044715x³)
//                                   gelu_tanh'(x) = ½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²)
//   geglu(x)     = h[:, :O] · gelu(h[:, O:]),  h = proj(x)  (first half value, second half gate)
// Each module's forward saves its input (GEGLU: h); backward returns dx (GEGLU: accumulates the
// projection's parameter gradients).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numbers>
#include <string>
#include <vector>
#include <xtensor/xtensor.hpp>

#include "difftrain/core/error.hpp"
#include "difftrain/core/parallel.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/nn/linear.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::nn {

// ---- scalar functions ----

// silu(x) = x / (1 + e^(−x))
template <class T>
T silu(T x) {
  return x / (T(1) + std::exp(-x));
}
// silu'(x) = σ(x)·(1 + x·(1 − σ(x)))
template <class T>
T silu_grad(T x) {
  const T s = T(1) / (T(1) + std::exp(-x));
  return s * (T(1) + x * (T(1) - s));
}

/// diffusers/PyTorch `approximate`: "none" (exact erf) or "tanh".
enum class GeluApproximation { none, tanh };

namespace activation_detail {
inline constexpr double kGeluTanhCoefficient = 0.044715;
inline constexpr double kSqrtTwoOverPi = 0.7978845608028654;  // √(2/π)
inline constexpr double kInvSqrtTwo = 0.7071067811865476;     // 1/√2
inline constexpr double kInvSqrtTwoPi = 0.3989422804014327;   // 1/√(2π)
}  // namespace activation_detail

// gelu(x) = ½x(1 + erf(x/√2))  or  ½x(1 + tanh(√(2/π)(x + 0.044715x³)))
template <class T>
T gelu(T x, GeluApproximation approximate = GeluApproximation::none) {
  using namespace activation_detail;
  if (approximate == GeluApproximation::tanh) {
    const T u = T(kSqrtTwoOverPi) * (x + T(kGeluTanhCoefficient) * x * x * x);
    return T(0.5) * x * (T(1) + std::tanh(u));
  }
  return T(0.5) * x * (T(1) + std::erf(x * T(kInvSqrtTwo)));
}
// gelu'(x) = Φ(x) + x·φ(x)  (tanh form: ½(1 + t) + ½x(1 − t²)·u'(x))
template <class T>
T gelu_grad(T x, GeluApproximation approximate = GeluApproximation::none) {
  using namespace activation_detail;
  if (approximate == GeluApproximation::tanh) {
    const T u = T(kSqrtTwoOverPi) * (x + T(kGeluTanhCoefficient) * x * x * x);
    const T t = std::tanh(u);
    const T du = T(kSqrtTwoOverPi) * (T(1) + T(3 * kGeluTanhCoefficient) * x * x);
    return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * du;
  }
  const T cdf = T(0.5) * (T(1) + std::erf(x * T(kInvSqrtTwo)));
  const T pdf = T(kInvSqrtTwoPi) * std::exp(T(-0.5) * x * x);
  return cdf + x * pdf;
}

namespace activation_detail {
// y[i] = f(x[i]) over n elements (OpenMP for large tensors)
template <class T, class F>
void map(const T* x, std::size_t n, T* y, F f) {
  const auto count = static_cast<std::int64_t>(n);
#pragma omp parallel for schedule(static) if (parallel::exceeds(n, parallel::kElementwiseSize))
  for (std::int64_t i = 0; i < count; ++i) y[i] = f(x[i]);
}
// dx[i] = dy[i]·f'(x[i])
template <class T, class F>
void map_backward(const T* x, const T* dy, std::size_t n, T* dx, F grad) {
  const auto count = static_cast<std::int64_t>(n);
#pragma omp parallel for schedule(static) if (parallel::exceeds(n, parallel::kElementwiseSize))
  for (std::int64_t i = 0; i < count; ++i) dx[i] = dy[i] * grad(x[i]);
}

// Saves the input of an elementwise op and checks dy against it.
template <class T>
class SavedInput {
 public:
  template <std::size_t N>
  void save(const Tensor<T, N>& x) {
    values_.assign(x.begin(), x.end());
    shape_.assign(x.shape().begin(), x.shape().end());
  }
  template <std::size_t N>
  void check(std::string_view function, const Tensor<T, N>& dy) const {
    require(shape_.size() == N, function, "no saved forward of rank ", N, " (call forward first)");
    check_same_shape(function, "dy", dy.shape(), shape_);
  }
  const T* data() const { return values_.data(); }
  void clear() {
    values_ = std::vector<T>();  // (= {} would keep the capacity)
    shape_ = std::vector<std::size_t>();
  }

 private:
  std::vector<T> values_;
  std::vector<std::size_t> shape_;
};
}  // namespace activation_detail

// ---- modules ----

/// SiLU (x·σ(x)), no parameters.
template <class T = float>
class SiLU {
 public:
  template <class Visitor>
  void for_each_parameter(const std::string&, Visitor&&) const {}

  template <std::size_t N>
  Tensor<T, N> forward(const Tensor<T, N>& x) {
    saved_.save(x);
    return forward_inference(x);
  }
  template <std::size_t N>
  Tensor<T, N> forward_inference(const Tensor<T, N>& x) const {
    Tensor<T, N> y(x.shape());
    activation_detail::map(x.data(), x.size(), y.data(), [](T v) { return silu(v); });
    return y;
  }
  // dx = dy·silu'(x)
  template <std::size_t N>
  Tensor<T, N> backward(const Tensor<T, N>& dy) const {
    saved_.check("SiLU::backward", dy);
    Tensor<T, N> dx(dy.shape());
    activation_detail::map_backward(saved_.data(), dy.data(), dy.size(), dx.data(),
                                    [](T v) { return silu_grad(v); });
    return dx;
  }
  /// Drops the saved forward context (frees its memory).
  void clear_saved() { saved_.clear(); }

 private:
  activation_detail::SavedInput<T> saved_;
};

/// GELU, exact (erf) by default or the tanh approximation; no parameters.
template <class T = float>
class GELU {
 public:
  explicit GELU(GeluApproximation approximate = GeluApproximation::none)
      : approximate_(approximate) {}
  GeluApproximation approximate() const { return approximate_; }

  template <class Visitor>
  void for_each_parameter(const std::string&, Visitor&&) const {}

  template <std::size_t N>
  Tensor<T, N> forward(const Tensor<T, N>& x) {
    saved_.save(x);
    return forward_inference(x);
  }
  template <std::size_t N>
  Tensor<T, N> forward_inference(const Tensor<T, N>& x) const {
    Tensor<T, N> y(x.shape());
    const auto a = approximate_;
    activation_detail::map(x.data(), x.size(), y.data(), [a](T v) { return gelu(v, a); });
    return y;
  }
  // dx = dy·gelu'(x)
  template <std::size_t N>
  Tensor<T, N> backward(const Tensor<T, N>& dy) const {
    saved_.check("GELU::backward", dy);
    Tensor<T, N> dx(dy.shape());
    const auto a = approximate_;
    activation_detail::map_backward(saved_.data(), dy.data(), dy.size(), dx.data(),
                                    [a](T v) { return gelu_grad(v, a); });
    return dx;
  }

 private:
  GeluApproximation approximate_;
  activation_detail::SavedInput<T> saved_;
};

struct GEGLUConfig {
  std::size_t dim_in = 0;
  std::size_t dim_out = 0;
  bool bias = true;
  GeluApproximation approximate = GeluApproximation::none;  // diffusers GEGLU: exact
};

/// diffusers GEGLU: h = proj(x) [.., 2·O]; y = h[.., :O] · gelu(h[.., O:]).
template <class T = float>
class GEGLU {
 public:
  using Scalar = T;
  Linear<T> proj;  // [2·O, I]

  GEGLU() = default;
  explicit GEGLU(GEGLUConfig config)
      : proj(config.dim_in, 2 * config.dim_out, config.bias), config_(config) {}
  GEGLU(std::size_t dim_in, std::size_t dim_out) : GEGLU(GEGLUConfig{dim_in, dim_out}) {}

  const GEGLUConfig& config() const { return config_; }

  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    proj.for_each_parameter(join_name(prefix, "proj"), visit);
  }
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) const {
    proj.for_each_parameter(join_name(prefix, "proj"), visit);
  }

  // y = value · gelu(gate) with [value, gate] = split(proj(x)), saving h = proj(x)
  template <std::size_t N>
  Tensor<T, N> forward(const Tensor<T, N>& x) {
    Tensor<T, N> h = proj.forward(x);
    Tensor<T, N> y = gate(h);
    saved_.save(h);
    saved_shape_.assign(y.shape().begin(), y.shape().end());
    return y;
  }
  template <std::size_t N>
  Tensor<T, N> forward_inference(const Tensor<T, N>& x) const {
    return gate(proj.forward_inference(x));
  }

  // dvalue = dy·gelu(gate), dgate = dy·value·gelu'(gate); dx = proj.backward([dvalue, dgate])
  template <std::size_t N>
  Tensor<T, N> backward(const Tensor<T, N>& dy) {
    require(saved_shape_.size() == N, "GEGLU::backward", "no saved forward of rank ", N,
            " (call forward first)");
    check_same_shape("GEGLU::backward", "dy", dy.shape(), saved_shape_);
    const std::size_t O = config_.dim_out, rows = dy.size() / O;
    auto h_shape = dy.shape();
    h_shape[N - 1] = 2 * O;
    Tensor<T, N> dh(h_shape);
    const T* h = saved_.data();
    const auto a = config_.approximate;
    const auto R = static_cast<std::int64_t>(rows);
#pragma omp parallel for schedule( \
    static) if (parallel::exceeds(rows * O, parallel::kElementwiseSize))
    for (std::int64_t r = 0; r < R; ++r) {
      const T* hr = h + r * 2 * O;
      const T* dyr = dy.data() + r * O;
      T* dhr = dh.data() + r * 2 * O;
      for (std::size_t j = 0; j < O; ++j) {
        dhr[j] = dyr[j] * gelu(hr[O + j], a);
        dhr[O + j] = dyr[j] * hr[j] * gelu_grad(hr[O + j], a);
      }
    }
    return proj.backward(dh);
  }

 private:
  template <std::size_t N>
  Tensor<T, N> gate(const Tensor<T, N>& h) const {
    const std::size_t O = config_.dim_out, rows = h.size() / (2 * O);
    auto shape = h.shape();
    shape[N - 1] = O;
    Tensor<T, N> y(shape);
    const auto a = config_.approximate;
    const auto R = static_cast<std::int64_t>(rows);
#pragma omp parallel for schedule( \
    static) if (parallel::exceeds(rows * O, parallel::kElementwiseSize))
    for (std::int64_t r = 0; r < R; ++r) {
      const T* hr = h.data() + r * 2 * O;
      T* yr = y.data() + r * O;
      for (std::size_t j = 0; j < O; ++j) yr[j] = hr[j] * gelu(hr[O + j], a);
    }
    return y;
  }

  GEGLUConfig config_{};
  activation_detail::SavedInput<T> saved_;
  std::vector<std::size_t> saved_shape_;
};

}  // namespace difftrain::nn
