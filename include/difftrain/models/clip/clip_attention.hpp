#pragma once
// Causal multi-head self-attention of the CLIP text transformer (transformers' CLIPAttention):
// q_proj, k_proj, v_proj, out_proj, all with bias, held in LoRA slots (lora/inject.hpp) so that
// text-encoder adapters can be injected by module name; token i attends to tokens 0..i only.
//
// Dims legend: B batch, L tokens, D hidden_size, Hn heads, Hd = D / Hn head_dim. Heads split D:
// q [B, L, D] is viewed as [B, L, Hn, Hd] (no transposes; strided views as in nn/attention.hpp).
//
//   q = x Wqᵀ + bq, k = x Wkᵀ + bk, v = x Wvᵀ + bv
//   per (b, h): S = q_bh k_bhᵀ / √Hd [L, L], S_ij = −∞ for j > i, P = softmax_rows(S),
//   o_bh = P v_bh;  y = o Woᵀ + bo
//
// The core is nn::scaled_dot_product_attention_{forward,backward} with AttentionShape::causal.
// forward saves q, k, v (each slot its input); backward recomputes P block by block.

#include <cmath>
#include <cstddef>
#include <string>

#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/lora/inject.hpp"
#include "difftrain/nn/attention.hpp"
#include "difftrain/nn/linear.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::models {

/// transformers' CLIPAttention (self-attention with a causal mask).
template <class T = float>
class ClipAttention {
 public:
  using Scalar = T;

  lora::LinearSlot<T> q_proj, k_proj, v_proj, out_proj;  // [D, D] + bias [D] each

  ClipAttention() = default;
  ClipAttention(std::size_t hidden_size, std::size_t num_heads)
      : q_proj(nn::Linear<T>(hidden_size, hidden_size, true)),
        k_proj(nn::Linear<T>(hidden_size, hidden_size, true)),
        v_proj(nn::Linear<T>(hidden_size, hidden_size, true)),
        out_proj(nn::Linear<T>(hidden_size, hidden_size, true)),
        hidden_(hidden_size),
        heads_(num_heads) {
    require(num_heads > 0 && hidden_size % num_heads == 0, "ClipAttention", "hidden_size ",
            hidden_size, " is not divisible by num_heads ", num_heads);
  }

  std::size_t hidden_size() const { return hidden_; }
  std::size_t heads() const { return heads_; }
  std::size_t head_dim() const { return hidden_size() / heads_; }
  // 1/√Hd (transformers: self.scale = head_dim**-0.5)
  T scale() const { return T(1) / std::sqrt(static_cast<T>(head_dim())); }

  /// Calls f(name, slot) for q_proj, k_proj, v_proj, out_proj (transformers' module names).
  template <class Self, class F>
  static void for_each_projection(Self& self, const std::string& prefix, F&& f) {
    f(nn::join_name(prefix, "q_proj"), self.q_proj);
    f(nn::join_name(prefix, "k_proj"), self.k_proj);
    f(nn::join_name(prefix, "v_proj"), self.v_proj);
    f(nn::join_name(prefix, "out_proj"), self.out_proj);
  }

  /// q_proj, k_proj, v_proj, out_proj (weight, bias each; lora_A/B once adapted).
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) {
    for_each_projection(*this, prefix,
                        [&](const std::string& n, auto& p) { p.for_each_parameter(n, visit); });
  }
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) const {
    for_each_projection(*this, prefix,
                        [&](const std::string& n, auto& p) { p.for_each_parameter(n, visit); });
  }
  template <class F>
  void for_each_slot(const std::string& prefix, F&& visit) {
    for_each_projection(*this, prefix, [&](const std::string& n, auto& p) { visit(n, p); });
  }

  /// x [B, L, D] → [B, L, D], saving for backward.
  Tensor3<T> forward(const Tensor3<T>& x) {
    const nn::AttentionShape s = check_input(x);
    saved_ = false;
    q_ = q_proj.forward(x);
    k_ = k_proj.forward(x);
    v_ = v_proj.forward(x);
    Tensor3<T> o(x.shape());
    nn::scaled_dot_product_attention_forward(q_.data(), k_.data(), v_.data(), o.data(), s, scale(),
                                             workspace_);
    Tensor3<T> y = out_proj.forward(o);
    shape_ = s;
    saved_ = true;
    return y;
  }

  /// The same without saving anything. Const, but it uses the object's score workspace: one
  /// object must not run two calls at the same time.
  Tensor3<T> forward_inference(const Tensor3<T>& x) const {
    const nn::AttentionShape s = check_input(x);
    const Tensor3<T> q = q_proj.forward_inference(x);
    const Tensor3<T> k = k_proj.forward_inference(x);
    const Tensor3<T> v = v_proj.forward_inference(x);
    Tensor3<T> o(x.shape());
    nn::scaled_dot_product_attention_forward(q.data(), k.data(), v.data(), o.data(), s, scale(),
                                             workspace_);
    return out_proj.forward_inference(o);
  }

  // dx = q_proj'(dq) + k_proj'(dk) + v_proj'(dv), (dq, dk, dv) = attention'(out_proj'(dy))
  Tensor3<T> backward(const Tensor3<T>& dy) {
    require(saved_, "ClipAttention::backward", "no saved forward (call forward first)");
    check_shape("ClipAttention::backward", "dy", dy.shape(),
                {shape_.batch, shape_.queries, hidden_});
    const Tensor3<T> d_o = out_proj.backward(dy);
    Tensor3<T> dq(q_.shape()), dk(k_.shape()), dv(v_.shape());
    nn::scaled_dot_product_attention_backward(q_.data(), k_.data(), v_.data(), d_o.data(),
                                              dq.data(), dk.data(), dv.data(), shape_, scale(),
                                              workspace_);
    Tensor3<T> dx = q_proj.backward(dq);
    dx += k_proj.backward(dk);
    dx += v_proj.backward(dv);
    return dx;
  }

  void clear_saved() {
    q_ = k_ = v_ = Tensor3<T>();
    saved_ = false;
    for_each_projection(*this, "", [](const std::string&, auto& p) { p.clear_saved(); });
  }

 private:
  nn::AttentionShape check_input(const Tensor3<T>& x) const {
    const std::size_t B = x.shape()[0], L = x.shape()[1];
    check_shape("ClipAttention::forward", "x", x.shape(), {B, L, hidden_});
    require(L > 0, "ClipAttention::forward", "x has shape ", shape_string(x.shape()),
            ", expected at least one token");
    nn::AttentionShape s{B, L, L, heads_, head_dim()};
    s.causal = true;
    return s;
  }

  std::size_t hidden_ = 0;
  std::size_t heads_ = 1;
  Tensor3<T> q_, k_, v_;
  nn::AttentionShape shape_{};
  bool saved_ = false;
  mutable nn::AttentionWorkspace<T> workspace_;  // scratch only, no state between calls
};

}  // namespace difftrain::models
