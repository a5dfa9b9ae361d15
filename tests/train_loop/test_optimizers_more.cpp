// Lion, Adafactor, Prodigy and Schedule-Free AdamW against their reference update rules worked
// out by hand in double (written from the formulas, not from the implementations); state round
// trips that resume bitwise; thread-count independence; option checks.
#include <omp.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "difftrain/core/random.hpp"
#include "difftrain/train/adafactor.hpp"
#include "difftrain/train/lion.hpp"
#include "difftrain/train/prodigy.hpp"
#include "difftrain/train/schedule_free_adamw.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using difftrain::train::Adafactor;
using difftrain::train::AdafactorOptions;
using difftrain::train::Lion;
using difftrain::train::LionOptions;
using difftrain::train::ParamGroup;
using difftrain::train::Prodigy;
using difftrain::train::ProdigyOptions;
using difftrain::train::ScheduleFreeAdamW;
using difftrain::train::ScheduleFreeAdamWOptions;

namespace {

nn::Parameter<float> param_of(std::vector<std::size_t> shape, std::vector<float> value) {
  nn::Parameter<float> p(shape);
  std::copy(value.begin(), value.end(), p.value.begin());
  return p;
}

void set_grad(nn::Parameter<float>& p, const std::vector<float>& g) {
  std::copy(g.begin(), g.end(), p.grad.begin());
}

ParamGroup group_of(std::vector<nn::Parameter<float>*> params, std::vector<std::string> names,
                    double lr) {
  ParamGroup g;
  g.params.assign(params.begin(), params.end());
  g.names = std::move(names);
  g.lr = lr;
  return g;
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// The fixture: a 2×3 weight and a 3-vector bias, three gradients for each.
const std::vector<float> kW0 = {0.5f, -1.25f, 2.0f, 0.1f, -0.3f, 0.75f};
const std::vector<float> kB0 = {0.2f, -0.4f, 1.5f};
const std::vector<std::vector<float>> kWg = {{0.1f, -0.2f, 0.03f, 1.5f, -4.0f, 0.25f},
                                             {-0.05f, 0.4f, 0.02f, -2.0f, 1.0f, 0.5f},
                                             {0.3f, 0.1f, -0.6f, 0.2f, -0.7f, 0.05f}};
const std::vector<std::vector<float>> kBg = {
    {0.5f, -0.1f, 2.0f}, {0.25f, 0.3f, -1.0f}, {-1.0f, 0.2f, 0.5f}};

double sgn(double x) { return x > 0 ? 1.0 : (x < 0 ? -1.0 : 0.0); }

// A big vector and a big matrix with random values and gradients (many chunks, rows, tiles).
struct Big {
  nn::Parameter<float> vec{{3 * (1 << 14) + 37}}, mat{{200, 301}};
  Big() {
    std::vector<float> v(vec.size()), g(vec.size()), w(mat.size()), h(mat.size());
    fill_normal(v, {11, 1});
    fill_normal(g, {11, 2});
    fill_normal(w, {11, 3});
    fill_normal(h, {11, 4});
    std::copy(v.begin(), v.end(), vec.value.begin());
    std::copy(g.begin(), g.end(), vec.grad.begin());
    std::copy(w.begin(), w.end(), mat.value.begin());
    std::copy(h.begin(), h.end(), mat.grad.begin());
  }
  std::vector<ParamGroup> groups(double lr) { return {group_of({&vec, &mat}, {"vec", "mat"}, lr)}; }
  std::vector<float> values() const {
    std::vector<float> out(vec.value.begin(), vec.value.end());
    out.insert(out.end(), mat.value.begin(), mat.value.end());
    return out;
  }
};

// Three steps on Big with `threads` threads; the parameters afterwards.
template <class Make>
std::vector<float> run_big(int threads, double lr, Make make) {
  omp_set_num_threads(threads);
  Big big;
  auto opt = make(big.groups(lr));
  for (int s = 0; s < 3; ++s) opt.step(0.5 + 0.25 * s);
  omp_set_num_threads(2);
  return big.values();
}

// Two steps, save, load into an optimizer over copies of the parameters, two more steps each:
// the copies end bitwise equal.
template <class Make>
void check_round_trip(double lr, Make make) {
  Big a;
  auto first = make(a.groups(lr));
  first.step();
  first.step(0.5);
  Big b;
  b.vec.value = a.vec.value;
  b.mat.value = a.mat.value;
  auto second = make(b.groups(lr));
  second.load_state_dict(first.state_dict(), first.step_count());
  REQUIRE(second.step_count() == 2);
  for (int s = 0; s < 2; ++s) {
    first.step(0.75);
    second.step(0.75);
  }
  REQUIRE(a.values() == b.values());
  REQUIRE(first.state_dict().size() == second.state_dict().size());
  for (const auto& [key, value] : first.state_dict()) {
    INFO(key);
    REQUIRE((second.state_dict().at(key) == value));
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Lion

TEST_CASE("Lion: two steps equal lion-pytorch's update worked out in double") {
  nn::Parameter<float> w = param_of({2, 3}, kW0), b = param_of({3}, kB0);
  // Two groups (LoRA+ style): the bias with twice the lr and no weight decay.
  ParamGroup gw = group_of({&w}, {"w"}, 1e-2), gb = group_of({&b}, {"b"}, 2e-2);
  gw.weight_decay = 0.1;
  gb.weight_decay = 0.0;
  Lion opt({gw, gb});
  for (int s = 0; s < 2; ++s) {
    set_grad(w, kWg[s]);
    set_grad(b, kBg[s]);
    opt.step(s == 0 ? 1.0 : 0.5);
  }
  auto expect = [](const std::vector<float>& p0, const std::vector<std::vector<float>>& grads,
                   double lr, double wd) {
    std::vector<double> out(p0.size());
    for (std::size_t i = 0; i < p0.size(); ++i) {
      double p = p0[i], m = 0;
      for (int s = 0; s < 2; ++s) {
        const double lr_s = lr * (s == 0 ? 1.0 : 0.5), g = grads[s][i];
        const double c = 0.9 * m + 0.1 * g;
        p = p * (1 - lr_s * wd) - lr_s * sgn(c);
        m = 0.99 * m + 0.01 * g;
      }
      out[i] = p;
    }
    return out;
  };
  REQUIRE_CLOSE(w.value, expect(kW0, kWg, 1e-2, 0.1), 1e-6, 1e-7);
  REQUIRE_CLOSE(b.value, expect(kB0, kBg, 2e-2, 0.0), 1e-6, 1e-7);
  REQUIRE(opt.step_count() == 2);
  const auto state = opt.state_dict();
  REQUIRE(state.size() == 2);
  // m after two steps: 0.99·0.01·g1 + 0.01·g2
  REQUIRE(state.at("w.exp_avg")(1, 0) == Approx(0.99 * 0.01 * 1.5 + 0.01 * -2.0).epsilon(1e-6));
}

TEST_CASE("Lion: sign(0) is 0, so a zero gradient only decays") {
  nn::Parameter<float> p = param_of({2}, {1.0f, -2.0f});
  ParamGroup g = group_of({&p}, {"p"}, 0.1);
  g.weight_decay = 0.5;
  Lion opt({g});
  opt.step();
  REQUIRE(p.value(0) == Approx(0.95));
  REQUIRE(p.value(1) == Approx(-1.9));
}

// ---------------------------------------------------------------------------------------------
// Adafactor

namespace {

// transformers' Adafactor on one parameter, in double, from the formulas.
struct AdafactorRef {
  std::size_t B, R, C;  // factored when R > 0
  std::vector<double> p, row, col, v, m;

  void step(const std::vector<float>& g, double t, double group_lr, const AdafactorOptions& o) {
    const std::size_t n = p.size();
    double rel = group_lr;
    if (o.relative_step) rel = std::min(o.warmup_init ? 1e-6 * t : 1e-2, 1 / std::sqrt(t));
    double rms_p = 0;
    for (double x : p) rms_p += x * x;
    rms_p = std::sqrt(rms_p / double(n));
    const double lr = (o.scale_parameter ? std::max(o.eps2, rms_p) : 1.0) * rel;
    const double beta2t = 1 - std::pow(t, o.decay_rate);
    std::vector<double> g2(n), u(n);
    for (std::size_t i = 0; i < n; ++i) g2[i] = double(g[i]) * g[i] + o.eps1;
    if (R > 0) {
      for (std::size_t b = 0; b < B; ++b) {
        for (std::size_t r = 0; r < R; ++r) {
          double mean = 0;
          for (std::size_t c = 0; c < C; ++c) mean += g2[(b * R + r) * C + c] / double(C);
          row[b * R + r] = beta2t * row[b * R + r] + (1 - beta2t) * mean;
        }
        for (std::size_t c = 0; c < C; ++c) {
          double mean = 0;
          for (std::size_t r = 0; r < R; ++r) mean += g2[(b * R + r) * C + c] / double(R);
          col[b * C + c] = beta2t * col[b * C + c] + (1 - beta2t) * mean;
        }
        double row_mean = 0;
        for (std::size_t r = 0; r < R; ++r) row_mean += row[b * R + r] / double(R);
        for (std::size_t r = 0; r < R; ++r)
          for (std::size_t c = 0; c < C; ++c) {
            const std::size_t i = (b * R + r) * C + c;
            u[i] = g[i] / std::sqrt(row[b * R + r] / row_mean) / std::sqrt(col[b * C + c]);
          }
      }
    } else {
      for (std::size_t i = 0; i < n; ++i) {
        v[i] = beta2t * v[i] + (1 - beta2t) * g2[i];
        u[i] = g[i] / std::sqrt(v[i]);
      }
    }
    double rms_u = 0;
    for (double x : u) rms_u += x * x;
    rms_u = std::sqrt(rms_u / double(n));
    const double clip = std::max(1.0, rms_u / o.clip_threshold);
    for (std::size_t i = 0; i < n; ++i) {
      double ui = u[i] / clip * lr;
      if (o.beta1) ui = m[i] = *o.beta1 * m[i] + (1 - *o.beta1) * ui;
      p[i] = p[i] - o.weight_decay * lr * p[i] - ui;
    }
  }
};

AdafactorRef adafactor_ref(const std::vector<float>& p0, std::size_t B, std::size_t R,
                           std::size_t C) {
  AdafactorRef r{B, R, C, to_double(p0), {}, {}, {}, {}};
  r.row.assign(B * R, 0.0);
  r.col.assign(B * C, 0.0);
  r.v.assign(p0.size(), 0.0);
  r.m.assign(p0.size(), 0.0);
  return r;
}

}  // namespace

TEST_CASE("Adafactor: three steps equal transformers' update worked out in double") {
  AdafactorOptions kohya;  // kohya's usual call: a given lr, no relative step, no scaling
  kohya.relative_step = false;
  kohya.scale_parameter = false;
  AdafactorOptions kohya_extra = kohya;  // with a first moment, weight decay, harder clipping
  kohya_extra.beta1 = 0.9;
  kohya_extra.weight_decay = 0.01;
  kohya_extra.clip_threshold = 0.5;
  AdafactorOptions relative;  // transformers' defaults: relative step, parameter scale
  AdafactorOptions warmup;
  warmup.warmup_init = true;
  warmup.decay_rate = -0.5;
  const int which = GENERATE(0, 1, 2, 3);
  const AdafactorOptions o = std::vector{kohya, kohya_extra, relative, warmup}[which];
  INFO("options " << which);

  // A 2×3 matrix, a 3-vector and a 2×2×3 tensor (factored over its last two dims).
  std::vector<float> t0(12), tg(36);
  for (std::size_t i = 0; i < 12; ++i) t0[i] = 0.1f * float(i) - 0.55f;
  for (std::size_t i = 0; i < 36; ++i)
    tg[i] = std::sin(1.7f * float(i)) * (i % 5 == 0 ? 3.0f : 1.0f);
  nn::Parameter<float> w = param_of({2, 3}, kW0), b = param_of({3}, kB0),
                       t = param_of({2, 2, 3}, t0);
  std::vector<ParamGroup> groups = {group_of({&w, &t}, {"w", "t"}, 1e-2),
                                    group_of({&b}, {"b"}, 3e-2)};
  Adafactor opt(groups, o);
  AdafactorRef rw = adafactor_ref(kW0, 1, 2, 3), rb = adafactor_ref(kB0, 1, 0, 0),
               rt = adafactor_ref(t0, 2, 2, 3);
  for (int s = 0; s < 3; ++s) {
    const std::vector<float> gt(tg.begin() + 12 * s, tg.begin() + 12 * (s + 1));
    set_grad(w, kWg[s]);
    set_grad(b, kBg[s]);
    set_grad(t, gt);
    const double scale = s == 1 ? 0.5 : 1.0;
    opt.step(scale);
    rw.step(kWg[s], s + 1, 1e-2 * scale, o);
    rb.step(kBg[s], s + 1, 3e-2 * scale, o);
    rt.step(gt, s + 1, 1e-2 * scale, o);
    INFO("step " << s + 1);
    REQUIRE_CLOSE(w.value, rw.p, 1e-6, 1e-8);
    REQUIRE_CLOSE(b.value, rb.p, 1e-6, 1e-8);
    REQUIRE_CLOSE(t.value, rt.p, 1e-6, 1e-8);
  }
  const auto state = opt.state_dict();
  REQUIRE(state.at("w.exp_avg_sq_row").shape() == std::vector<std::size_t>{2});
  REQUIRE(state.at("w.exp_avg_sq_col").shape() == std::vector<std::size_t>{3});
  REQUIRE(state.at("t.exp_avg_sq_row").shape() == std::vector<std::size_t>{2, 2});
  REQUIRE(state.at("t.exp_avg_sq_col").shape() == std::vector<std::size_t>{2, 3});
  REQUIRE(state.at("b.exp_avg_sq").shape() == std::vector<std::size_t>{3});
  REQUIRE(state.count("w.exp_avg") == (o.beta1 ? 1u : 0u));
  REQUIRE(state.size() == (o.beta1 ? 8u : 5u));
  REQUIRE_CLOSE(state.at("t.exp_avg_sq_col"), rt.col, 1e-6, 0);
  REQUIRE_CLOSE(state.at("w.exp_avg_sq_row"), rw.row, 1e-6, 0);
}

// ---------------------------------------------------------------------------------------------
// Prodigy

namespace {

// prodigyopt's Prodigy over a list of parameters, in double, from the formulas.
struct ProdigyRef {
  ProdigyOptions o;
  double d, d_max, d_numerator = 0;
  int k = 0;
  std::vector<std::vector<double>> p, p0, m, v, s;

  ProdigyRef(const ProdigyOptions& options, const std::vector<std::vector<float>>& params)
      : o(options), d(options.d0), d_max(options.d0) {
    for (const auto& x : params) {
      p.push_back(to_double(x));
      p0.push_back(to_double(x));
      m.emplace_back(x.size(), 0.0);
      v.emplace_back(x.size(), 0.0);
      s.emplace_back(x.size(), 0.0);
    }
  }

  void step(const std::vector<std::vector<float>>& grads, double lr) {
    const double b1 = o.betas[0], b2 = o.betas[1], b3 = o.beta3 ? *o.beta3 : std::sqrt(b2);
    const double bc =
        o.use_bias_correction ? std::sqrt(1 - std::pow(b2, k + 1)) / (1 - std::pow(b1, k + 1)) : 1;
    const double dlr = d * lr * bc;
    d_numerator *= b3;
    double d_denom = 0;
    std::vector<std::vector<double>> gs;
    for (std::size_t j = 0; j < p.size(); ++j) {
      std::vector<double> g(p[j].size());
      double dot = 0;
      for (std::size_t i = 0; i < g.size(); ++i) {
        g[i] = grads[j][i] + (o.decouple ? 0.0 : o.weight_decay * p[j][i]);
        dot += g[i] * (p0[j][i] - p[j][i]);
      }
      d_numerator += (d / o.d0) * dlr * dot;
      for (std::size_t i = 0; i < g.size(); ++i) {
        m[j][i] = b1 * m[j][i] + d * (1 - b1) * g[i];
        v[j][i] = b2 * v[j][i] + d * d * (1 - b2) * g[i] * g[i];
        s[j][i] = b3 * s[j][i] + (d / o.d0) * (o.safeguard_warmup ? d : dlr) * g[i];
        d_denom += std::abs(s[j][i]);
      }
    }
    const double d_hat = o.d_coef * d_numerator / d_denom;
    if (d == o.d0) d = std::max(d, d_hat);
    d_max = std::max(d_max, d_hat);
    d = std::min(d_max, d * o.growth_rate);
    for (std::size_t j = 0; j < p.size(); ++j)
      for (std::size_t i = 0; i < p[j].size(); ++i) {
        if (o.decouple) p[j][i] -= o.weight_decay * dlr * p[j][i];
        p[j][i] -= dlr * m[j][i] / (std::sqrt(v[j][i]) + d * o.eps);
      }
    ++k;
  }
};

}  // namespace

TEST_CASE("Prodigy: four steps equal prodigyopt's update worked out in double") {
  ProdigyOptions plain;  // d0 large enough that p0 − p is well resolved in float32
  plain.d0 = 1e-2;
  plain.weight_decay = 0.01;
  ProdigyOptions variant = plain;
  variant.decouple = false;
  variant.use_bias_correction = true;
  variant.safeguard_warmup = true;
  variant.beta3 = 0.95;
  variant.d_coef = 10.0;
  variant.growth_rate = 1.5;
  const int which = GENERATE(0, 1);
  const ProdigyOptions o = which == 0 ? plain : variant;
  INFO("options " << which);

  nn::Parameter<float> w = param_of({2, 3}, kW0), b = param_of({3}, kB0);
  Prodigy opt({group_of({&w, &b}, {"w", "b"}, 1.0)}, o);
  ProdigyRef ref(o, {kW0, kB0});
  // Gradients of ½‖p − target‖² (taken from the float parameters, given to both): they keep
  // pointing one way, so d grows.
  const std::vector<float> target_w = {2.0f, 1.0f, -1.0f, 0.5f, 3.0f, -2.0f},
                           target_b = {-1.0f, 1.0f, 0.5f};
  auto gradient = [](const nn::Parameter<float>& p, const std::vector<float>& target) {
    std::vector<float> g(target.size());
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = p.value.flat(i) - target[i];
    return g;
  };
  for (int s = 0; s < 4; ++s) {
    const std::vector<float> gw = gradient(w, target_w), gb = gradient(b, target_b);
    set_grad(w, gw);
    set_grad(b, gb);
    const double scale = s == 3 ? 0.5 : 1.0;
    opt.step(scale);
    ref.step({gw, gb}, scale);
    INFO("step " << s + 1 << ": d " << opt.d() << ", expected " << ref.d);
    REQUIRE(opt.d() == Approx(ref.d).epsilon(1e-6));
    REQUIRE_CLOSE(w.value, ref.p[0], 1e-6, 1e-7);
    REQUIRE_CLOSE(b.value, ref.p[1], 1e-6, 1e-7);
  }
  REQUIRE(ref.d != o.d0);  // the estimate moved
  REQUIRE(opt.k() == 4);
  const auto state = opt.state_dict();
  REQUIRE(state.size() == 4 * 2 + 4);
  REQUIRE_CLOSE(state.at("w.p0"), kW0, 0, 0);
  REQUIRE_CLOSE(state.at("b.s"), ref.s[1], 3e-6, 1e-9);
  REQUIRE(state.at("prodigy.d").shape() == std::vector<std::size_t>{5});
  REQUIRE(state.at("prodigy.d")(0) == float(opt.d()));
  REQUIRE(state.at("prodigy.k")(0) == 4.0f);
}

TEST_CASE("Prodigy: a step without usable gradient (d_denom = 0) changes nothing, as prodigyopt") {
  nn::Parameter<float> w = param_of({2, 3}, kW0);
  ProdigyOptions o;
  o.weight_decay = 0.1;
  Prodigy opt({group_of({&w}, {"w"}, 1.0)}, o);
  opt.step();  // zero gradient
  opt.step(0.0);
  set_grad(w, kWg[0]);
  opt.step(0.0);  // lr 0 (first warm-up step)
  REQUIRE_CLOSE(w.value, kW0, 0, 0);
  REQUIRE(opt.k() == 0);
  REQUIRE(opt.step_count() == 3);
  opt.step();
  REQUIRE(opt.k() == 1);
  REQUIRE(w.value(0, 0) != kW0[0]);
}

TEST_CASE("Prodigy: groups must share one lr or have lr 0, as prodigyopt requires") {
  nn::Parameter<float> w = param_of({2, 3}, kW0), b = param_of({3}, kB0);
  REQUIRE_THROWS_WITH(Prodigy({group_of({&w}, {"w"}, 1.0), group_of({&b}, {"b"}, 2.0)}),
                      Catch::Contains("group 0 lr is 1, expected the largest group lr (2) or 0"));
  // A group with lr 0 takes no part in the estimate and its moments stay zero.
  set_grad(w, kWg[0]);
  set_grad(b, kBg[0]);
  Prodigy opt({group_of({&w}, {"w"}, 1.0), group_of({&b}, {"b"}, 0.0)});
  opt.step();
  REQUIRE_CLOSE(b.value, kB0, 0, 0);
  REQUIRE(opt.state_dict().at("b.exp_avg")(0) == 0.0f);
  REQUIRE(opt.state_dict().at("w.exp_avg")(0) != 0.0f);
}

// ---------------------------------------------------------------------------------------------
// Schedule-Free AdamW

namespace {

// AdamWScheduleFree written as the paper states it: z (iterate), x (average), y = (1−β1)z + β1x.
struct ScheduleFreeRef {
  ScheduleFreeAdamWOptions o;
  std::vector<double> z, x, v;
  double lr_max = -1, weight_sum = 0;
  int k = 0;

  ScheduleFreeRef(const ScheduleFreeAdamWOptions& options, const std::vector<float>& y0)
      : o(options), z(to_double(y0)), x(to_double(y0)), v(y0.size(), 0.0) {}

  double y(std::size_t i) const { return (1 - o.betas[0]) * z[i] + o.betas[0] * x[i]; }
  std::vector<double> y() const {
    std::vector<double> out(z.size());
    for (std::size_t i = 0; i < z.size(); ++i) out[i] = y(i);
    return out;
  }

  void step(const std::vector<float>& g, double group_lr) {
    const double b2 = o.betas[1];
    const double warm = k < o.warmup_steps ? double(k + 1) / double(o.warmup_steps) : 1.0;
    const double lr = group_lr * warm * std::sqrt(1 - std::pow(b2, k + 1));
    lr_max = std::max(lr_max, lr);
    const double weight = std::pow(k + 1, o.r) * std::pow(lr_max, o.weight_lr_power);
    weight_sum += weight;
    const double c = weight / weight_sum;
    for (std::size_t i = 0; i < z.size(); ++i) {
      v[i] = b2 * v[i] + (1 - b2) * double(g[i]) * g[i];
      const double gn = g[i] / (std::sqrt(v[i]) + o.eps) + o.weight_decay * y(i);
      z[i] -= lr * gn;
      x[i] = (1 - c) * x[i] + c * z[i];
    }
    ++k;
  }
};

}  // namespace

TEST_CASE("ScheduleFreeAdamW: three steps equal the paper's z/x/y recursion in double") {
  ScheduleFreeAdamWOptions plain;
  plain.warmup_steps = 2;
  plain.weight_decay = 0.01;
  ScheduleFreeAdamWOptions variant = plain;
  variant.r = 1.0;
  variant.weight_lr_power = 1.0;
  variant.betas = {0.8, 0.99};
  variant.warmup_steps = 0;
  const int which = GENERATE(0, 1);
  const ScheduleFreeAdamWOptions o = which == 0 ? plain : variant;
  INFO("options " << which);

  nn::Parameter<float> w = param_of({2, 3}, kW0), b = param_of({3}, kB0);
  ScheduleFreeAdamW opt({group_of({&w}, {"w"}, 0.01), group_of({&b}, {"b"}, 0.02)}, o);
  REQUIRE(opt.is_train_mode());
  ScheduleFreeRef rw(o, kW0), rb(o, kB0);
  for (int s = 0; s < 3; ++s) {
    set_grad(w, kWg[s]);
    set_grad(b, kBg[s]);
    opt.step();
    rw.step(kWg[s], 0.01);
    rb.step(kBg[s], 0.02);
    INFO("step " << s + 1);
    REQUIRE_CLOSE(w.value, rw.y(), 1e-6, 1e-8);
    REQUIRE_CLOSE(b.value, rb.y(), 1e-6, 1e-8);
  }
  const auto state = opt.state_dict();
  REQUIRE_CLOSE(state.at("w.z"), rw.z, 1e-6, 1e-8);

  // eval() gives x; train() gives y back. Both are torch's float lerp, so the round trip is not
  // exact: it is within 1 ulp of max(|x|, |y|, |z|) (measured: 0.79 on 1e5 random elements, 0.3%
  // of them not bitwise equal; the reference behaves alike).
  const xt::xarray<float> y_w = w.value, y_b = b.value;
  opt.eval();
  REQUIRE(!opt.is_train_mode());
  REQUIRE_CLOSE(w.value, rw.x, 1e-6, 1e-8);
  REQUIRE_CLOSE(b.value, rb.x, 1e-6, 1e-8);
  const xt::xarray<float> x_w = w.value, x_b = b.value;
  opt.eval();  // no-op in eval mode
  REQUIRE((w.value == x_w));
  REQUIRE_THROWS_WITH(opt.step(), Catch::Contains("in eval mode, expected train mode"));
  opt.train();
  REQUIRE(opt.is_train_mode());
  const auto z_state = opt.state_dict();
  auto check_restored = [](const xt::xarray<float>& now, const xt::xarray<float>& y,
                           const xt::xarray<float>& x, const xt::xarray<float>& z) {
    for (std::size_t i = 0; i < y.size(); ++i) {
      INFO("element " << i << ": " << now.flat(i) << " vs " << y.flat(i));
      const float scale = std::max({std::abs(x.flat(i)), std::abs(y.flat(i)), std::abs(z.flat(i))});
      REQUIRE(std::abs(now.flat(i) - y.flat(i)) <= std::numeric_limits<float>::epsilon() * scale);
    }
  };
  check_restored(w.value, y_w, x_w, z_state.at("w.z"));
  check_restored(b.value, y_b, x_b, z_state.at("b.z"));
}

TEST_CASE("ScheduleFreeAdamW: eval/train before the first step are no-ops; z starts at p") {
  nn::Parameter<float> w = param_of({2, 3}, kW0);
  ScheduleFreeAdamW opt({group_of({&w}, {"w"}, 0.01)});
  opt.eval();
  REQUIRE_CLOSE(w.value, kW0, 0, 0);
  opt.train();
  REQUIRE_CLOSE(w.value, kW0, 0, 0);
  // Parameters changed after construction (weights loaded): z is taken at the first step.
  for (auto& x : w.value) x *= 2;
  set_grad(w, kWg[0]);
  opt.step();
  // First step: c = 1, so y = z − lr·(1 − β1·0)… = z_new, and z_new = 2·p0 − lr·ĝ.
  for (std::size_t i = 0; i < 6; ++i) {
    const double lr = 0.01 * std::sqrt(1 - 0.999);
    const double g = kWg[0][i], v = 0.001 * g * g;
    REQUIRE(w.value.flat(i) == Approx(2.0 * kW0[i] - lr * g / (std::sqrt(v) + 1e-8)).epsilon(1e-6));
  }
}

TEST_CASE("ScheduleFreeAdamW: the state keeps the mode; saved in eval mode, train() resumes") {
  Big a;
  ScheduleFreeAdamW first(a.groups(0.01));
  first.step();
  first.step();
  first.eval();  // as a trainer saves: weights x and the optimizer state
  const auto state = first.state_dict();
  Big b;
  b.vec.value = a.vec.value;
  b.mat.value = a.mat.value;
  ScheduleFreeAdamW second(b.groups(0.01));
  second.load_state_dict(state, first.step_count());
  REQUIRE(!second.is_train_mode());
  first.train();
  second.train();
  REQUIRE(a.values() == b.values());
  first.step();
  second.step();
  REQUIRE(a.values() == b.values());
  auto bad = state;
  bad["schedule_free.train_mode"](1) = 0.5f;
  REQUIRE_THROWS_WITH(second.load_state_dict(bad, 2),
                      Catch::Contains("schedule_free.train_mode element 1 is 0.5"));
}

// ---------------------------------------------------------------------------------------------
// All four

TEST_CASE(
    "Lion, Adafactor, Prodigy, ScheduleFreeAdamW: results do not depend on the thread count") {
  auto check = [](double lr, auto make) {
    const std::vector<float> one = run_big(1, lr, make), two = run_big(2, lr, make),
                             three = run_big(3, lr, make);
    REQUIRE(one == two);
    REQUIRE(one == three);
    Big fresh;
    REQUIRE(one != fresh.values());
  };
  SECTION("Lion") {
    check(1e-3, [](std::vector<ParamGroup> g) { return Lion(std::move(g)); });
  }
  SECTION("Adafactor (kohya)") {
    AdafactorOptions o;
    o.relative_step = o.scale_parameter = false;
    o.beta1 = 0.9;
    o.weight_decay = 0.01;
    check(1e-3, [o](std::vector<ParamGroup> g) { return Adafactor(std::move(g), o); });
  }
  SECTION("Adafactor (relative step)") {
    check(1e-3, [](std::vector<ParamGroup> g) { return Adafactor(std::move(g)); });
  }
  SECTION("Prodigy") {
    ProdigyOptions o;
    o.weight_decay = 0.01;
    check(1.0, [o](std::vector<ParamGroup> g) { return Prodigy(std::move(g), o); });
  }
  SECTION("ScheduleFreeAdamW") {
    ScheduleFreeAdamWOptions o;
    o.weight_decay = 0.01;
    o.warmup_steps = 2;
    check(1e-3, [o](std::vector<ParamGroup> g) { return ScheduleFreeAdamW(std::move(g), o); });
  }
}

TEST_CASE("Lion, Adafactor, Prodigy, ScheduleFreeAdamW: state round trips resume bitwise") {
  SECTION("Lion") {
    check_round_trip(1e-3, [](std::vector<ParamGroup> g) { return Lion(std::move(g)); });
  }
  SECTION("Adafactor") {
    AdafactorOptions o;
    o.beta1 = 0.9;
    check_round_trip(1e-3, [o](std::vector<ParamGroup> g) { return Adafactor(std::move(g), o); });
  }
  SECTION("Prodigy") {
    check_round_trip(1.0, [](std::vector<ParamGroup> g) { return Prodigy(std::move(g)); });
  }
  SECTION("ScheduleFreeAdamW") {
    ScheduleFreeAdamWOptions o;
    o.warmup_steps = 3;
    check_round_trip(1e-3,
                     [o](std::vector<ParamGroup> g) { return ScheduleFreeAdamW(std::move(g), o); });
  }
}

TEST_CASE("optimizer scalars are stored exactly and read strictly") {
  nn::Parameter<float> w = param_of({2, 3}, kW0);
  set_grad(w, kWg[0]);
  Prodigy first({group_of({&w}, {"w"}, 1.0)});
  first.step();
  first.step();
  auto state = first.state_dict();
  // d is a double: 1e-6 is not a float, and the four 16-bit pieces hold it exactly.
  Prodigy second({group_of({&w}, {"w"}, 1.0)});
  second.load_state_dict(state, 2);
  REQUIRE(second.d() == first.d());
  REQUIRE(second.k() == 2);

  auto bad = state;
  bad.erase("prodigy.d_max");
  bad["w.stray"] = xt::zeros<float>({1});
  REQUIRE_THROWS_WITH(second.load_state_dict(bad, 2), Catch::Contains("missing prodigy.d_max") &&
                                                          Catch::Contains("unexpected w.stray"));
  bad = state;
  bad["prodigy.d"] = xt::zeros<float>({1});
  REQUIRE_THROWS_WITH(second.load_state_dict(bad, 2),
                      Catch::Contains("prodigy.d has shape [1], expected [5]"));
  bad = state;
  bad["w.p0"] = xt::zeros<float>({6});
  REQUIRE_THROWS_WITH(second.load_state_dict(bad, 2),
                      Catch::Contains("w.p0 has shape [6], expected [2,3]"));

  AdafactorOptions o;
  Adafactor af({group_of({&w}, {"w"}, 1e-3)}, o);
  auto af_state = af.state_dict();
  af_state["w.exp_avg_sq_row"] = xt::zeros<float>({3});
  REQUIRE_THROWS_WITH(af.load_state_dict(af_state, 1),
                      Catch::Contains("w.exp_avg_sq_row has shape [3], expected [2]"));
  af_state = af.state_dict();
  af_state["w.exp_avg"] = xt::zeros<float>({2, 3});  // no beta1: no first moment
  REQUIRE_THROWS_WITH(af.load_state_dict(af_state, 1), Catch::Contains("unexpected w.exp_avg"));
}

TEST_CASE("Lion, Adafactor, Prodigy, ScheduleFreeAdamW reject bad options") {
  nn::Parameter<float> p({2});
  const std::vector<ParamGroup> g = {group_of({&p}, {"p"}, 1e-3)};
  LionOptions lion;
  lion.betas = {0.9, 1.5};
  REQUIRE_THROWS_AS(Lion(g, lion), Error);
  REQUIRE_THROWS_WITH(Lion(g, lion), Catch::Contains("Lion: betas[1] is 1.5, expected in [0, 1]"));

  AdafactorOptions af;
  af.relative_step = false;
  af.warmup_init = true;
  REQUIRE_THROWS_WITH(Adafactor(g, af), Catch::Contains("warmup_init is true but relative_step "
                                                        "is false"));
  af = {};
  af.clip_threshold = 0;
  REQUIRE_THROWS_WITH(Adafactor(g, af), Catch::Contains("clip_threshold is 0, expected"));
  af = {};
  af.decay_rate = 0.5;
  REQUIRE_THROWS_WITH(Adafactor(g, af), Catch::Contains("decay_rate is 0.5, expected"));
  af = {};
  af.beta1 = 1.0;
  REQUIRE_THROWS_WITH(Adafactor(g, af), Catch::Contains("beta1 is 1, expected in [0, 1)"));

  ProdigyOptions pr;
  pr.d0 = 0;
  REQUIRE_THROWS_WITH(Prodigy(g, pr), Catch::Contains("Prodigy: d0 is 0, expected"));
  pr = {};
  pr.eps = 0;
  REQUIRE_THROWS_WITH(Prodigy(g, pr), Catch::Contains("eps is 0, expected a finite value > 0"));
  pr = {};
  pr.beta3 = 1.5;
  REQUIRE_THROWS_WITH(Prodigy(g, pr), Catch::Contains("beta3 is 1.5, expected in [0, 1]"));
  pr = {};
  pr.growth_rate = 0;
  REQUIRE_THROWS_WITH(Prodigy(g, pr), Catch::Contains("growth_rate is 0"));

  ScheduleFreeAdamWOptions sf;
  sf.betas = {0.0, 0.999};
  REQUIRE_THROWS_WITH(ScheduleFreeAdamW(g, sf),
                      Catch::Contains("betas[0] is 0, expected in (0, 1)"));
  sf = {};
  sf.warmup_steps = -1;
  REQUIRE_THROWS_WITH(ScheduleFreeAdamW(g, sf),
                      Catch::Contains("warmup_steps is -1, expected >= 0"));
  sf = {};
  sf.weight_lr_power = -2;
  REQUIRE_THROWS_WITH(ScheduleFreeAdamW(g, sf), Catch::Contains("weight_lr_power is -2"));

  // Bad groups and gradients, as for AdamW.
  ParamGroup bad = g[0];
  bad.lr = -1;
  REQUIRE_THROWS_WITH(Lion({bad}), Catch::Contains("group 0 lr is -1"));
  Adafactor opt(g);
  p.grad = xt::zeros<float>({3});
  REQUIRE_THROWS_WITH(opt.step(), Catch::Contains("gradient of 'p' has shape [3], expected [2]"));
  REQUIRE_THROWS_WITH(opt.step(-1), Catch::Contains("lr_scale is -1"));
}
