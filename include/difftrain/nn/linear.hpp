#pragma once
// Linear layer (PyTorch nn.Linear): y = x Wᵀ + b.
//
// Dims legend: R rows (every leading dim of the input flattened: B·L tokens, or B), I in_features,
// O out_features. Weight [O, I] row-major (PyTorch layout, loads unchanged), bias [O].
// Input [..., I] row-major → output [..., O]; GEMMs run in Eigen on row-major Maps of the xtensor
// data (no copies).
//
// forward(x) saves a copy of x (what backward needs); backward(dy) returns dx and accumulates (+=)
// dW and db. A frozen parameter (trainable == false) has an empty grad and its GEMM is skipped.
// One forward context is kept: a second forward before backward overwrites it.

#include <Eigen/Core>
#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>
#include <xtensor/xadapt.hpp>
#include <xtensor/xtensor.hpp>

#include "difftrain/core/error.hpp"
#include "difftrain/core/ordered_sum.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/nn/bf16_weight.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::nn {

/// Row-major Eigen views of raw row-major buffers (the library-wide convention for GEMMs).
template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using RowMatrixMap = Eigen::Map<RowMatrix<T>>;
template <class T>
using ConstRowMatrixMap = Eigen::Map<const RowMatrix<T>>;
template <class T>
using VectorMap = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>>;
template <class T>
using ConstVectorMap = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>>;

struct LinearConfig {
  std::size_t in_features = 0;
  std::size_t out_features = 0;
  bool bias = true;
};

template <class T = float>
class Linear {
 public:
  using Scalar = T;

  Parameter<T> weight;  // [O, I]
  Parameter<T> bias;    // [O]; shape [0] when config.bias is false (never visited then)

  Linear() = default;
  explicit Linear(LinearConfig config)
      : weight({config.out_features, config.in_features}),
        bias({config.bias ? config.out_features : 0}),
        config_(config) {
    require(config.in_features > 0 && config.out_features > 0, "Linear",
            "in_features and out_features must be positive, got ", config.in_features, " and ",
            config.out_features);
  }
  Linear(std::size_t in_features, std::size_t out_features, bool has_bias = true)
      : Linear(LinearConfig{in_features, out_features, has_bias}) {}

  const LinearConfig& config() const { return config_; }
  std::size_t in_features() const { return config_.in_features; }
  std::size_t out_features() const { return config_.out_features; }
  bool has_bias() const { return config_.bias; }

  /// Visits "prefix.weight" and, with a bias, "prefix.bias" (PyTorch names and order).
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    visit(join_name(prefix, "weight"), weight);
    if (config_.bias) visit(join_name(prefix, "bias"), bias);
  }
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) const {
    visit(join_name(prefix, "weight"), weight);
    if (config_.bias) visit(join_name(prefix, "bias"), bias);
  }

  // ---- raw row API (no saved state; for callers that own their buffers, e.g. attention) ----

  // Y[R, O] = X[R, I] · Wᵀ + b
  void forward_rows(const T* x, std::size_t rows, T* y) const {
    check_parameters("Linear::forward", false);
    ConstRowMatrixMap<T> X(x, rows, in_features());
    ConstRowMatrixMap<T> W(bf16_.data(weight), out_features(), in_features());
    RowMatrixMap<T> Y(y, rows, out_features());
    Y.noalias() = X * W.transpose();
    if (config_.bias) {
      ConstVectorMap<T> b(bias.value.data(), out_features());
      Y.rowwise() += b.transpose();
    }
  }

  // dX[R, I] = dY · W (skipped when dx is null); dW += dYᵀ · X; db += Σ_R dY (each unless frozen)
  void backward_rows(const T* x, const T* dy, std::size_t rows, T* dx) {
    check_parameters("Linear::backward", true);
    ConstRowMatrixMap<T> dY(dy, rows, out_features());
    if (dx != nullptr) {
      RowMatrixMap<T> dX(dx, rows, in_features());
      dX.noalias() = dY * ConstRowMatrixMap<T>(bf16_.data(weight), out_features(), in_features());
    }
    if (weight.trainable) {
      RowMatrixMap<T> dW(weight.grad.data(), out_features(), in_features());
      dW.noalias() += dY.transpose() * ConstRowMatrixMap<T>(x, rows, in_features());
    }
    if (config_.bias && bias.trainable) {
      add_column_sums(dy, rows, out_features(), bias.grad.data());
    }
  }

  // ---- tensor API: any rank ≥ 1, last dim I → O ----

  // y = x Wᵀ + b, saving x for backward when the weight is trainable (dx needs only W)
  template <std::size_t N>
  Tensor<T, N> forward(const Tensor<T, N>& x) {
    Tensor<T, N> y = forward_inference(x);
    input_saved_ = weight.trainable;
    if (input_saved_) {
      saved_input_.assign(x.begin(), x.end());
    } else {
      saved_input_ = std::vector<T>();
    }
    saved_shape_.assign(x.shape().begin(), x.shape().end());
    return y;
  }

  // y = x Wᵀ + b without saving anything (validation / sampling)
  template <std::size_t N>
  Tensor<T, N> forward_inference(const Tensor<T, N>& x) const {
    static_assert(N >= 1, "Linear needs an input of rank >= 1");
    require(x.shape()[N - 1] == in_features(), "Linear::forward", "x has shape ",
            shape_string(x.shape()), ", expected last dim ", in_features());
    auto shape = x.shape();
    shape[N - 1] = out_features();
    Tensor<T, N> y(shape);
    forward_rows(x.data(), x.size() / in_features(), y.data());
    return y;
  }

  /// dx for the saved input (empty tensor of the same rank when !input_grad); accumulates dW, db.
  template <std::size_t N>
  Tensor<T, N> backward(const Tensor<T, N>& dy, bool input_grad = true) {
    require(saved_shape_.size() == N, "Linear::backward", "no saved forward of rank ", N,
            " (call forward first)");
    require(!weight.trainable || input_saved_, "Linear::backward",
            "the weight was frozen during the forward, which therefore kept no input; run the "
            "forward again after making it trainable");
    auto expected = dy.shape();
    std::copy(saved_shape_.begin(), saved_shape_.end(), expected.begin());
    expected[N - 1] = out_features();
    check_same_shape("Linear::backward", "dy", dy.shape(), expected);
    const std::size_t rows = dy.size() / out_features();
    Tensor<T, N> dx;
    if (input_grad) {
      auto in_shape = expected;
      in_shape[N - 1] = in_features();
      dx = Tensor<T, N>(in_shape);
    }
    backward_rows(saved_input_.data(), dy.data(), rows, input_grad ? dx.data() : nullptr);
    return dx;
  }

  /// --mixed_precision bf16: keeps the frozen weight as bfloat16 (nn/bf16_weight.hpp); weight.value
  /// is left empty.
  void store_weight_bf16() { bf16_.store(weight, "Linear::store_weight_bf16"); }
  bool weight_in_bf16() const { return bf16_.stored(); }

  /// Drops the saved forward context (frees its memory).
  void clear_saved() {
    saved_input_ = std::vector<T>();  // (= {} would keep the capacity)
    saved_shape_ = std::vector<std::size_t>();
    input_saved_ = false;
  }

 private:
  void check_parameters(std::string_view function, bool grads) const {
    if (bf16_.stored()) {
      require(bf16_.size() == out_features() * in_features(), function, "the bf16 weight has ",
              bf16_.size(), " elements, expected ", out_features(), "x", in_features());
    } else {
      check_shape(function, "weight", weight.value.shape(), {out_features(), in_features()});
    }
    if (grads && weight.trainable)
      check_shape(function, "weight.grad", weight.grad.shape(), {out_features(), in_features()});
    if (config_.bias) {
      check_shape(function, "bias", bias.value.shape(), {out_features()});
      if (grads && bias.trainable)
        check_shape(function, "bias.grad", bias.grad.shape(), {out_features()});
    }
  }

  LinearConfig config_{};
  Bf16Weight<T> bf16_;
  std::vector<T> saved_input_;  // empty when the weight was frozen in the forward
  std::vector<std::size_t> saved_shape_;
  bool input_saved_ = false;
};

}  // namespace difftrain::nn
