#pragma once
// The UNet's attention (diffusers `Attention`, attn1 / attn2) and GEGLU feed-forward projection
// with their Linear layers held in LoRA slots (lora/inject.hpp), so that adapters can be injected
// into to_q, to_k, to_v, to_out.0 and ff.net.0.proj by name. The math is nn::Attention's and
// nn::GEGLU's (same core functions); only the ownership of the projections differs.
//
// Dims legend: B batch, L query tokens, Lc context tokens (= L for self-attention), Dq query_dim,
// Dc cross_attention_dim, Hn heads, Hd dim_head, I = Hn·Hd, O GEGLU dim_out.
//   Attention: q = to_q(x), k = to_k(c), v = to_v(c) (c = x for self-attention);
//              o_bh = softmax(q_bh k_bhᵀ / √Hd) v_bh per (b, h); y = to_out.0(o)
//   GEGLU:     h = proj(x) [.., 2·O]; y = h[.., :O] · gelu(h[.., O:])  (first half value)

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/parallel.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/lora/inject.hpp"
#include "difftrain/models/unet/module_tree.hpp"
#include "difftrain/nn/activations.hpp"
#include "difftrain/nn/attention.hpp"
#include "difftrain/nn/linear.hpp"

namespace difftrain::models {

template <class T = float>
class Attention : public CompositeModule<Attention<T>> {
 public:
  using Scalar = T;

  lora::LinearSlot<T> to_q, to_k, to_v;
  lora::LinearSlot<T> to_out;  // "to_out.0"

  Attention() = default;
  explicit Attention(const nn::AttentionConfig& c, Allocation allocation = Allocation::parameters)
      : to_q(make_slot<lora::LinearSlot<T>>(q_config(c), allocation)),
        to_k(make_slot<lora::LinearSlot<T>>(kv_config(c), allocation)),
        to_v(make_slot<lora::LinearSlot<T>>(kv_config(c), allocation)),
        to_out(make_slot<lora::LinearSlot<T>>(out_config(c), allocation)),
        config_(c) {
    require(c.query_dim > 0 && c.heads > 0 && c.dim_head > 0, "models::Attention",
            "query_dim, heads and dim_head must be positive, got ", c.query_dim, ", ", c.heads,
            " and ", c.dim_head);
  }

  const nn::AttentionConfig& config() const { return config_; }
  bool is_cross_attention() const { return config_.cross_attention_dim != 0; }
  // 1/√Hd
  T scale() const { return T(1) / std::sqrt(static_cast<T>(config_.dim_head)); }

  template <class Self, class F>
  static void walk(Self& self, const std::string& prefix, F&& f) {
    const nn::AttentionConfig& c = self.config_;
    f(nn::join_name(prefix, "to_q"), self.to_q, q_config(c));
    f(nn::join_name(prefix, "to_k"), self.to_k, kv_config(c));
    f(nn::join_name(prefix, "to_v"), self.to_v, kv_config(c));
    f(nn::join_name(prefix, "to_out.0"), self.to_out, out_config(c));
  }

  /// Self-attention: x [B, L, Dq] → [B, L, Dq], saving for backward.
  Tensor3<T> forward(const Tensor3<T>& x) { return run(x, x, true); }
  /// Cross-attention: x [B, L, Dq], context [B, Lc, Dc] → [B, L, Dq], saving for backward.
  Tensor3<T> forward(const Tensor3<T>& x, const Tensor3<T>& context) {
    return run(x, context, false);
  }

  /// dx (and dcontext of a cross-attention when context_grad); projection gradients +=.
  nn::AttentionGrads<T> backward(const Tensor3<T>& dy, bool context_grad = true) {
    require(saved_, "models::Attention::backward", "no saved forward (call forward first)");
    check_shape("models::Attention::backward", "dy", dy.shape(),
                {shape_.batch, shape_.queries, config_.query_dim});
    const Tensor3<T> d_o = to_out.backward(dy);
    Tensor3<T> dq(q_.shape()), dk(k_.shape()), dv(v_.shape());
    nn::scaled_dot_product_attention_backward(q_.data(), k_.data(), v_.data(), d_o.data(),
                                              dq.data(), dk.data(), dv.data(), shape_, scale(),
                                              workspace_);
    nn::AttentionGrads<T> grads;
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

  /// Drops the saved forward context (here and in the projections).
  void clear_saved() {
    q_ = k_ = v_ = Tensor3<T>();
    saved_ = false;
    for (lora::LinearSlot<T>* p : {&to_q, &to_k, &to_v, &to_out}) p->clear_saved();
  }

 private:
  static std::size_t context_dim(const nn::AttentionConfig& c) {
    return c.cross_attention_dim != 0 ? c.cross_attention_dim : c.query_dim;
  }
  static nn::LinearConfig q_config(const nn::AttentionConfig& c) {
    return {c.query_dim, c.heads * c.dim_head, c.bias};
  }
  static nn::LinearConfig kv_config(const nn::AttentionConfig& c) {
    return {context_dim(c), c.heads * c.dim_head, c.bias};
  }
  static nn::LinearConfig out_config(const nn::AttentionConfig& c) {
    return {c.heads * c.dim_head, c.query_dim, c.out_bias};
  }

  Tensor3<T> run(const Tensor3<T>& x, const Tensor3<T>& context, bool self) {
    constexpr const char* fn = "models::Attention::forward";
    const std::size_t B = x.shape()[0], L = x.shape()[1], Lc = context.shape()[1];
    check_shape(fn, "x", x.shape(), {B, L, config_.query_dim});
    require(L > 0 && Lc > 0, fn, "x has shape ", shape_string(x.shape()), " and context ",
            shape_string(context.shape()), ", expected at least one token each");
    check_shape(fn, "context", context.shape(), {B, Lc, context_dim(config_)});
    const nn::AttentionShape s{B, L, Lc, config_.heads, config_.dim_head};
    q_ = to_q.forward(x);
    k_ = to_k.forward(context);
    v_ = to_v.forward(context);
    Tensor3<T> o(std::array<std::size_t, 3>{B, L, s.inner()});
    nn::scaled_dot_product_attention_forward(q_.data(), k_.data(), v_.data(), o.data(), s, scale(),
                                             workspace_);
    shape_ = s;
    self_ = self;
    saved_ = true;
    return to_out.forward(o);
  }

  nn::AttentionConfig config_{};
  Tensor3<T> q_, k_, v_;
  nn::AttentionShape shape_{};
  bool self_ = false, saved_ = false;
  nn::AttentionWorkspace<T> workspace_;
};

template <class T = float>
class GEGLU : public CompositeModule<GEGLU<T>> {
 public:
  using Scalar = T;

  lora::LinearSlot<T> proj;  // [2·O, I]

  GEGLU() = default;
  explicit GEGLU(const nn::GEGLUConfig& c, Allocation allocation = Allocation::parameters)
      : proj(make_slot<lora::LinearSlot<T>>(proj_config(c), allocation)), config_(c) {}

  template <class Self, class F>
  static void walk(Self& self, const std::string& prefix, F&& f) {
    f(nn::join_name(prefix, "proj"), self.proj, proj_config(self.config_));
  }

  // y = value · gelu(gate), [value, gate] = split(proj(x)); saves h = proj(x)
  Tensor3<T> forward(const Tensor3<T>& x) {
    h_ = proj.forward(x);
    const std::size_t O = config_.dim_out, rows = h_.size() / (2 * O);
    Tensor3<T> y(std::array<std::size_t, 3>{h_.shape()[0], h_.shape()[1], O});
    const auto a = config_.approximate;
    const auto R = static_cast<std::int64_t>(rows);
#pragma omp parallel for schedule( \
    static) if (parallel::exceeds(rows * O, parallel::kElementwiseSize))
    for (std::int64_t r = 0; r < R; ++r) {
      const T* hr = h_.data() + r * 2 * O;
      T* yr = y.data() + r * O;
      for (std::size_t j = 0; j < O; ++j) yr[j] = hr[j] * nn::gelu(hr[O + j], a);
    }
    return y;
  }

  // dvalue = dy·gelu(gate), dgate = dy·value·gelu'(gate); dx = proj.backward([dvalue, dgate])
  Tensor3<T> backward(const Tensor3<T>& dy) {
    const std::size_t O = config_.dim_out, rows = h_.size() / (2 * O);
    check_shape("models::GEGLU::backward", "dy", dy.shape(), {h_.shape()[0], h_.shape()[1], O});
    Tensor3<T> dh(h_.shape());
    const auto a = config_.approximate;
    const auto R = static_cast<std::int64_t>(rows);
#pragma omp parallel for schedule( \
    static) if (parallel::exceeds(rows * O, parallel::kElementwiseSize))
    for (std::int64_t r = 0; r < R; ++r) {
      const T* hr = h_.data() + r * 2 * O;
      const T* dyr = dy.data() + r * O;
      T* dhr = dh.data() + r * 2 * O;
      for (std::size_t j = 0; j < O; ++j) {
        dhr[j] = dyr[j] * nn::gelu(hr[O + j], a);
        dhr[O + j] = dyr[j] * hr[j] * nn::gelu_grad(hr[O + j], a);
      }
    }
    return proj.backward(dh);
  }

  void clear_saved() {
    h_ = Tensor3<T>();
    proj.clear_saved();
  }

 private:
  static nn::LinearConfig proj_config(const nn::GEGLUConfig& c) {
    return {c.dim_in, 2 * c.dim_out, c.bias};
  }

  nn::GEGLUConfig config_{};
  Tensor3<T> h_;
};

}  // namespace difftrain::models
