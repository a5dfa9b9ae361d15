#pragma once
// Multi-head attention as diffusers' `Attention` (the UNet's attn1 / attn2): self-attention, or
// cross-attention over a context (the text encoder's states), with projections to_q, to_k, to_v
// (no bias) and to_out.0 (with bias); to_out.1 is a dropout (identity in this reference layer).
//
// Dims legend: B batch, L query tokens, Lc context tokens (= L for self-attention),
// Dq query_dim, Dc cross_attention_dim (= Dq for self-attention), Hn heads, Hd dim_head,
// I = Hn·Hd inner dim. Heads split the inner dim: q [B, L, I] is viewed as [B, L, Hn, Hd].
//
//   q = x Wqᵀ, k = c Wkᵀ, v = c Wvᵀ                     (c = x for self-attention)
//   per (b, h): S = q_bh k_bhᵀ / √Hd [L, Lc], P = softmax_rows(S), o_bh = P v_bh [L, Hd]
//   y = o Woᵀ + bo                                       [B, L, Dq]
//
// The core runs batched GEMMs with Eigen on strided row-major views of q, k, v (no head
// transposes), in OpenMP over B·Hn, and on blocks of kQueryBlock query rows, so that only a
// [kQueryBlock, Lc] score block per thread is ever held. Forward saves q, k, v (and each Linear
// its input); backward recomputes P block by block from q and k instead of keeping the
// [B, Hn, L, Lc] probabilities (memory O(B·L·I) rather than O(B·Hn·L·Lc); one extra GEMM).
// Frozen projections get no gradient, and it is not computed (Linear skips it).

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/parallel.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/nn/linear.hpp"
#include "difftrain/nn/parameter.hpp"
#include "difftrain/nn/softmax.hpp"

namespace difftrain::nn {

/// Query rows per score block of the attention core.
inline constexpr std::size_t kQueryBlock = 128;

/// Sizes of one scaled-dot-product attention call over head-interleaved buffers.
struct AttentionShape {
  std::size_t batch = 0;     // B
  std::size_t queries = 0;   // L
  std::size_t keys = 0;      // Lc
  std::size_t heads = 0;     // Hn
  std::size_t head_dim = 0;  // Hd
  bool causal = false;       // query i sees keys 0..i only (CLIP's text transformer; L = Lc)
  std::size_t inner() const { return heads * head_dim; }
  // keys a block of query rows r0..r0+n−1 can see
  std::size_t visible_keys(std::size_t r0, std::size_t n) const { return causal ? r0 + n : keys; }
  // multiply-adds of S = QKᵀ and O = PV
  std::size_t work() const { return 2 * batch * heads * queries * keys * head_dim; }
};

namespace detail {
template <class T>
using StridedMap = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;
template <class T>
using ConstStridedMap = Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>>;

// The [rows, Hd] slice of head h of sample b in a [B, rows, I] buffer.
template <class T>
ConstStridedMap<T> head_view(const T* data, const AttentionShape& s, std::size_t rows,
                             std::size_t b, std::size_t h) {
  const std::size_t I = s.inner();
  return ConstStridedMap<T>(data + b * rows * I + h * s.head_dim, rows, s.head_dim,
                            Eigen::OuterStride<>(I));
}
template <class T>
StridedMap<T> head_view(T* data, const AttentionShape& s, std::size_t rows, std::size_t b,
                        std::size_t h) {
  const std::size_t I = s.inner();
  return StridedMap<T>(data + b * rows * I + h * s.head_dim, rows, s.head_dim,
                       Eigen::OuterStride<>(I));
}
// Row kernels of softmax.hpp (same formulas) on Eigen arrays, whose exp and reductions are
// vectorised: the B·Hn·L·Lc exponentials are the core's hottest elementwise loop, and the scalar
// std::exp path took as long as its GEMMs. Results differ from the scalar kernels only in the
// last bits. Row-major [n, Lc] blocks, rows contiguous.
// y_j = exp(x_j − m) / Σ_k exp(x_k − m), m = max_k x_k, in place over x[0..n)
template <class T>
void softmax_row_inplace(T* x, Eigen::Index n) {
  Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>> row(x, n);
  const T m = row.maxCoeff();
  row = (row - m).exp();
  row *= T(1) / row.sum();
}
template <class Block>
void softmax_rows_inplace(Block&& P) {
  for (Eigen::Index i = 0; i < P.rows(); ++i) softmax_row_inplace(&P(i, 0), P.cols());
}
// The same with a causal mask: row i of a block starting at query r0 takes the softmax of its
// first r0 + i + 1 scores; the rest is exactly 0 (= exp(−∞)), so backward needs no mask.
template <class Block>
void causal_softmax_rows_inplace(Block&& P, std::size_t r0) {
  for (Eigen::Index i = 0; i < P.rows(); ++i) {
    const auto allowed = static_cast<Eigen::Index>(r0) + i + 1;
    softmax_row_inplace(&P(i, 0), allowed);
    std::fill(&P(i, 0) + allowed, &P(i, 0) + P.cols(), 0);
  }
}
template <class Block>
void masked_softmax_rows_inplace(Block&& P, const AttentionShape& s, std::size_t r0) {
  if (s.causal) {
    causal_softmax_rows_inplace(P, r0);
  } else {
    softmax_rows_inplace(P);
  }
}
// dx_j = y_j · (dy_j − Σ_k dy_k y_k), dx written over dy
template <class BlockY, class BlockD>
void softmax_rows_backward_inplace(const BlockY& P, BlockD&& dS) {
  using T = typename std::remove_cvref_t<BlockD>::Scalar;
  for (Eigen::Index i = 0; i < P.rows(); ++i) {
    Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>> y(&P(i, 0), P.cols());
    Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>> d(&dS(i, 0), dS.cols());
    const T dot = (d * y).sum();
    d = y * (d - dot);
  }
}
}  // namespace detail

/// Per-thread score buffers of the attention core (reused across calls).
template <class T>
struct AttentionWorkspace {
  std::vector<RowMatrix<T>> scores, grad_scores;
  // At least `rows` × exactly `cols` per thread; grows only (no reallocation in steady state).
  void reserve(std::size_t rows, std::size_t cols, bool backward) {
    const auto threads = static_cast<std::size_t>(parallel::max_threads());
    if (scores.size() < threads) scores.resize(threads);
    if (backward && grad_scores.size() < threads) grad_scores.resize(threads);
    auto fit = [&](RowMatrix<T>& m) {
      if (m.rows() < static_cast<Eigen::Index>(rows) || m.cols() != static_cast<Eigen::Index>(cols))
        m.resize(static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(cols));
    };
    for (auto& m : scores) fit(m);
    if (backward)
      for (auto& m : grad_scores) fit(m);
  }
};

// o_bh = softmax(q_bh k_bhᵀ · scale) v_bh for every (b, h); q, o [B, L, I]; k, v [B, Lc, I].
// With s.causal, query i sees keys 0..i (scores of a block are computed up to its last row only).
template <class T>
void scaled_dot_product_attention_forward(const T* q, const T* k, const T* v, T* o,
                                          const AttentionShape& s, T scale,
                                          AttentionWorkspace<T>& ws) {
  require(!s.causal || s.queries == s.keys, "scaled_dot_product_attention_forward",
          "causal attention needs queries (", s.queries, ") == keys (", s.keys, ")");
  const std::size_t L = s.queries, Lc = s.keys;
  ws.reserve(std::min(kQueryBlock, L), Lc, false);
  const auto jobs = static_cast<std::ptrdiff_t>(s.batch * s.heads);
#pragma omp parallel for schedule(static) if (s.work() >= parallel::kAttentionWork)
  for (std::ptrdiff_t job = 0; job < jobs; ++job) {
    const std::size_t b = static_cast<std::size_t>(job) / s.heads;
    const std::size_t h = static_cast<std::size_t>(job) % s.heads;
    auto Q = detail::head_view(q, s, L, b, h);
    auto K = detail::head_view(k, s, Lc, b, h);
    auto V = detail::head_view(v, s, Lc, b, h);
    auto O = detail::head_view(o, s, L, b, h);
    RowMatrix<T>& buffer = ws.scores[parallel::thread_id()];
    for (std::size_t r0 = 0; r0 < L; r0 += kQueryBlock) {
      const std::size_t n = std::min(kQueryBlock, L - r0), visible = s.visible_keys(r0, n);
      auto P = buffer.topLeftCorner(n, visible);
      P.noalias() = scale * (Q.middleRows(r0, n) * K.topRows(visible).transpose());
      detail::masked_softmax_rows_inplace(P, s, r0);
      O.middleRows(r0, n).noalias() = P * V.topRows(visible);
    }
  }
}

// Backward of the core, P recomputed from q and k:
// dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)), dQ = scale·dS K, dK = scale·dSᵀ Q.
// dq, dk, dv are overwritten. Masked scores have P = 0, hence dS = 0: the causal case needs only
// the visible columns.
template <class T>
void scaled_dot_product_attention_backward(const T* q, const T* k, const T* v, const T* d_o, T* dq,
                                           T* dk, T* dv, const AttentionShape& s, T scale,
                                           AttentionWorkspace<T>& ws) {
  require(!s.causal || s.queries == s.keys, "scaled_dot_product_attention_backward",
          "causal attention needs queries (", s.queries, ") == keys (", s.keys, ")");
  const std::size_t L = s.queries, Lc = s.keys;
  ws.reserve(std::min(kQueryBlock, L), Lc, true);
  const auto jobs = static_cast<std::ptrdiff_t>(s.batch * s.heads);
#pragma omp parallel for schedule(static) if (s.work() >= parallel::kAttentionWork)
  for (std::ptrdiff_t job = 0; job < jobs; ++job) {
    const std::size_t b = static_cast<std::size_t>(job) / s.heads;
    const std::size_t h = static_cast<std::size_t>(job) % s.heads;
    auto Q = detail::head_view(q, s, L, b, h);
    auto K = detail::head_view(k, s, Lc, b, h);
    auto V = detail::head_view(v, s, Lc, b, h);
    auto dO = detail::head_view(d_o, s, L, b, h);
    auto dQ = detail::head_view(dq, s, L, b, h);
    auto dK = detail::head_view(dk, s, Lc, b, h);
    auto dV = detail::head_view(dv, s, Lc, b, h);
    dK.setZero();
    dV.setZero();
    const int thread = parallel::thread_id();
    RowMatrix<T>& p_buffer = ws.scores[thread];
    RowMatrix<T>& g_buffer = ws.grad_scores[thread];
    for (std::size_t r0 = 0; r0 < L; r0 += kQueryBlock) {
      const std::size_t n = std::min(kQueryBlock, L - r0), visible = s.visible_keys(r0, n);
      auto P = p_buffer.topLeftCorner(n, visible);
      auto dS = g_buffer.topLeftCorner(n, visible);
      P.noalias() = scale * (Q.middleRows(r0, n) * K.topRows(visible).transpose());
      detail::masked_softmax_rows_inplace(P, s, r0);
      dV.topRows(visible).noalias() += P.transpose() * dO.middleRows(r0, n);
      dS.noalias() = dO.middleRows(r0, n) * V.topRows(visible).transpose();
      detail::softmax_rows_backward_inplace(P, dS);
      dQ.middleRows(r0, n).noalias() = scale * (dS * K.topRows(visible));
      dK.topRows(visible).noalias() += scale * (dS.transpose() * Q.middleRows(r0, n));
    }
  }
}

struct AttentionConfig {
  std::size_t query_dim = 0;            // Dq
  std::size_t cross_attention_dim = 0;  // Dc; 0: self-attention (Dc = Dq)
  std::size_t heads = 8;                // Hn (diffusers' default)
  std::size_t dim_head = 64;            // Hd (diffusers' default)
  bool bias = false;                    // to_q, to_k, to_v bias (diffusers: False)
  bool out_bias = true;                 // to_out.0 bias (diffusers: True)
};

/// Gradients of Attention::backward: dx [B, L, Dq] and dcontext [B, Lc, Dc] (empty for a
/// self-attention forward, whose context gradients are folded into dx, or when not requested).
template <class T>
struct AttentionGrads {
  Tensor3<T> x;
  Tensor3<T> context;
};

/// Projection is the type of the four projections: Linear<T>, or any wrapper constructible from
/// a Linear<T> with the same tensor API (forward, forward_inference, backward(dy, input_grad),
/// for_each_parameter), e.g. a LoRA slot (lora::LinearSlot<T>), so a model can hold adaptable
/// attentions without nn depending on lora.
template <class T = float, class Projection = Linear<T>>
class Attention {
 public:
  using Scalar = T;

  AttentionConfig config;
  Projection to_q, to_k, to_v;  // module names "to_q", "to_k", "to_v"
  Projection to_out;            // module name "to_out.0" (diffusers' ModuleList index 0)

  Attention() = default;
  explicit Attention(const AttentionConfig& c)
      : config(checked(c)),
        to_q(Linear<T>(c.query_dim, c.heads * c.dim_head, c.bias)),
        to_k(Linear<T>(context_dim(c), c.heads * c.dim_head, c.bias)),
        to_v(Linear<T>(context_dim(c), c.heads * c.dim_head, c.bias)),
        to_out(Linear<T>(c.heads * c.dim_head, c.query_dim, c.out_bias)) {}

  std::size_t inner_dim() const { return config.heads * config.dim_head; }
  std::size_t context_dim() const { return context_dim(config); }
  bool is_cross_attention() const { return config.cross_attention_dim != 0; }
  // 1/√Hd (diffusers: scale_qk, dim_head**-0.5)
  T scale() const { return T(1) / std::sqrt(static_cast<T>(config.dim_head)); }

  /// Visits to_q, to_k, to_v, to_out.0 as (full module name, Projection&), the names a LoRA
  /// injection matches ("…attn1.to_q", "…attn2.to_out.0").
  template <class F>
  void for_each_projection(const std::string& prefix, F&& visit) {
    visit(join_name(prefix, "to_q"), to_q);
    visit(join_name(prefix, "to_k"), to_k);
    visit(join_name(prefix, "to_v"), to_v);
    visit(join_name(prefix, "to_out.0"), to_out);
  }
  template <class F>
  void for_each_projection(const std::string& prefix, F&& visit) const {
    visit(join_name(prefix, "to_q"), to_q);
    visit(join_name(prefix, "to_k"), to_k);
    visit(join_name(prefix, "to_v"), to_v);
    visit(join_name(prefix, "to_out.0"), to_out);
  }

  /// The same as (name, Linear<T>&): the projection itself, or the Linear a wrapper exposes as
  /// base().
  template <class F>
  void for_each_linear(const std::string& prefix, F&& visit) {
    for_each_projection(prefix,
                        [&](const std::string& name, Projection& p) { visit(name, linear_of(p)); });
  }
  template <class F>
  void for_each_linear(const std::string& prefix, F&& visit) const {
    for_each_projection(
        prefix, [&](const std::string& name, const Projection& p) { visit(name, linear_of(p)); });
  }

  /// LoRA slots (lora::HasLoraSlots), when the projections are slots: forwards to each
  /// projection's for_each_slot under its module name.
  template <class F>
  requires requires(Projection& p, const std::string& name, F& f) { p.for_each_slot(name, f); }
  void for_each_slot(const std::string& prefix, F&& visit) {
    for_each_projection(
        prefix, [&](const std::string& name, Projection& p) { p.for_each_slot(name, visit); });
  }

  /// to_q.weight, to_k.weight, to_v.weight, to_out.0.weight, to_out.0.bias (diffusers order).
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) {
    for_each_projection(
        prefix, [&](const std::string& name, Projection& p) { p.for_each_parameter(name, visit); });
  }
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) const {
    for_each_projection(prefix, [&](const std::string& name, const Projection& p) {
      p.for_each_parameter(name, visit);
    });
  }

  /// Self-attention (context = x; needs Dc = Dq): x [B, L, Dq] → [B, L, Dq], saving for backward.
  Tensor3<T> forward(const Tensor3<T>& x) { return run(x, x, true); }
  /// Cross-attention: x [B, L, Dq], context [B, Lc, Dc] → [B, L, Dq], saving for backward.
  Tensor3<T> forward(const Tensor3<T>& x, const Tensor3<T>& context) {
    return run(x, context, false);
  }
  /// The same without saving anything (validation, sampling, gradient checks). Const, but it
  /// uses the object's score workspace: one object must not run two calls at the same time.
  Tensor3<T> forward_inference(const Tensor3<T>& x) const { return infer(x, x, true); }
  Tensor3<T> forward_inference(const Tensor3<T>& x, const Tensor3<T>& context) const {
    return infer(x, context, false);
  }

  /// dy [B, L, Dq] → dx (and dcontext for a cross forward when context_grad); accumulates (+=)
  /// the gradients of every trainable projection parameter.
  AttentionGrads<T> backward(const Tensor3<T>& dy, bool context_grad = true) {
    require(saved_, "Attention::backward", "no saved forward (call forward first)");
    check_shape("Attention::backward", "dy", dy.shape(),
                {shape_.batch, shape_.queries, config.query_dim});
    AttentionGrads<T> grads;
    const Tensor3<T> d_o = to_out.backward(dy);
    Tensor3<T> dq(q_.shape()), dk(k_.shape()), dv(v_.shape());
    scaled_dot_product_attention_backward(q_.data(), k_.data(), v_.data(), d_o.data(), dq.data(),
                                          dk.data(), dv.data(), shape_, scale(), workspace_);
    grads.x = to_q.backward(dq);
    const bool need_context = self_ || context_grad;
    Tensor3<T> dc = to_k.backward(dk, need_context);
    Tensor3<T> dc_v = to_v.backward(dv, need_context);
    if (need_context) dc += dc_v;
    if (self_) {
      grads.x += dc;
    } else if (context_grad) {
      grads.context = std::move(dc);
    }
    return grads;
  }

  /// Frees the saved forward state (here and in the projections).
  void clear_saved() {
    q_ = k_ = v_ = Tensor3<T>();
    saved_ = false;
    for_each_projection("", [](const std::string&, Projection& p) {
      if constexpr (requires { p.clear_saved(); }) p.clear_saved();
    });
  }

 private:
  static Linear<T>& linear_of(Linear<T>& p) { return p; }
  static const Linear<T>& linear_of(const Linear<T>& p) { return p; }
  template <class P>
  requires(!std::is_same_v<std::remove_cv_t<P>, Linear<T>>) static auto& linear_of(P& p) {
    return p.base();
  }

  static std::size_t context_dim(const AttentionConfig& c) {
    return c.cross_attention_dim != 0 ? c.cross_attention_dim : c.query_dim;
  }
  static const AttentionConfig& checked(const AttentionConfig& c) {
    require(c.query_dim > 0 && c.heads > 0 && c.dim_head > 0, "Attention",
            "query_dim, heads and dim_head must be positive, got ", c.query_dim, ", ", c.heads,
            " and ", c.dim_head);
    return c;
  }

  // Checks x [B, L, Dq] and context [B, Lc, Dc] and returns the core's sizes.
  AttentionShape check_inputs(const Tensor3<T>& x, const Tensor3<T>& context, bool self) const {
    constexpr const char* fn = "Attention::forward";
    const std::size_t B = x.shape()[0], L = x.shape()[1];
    check_shape(fn, "x", x.shape(), {B, L, config.query_dim});
    require(L > 0, fn, "x has shape ", shape_string(x.shape()), ", expected at least one token");
    if (self) {
      require(context_dim() == config.query_dim, fn, "no context given, but cross_attention_dim ",
              config.cross_attention_dim, " differs from query_dim ", config.query_dim);
    }
    const std::size_t Lc = context.shape()[1];
    check_shape(fn, "context", context.shape(), {B, Lc, context_dim()});
    require(Lc > 0, fn, "context has shape ", shape_string(context.shape()),
            ", expected at least one token");
    return AttentionShape{B, L, Lc, config.heads, config.dim_head};
  }

  Tensor3<T> core(const Tensor3<T>& q, const Tensor3<T>& k, const Tensor3<T>& v,
                  const AttentionShape& s) const {
    Tensor3<T> o(std::array<std::size_t, 3>{s.batch, s.queries, inner_dim()});
    scaled_dot_product_attention_forward(q.data(), k.data(), v.data(), o.data(), s, scale(),
                                         workspace_);
    return o;
  }

  Tensor3<T> run(const Tensor3<T>& x, const Tensor3<T>& context, bool self) {
    const AttentionShape s = check_inputs(x, context, self);
    saved_ = false;  // until the whole forward has succeeded
    q_ = to_q.forward(x);
    k_ = to_k.forward(context);
    v_ = to_v.forward(context);
    Tensor3<T> y = to_out.forward(core(q_, k_, v_, s));
    shape_ = s;
    self_ = self;
    saved_ = true;
    return y;
  }

  Tensor3<T> infer(const Tensor3<T>& x, const Tensor3<T>& context, bool self) const {
    const AttentionShape s = check_inputs(x, context, self);
    return to_out.forward_inference(core(to_q.forward_inference(x), to_k.forward_inference(context),
                                         to_v.forward_inference(context), s));
  }

  Tensor3<T> q_, k_, v_;  // saved projections
  AttentionShape shape_{};
  bool self_ = false;
  bool saved_ = false;
  mutable AttentionWorkspace<T> workspace_;  // scratch only, no state between calls
};

}  // namespace difftrain::nn
