#pragma once
// Causal multi-head self-attention of the CLIP text transformer (transformers' CLIPAttention):
// q_proj, k_proj, v_proj, out_proj, all with bias; token i attends to tokens 0..i only.
//
// Dims legend: B batch, L tokens, D hidden_size, Hn heads, Hd = D / Hn head_dim. Heads split D:
// q [B, L, D] is viewed as [B, L, Hn, Hd] (no transposes; strided views as in nn/attention.hpp).
//
//   q = x Wqᵀ + bq, k = x Wkᵀ + bk, v = x Wvᵀ + bv
//   per (b, h): S = q_bh k_bhᵀ / √Hd [L, L], S_ij = −∞ for j > i, P = softmax_rows(S),
//   o_bh = P v_bh;  y = o Woᵀ + bo
//
// The mask is applied by taking the softmax of row i over its first i + 1 scores only and setting
// the rest of P to 0 (exactly exp(−∞) = 0), and by computing the scores of a block of query rows
// against the keys up to its last row only. Forward only (the text encoder is frozen).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>

#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/nn/attention.hpp"
#include "difftrain/nn/linear.hpp"
#include "difftrain/nn/parameter.hpp"
#include "difftrain/nn/softmax.hpp"

namespace difftrain::models {

// o_bh = softmax(causal_mask(q_bh k_bhᵀ · scale)) v_bh for every (b, h); q, k, v, o [B, L, I]
// (s.queries == s.keys).
template <class T>
void causal_attention_forward(const T* q, const T* k, const T* v, T* o, const nn::AttentionShape& s,
                              T scale, nn::AttentionWorkspace<T>& ws) {
  require(s.queries == s.keys, "causal_attention_forward", "queries (", s.queries, ") and keys (",
          s.keys, ") differ; causal self-attention needs one sequence");
  const std::size_t L = s.queries;
  ws.reserve(std::min(nn::kQueryBlock, L), L, false);
  const auto jobs = static_cast<std::ptrdiff_t>(s.batch * s.heads);
#pragma omp parallel for schedule(static) if (s.work() >= parallel::kAttentionWork)
  for (std::ptrdiff_t job = 0; job < jobs; ++job) {
    const std::size_t b = static_cast<std::size_t>(job) / s.heads;
    const std::size_t h = static_cast<std::size_t>(job) % s.heads;
    auto Q = nn::detail::head_view(q, s, L, b, h);
    auto K = nn::detail::head_view(k, s, L, b, h);
    auto V = nn::detail::head_view(v, s, L, b, h);
    auto O = nn::detail::head_view(o, s, L, b, h);
    nn::RowMatrix<T>& buffer = ws.scores[parallel::thread_id()];
    for (std::size_t r0 = 0; r0 < L; r0 += nn::kQueryBlock) {
      const std::size_t n = std::min(nn::kQueryBlock, L - r0);
      const std::size_t visible = r0 + n;  // keys 0..r0+n−1 are all the block can see
      auto P = buffer.topLeftCorner(n, visible);
      P.noalias() = scale * (Q.middleRows(r0, n) * K.topRows(visible).transpose());
      for (std::size_t i = 0; i < n; ++i) {
        const std::size_t allowed = r0 + i + 1;  // row r0+i sees keys 0..r0+i
        nn::softmax_row(&P(i, 0), &P(i, 0), allowed);
        std::fill(&P(i, 0) + allowed, &P(i, 0) + visible, T(0));
      }
      O.middleRows(r0, n).noalias() = P * V.topRows(visible);
    }
  }
}

/// transformers' CLIPAttention (self-attention with a causal mask), forward only.
template <class T = float>
class ClipAttention {
 public:
  using Scalar = T;

  nn::Linear<T> q_proj, k_proj, v_proj, out_proj;  // [D, D] + bias [D] each

  ClipAttention() = default;
  ClipAttention(std::size_t hidden_size, std::size_t num_heads)
      : q_proj(hidden_size, hidden_size, true),
        k_proj(hidden_size, hidden_size, true),
        v_proj(hidden_size, hidden_size, true),
        out_proj(hidden_size, hidden_size, true),
        heads_(num_heads) {
    require(num_heads > 0 && hidden_size % num_heads == 0, "ClipAttention", "hidden_size ",
            hidden_size, " is not divisible by num_heads ", num_heads);
  }

  std::size_t hidden_size() const { return q_proj.in_features(); }
  std::size_t heads() const { return heads_; }
  std::size_t head_dim() const { return hidden_size() / heads_; }
  // 1/√Hd (transformers: self.scale = head_dim**-0.5)
  T scale() const { return T(1) / std::sqrt(static_cast<T>(head_dim())); }

  /// q_proj, k_proj, v_proj, out_proj (weight, bias each), transformers' names.
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) {
    q_proj.for_each_parameter(nn::join_name(prefix, "q_proj"), visit);
    k_proj.for_each_parameter(nn::join_name(prefix, "k_proj"), visit);
    v_proj.for_each_parameter(nn::join_name(prefix, "v_proj"), visit);
    out_proj.for_each_parameter(nn::join_name(prefix, "out_proj"), visit);
  }
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) const {
    q_proj.for_each_parameter(nn::join_name(prefix, "q_proj"), visit);
    k_proj.for_each_parameter(nn::join_name(prefix, "k_proj"), visit);
    v_proj.for_each_parameter(nn::join_name(prefix, "v_proj"), visit);
    out_proj.for_each_parameter(nn::join_name(prefix, "out_proj"), visit);
  }

  /// x [B, L, D] → [B, L, D]. Const, but it uses the object's score workspace: one object must
  /// not run two calls at the same time.
  Tensor3<T> forward(const Tensor3<T>& x) const {
    const std::size_t B = x.shape()[0], L = x.shape()[1];
    check_shape("ClipAttention::forward", "x", x.shape(), {B, L, hidden_size()});
    require(L > 0, "ClipAttention::forward", "x has shape ", shape_string(x.shape()),
            ", expected at least one token");
    const Tensor3<T> q = q_proj.forward_inference(x);
    const Tensor3<T> k = k_proj.forward_inference(x);
    const Tensor3<T> v = v_proj.forward_inference(x);
    Tensor3<T> o(x.shape());
    const nn::AttentionShape s{B, L, L, heads_, head_dim()};
    causal_attention_forward(q.data(), k.data(), v.data(), o.data(), s, scale(), workspace_);
    return out_proj.forward_inference(o);
  }

 private:
  std::size_t heads_ = 1;
  mutable nn::AttentionWorkspace<T> workspace_;  // scratch only, no state between calls
};

}  // namespace difftrain::models
