// The training loop end to end with a small per-pixel MLP denoiser built on nn::Parameter:
// accumulation, prior preservation, clipping, non-finite guard, checkpoints and resume, and a fit.
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <string>
#include <vector>
#include <xtensor/xview.hpp>

#include "difftrain/difftrain.hpp"
#include "difftrain/train/trainer.hpp"
#include "support/temp_dir.hpp"
#include "support/tensor_match.hpp"
#include "train_loop/zero_text.hpp"

using namespace difftrain;
using namespace difftrain::train;
using difftrain::test::ZeroText;
namespace fs = std::filesystem;

namespace {

// pred[b,:,p] = W2·silu(W1·[x_t[b,:,p]; τ(t_b)] + b1) + b2 per pixel, τ(t) = sin/cos(2^k·π·t/T).
// Dims: B batch, C channels, P = H·W pixels, F = C + 2·kFreqs inputs, Hd hidden units.
// Poison switches for the non-finite tests: a NaN prediction or a NaN gradient at forward call n.
struct TinyDenoiser {
  static constexpr std::size_t kFreqs = 3;
  std::size_t C, Hd, F;
  nn::Parameter<float> w1, b1, w2, b2;
  int calls = 0, nan_prediction_at = -1, nan_gradient_at = -1;
  std::vector<std::int64_t> last_timesteps;
  std::vector<float> inputs, pre;
  std::size_t B = 0, P = 0;

  TinyDenoiser(std::size_t channels, std::size_t hidden, std::uint64_t seed)
      : C(channels),
        Hd(hidden),
        F(channels + 2 * kFreqs),
        w1({Hd, F}),
        b1({Hd}),
        w2({C, Hd}),
        b2({C}) {
    fill_uniform(std::span<float>(w1.value.data(), w1.size()), {seed, 1});
    fill_uniform(std::span<float>(w2.value.data(), w2.size()), {seed, 2});
    for (float& w : w1.value) w = (2 * w - 1) / std::sqrt(float(F));
    for (float& w : w2.value) w = (2 * w - 1) / std::sqrt(float(Hd));
  }

  template <class V>
  void for_each_parameter(const std::string& prefix, V&& visit) {
    visit(nn::join_name(prefix, "mlp.0.weight"), w1);
    visit(nn::join_name(prefix, "mlp.0.bias"), b1);
    visit(nn::join_name(prefix, "mlp.2.weight"), w2);
    visit(nn::join_name(prefix, "mlp.2.bias"), b2);
  }

  static float silu(float z) { return z / (1.0f + std::exp(-z)); }

  Tensor4<float> forward(const Tensor4<float>& x_t, std::span<const std::int64_t> t,
                         const Tensor3<float>&) {
    ++calls;
    last_timesteps.assign(t.begin(), t.end());
    const auto& sh = x_t.shape();
    B = sh[0];
    P = sh[2] * sh[3];
    inputs.assign(B * P * F, 0.0f);
    pre.assign(B * P * Hd, 0.0f);
    Tensor4<float> pred = xt::zeros<float>(sh);
    for (std::size_t b = 0; b < B; ++b) {
      const double phase = std::numbers::pi * double(t[b]) / 1000.0;
      for (std::size_t p = 0; p < P; ++p) {
        float* in = &inputs[(b * P + p) * F];
        for (std::size_t c = 0; c < C; ++c) in[c] = x_t.data()[(b * C + c) * P + p];
        for (std::size_t k = 0; k < kFreqs; ++k) {
          in[C + 2 * k] = float(std::sin(phase * double(1 << k)));
          in[C + 2 * k + 1] = float(std::cos(phase * double(1 << k)));
        }
        float* z = &pre[(b * P + p) * Hd];
        for (std::size_t j = 0; j < Hd; ++j) {
          float acc = b1.value(j);
          for (std::size_t f = 0; f < F; ++f) acc += w1.value(j, f) * in[f];
          z[j] = acc;
        }
        for (std::size_t c = 0; c < C; ++c) {
          float acc = b2.value(c);
          for (std::size_t j = 0; j < Hd; ++j) acc += w2.value(c, j) * silu(z[j]);
          pred.data()[(b * C + c) * P + p] = acc;
        }
      }
    }
    if (calls == nan_prediction_at) pred(0, 0, 0, 0) = NAN;
    return pred;
  }

  void backward(const Tensor4<float>& grad_pred) {
    std::vector<float> dz(Hd);
    for (std::size_t b = 0; b < B; ++b)
      for (std::size_t p = 0; p < P; ++p) {
        const float* in = &inputs[(b * P + p) * F];
        const float* z = &pre[(b * P + p) * Hd];
        std::fill(dz.begin(), dz.end(), 0.0f);
        for (std::size_t c = 0; c < C; ++c) {
          const float g = grad_pred.data()[(b * C + c) * P + p];
          b2.grad(c) += g;
          for (std::size_t j = 0; j < Hd; ++j) {
            w2.grad(c, j) += g * silu(z[j]);
            dz[j] += g * w2.value(c, j);
          }
        }
        for (std::size_t j = 0; j < Hd; ++j) {
          const float s = 1.0f / (1.0f + std::exp(-z[j]));
          const float d = dz[j] * s * (1.0f + z[j] * (1.0f - s));
          b1.grad(j) += d;
          for (std::size_t f = 0; f < F; ++f) w1.grad(j, f) += d * in[f];
        }
      }
    if (calls == nan_gradient_at) w2.grad(0, 0) = NAN;
  }
};
static_assert(Denoiser<TinyDenoiser>);
static_assert(nn::Module<TinyDenoiser>);

// Images [n, 4, 6, 6]: each sample one of two colours (±0.8 per channel) plus a little noise;
// a function of (seed, index) only.
Tensor4<float> images(std::size_t n, std::uint64_t seed, std::uint64_t index) {
  Tensor4<float> x = xt::zeros<float>({n, std::size_t{4}, std::size_t{6}, std::size_t{6}});
  const RandomStream rs{seed, 500 + index};
  fill_normal(std::span<float>(x.data(), x.size()), rs);
  for (std::size_t b = 0; b < n; ++b) {
    const bool first = uniform_double(rs.derive(0, 1), b) < 0.5;
    for (std::size_t c = 0; c < 4; ++c)
      for (std::size_t p = 0; p < 36; ++p) {
        float& v = x.data()[(b * 4 + c) * 36 + p];
        v = (((c % 2 == 0) == first) ? 0.8f : -0.8f) + 0.05f * v;
      }
  }
  return x;
}
TokenIds tokens(std::size_t n) { return xt::zeros<std::int64_t>({n, std::size_t{2}}); }

// A plain batch of n images per micro-batch m.
struct Plain {
  std::size_t n = 4;
  std::uint64_t seed = 1;
  TrainBatch operator()(std::uint64_t m) const {
    TrainBatch b;
    b.images = images(n, seed, m);
    b.token_ids = tokens(n);
    return b;
  }
};

using Step =
    DiffusionTrainStep<DdpmScheduler, TinyDenoiser, IdentityEncoder, ZeroText, loss::MinSnr>;

// A model with its step and a trainer (the step and the trainer hold the model by reference).
struct Setup {
  TinyDenoiser model;
  IdentityEncoder vae;
  ZeroText text;
  Step step;
  Trainer<Step, TinyDenoiser> trainer;
  Setup(TrainerOptions o, std::uint64_t init_seed = 3, std::size_t hidden = 16)
      : model(4, hidden, init_seed),
        step(DdpmScheduler::sd15(), model, vae, text,
             loss::MinSnr(o.weighting.snr_gamma.value_or(5.0)), train_step_options(o)),
        trainer(step, model, o) {}
};

std::vector<float> flat(TinyDenoiser& m) {
  std::vector<float> out;
  for (auto& [name, p] : nn::named_parameters<float>(m))
    out.insert(out.end(), p->value.begin(), p->value.end());
  return out;
}

double min_snr_eps(double snr, double gamma) { return snr < gamma ? 1.0 : gamma / snr; }

// Deterministic step pieces for the accumulation test: one fixed timestep, and noise that is a
// function of the sample itself, so a sample's loss does not depend on its batch or position.
struct FixedTimestep {
  void sample(std::span<std::int64_t> out, RandomStream) const {
    std::fill(out.begin(), out.end(), 321);
  }
};
struct ContentNoise {
  void sample(Tensor4<float>& noise, const Tensor4<float>& x0, RandomStream) const {
    noise = xt::sin(13.0f * x0);
  }
};
using DeterministicStep = DiffusionTrainStep<DdpmScheduler, TinyDenoiser, IdentityEncoder, ZeroText,
                                             loss::MinSnr, FixedTimestep, ContentNoise>;

}  // namespace

TEST_CASE("accumulating 2 micro-batches of B/2 equals one batch of B (deterministic step)") {
  TrainerOptions o;
  o.optimizer = "sgd";
  o.learning_rate = 0.05;
  o.sgd_momentum = 0.9;
  o.lr_scheduler = "linear";
  o.lr_warmup_steps = 2;
  o.max_train_steps = 10;
  o.max_grad_norm = 1e9;
  o.use_ema = true;
  auto run = [&](std::int64_t accum) {
    TrainerOptions oo = o;
    oo.gradient_accumulation_steps = accum;
    TinyDenoiser model(4, 16, 3);
    IdentityEncoder vae;
    ZeroText text;
    DeterministicStep step(DdpmScheduler::sd15(), model, vae, text, loss::MinSnr(5.0),
                           train_step_options(oo), FixedTimestep{}, ContentNoise{});
    Trainer<DeterministicStep, TinyDenoiser> trainer(step, model, oo);
    // Global step s uses the 8 images of batch s; with accum 2, micro-batch m is half m % 2.
    auto data = [&](std::uint64_t m) {
      const std::uint64_t s = m / std::uint64_t(accum), k = m % std::uint64_t(accum);
      const Tensor4<float> all = images(8, 1, s);
      const std::size_t n = 8 / std::size_t(accum);
      TrainBatch b;
      b.images = xt::view(all, xt::range(k * n, (k + 1) * n), xt::all(), xt::all(), xt::all());
      b.token_ids = tokens(n);
      return b;
    };
    std::vector<double> losses, lrs;
    for (int s = 0; s < 4; ++s) {
      const StepLog log = trainer.train_step(data);
      losses.push_back(log.loss);
      lrs.push_back(log.lr);
    }
    // Optimizer, LR schedule and EMA advanced once per global step, data once per micro-batch.
    REQUIRE(trainer.global_step() == 4);
    REQUIRE(trainer.optimizer_step() == 4);
    REQUIRE(trainer.scheduler_step() == 4);
    REQUIRE(trainer.ema()->optimization_step() == 4);
    REQUIRE(trainer.micro_batch_index() == std::uint64_t(4 * accum));
    REQUIRE(model.calls == 4 * accum);
    REQUIRE(lrs == std::vector<double>{0.0, 0.025, 0.05, 0.05 * 7.0 / 8.0});
    return std::make_tuple(flat(model), losses, trainer.ema()->state_dict());
  };
  const auto [w1, l1, e1] = run(1);
  const auto [w2, l2, e2] = run(2);
  // Float sums over 4 + 4 samples vs 8 samples differ in rounding only.
  REQUIRE_CLOSE(w2, w1, 1e-5, 1e-6);
  REQUIRE_CLOSE(l2, l1, 1e-6, 0.0);
  REQUIRE_CLOSE(e2.at("mlp.0.weight"), e1.at("mlp.0.weight"), 1e-5, 1e-6);
  REQUIRE(w1 != flat(*std::make_unique<TinyDenoiser>(4, 16, 3)));  // the weights did move
}

TEST_CASE("accumulation groups end with the epoch, as accelerate's (5 micro-batches, accum 2)") {
  // accelerate also steps the optimizer after an epoch's last micro-batch: with 5 micro-batches
  // per epoch and accumulation 2, every epoch is 3 optimizer steps of 2, 2 and 1 micro-batches
  // (ceil(5/2), as diffusers' num_update_steps_per_epoch), and no group spans two epochs.
  TrainerOptions o;
  o.optimizer = "sgd";
  o.learning_rate = 0.01;
  o.lr_scheduler = "constant";
  o.max_train_steps = 6;
  o.gradient_accumulation_steps = 2;
  o.micro_batches_per_epoch = 5;
  Setup s(o);
  std::vector<std::uint64_t> seen, index_after;
  std::vector<std::size_t> rows;
  auto data = [&](std::uint64_t m) {
    seen.push_back(m);
    return Plain{}(m);
  };
  for (int k = 0; k < 6; ++k) {
    const StepLog log = s.trainer.train_step(data);
    index_after.push_back(s.trainer.micro_batch_index());
    rows.push_back(log.weights.size());
  }
  REQUIRE(index_after == std::vector<std::uint64_t>{2, 4, 5, 7, 9, 10});
  REQUIRE(seen == std::vector<std::uint64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
  REQUIRE(rows == std::vector<std::size_t>{8, 8, 4, 8, 8, 4});
  REQUIRE(s.trainer.optimizer_step() == 6);

  // Without epochs (0) every group has 2 micro-batches.
  o.micro_batches_per_epoch = 0;
  Setup plain(o);
  for (int k = 0; k < 3; ++k) plain.trainer.train_step(Plain{});
  REQUIRE(plain.trainer.micro_batch_index() == 6);
  o.micro_batches_per_epoch = -1;
  REQUIRE_THROWS_WITH(Setup(o), Catch::Contains("micro_batches_per_epoch"));
}

TEST_CASE("prior preservation: loss = L_instance + λ·L_prior, Min-SNR with each sample's t") {
  auto run = [](double lambda, StepLog* log_out, std::vector<std::int64_t>* seen) {
    TrainerOptions o;
    o.optimizer = "sgd";
    o.sgd_momentum = 0;
    o.learning_rate = 1.0;
    o.max_grad_norm = 0;  // no clipping: the update is −∇L
    o.with_prior_preservation = true;
    o.prior_loss_weight = lambda;
    o.seed = 11;
    Setup s(o);
    auto data = [](std::uint64_t m) {
      TrainBatch b;
      b.images = images(3, 1, m);  // 3 instance examples
      b.token_ids = tokens(3);
      b.class_images = images(2, 2, m);  // 2 class examples
      b.class_token_ids = tokens(2);
      return b;
    };
    const std::vector<float> before = flat(s.model);
    const StepLog log = s.trainer.train_step(data);
    if (log_out) *log_out = log;
    if (seen) *seen = s.model.last_timesteps;
    std::vector<double> delta;
    const std::vector<float> after = flat(s.model);
    for (std::size_t i = 0; i < after.size(); ++i) delta.push_back(double(after[i]) - before[i]);
    return delta;
  };
  StepLog log;
  std::vector<std::int64_t> seen;
  const double lambda = 0.7;
  const std::vector<double> d = run(lambda, &log, &seen);
  const DdpmScheduler sched = DdpmScheduler::sd15();
  REQUIRE(log.per_sample_loss.size() == 5);
  // the model saw all 5 rows in one forward, instance first
  REQUIRE(log.timesteps == std::vector<double>(seen.begin(), seen.end()));
  REQUIRE((seen[3] != seen[0] || seen[4] != seen[1]));  // class rows have their own timesteps
  // Hand composition: each half's Min-SNR-weighted mean, with the row's own timestep.
  double inst = 0, prior = 0;
  for (std::size_t b = 0; b < 5; ++b) {
    const double w = min_snr_eps(sched.snr(static_cast<std::int64_t>(log.timesteps[b])), 5.0);
    const double expected_weight = b < 3 ? w * 5.0 / 3.0 : lambda * w * 5.0 / 2.0;
    REQUIRE(log.weights[b] == Approx(expected_weight).epsilon(1e-6));
    (b < 3 ? inst : prior) += w * log.per_sample_loss[b] / (b < 3 ? 3.0 : 2.0);
  }
  REQUIRE(log.loss == Approx(inst + lambda * prior).epsilon(1e-6));
  // The gradient is linear in λ: Δ(λ) = Δ(0) + λ·(Δ(1) − Δ(0)), i.e. ∇L_inst + λ·∇L_prior.
  const std::vector<double> d0 = run(0.0, nullptr, nullptr), d1 = run(1.0, nullptr, nullptr);
  std::vector<double> composed(d.size());
  double scale = 0;
  for (std::size_t i = 0; i < d.size(); ++i) {
    composed[i] = d0[i] + lambda * (d1[i] - d0[i]);
    scale = std::max(scale, std::abs(composed[i]));
  }
  REQUIRE(scale > 1e-4);
  REQUIRE_CLOSE(d, composed, 1e-3, 1e-5 * scale);
}

TEST_CASE("clipping: the update uses the clipped gradient, the norm is reported before clipping") {
  TrainerOptions o;
  o.optimizer = "sgd";
  o.sgd_momentum = 0;
  o.learning_rate = 1.0;
  o.max_grad_norm = 0;  // reference run: raw gradient
  Setup raw(o);
  const std::vector<float> w0 = flat(raw.model);
  const StepLog a = raw.trainer.train_step(Plain{});
  std::vector<double> g(w0.size());  // −Δ = raw gradient
  double norm2 = 0;
  const std::vector<float> w1 = flat(raw.model);
  for (std::size_t i = 0; i < g.size(); ++i) {
    g[i] = double(w0[i]) - w1[i];
    norm2 += g[i] * g[i];
  }
  REQUIRE(a.grad_norm == Approx(std::sqrt(norm2)).epsilon(1e-4));

  o.max_grad_norm = 0.25 * a.grad_norm;
  Setup clipped(o);
  const StepLog b = clipped.trainer.train_step(Plain{});
  REQUIRE(b.grad_norm == a.grad_norm);  // same gradient, reported before clipping
  const double coef = o.max_grad_norm / (a.grad_norm + 1e-6);
  std::vector<double> expected(w0.size());
  for (std::size_t i = 0; i < g.size(); ++i) expected[i] = double(w0[i]) - coef * g[i];
  REQUIRE_CLOSE(flat(clipped.model), expected, 1e-5, 1e-6);
}

TEST_CASE("non-finite guard: a poisoned step never reaches the weights; skip counts, error names") {
  TrainerOptions o;
  o.gradient_accumulation_steps = 2;
  o.use_ema = true;
  o.lr_scheduler = "constant_with_warmup";
  o.lr_warmup_steps = 1;
  o.learning_rate = 1e-2;
  const bool nan_in_prediction = GENERATE(false, true);
  SECTION("skip") {
    Setup s(o);
    // Forward calls 1–2 are global step 1; call 4 is the second micro-batch of step 2.
    (nan_in_prediction ? s.model.nan_prediction_at : s.model.nan_gradient_at) = 4;
    s.trainer.train_step(Plain{});
    const std::vector<float> after_one = flat(s.model);
    const auto ema_one = s.trainer.ema()->state_dict();
    const StepLog bad = s.trainer.train_step(Plain{});
    REQUIRE(bad.skipped);
    REQUIRE(bad.skipped_steps == 1);
    REQUIRE(s.trainer.skipped_steps() == 1);
    REQUIRE(flat(s.model) == after_one);  // bitwise unchanged
    REQUIRE((s.trainer.ema()->state_dict().at("mlp.0.weight") == ema_one.at("mlp.0.weight")));
    REQUIRE(s.trainer.optimizer_step() == 1);  // no optimizer update
    REQUIRE(s.trainer.scheduler_step() == 1);  // no LR step
    REQUIRE(s.trainer.ema()->optimization_step() == 1);
    REQUIRE(s.trainer.global_step() == 2);  // the batch was consumed
    REQUIRE(s.trainer.micro_batch_index() == 4);
    // The poisoned gradient was dropped.
    for (const ParameterView& p : s.trainer.trainable_parameters())
      REQUIRE(std::all_of(p.grad.begin(), p.grad.end(), [](float g) { return g == 0.0f; }));
    const StepLog good = s.trainer.train_step(Plain{});
    REQUIRE(!good.skipped);
    REQUIRE(std::isfinite(good.loss));
    REQUIRE(flat(s.model) != after_one);
    REQUIRE(s.trainer.optimizer_step() == 2);
  }
  SECTION("error") {
    o.non_finite = NonFinitePolicy::error;
    Setup s(o);
    (nan_in_prediction ? s.model.nan_prediction_at : s.model.nan_gradient_at) = 4;
    s.trainer.train_step(Plain{});
    const std::vector<float> after_one = flat(s.model);
    REQUIRE_THROWS_WITH(
        s.trainer.train_step(Plain{}),
        Catch::Contains("non-finite value at global step 2") &&
            Catch::Contains(nan_in_prediction ? "micro-batch 3: " : "gradient norm is nan"));
    REQUIRE(flat(s.model) == after_one);
    REQUIRE(s.trainer.global_step() == 1);
    REQUIRE(s.trainer.optimizer_step() == 1);
  }
}

TEST_CASE("resume: N steps, save, resume, M steps == N + M uninterrupted, bitwise") {
  test::TempDir dir("trainer_resume");
  TrainerOptions o;
  o.learning_rate = 3e-3;
  o.lr_scheduler = "cosine";
  o.lr_warmup_steps = 2;
  o.max_train_steps = 6;
  o.gradient_accumulation_steps = 2;
  o.max_grad_norm = 0.5;
  o.use_ema = true;
  o.noise.noise_offset = 0.05f;
  o.seed = 5;
  o.output_dir = dir.path().string();
  o.checkpointing_steps = 3;
  o.loraplus_lr_ratio = 1.0;
  const Plain data{4, 9};

  Setup full(o);
  std::vector<double> full_losses;
  for (int s = 0; s < 6; ++s) full_losses.push_back(full.trainer.train_step(data).loss);

  test::TempDir dir2("trainer_resume_2");
  o.output_dir = dir2.path().string();
  {
    Setup first(o);
    std::vector<StepLog> logs;
    first.trainer.fit(data, [&](const StepLog& l) { logs.push_back(l); });  // saves at 3 and 6
    REQUIRE(logs.size() == 6);
    REQUIRE(list_checkpoints(dir2.path()).size() == 2);
  }
  fs::remove_all(checkpoint_path(dir2.path(), 6));  // resume from step 3
  o.resume_from_checkpoint = "latest";
  Setup resumed(o, /*init_seed=*/77);  // a different init: everything must come from the file
  std::vector<double> resumed_losses;
  resumed.trainer.fit(data, [&](const StepLog& l) { resumed_losses.push_back(l.loss); });
  REQUIRE(resumed.trainer.global_step() == 6);
  REQUIRE(resumed_losses == std::vector<double>(full_losses.begin() + 3, full_losses.end()));
  REQUIRE(flat(resumed.model) == flat(full.model));
  const auto e_full = full.trainer.ema()->state_dict(), e_res = resumed.trainer.ema()->state_dict();
  for (const auto& [name, v] : e_full) REQUIRE((e_res.at(name) == v));
  REQUIRE(resumed.trainer.optimizer_step() == full.trainer.optimizer_step());
  REQUIRE(resumed.trainer.micro_batch_index() == full.trainer.micro_batch_index());

  // A checkpoint from other settings is refused, naming the setting.
  TrainerOptions other = o;
  other.seed = 6;
  Setup mismatched(other);
  REQUIRE_THROWS_WITH(mismatched.trainer.resume("latest"), Catch::Contains("seed = 5, expected 6"));
  // So is one whose parameters do not fit the model; nothing is changed by the failed resume.
  Setup narrow(o, 3, /*hidden=*/8);
  const std::vector<float> narrow_before = flat(narrow.model);
  REQUIRE_THROWS_WITH(narrow.trainer.resume("latest"),
                      Catch::Contains("mlp.0.weight has shape [16,10], expected [8,10]"));
  REQUIRE(flat(narrow.model) == narrow_before);
  REQUIRE(narrow.trainer.global_step() == 0);
}

TEST_CASE("an interrupted checkpoint write leaves the previous one loadable; total limit") {
  test::TempDir dir("trainer_interrupted");
  TrainerOptions o;
  o.learning_rate = 1e-2;
  o.output_dir = dir.path().string();
  o.checkpoints_total_limit = 2;
  Setup s(o);
  s.trainer.train_step(Plain{});
  s.trainer.train_step(Plain{});
  s.trainer.save_checkpoint();
  const std::vector<float> at_two = flat(s.model);
  s.trainer.train_step(Plain{});
  s.trainer.set_checkpoint_hook([](const fs::path&) { throw Error("power cut"); });
  REQUIRE_THROWS_WITH(s.trainer.save_checkpoint(), Catch::Contains("power cut"));
  REQUIRE(list_checkpoints(dir.path()).size() == 1);
  std::size_t entries = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir.path())) ++entries;
  REQUIRE(entries == 1);  // no temporary folder left behind
  Setup fresh(o, 99);
  fresh.trainer.resume("latest");
  REQUIRE(fresh.trainer.global_step() == 2);
  REQUIRE(flat(fresh.model) == at_two);
  // Keep the last 2: saving at 3, 4, 5 leaves 4 and 5.
  s.trainer.set_checkpoint_hook({});
  for (int k = 0; k < 3; ++k) {
    s.trainer.save_checkpoint();
    s.trainer.train_step(Plain{});
  }
  const auto kept = list_checkpoints(dir.path());
  REQUIRE(kept.size() == 2);
  REQUIRE(kept[0].first == 4);
  REQUIRE(kept[1].first == 5);
}

TEST_CASE("Ctrl-C on a checkpointing step: a kill while re-saving it loses nothing") {
  // The interrupted run saves step 2 at its checkpointing step, then again on Ctrl-C; a kill
  // between the two renames of that replacement used to leave no checkpoint-2.
  test::TempDir dir("trainer_resave_killed");
  TrainerOptions o;
  o.learning_rate = 1e-2;
  o.output_dir = dir.path().string();
  Setup s(o);
  s.trainer.train_step(Plain{});
  s.trainer.save_checkpoint();  // checkpoint-1, complete
  s.trainer.train_step(Plain{});
  s.trainer.save_checkpoint();
  const std::vector<float> at_two = flat(s.model);
  CheckpointHooks kill;
  kill.after_move_aside = [](const fs::path&) { throw Error("SIGKILL"); };
  s.trainer.set_checkpoint_hooks(kill);
  REQUIRE_THROWS_WITH(s.trainer.save_checkpoint(), Catch::Contains("SIGKILL"));
  REQUIRE(!fs::exists(checkpoint_path(dir.path(), 2)));  // only the hidden old copy is left

  Setup fresh(o, 99);
  std::vector<std::string> lines;
  fresh.trainer.set_checkpoint_log([&](const std::string& line) { lines.push_back(line); });
  REQUIRE(fresh.trainer.resume("latest") == checkpoint_path(dir.path(), 2));
  REQUIRE(fresh.trainer.global_step() == 2);
  REQUIRE(flat(fresh.model) == at_two);
  auto logged = [&](const std::string& text) {
    return std::any_of(lines.begin(), lines.end(),
                       [&](const std::string& l) { return l.find(text) != std::string::npos; });
  };
  REQUIRE(logged("recovered '" + checkpoint_path(dir.path(), 2).string() + "'"));
  REQUIRE(logged("latest checkpoint: '" + checkpoint_path(dir.path(), 2).string() + "' (step 2)"));

  // A newest checkpoint without optimizer state is skipped, and the log says so.
  fs::remove(checkpoint_path(dir.path(), 2) / "optimizer.safetensors");
  Setup older(o, 98);
  lines.clear();
  older.trainer.set_checkpoint_log([&](const std::string& line) { lines.push_back(line); });
  REQUIRE(older.trainer.resume("latest") == checkpoint_path(dir.path(), 1));
  REQUIRE(older.trainer.global_step() == 1);
  REQUIRE(logged("skipped '" + checkpoint_path(dir.path(), 2).string() +
                 "': it has no optimizer.safetensors"));

  // An output_dir that is a file is named in the error.
  const std::string file = (dir.path() / "file").string();
  std::ofstream(file) << "x";
  o.output_dir = file;
  Setup bad(o);
  REQUIRE_THROWS_WITH(bad.trainer.save_checkpoint(),
                      Catch::Contains("output_dir '" + file + "' is not a folder"));
}

TEST_CASE("end to end: AdamW + Min-SNR + cosine schedule + EMA fits the two-colour data") {
  TrainerOptions o;
  o.learning_rate = 1e-2;
  o.lr_scheduler = "cosine";
  o.lr_warmup_steps = 10;
  o.max_train_steps = 150;
  o.use_ema = true;
  o.seed = 2;
  Setup s(o, 3, 24);
  std::vector<double> losses;
  s.trainer.fit(Plain{8, 4}, [&](const StepLog& l) {
    losses.push_back(l.loss);
    REQUIRE(l.step == std::int64_t(losses.size()));
    REQUIRE(l.per_sample_loss.size() == 8);
    REQUIRE(l.it_per_s > 0);
    REQUIRE(l.lr == Approx(1e-2 * s.trainer.lr_schedule().multiplier(l.step - 1)));
  });
  double first = 0, last = 0;
  for (int i = 0; i < 20; ++i) {
    first += losses[std::size_t(i)] / 20;
    last += losses[losses.size() - 1 - std::size_t(i)] / 20;
  }
  INFO("mean loss of the first 20 steps " << first << ", of the last 20 " << last);
  REQUIRE(last < first / 3.0);
}

TEST_CASE("trainer option and batch errors") {
  TrainerOptions o;
  o.gradient_accumulation_steps = 0;
  REQUIRE_THROWS_WITH(Setup(o), Catch::Contains("gradient_accumulation_steps is 0"));
  o = {};
  o.optimizer = "lamb";
  REQUIRE_THROWS_WITH(Setup(o), Catch::Contains("optimizer is 'lamb', expected adamw, sgd, lion"));
  o = {};
  o.optimizer = "Adafactor";
  o.optimizer_args = {"relative_step=False", "scale_paramter=False"};
  REQUIRE_THROWS_WITH(Setup(o),
                      Catch::Contains("key 'scale_paramter' is not an argument of adafactor"));
  o.optimizer_args = {"relative_step=Maybe"};
  REQUIRE_THROWS_WITH(Setup(o), Catch::Contains("relative_step=Maybe: expected True or False"));

  o = {};
  o.lr_scheduler = "warmup_stable_decay";
  REQUIRE_THROWS_WITH(Setup(o), Catch::Contains("unknown lr_scheduler"));
  o = {};
  o.with_prior_preservation = true;
  Setup s(o);
  REQUIRE_THROWS_WITH(s.trainer.train_step(Plain{}),
                      Catch::Contains("with_prior_preservation needs class_images"));
  REQUIRE(s.trainer.global_step() == 0);
  REQUIRE_THROWS_WITH(s.trainer.resume("latest"), Catch::Contains("no checkpoint"));
  // One seed: the step's, whatever TrainerOptions::seed says (it is what a resume relies on).
  TinyDenoiser m(4, 8, 1);
  IdentityEncoder vae;
  ZeroText text;
  TrainStepOptions step_options;
  step_options.seed = 7;
  Step step(DdpmScheduler::sd15(), m, vae, text, loss::MinSnr(5.0), step_options);
  o = {};
  o.seed = 5;
  REQUIRE(Trainer<Step, TinyDenoiser>(step, m, o).seed() == 7);
  TrainBatch b = Plain{}(0);
  b.sample_weights = {1, 2};
  REQUIRE_THROWS_WITH(compose_batch(b, false, 1.0, 1),
                      Catch::Contains("sample_weights has 2 entries, expected 4"));
}

TEST_CASE("every optimizer by name (ours and kohya's), its args, and bitwise resume") {
  // name, args, and a direct construction of the same optimizer to compare one step with.
  struct Case {
    std::string name;
    std::vector<std::string> args;
    std::string kohya_class;  // what kohya records as ss_optimizer (module + "." + class)
  };
  const std::vector<Case> cases = {
      {"AdamW", {"betas=(0.8, 0.95)", "weight_decay=0.1"}, "torch.optim.adamw.AdamW"},
      {"SGDNesterov", {"momentum=0.5"}, "torch.optim.sgd.SGD"},
      {"Lion", {"betas=0.95,0.98", "weight_decay=0.01"}, "lion_pytorch.lion_pytorch.Lion"},
      {"Adafactor",
       {"relative_step=False", "scale_parameter=False", "warmup_init=False"},
       "transformers.optimization.Adafactor"},
      {"Prodigy", {"d_coef=2", "use_bias_correction=True"}, "prodigyopt.prodigy.Prodigy"},
      {"AdamWScheduleFree",
       {"warmup_steps=2"},
       "schedulefree.adamw_schedulefree.AdamWScheduleFree"},
  };
  const Plain data{4, 9};
  for (const Case& c : cases) {
    INFO(c.name);
    TrainerOptions o;
    o.optimizer = c.name;
    o.optimizer_args = c.args;
    o.learning_rate = c.name == "Prodigy" ? 1.0 : 1e-3;
    o.lr_warmup_steps = 0;
    o.max_train_steps = 4;
    o.seed = 5;

    // The args reach the optimizer of the trainer, which takes a step.
    Setup s(o);
    const std::vector<float> before = flat(s.model);
    s.trainer.train_step(data);
    REQUIRE(flat(s.model) != before);
    const AnyOptimizer& used = s.trainer.optimizer();
    const std::vector<std::size_t> index = {0, 1, 2, 3, 4, 5};  // the cases' variant order
    CHECK(used.index() == index[std::size_t(&c - cases.data())]);
    CHECK(train::kohya_optimizer_class(train::parse_optimizer_name(c.name).name) == c.kohya_class);
    if (c.name == "AdamW") {
      const ParamGroup& g = std::get<AdamW>(used).param_groups().front();
      CHECK(g.betas == std::array<double, 2>{0.8, 0.95});
      CHECK(g.weight_decay == 0.1);
    }
    if (c.name == "SGDNesterov") {
      const ParamGroup& g = std::get<Sgd>(used).param_groups().front();
      CHECK(g.nesterov);
      CHECK(g.momentum == 0.5);
    }
    if (c.name == "Lion") CHECK(std::get<Lion>(used).param_groups().front().weight_decay == 0.01);
    if (c.name == "Adafactor") {
      CHECK(!std::get<Adafactor>(used).options().relative_step);
      CHECK(!std::get<Adafactor>(used).options().scale_parameter);
    }
    if (c.name == "Prodigy") {
      CHECK(std::get<Prodigy>(used).options().d_coef == 2);
      CHECK(std::get<Prodigy>(used).options().use_bias_correction);
    }
    if (c.name == "AdamWScheduleFree")
      CHECK(std::get<ScheduleFreeAdamW>(used).options().warmup_steps == 2);

    // Resume after 2 of 4 steps repeats the uninterrupted run bitwise.
    test::TempDir dir("optimizer_resume");
    o.output_dir = dir.path().string();
    o.checkpointing_steps = 2;
    Setup full(o);
    std::vector<double> full_losses;
    full.trainer.fit(data, [&](const StepLog& l) { full_losses.push_back(l.loss); });
    fs::remove_all(checkpoint_path(dir.path(), 4));
    o.resume_from_checkpoint = "latest";
    Setup resumed(o, /*init_seed=*/77);
    std::vector<double> resumed_losses;
    resumed.trainer.fit(data, [&](const StepLog& l) { resumed_losses.push_back(l.loss); });
    CHECK(resumed_losses == std::vector<double>(full_losses.begin() + 2, full_losses.end()));
    CHECK(flat(resumed.model) == flat(full.model));

    // Schedule-free: eval_weights() puts x in the model, train_weights() y back (≈, as the
    // reference's lerps round); a no-op for the others.
    const std::vector<float> y = flat(full.model);
    full.trainer.eval_weights();
    const std::vector<float> x = flat(full.model);
    full.trainer.train_weights();
    const std::vector<float> y2 = flat(full.model);
    if (c.name == "AdamWScheduleFree") {
      CHECK(x != y);
      for (std::size_t i = 0; i < y.size(); ++i) CHECK(y2[i] == Approx(y[i]).margin(1e-6));
    } else {
      CHECK(x == y);
      CHECK(y2 == y);
    }
  }
}
