#pragma once
// Adafactor (Shazeer & Stern 2018), as transformers.optimization.Adafactor (huggingface/
// transformers src/transformers/optimization.py) runs it; kohya sd-scripts' "Adafactor", usually
// with relative_step=False, scale_parameter=False, warmup_init=False and a given lr.
//
// A parameter with ≥ 2 dims keeps a factored second moment over its last two dims (dims legend:
// B = product of the leading dims, R = rows = dim −2, C = columns = dim −1): exp_avg_sq_row
// [..., R] and exp_avg_sq_col [..., C]; one with fewer dims keeps exp_avg_sq like itself. The
// reductions (row and column means, RMS) accumulate in double in a fixed order (per row, per
// column, per fixed block, blocks in order), so the result does not depend on the thread count.
//
// State for checkpoints: "<name>.exp_avg_sq_row" and "<name>.exp_avg_sq_col", or
// "<name>.exp_avg_sq"; "<name>.exp_avg" when beta1 is set. The reference's per-parameter step is
// step_count().

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>
#include <xsimd/xsimd.hpp>
#include <xtensor/xarray.hpp>

#include "difftrain/core/error.hpp"
#include "difftrain/train/optimizer.hpp"

namespace difftrain::train {

/// transformers' Adafactor arguments (its defaults; eps = (eps1, eps2)). lr comes from each group
/// (· lr_scale) unless relative_step. The groups' weight_decay, betas and eps are not read.
struct AdafactorOptions {
  double eps1 = 1e-30;  // added to g² (regularizes the second moment)
  double eps2 = 1e-3;   // floor of the parameter scale
  double clip_threshold = 1.0;
  double decay_rate = -0.8;
  std::optional<double> beta1;  // none: no first moment
  double weight_decay = 0;
  bool scale_parameter = true;
  bool relative_step = true;
  bool warmup_init = false;
};

namespace detail {

inline constexpr std::size_t kAdafactorColumnTile = 64;  // columns per work item (fixed)

struct AdafactorCoefficients {
  float clip_divisor, lr, beta1, one_minus_beta1, decay;  // decay (−wd·lr) 0: off
  bool first_moment;
};

// The clipped, scaled update u (in place) applied to p.
template <class Arch>
void adafactor_apply_kernel(float* p, float* u, float* m, std::size_t n,
                            const AdafactorCoefficients& k) {
  using F = xsimd::batch<float, Arch>;
  constexpr std::size_t W = F::size;
  const F clip(k.clip_divisor), lr(k.lr), b1(k.beta1), c1(k.one_minus_beta1), decay(k.decay);
  const bool use_decay = k.decay != 0.0f;
  std::size_t i = 0;
  for (; i + W <= n; i += W) {
    F ui = F::load_unaligned(u + i) / clip * lr;
    if (k.first_moment) {
      ui = F::load_unaligned(m + i) * b1 + c1 * ui;
      ui.store_unaligned(m + i);
    }
    F pi = F::load_unaligned(p + i);
    if (use_decay) pi = pi + decay * pi;
    (pi - ui).store_unaligned(p + i);
  }
  for (; i < n; ++i) {  // scalar tail: the same operations in the same order
    float ui = u[i] / k.clip_divisor * k.lr;
    if (k.first_moment) {
      ui = m[i] * k.beta1 + k.one_minus_beta1 * ui;
      m[i] = ui;
    }
    float pi = p[i];
    if (use_decay) pi = pi + k.decay * pi;
    p[i] = pi - ui;
  }
}

// Σ f(i) over [0, n) in double: per fixed block of kUpdateChunk, blocks in order.
template <class F>
double ordered_sum(std::size_t n, F&& f) {
  const std::size_t blocks = (n + kUpdateChunk - 1) / kUpdateChunk;
  std::vector<double> part(blocks, 0.0);
  parallel_items(blocks, [&](std::size_t b) {
    double sum = 0;
    for (std::size_t i = b * kUpdateChunk, e = std::min(n, i + kUpdateChunk); i < e; ++i)
      sum += f(i);
    part[b] = sum;
  });
  double total = 0;
  for (double x : part) total += x;
  return total;
}

}  // namespace detail

/// Adafactor (transformers.optimization.Adafactor). Per update t = 1, 2, … and parameter:
/// lr = (scale_parameter ? max(eps2, RMS(p)) : 1) · (relative_step ? min(warmup_init ? 1e-6·t :
/// 1e-2, 1/√t) : group.lr · lr_scale) (with relative_step group.lr and lr_scale are not used, as
/// the reference takes no lr then), β2t = 1 − t^decay_rate, and g2 = g² + eps1:
// factored: R ← β2t·R + (1−β2t)·mean_C(g2); C ← β2t·C + (1−β2t)·mean_R(g2); u = g/√(R/mean(R))/√C
// else: v ← β2t·v + (1−β2t)·g2; u = g/√v
/// then u ← lr·u / max(1, RMS(u)/clip_threshold); with beta1: m ← β1·m + (1−β1)·u, u = m;
// p ← p − wd·lr·p − u
/// Differences: the reductions accumulate in double (the reference: float32), and RMS(p) is
/// computed only with scale_parameter (the reference computes it always; it is only used then).
class Adafactor : public detail::OptimizerBase {
 public:
  static constexpr std::string_view kName = "adafactor";
  // What kohya records as ss_optimizer (the Python module + "." + class).
  static constexpr std::string_view kKohyaClass = "transformers.optimization.Adafactor";

  explicit Adafactor(std::vector<ParamGroup> groups, AdafactorOptions options = {})
      : OptimizerBase(std::move(groups)), options_(options) {
    constexpr std::string_view fn = "Adafactor";
    const auto& o = options_;
    detail::require_nonnegative(fn, "eps1", o.eps1);
    detail::require_nonnegative(fn, "eps2", o.eps2);
    detail::require_positive(fn, "clip_threshold", o.clip_threshold);
    require(std::isfinite(o.decay_rate) && o.decay_rate <= 0, fn, "decay_rate is ", o.decay_rate,
            ", expected a finite value <= 0");
    if (o.beta1) detail::require_beta(fn, "beta1", *o.beta1);
    detail::require_nonnegative(fn, "weight_decay", o.weight_decay);
    require(!o.warmup_init || o.relative_step, fn,
            "warmup_init is true but relative_step is false, expected relative_step with "
            "warmup_init");
    build(fn);
    for (const ParamGroup& g : groups_)
      for (const ParameterRef& p : g.params) {
        Slot s;
        s.shape = p.shape();
        s.n = p.value().size();
        s.factored = s.shape.size() >= 2;
        if (s.factored) {
          s.rows = s.shape[s.shape.size() - 2];
          s.cols = s.shape.back();
          s.batch = s.n == 0 ? 0 : s.n / (s.rows * s.cols);
          s.row.assign(s.batch * s.rows, 0.0f);
          s.col.assign(s.batch * s.cols, 0.0f);
        } else {
          s.v.assign(s.n, 0.0f);
        }
        if (o.beta1) s.m.assign(s.n, 0.0f);
        scratch_size_ = std::max(scratch_size_, s.n);
        slots_.push_back(std::move(s));
      }
  }

  /// One update from the current gradients (lr as in the class comment).
  void step(double lr_scale = 1.0) {
    constexpr std::string_view fn = "Adafactor::step";
    check_lr_scale(fn, lr_scale);
    const std::vector<detail::ParamSpans> params = checked_params(fn);
    ++step_count_;
    const double t = double(step_count_);
    const double beta2t = 1.0 - std::pow(t, options_.decay_rate);
    std::vector<float> u(scratch_size_);
    std::size_t slot = 0;
    for (const ParamGroup& g : groups_)
      for (std::size_t i = 0; i < g.params.size(); ++i, ++slot)
        update(params[slot], slots_[slot], g.lr * lr_scale, t, beta2t, u.data());
  }

  const AdafactorOptions& options() const { return options_; }

  /// The second moments (factored or not) and exp_avg (with beta1) of every parameter.
  std::map<std::string, xt::xarray<float>> state_dict() const {
    std::map<std::string, xt::xarray<float>> out;
    for_each_state(slots_, [&](const std::string& key, const std::vector<std::size_t>& shape,
                               const std::vector<float>& values) {
      detail::export_shaped(out, key, shape, values);
    });
    return out;
  }

  /// Strict: every key of state_dict() with its shape, nothing else.
  void load_state_dict(const std::map<std::string, xt::xarray<float>>& state,
                       std::int64_t step_count) {
    detail::StateReader in = read_state("Adafactor::load_state_dict", state, step_count);
    std::vector<Slot> slots = slots_;
    for_each_state(slots, [&](const std::string& key, const std::vector<std::size_t>& shape,
                              std::vector<float>& values) { in.read(key, shape, values); });
    in.finish();
    slots_ = std::move(slots);
    step_count_ = step_count;
  }

 private:
  struct Slot {
    std::vector<std::size_t> shape;
    std::size_t n = 0, batch = 0, rows = 0, cols = 0;
    bool factored = false;
    std::vector<float> row, col, v, m;  // exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq, exp_avg
  };

  static std::vector<std::size_t> row_shape(const Slot& s) {
    return {s.shape.begin(), s.shape.end() - 1};
  }
  static std::vector<std::size_t> col_shape(const Slot& s) {
    std::vector<std::size_t> shape(s.shape.begin(), s.shape.end() - 2);
    shape.push_back(s.cols);
    return shape;
  }

  // f(key, shape, values) for every state vector of `slots` (slots_ or a copy of it).
  template <class Slots, class F>
  void for_each_state(Slots& slots, F&& f) const {
    std::size_t k = 0;
    for (const ParamGroup& g : groups_)
      for (std::size_t i = 0; i < g.params.size(); ++i, ++k) {
        auto& s = slots[k];
        if (s.factored) {
          f(g.names[i] + ".exp_avg_sq_row", row_shape(s), s.row);
          f(g.names[i] + ".exp_avg_sq_col", col_shape(s), s.col);
        } else {
          f(g.names[i] + ".exp_avg_sq", s.shape, s.v);
        }
        if (options_.beta1) f(g.names[i] + ".exp_avg", s.shape, s.m);
      }
  }

  // One parameter's update; u is scratch of at least s.n floats.
  void update(const detail::ParamSpans& p, Slot& s, double group_lr, double t, double beta2t,
              float* u) const {
    if (s.n == 0) return;
    const AdafactorOptions& o = options_;
    const float* pv = p.value.data();
    const float* g = p.grad.data();
    // lr (transformers' _get_lr), with RMS(p) before this update.
    double rel_step = group_lr;
    if (o.relative_step) rel_step = std::min(o.warmup_init ? 1e-6 * t : 1e-2, 1.0 / std::sqrt(t));
    double scale = 1.0;
    if (o.scale_parameter) {
      const double sum =
          detail::ordered_sum(s.n, [&](std::size_t i) { return double(pv[i]) * double(pv[i]); });
      scale = std::max(o.eps2, double(float(std::sqrt(sum) / std::sqrt(double(s.n)))));
    }
    const double lr = scale * rel_step;
    const float b2t = float(beta2t), c2t = float(1.0 - beta2t), eps1 = float(o.eps1);
    auto g2 = [&](std::size_t i) { return g[i] * g[i] + eps1; };

    if (s.factored) {
      const std::size_t B = s.batch, R = s.rows, C = s.cols;
      const std::size_t rows_per_item = std::max<std::size_t>(1, detail::kUpdateChunk / C);
      const std::size_t row_items = (B * R + rows_per_item - 1) / rows_per_item;
      // exp_avg_sq_row ← β2t·row + (1−β2t)·mean over C of g2, per row (b, r)
      detail::parallel_items(row_items, [&](std::size_t item) {
        for (std::size_t br = item * rows_per_item, e = std::min(B * R, br + rows_per_item); br < e;
             ++br) {
          double sum = 0;
          for (std::size_t c = 0; c < C; ++c) sum += double(g2(br * C + c));
          s.row[br] = s.row[br] * b2t + c2t * float(sum / double(C));
        }
      });
      // exp_avg_sq_col ← β2t·col + (1−β2t)·mean over R of g2, per column (b, c), in tiles
      const std::size_t tiles =
          (C + detail::kAdafactorColumnTile - 1) / detail::kAdafactorColumnTile;
      detail::parallel_items(B * tiles, [&](std::size_t item) {
        const std::size_t b = item / tiles, c0 = (item % tiles) * detail::kAdafactorColumnTile;
        const std::size_t c1 = std::min(C, c0 + detail::kAdafactorColumnTile);
        double sum[detail::kAdafactorColumnTile] = {};
        for (std::size_t r = 0; r < R; ++r)
          for (std::size_t c = c0; c < c1; ++c) sum[c - c0] += double(g2((b * R + r) * C + c));
        for (std::size_t c = c0; c < c1; ++c)
          s.col[b * C + c] = s.col[b * C + c] * b2t + c2t * float(sum[c - c0] / double(R));
      });
      // u = (rsqrt(row / mean over R of row) · rsqrt(col)) · g
      std::vector<float> row_mean(B);
      for (std::size_t b = 0; b < B; ++b) {
        double sum = 0;
        for (std::size_t r = 0; r < R; ++r) sum += double(s.row[b * R + r]);
        row_mean[b] = float(sum / double(R));
      }
      detail::parallel_items(row_items, [&](std::size_t item) {
        for (std::size_t br = item * rows_per_item, e = std::min(B * R, br + rows_per_item); br < e;
             ++br) {
          const std::size_t b = br / R;
          const float r_factor = 1.0f / std::sqrt(s.row[br] / row_mean[b]);
          for (std::size_t c = 0; c < C; ++c) {
            const float c_factor = 1.0f / std::sqrt(s.col[b * C + c]);
            u[br * C + c] = (r_factor * c_factor) * g[br * C + c];
          }
        }
      });
    } else {
      // exp_avg_sq ← β2t·v + (1−β2t)·g2;  u = rsqrt(v)·g
      detail::parallel_items((s.n + detail::kUpdateChunk - 1) / detail::kUpdateChunk,
                             [&](std::size_t item) {
                               const std::size_t i0 = item * detail::kUpdateChunk;
                               const std::size_t e = std::min(s.n, i0 + detail::kUpdateChunk);
                               for (std::size_t i = i0; i < e; ++i) {
                                 s.v[i] = s.v[i] * b2t + c2t * g2(i);
                                 u[i] = (1.0f / std::sqrt(s.v[i])) * g[i];
                               }
                             });
    }
    // u ← u / max(1, RMS(u)/clip_threshold) · lr; first moment; decay; step
    const double u_sum =
        detail::ordered_sum(s.n, [&](std::size_t i) { return double(u[i]) * u[i]; });
    const float rms_u = float(std::sqrt(u_sum) / std::sqrt(double(s.n)));
    const float clip = std::max(rms_u / float(o.clip_threshold), 1.0f);
    const detail::AdafactorCoefficients k{clip,
                                          float(lr),
                                          float(o.beta1.value_or(0.0)),
                                          float(1.0 - o.beta1.value_or(0.0)),
                                          o.weight_decay != 0 ? float(-o.weight_decay * lr) : 0.0f,
                                          o.beta1.has_value()};
    float* m = o.beta1 ? s.m.data() : nullptr;
    detail::parallel_items((s.n + detail::kUpdateChunk - 1) / detail::kUpdateChunk,
                           [&](std::size_t item) {
                             const std::size_t i0 = item * detail::kUpdateChunk;
                             detail::adafactor_apply_kernel<xsimd::default_arch>(
                                 p.value.data() + i0, u + i0, m ? m + i0 : nullptr,
                                 std::min(detail::kUpdateChunk, s.n - i0), k);
                           });
  }

  AdafactorOptions options_;
  std::vector<Slot> slots_;
  std::size_t scratch_size_ = 0;
};

}  // namespace difftrain::train
