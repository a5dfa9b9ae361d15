#pragma once
// LoRA adapter over a frozen layer (PEFT / kohya LoRA), and its Linear form LoraLinear.
//
// Dims legend: I in_features, O out_features, r rank, B batch (first input dim), R rows.
//   y = base(x) + m·s·B(network_dropout(A(dropout(x))) ⊙ rank_mask),
//   s = alpha/r (alpha/√r with use_rslora),
//   m = user multiplier. Linear: A [r, I] (`lora_A.weight`), B [O, r] (`lora_B.weight`), no biases.
// Options (training only, deterministic from the adapter's RandomStream and the current step):
//   dropout        PEFT lora_dropout: elementwise dropout of the adapter's input x.
//   network_dropout kohya --network_dropout: elementwise dropout of the rank activations A·x
//                  (scaled 1/(1−p), before the rank mask, as kohya's LoRAModule.forward).
//   rank_dropout   kohya: mask [B, r], keep with prob 1−p (u ≥ p), scaled 1/(1−p), broadcast over
//                  tokens (Linear) or pixels (Conv2d).
//   module_dropout kohya: with prob p the whole adapter is skipped for this step.
// The draws depend only on (adapter stream, step, purpose): set_step(s) selects them
// (inject.hpp's set_lora_step does it for a whole model). Re-running a forward with the same step
// (gradient checkpointing, gradient checks) replays the same masks; give each forward that needs
// fresh masks (each step, or each micro-batch under gradient accumulation) its own counter.
// Data-parallel shards: set_step(s, global_rows) says that the input's batch rows b are rows
// global_rows[b] of the micro-batch of all processes; the elementwise and rank masks of row b are
// then that row's part of the one-process masks (the input must be batch-major: its leading
// dimension B or B·L). Module dropout is one draw per step, the same in every shard.
// Inits (B = 0 in both, so an injected model starts equal to the base):
//   kaiming_uniform  A ~ U(−1/√fan_in, 1/√fan_in)  (kaiming-uniform with a = √5; PEFT, kohya)
//   gaussian         A ~ N(0, 1/r²)                  (diffusers training scripts)
// Merge: W ← W + m·s·B·A on the flattened weights ([O, I·k·k] for convs); unmerge subtracts it.
//
// Parameters: for_each_parameter visits the base's `weight`, `bias` under the same names as the
// unadapted layer, then `lora_A.weight`, `lora_B.weight` (PEFT names without the adapter name).
// The base is frozen at construction and the adapters are trainable; for_each_adapter_parameter
// visits only the adapters.
//
// The generic core LoraLayer<Base> is shared with LoraConv2d (lora_conv2d.hpp); LoraTraits<Base>
// says how to build A and B for a base layer and where the rank axis is.

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>
#include <xtensor/xarray.hpp>

#include "difftrain/core/choice.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/nn/dropout.hpp"
#include "difftrain/nn/init.hpp"
#include "difftrain/nn/linear.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::lora {

enum class LoraInit { kaiming_uniform, gaussian };

/// PEFT's init_lora_weights names: "gaussian" (diffusers' training scripts) and "kaiming_uniform"
/// (PEFT's default `True`, kohya's init).
inline constexpr std::array<Choice<LoraInit>, 2> kLoraInits{{
    {"gaussian", LoraInit::gaussian},
    {"kaiming_uniform", LoraInit::kaiming_uniform},
}};

struct LoraConfig {
  std::size_t rank = 4;
  double alpha = 0;         // lora_alpha; 0 means alpha = rank (scale 1), as kohya and diffusers
  bool use_rslora = false;  // s = alpha/√r instead of alpha/r
  LoraInit init =
      LoraInit::kaiming_uniform;  // PEFT LoraConfig's default; `difftrain train`: gaussian
  double dropout = 0;             // PEFT lora_dropout on the adapter input
  double network_dropout = 0;     // kohya --network_dropout on A·x
  double rank_dropout = 0;        // kohya rank_dropout
  double module_dropout = 0;      // kohya module_dropout
  double multiplier = 1;          // user multiplier m

  // s = alpha / r, or alpha / √r with rslora (alpha = r when 0)
  double scale() const {
    const double a = alpha == 0 ? static_cast<double>(rank) : alpha;
    return use_rslora ? a / std::sqrt(static_cast<double>(rank)) : a / static_cast<double>(rank);
  }

  void validate(std::string_view function) const {
    require(rank > 0, function, "rank must be positive");
    require(std::isfinite(alpha) && alpha >= 0, function, "alpha is ", alpha,
            ", expected finite and >= 0");
    require(dropout >= 0 && dropout < 1, function, "dropout is ", dropout, ", expected in [0, 1)");
    require(network_dropout >= 0 && network_dropout < 1, function, "network_dropout is ",
            network_dropout, ", expected in [0, 1)");
    require(rank_dropout >= 0 && rank_dropout < 1, function, "rank_dropout is ", rank_dropout,
            ", expected in [0, 1)");
    require(module_dropout >= 0 && module_dropout <= 1, function, "module_dropout is ",
            module_dropout, ", expected in [0, 1]");
    require(std::isfinite(multiplier), function, "multiplier is ", multiplier);
  }
};

namespace lora_detail {
// SplitMix64 finaliser: decorrelates derived stream numbers.
constexpr std::uint64_t mix(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
// An independent stream for (a, purpose) under rs (full 64-bit mixing, unlike derive's shifts).
constexpr RandomStream substream(RandomStream rs, std::uint64_t a, StreamPurpose purpose) {
  const auto b = static_cast<std::uint64_t>(purpose);
  return {rs.seed, mix(rs.stream ^ mix(a ^ mix(b)))};
}
// FNV-1a of a module name: the adapter's stream depends on its name, not on visit order.
inline std::uint64_t name_hash(std::string_view name) {
  std::uint64_t h = 0xCBF29CE484222325ull;
  for (char c : name) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001B3ull;
  return h;
}
}  // namespace lora_detail

// The initialisers live in nn/init.hpp; LoRA code and users call them by these names too.
using nn::kaiming_uniform;
using nn::normal_init;

/// How to adapt a layer type: specialised for nn::Linear here and nn::Conv2d in lora_conv2d.hpp.
template <class Base>
struct LoraTraits;

template <class T>
struct LoraTraits<nn::Linear<T>> {
  static constexpr const char* name = "LoraLinear";
  static constexpr bool rank_axis_last = true;  // A's output [..., r]
  static nn::Linear<T> make_down(const nn::Linear<T>& base, std::size_t r) {
    return nn::Linear<T>(base.in_features(), r, false);
  }
  static nn::Linear<T> make_up(const nn::Linear<T>& base, std::size_t r) {
    return nn::Linear<T>(r, base.out_features(), false);
  }
  static std::size_t fan_in(const nn::Linear<T>& base) { return base.in_features(); }
};

template <class Base>
class LoraLayer {
 public:
  using Scalar = typename Base::Scalar;
  using T = Scalar;
  using Traits = LoraTraits<Base>;

  Base base;    // frozen; its parameters keep their names
  Base lora_A;  // down: base input → r
  Base lora_B;  // up: r → base output
  bool training = true;

  /// Wraps `base` (frozen here) with fresh adapters drawn from `rs` (B = 0).
  LoraLayer(Base base_layer, LoraConfig config, RandomStream rs)
      : base(std::move(base_layer)), config_(config), stream_(rs) {
    config.validate(Traits::name);
    lora_A = Traits::make_down(base, config.rank);
    lora_B = Traits::make_up(base, config.rank);
    base.for_each_parameter(
        "", [](const std::string&, nn::Parameter<T>& p) { p.set_trainable(false); });
    const RandomStream init = lora_detail::substream(stream_, 0, StreamPurpose::lora_init);
    if (config.init == LoraInit::kaiming_uniform) {
      kaiming_uniform(lora_A.weight.value, Traits::fan_in(base), init);
    } else {
      normal_init(lora_A.weight.value, 1.0 / static_cast<double>(config.rank), init);
    }
    lora_B.weight.value.fill(T(0));
    input_dropout_ = nn::Dropout<T>(config.dropout);
    hidden_dropout_ = nn::Dropout<T>(config.network_dropout);
  }

  const LoraConfig& config() const { return config_; }
  std::size_t rank() const { return config_.rank; }
  double scale() const { return config_.scale(); }
  double multiplier() const { return config_.multiplier; }
  bool merged() const { return merged_; }
  std::uint64_t step() const { return step_; }
  RandomStream stream() const { return stream_; }

  /// The user multiplier m (not while merged: the merged delta was made with the old one).
  void set_multiplier(double m) {
    require(!merged_, Traits::name, "set_multiplier while merged; unmerge first");
    require(std::isfinite(m), Traits::name, "multiplier is ", m);
    config_.multiplier = m;
  }
  /// Selects the dropout masks of training step `step`, for a batch whose rows b are rows
  /// global_rows[b] of the step's whole batch (empty: rows 0..B−1).
  void set_step(std::uint64_t step, std::span<const std::uint64_t> global_rows = {}) {
    step_ = step;
    global_rows_.assign(global_rows.begin(), global_rows.end());
  }
  std::span<const std::uint64_t> global_rows() const { return global_rows_; }

  /// base `weight`, `bias`, then `lora_A.weight`, `lora_B.weight`.
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    base.for_each_parameter(prefix, visit);
    for_each_adapter_parameter(prefix, visit);
  }
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) const {
    base.for_each_parameter(prefix, visit);
    for_each_adapter_parameter(prefix, visit);
  }
  template <class Visitor>
  void for_each_adapter_parameter(const std::string& prefix, Visitor&& visit) {
    visit(nn::join_name(prefix, "lora_A.weight"), lora_A.weight);
    visit(nn::join_name(prefix, "lora_B.weight"), lora_B.weight);
  }
  template <class Visitor>
  void for_each_adapter_parameter(const std::string& prefix, Visitor&& visit) const {
    visit(nn::join_name(prefix, "lora_A.weight"), lora_A.weight);
    visit(nn::join_name(prefix, "lora_B.weight"), lora_B.weight);
  }

  /// True when this step's module dropout skips the adapter (training only).
  bool module_dropped() const {
    if (!training || config_.module_dropout == 0) return false;
    const RandomStream rs =
        lora_detail::substream(stream_, step_, StreamPurpose::lora_module_dropout);
    return uniform_double(rs, 0) < config_.module_dropout;
  }

  // y = base(x) + m·s·B(network_dropout(A(dropout(x))) ⊙ rank_mask), saving what backward needs
  template <class X>
  X forward(const X& x) {
    X y = base.forward(x);
    active_ = !merged_ && !module_dropped();
    if (!active_) return y;
    dropout_used_ = training && config_.dropout > 0;
    X h;
    if (dropout_used_) {
      input_dropout_.training = true;
      const RandomStream rs = lora_detail::substream(stream_, step_, StreamPurpose::lora_dropout);
      h = lora_A.forward(input_dropout_.forward(x, rs, global_rows_));
    } else {
      h = lora_A.forward(x);
    }
    hidden_dropout_used_ = training && config_.network_dropout > 0;
    if (hidden_dropout_used_) {
      hidden_dropout_.training = true;
      h = hidden_dropout_.forward(
          h, lora_detail::substream(stream_, step_, StreamPurpose::lora_network_dropout),
          global_rows_);
    }
    apply_rank_mask(h);
    X z = lora_B.forward(h);
    add_scaled(y, z, coefficient());
    return y;
  }

  // y = base(x) + m·s·B A x (no dropout, nothing saved); base only when merged
  template <class X>
  X forward_inference(const X& x) const {
    X y = base.forward_inference(x);
    if (merged_) return y;
    X z = lora_B.forward_inference(lora_A.forward_inference(x));
    add_scaled(y, z, coefficient());
    return y;
  }

  // dx = base'(dy) + dropout'(Aᵀ network_dropout'(rank_mask ⊙ Bᵀ(m·s·dy))); dA, dB (and an
  // unfrozen base) accumulate
  template <class X>
  X backward(const X& dy, bool input_grad = true) {
    require(!merged_ || (!lora_A.weight.trainable && !lora_B.weight.trainable), Traits::name,
            "backward through a merged adapter with trainable lora_A/lora_B; unmerge first");
    X dx = base.backward(dy, input_grad);
    if (!active_) return dx;
    X dz = dy;
    scale_in_place(dz, coefficient());
    X dh = lora_B.backward(dz);
    apply_saved_rank_mask(dh);
    if (hidden_dropout_used_) dh = hidden_dropout_.backward(dh);
    X du = lora_A.backward(dh, input_grad);
    if (!input_grad) return dx;
    if (dropout_used_) du = input_dropout_.backward(du);
    add_scaled(dx, du, T(1));
    return dx;
  }

  /// Drops the saved forward contexts (frees their memory).
  void clear_saved() {
    base.clear_saved();
    lora_A.clear_saved();
    lora_B.clear_saved();
    rank_mask_.clear();
    active_ = false;
  }

  /// W ← W + m·s·B·A (the base then computes the adapted layer alone).
  void merge() {
    require(!merged_, Traits::name, "merge: already merged");
    add_delta(+1);
    merged_ = true;
  }
  /// W ← W − m·s·B·A.
  void unmerge() {
    require(merged_, Traits::name, "unmerge: not merged");
    add_delta(-1);
    merged_ = false;
  }
  /// m·s·B·A as a tensor of the base weight's shape.
  xt::xarray<T> delta_weight() const {
    xt::xarray<T> delta = xt::zeros<T>(base.weight.value.shape());
    accumulate_delta(delta.data(), coefficient());
    return delta;
  }

 private:
  T coefficient() const { return static_cast<T>(config_.multiplier * config_.scale()); }

  // h ⊙= mask[b, j] broadcast over the non-batch, non-rank axes; mask drawn for this step
  template <class X>
  void apply_rank_mask(X& h) {
    rank_mask_.clear();
    if (!training || config_.rank_dropout == 0) return;
    const std::size_t r = rank();
    const std::size_t B = h.dimension() >= 2 ? h.shape()[0] : 1;
    rank_mask_.resize(B * r);
    nn::dropout_mask(std::span<T>(rank_mask_),
                     lora_detail::substream(stream_, step_, StreamPurpose::lora_rank_dropout),
                     config_.rank_dropout, global_rows_);
    multiply_rank_mask(h, B);
  }
  template <class X>
  void apply_saved_rank_mask(X& dh) const {
    if (rank_mask_.empty()) return;
    multiply_rank_mask(dh, rank_mask_.size() / rank());
  }
  template <class X>
  void multiply_rank_mask(X& h, std::size_t B) const {
    const std::size_t r = rank(), per_batch = h.size() / B;
    T* data = h.data();
    for (std::size_t b = 0; b < B; ++b) {
      const T* m = rank_mask_.data() + b * r;
      T* hb = data + b * per_batch;
      if constexpr (Traits::rank_axis_last) {
        for (std::size_t i = 0; i < per_batch; ++i) hb[i] *= m[i % r];
      } else {  // [r, spatial] per batch
        const std::size_t spatial = per_batch / r;
        for (std::size_t j = 0; j < r; ++j)
          for (std::size_t s = 0; s < spatial; ++s) hb[j * spatial + s] *= m[j];
      }
    }
  }

  template <class X, class Z>
  static void add_scaled(X& y, const Z& z, T c) {
    T* yd = y.data();
    const T* zd = z.data();
    for (std::size_t i = 0; i < y.size(); ++i) yd[i] += c * zd[i];
  }
  template <class X>
  static void scale_in_place(X& x, T c) {
    for (auto& v : x) v *= c;
  }

  // W_flat[O, K] += c·B[O, r]·A[r, K]
  void accumulate_delta(T* w, T c) const {
    const std::size_t O = lora_B.weight.value.shape()[0], r = rank();
    const std::size_t K = lora_A.weight.value.size() / r;
    nn::RowMatrixMap<T> W(w, O, K);
    nn::ConstRowMatrixMap<T> Bm(lora_B.weight.value.data(), O, r);
    nn::ConstRowMatrixMap<T> Am(lora_A.weight.value.data(), r, K);
    W.noalias() += c * (Bm * Am);
  }
  void add_delta(int sign) {
    require(base.weight.value.size() ==
                lora_B.weight.value.shape()[0] * (lora_A.weight.value.size() / rank()),
            Traits::name, "merge: base weight has shape ", shape_string(base.weight.value.shape()),
            ", incompatible with the adapters");
    accumulate_delta(base.weight.value.data(), static_cast<T>(sign) * coefficient());
  }

  LoraConfig config_;
  RandomStream stream_;
  std::uint64_t step_ = 0;
  std::vector<std::uint64_t> global_rows_;  // of the batch of this step (empty: 0..B−1)
  bool merged_ = false;
  bool active_ = false;
  bool dropout_used_ = false;
  bool hidden_dropout_used_ = false;
  nn::Dropout<T> input_dropout_;
  nn::Dropout<T> hidden_dropout_;  // kohya network_dropout on A·x
  std::vector<T> rank_mask_;       // [B, r] of the last forward (empty: no rank dropout)
};

template <class T = float>
using LoraLinear = LoraLayer<nn::Linear<T>>;

}  // namespace difftrain::lora
