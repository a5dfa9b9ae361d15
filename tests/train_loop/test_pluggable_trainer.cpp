// The pluggable training loop: a hand-written model holding its weights in std::vector<float>
// (no nn::Parameter) trained by the Trainer exactly as the same model written with
// nn::Parameter members; checkpoint resume of it; a user-written optimizer plugged in (the
// closed form θ ← θ − lr·g); one seed, the step's; an unconditional model (no token ids); the
// concepts' accepted and rejected types.
#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "difftrain/core/random.hpp"
#include "difftrain/train/trainer.hpp"
#include "support/temp_dir.hpp"

using namespace difftrain;
using namespace difftrain::train;
namespace fs = std::filesystem;

namespace {

// Dims: B samples, D = C·H·W inputs per sample, K = 2 outputs.
constexpr std::size_t kB = 3, kD = 4, kK = 2;

// The linear model pred = W·x + c, W [K, D], c [K], with the same initial values in both
// spellings: W[k,d] = 0.1·(k + 1) − 0.05·d, c[k] = 0.2·k − 0.1.
float initial_weight(std::size_t k, std::size_t d) {
  return 0.1f * float(k + 1) - 0.05f * float(d);
}
float initial_bias(std::size_t k) { return 0.2f * float(k) - 0.1f; }

// What the step reads and writes of either model.
struct LinearSpans {
  std::span<float> w, c, dw, dc;
};

// Weights in std::vector<float>, listed through trainable_parameters() (no nn::Parameter).
struct VectorModel {
  std::vector<float> w = std::vector<float>(kK * kD), w_grad = std::vector<float>(kK * kD);
  std::vector<float> c = std::vector<float>(kK), c_grad = std::vector<float>(kK);
  explicit VectorModel(float shift = 0) {
    for (std::size_t k = 0; k < kK; ++k) {
      for (std::size_t d = 0; d < kD; ++d) w[k * kD + d] = initial_weight(k, d) + shift;
      c[k] = initial_bias(k) + shift;
    }
  }
  std::vector<ParameterView> trainable_parameters() {
    return {{"linear.weight", w, w_grad, {kK, kD}}, {"linear.bias", c, c_grad, {kK}}};
  }
  LinearSpans spans() { return {w, c, w_grad, c_grad}; }
  std::vector<float> values() const {
    std::vector<float> out = w;
    out.insert(out.end(), c.begin(), c.end());
    return out;
  }
};

// The same model with nn::Parameter members (an nn::Module).
struct ParamModel {
  nn::Parameter<float> w{{kK, kD}}, c{{kK}};
  ParamModel() {
    for (std::size_t k = 0; k < kK; ++k) {
      for (std::size_t d = 0; d < kD; ++d) w.value(k, d) = initial_weight(k, d);
      c.value(k) = initial_bias(k);
    }
  }
  template <class V>
  void for_each_parameter(const std::string& prefix, V&& visit) {
    visit(nn::join_name(prefix, "linear.weight"), w);
    visit(nn::join_name(prefix, "linear.bias"), c);
  }
  LinearSpans spans() {
    return {{w.value.data(), w.size()},
            {c.value.data(), c.size()},
            {w.grad.data(), w.size()},
            {c.grad.data(), c.size()}};
  }
  std::vector<float> values() const {
    std::vector<float> out(w.value.begin(), w.value.end());
    out.insert(out.end(), c.value.begin(), c.value.end());
    return out;
  }
};

// The inputs of micro-batch m: x_b = image_b + 0.1·n_b, n ~ N(0, 1) from the stream (seed, m).
std::vector<float> noisy_inputs(const Tensor4<float>& images, std::uint64_t seed, std::uint64_t m) {
  std::vector<float> x(images.begin(), images.end()), n(x.size());
  fill_normal(n, {seed, m});
  for (std::size_t i = 0; i < x.size(); ++i) x[i] += 0.1f * n[i];
  return x;
}

// A quadratic step: target_b = (x_b[0], −x_b[1]), L_b = ½‖W·x_b + c − target_b‖²,
// L = (1/B)·Σ_b w_b·L_b; backward accumulates dL/dW and dL/dc. The seed draws the input noise.
// Compiled once (noinline) for both models, so that both run the same float arithmetic.
[[gnu::noinline]] TrainStepResult quadratic_step(const LinearSpans& model,
                                                 const Tensor4<float>& images, std::uint64_t seed,
                                                 std::uint64_t m, const BatchExtras& extras) {
  const std::size_t B = images.shape()[0];
  const std::vector<float> x = noisy_inputs(images, seed, m);
  TrainStepResult r;
  for (std::size_t b = 0; b < B; ++b) {
    const float* xb = &x[b * kD];
    const float target[kK] = {xb[0], -xb[1]};
    const float wb = extras.sample_weights.empty() ? 1.0f : extras.sample_weights[b];
    float residual[kK], loss = 0;
    for (std::size_t k = 0; k < kK; ++k) {
      float pred = model.c[k];
      for (std::size_t d = 0; d < kD; ++d) pred += model.w[k * kD + d] * xb[d];
      residual[k] = pred - target[k];
      loss += 0.5f * residual[k] * residual[k];
    }
    for (std::size_t k = 0; k < kK; ++k) {
      const float g = wb / float(B) * residual[k];
      for (std::size_t d = 0; d < kD; ++d) model.dw[k * kD + d] += g * xb[d];
      model.dc[k] += g;
    }
    r.per_sample_loss.push_back(loss);
    r.weights.push_back(wb);
    r.timesteps.push_back(double(m));
    r.loss += double(wb) * loss / double(B);
  }
  return r;
}

// The step type the Trainer drives (its options().seed is the run's seed).
struct QuadraticOptions {
  std::uint64_t seed = 0;
};
template <class M>
struct QuadraticStep {
  M& model;
  QuadraticOptions opts;
  std::vector<std::size_t> token_rows;  // rows of token_ids seen by each call

  QuadraticStep(M& m, std::uint64_t seed) : model(m), opts{seed} {}

  const QuadraticOptions& options() const { return opts; }
  TrainStepResult step(const Tensor4<float>& images, const TokenIds& token_ids, std::uint64_t m,
                       const BatchExtras& extras) {
    token_rows.push_back(token_ids.shape()[0]);
    return quadratic_step(model.spans(), images, opts.seed, m, extras);
  }
};

// Micro-batch m: B images [1, 2, 2] from (m, b); token ids [B, 2] of zeros, or none (0 rows).
struct Data {
  bool with_tokens = true;
  TrainBatch operator()(std::uint64_t m) const {
    TrainBatch batch;
    batch.images = xt::zeros<float>({kB, std::size_t{1}, std::size_t{2}, std::size_t{2}});
    for (std::size_t i = 0; i < batch.images.size(); ++i)
      batch.images.data()[i] = float(std::sin(0.7 * double(i) + 1.3 * double(m)));
    if (with_tokens) batch.token_ids = xt::zeros<std::int64_t>({kB, std::size_t{2}});
    return batch;
  }
};

TrainerOptions base_options(const std::string& optimizer) {
  TrainerOptions o;
  o.optimizer = optimizer;
  o.learning_rate = 0.05;
  o.lr_scheduler = "cosine";
  o.lr_warmup_steps = 1;
  o.max_train_steps = 4;
  o.gradient_accumulation_steps = 2;
  o.max_grad_norm = 0.5;  // clipping on
  o.use_ema = true;
  o.seed = 0;  // not the step's: the Trainer takes the step's (11)
  return o;
}

// Plain SGD written here, over any model's trainable parameters (no momentum, no decay):
// θ ← θ − lr·lr_scale·g. Keeps the gradients it was given, for the test.
class PlainSgd {
 public:
  struct Group {
    double lr = 0;
  };
  PlainSgd(std::vector<NamedParameter> params, double lr)
      : params_(std::move(params)), groups_{{lr}} {}

  void step(double lr_scale) {
    const float step = float(groups_[0].lr * lr_scale);
    std::vector<float> grads;
    for (const auto& [name, p] : params_) {
      const std::span<float> value = p.value(), grad = p.grad();
      grads.insert(grads.end(), grad.begin(), grad.end());
      for (std::size_t i = 0; i < value.size(); ++i) value[i] = value[i] - step * grad[i];
    }
    seen_grads.push_back(std::move(grads));
    ++count_;
  }
  std::int64_t step_count() const { return count_; }
  const std::vector<Group>& param_groups() const { return groups_; }
  std::map<std::string, xt::xarray<float>> state_dict() const { return {}; }
  void load_state_dict(const std::map<std::string, xt::xarray<float>>& state,
                       std::int64_t step_count) {
    require(state.empty(), "PlainSgd::load_state_dict", state.size(), " tensors, expected none");
    count_ = step_count;
  }
  std::string_view name() const { return "plain_sgd"; }

  std::vector<std::vector<float>> seen_grads;  // per step, parameters in order

 private:
  std::vector<NamedParameter> params_;
  std::vector<Group> groups_;
  std::int64_t count_ = 0;
};

// ---- concepts: accepted and rejected types -------------------------------------------------

struct NoParameters {  // neither trainable_parameters() nor for_each_parameter
  void forward() {}
};
struct SpanParameters {  // a range, but of spans, not ParameterView
  std::vector<std::span<float>> trainable_parameters() { return {}; }
};
struct NoStepCount {
  void step(double) {}
  const std::vector<ParamGroup>& param_groups() const { return groups; }
  std::map<std::string, xt::xarray<float>> state_dict() const { return {}; }
  void load_state_dict(const std::map<std::string, xt::xarray<float>>&, std::int64_t) {}
  static constexpr std::string_view kName = "no_step_count";
  std::vector<ParamGroup> groups;
};
struct NoState {
  void step(double) {}
  std::int64_t step_count() const { return 0; }
  std::vector<PlainSgd::Group> param_groups() const { return {}; }
  std::string_view name() const { return "no_state"; }
};
struct Unnamed {
  void step(double) {}
  std::int64_t step_count() const { return 0; }
  std::vector<PlainSgd::Group> param_groups() const { return {}; }
  std::map<std::string, xt::xarray<float>> state_dict() const { return {}; }
  void load_state_dict(const std::map<std::string, xt::xarray<float>>&, std::int64_t) {}
};
struct NoLr {  // groups without an lr
  struct Group {
    double rate = 0;
  };
  void step(double) {}
  std::int64_t step_count() const { return 0; }
  std::vector<Group> param_groups() const { return {}; }
  std::map<std::string, xt::xarray<float>> state_dict() const { return {}; }
  void load_state_dict(const std::map<std::string, xt::xarray<float>>&, std::int64_t) {}
  std::string_view name() const { return "no_lr"; }
};

static_assert(HasTrainableParameters<VectorModel> && TrainableModel<VectorModel>);
static_assert(!nn::Module<VectorModel>);
static_assert(TrainableModel<ParamModel> && !HasTrainableParameters<ParamModel>);
static_assert(TrainableModel<nn::ModulePair<ParamModel, ParamModel>>);
static_assert(!TrainableModel<NoParameters>);
static_assert(!HasTrainableParameters<SpanParameters> && !TrainableModel<SpanParameters>);

static_assert(Optimizer<AdamW> && Optimizer<Sgd> && Optimizer<AnyOptimizer>);
static_assert(Optimizer<Lion> && Optimizer<Adafactor> && Optimizer<Prodigy> &&
              Optimizer<ScheduleFreeAdamW>);
static_assert(Optimizer<PlainSgd>);
static_assert(OptimizerStep<NoStepCount> && !HasStepCount<NoStepCount> && !Optimizer<NoStepCount>);
static_assert(HasStepCount<NoState> && !HasOptimizerState<NoState> && !Optimizer<NoState>);
static_assert(HasOptimizerState<Unnamed> && !HasOptimizerName<Unnamed> && !Optimizer<Unnamed>);
static_assert(!HasParamGroupLrs<NoLr> && !Optimizer<NoLr>);

// The optimizer type comes from the constructor used (CTAD).
static_assert(std::is_same_v<decltype(Trainer(std::declval<QuadraticStep<VectorModel>&>(),
                                              std::declval<VectorModel&>(), TrainerOptions{})),
                             Trainer<QuadraticStep<VectorModel>, VectorModel, AnyOptimizer>>);
static_assert(std::is_same_v<decltype(Trainer(std::declval<QuadraticStep<VectorModel>&>(),
                                              std::declval<VectorModel&>(),
                                              std::declval<PlainSgd>(), TrainerOptions{})),
                             Trainer<QuadraticStep<VectorModel>, VectorModel, PlainSgd>>);

// Trains a model with `o`; its values, the EMA shadow and the step logs afterwards.
struct Run {
  std::vector<float> values;
  std::map<std::string, xt::xarray<float>> ema;
  std::vector<StepLog> logs;
};
template <class M>
Run run(M& model, const TrainerOptions& o, const Data& data = {}) {
  QuadraticStep<M> step(model, 11);
  Trainer trainer(step, model, o);
  Run r;
  trainer.fit(data, [&](const StepLog& log) { r.logs.push_back(log); });
  r.values = model.values();
  r.ema = trainer.ema()->state_dict();
  return r;
}

}  // namespace

TEST_CASE("a std::vector<float> model trains bitwise as the same nn::Parameter model") {
  const std::string optimizer = GENERATE(std::string("adamw"), std::string("sgd"));
  INFO(optimizer);
  VectorModel vector_model;
  ParamModel param_model;
  const std::vector<float> initial = vector_model.values();
  REQUIRE(param_model.values() == initial);
  const Run a = run(vector_model, base_options(optimizer));
  const Run b = run(param_model, base_options(optimizer));
  REQUIRE(a.values != initial);   // it trained
  REQUIRE(a.values == b.values);  // bitwise
  REQUIRE(a.logs.size() == 4);
  for (std::size_t s = 0; s < a.logs.size(); ++s) {
    REQUIRE(a.logs[s].loss == b.logs[s].loss);
    REQUIRE(a.logs[s].grad_norm == b.logs[s].grad_norm);
    REQUIRE(a.logs[s].timesteps == std::vector<double>{double(2 * s), double(2 * s), double(2 * s),
                                                       double(2 * s + 1), double(2 * s + 1),
                                                       double(2 * s + 1)});
  }
  REQUIRE(a.ema.size() == 2);
  for (const auto& [name, shadow] : b.ema) REQUIRE((a.ema.at(name) == shadow));
  // The loss went down over the run (a sanity check of the gradient's sign).
  REQUIRE(a.logs.back().loss < a.logs.front().loss);
}

TEST_CASE("the views work with the optimizers, EMA and clipping directly") {
  VectorModel m;
  ParamModel p;
  std::vector<ParamGroup> groups = make_param_groups(m, ParamGroup{});
  REQUIRE(groups.size() == 1);
  REQUIRE(groups[0].names == std::vector<std::string>{"linear.weight", "linear.bias"});
  const std::vector<ParamGroup> module_groups = make_param_groups(p, ParamGroup{});
  REQUIRE(module_groups[0].params[0] == &p.w);
  REQUIRE(module_groups[0].names == groups[0].names);
  for (std::size_t i = 0; i < kK; ++i) m.c_grad[i] = 3.0f + float(i);  // ‖g‖ = √(9 + 16) = 5
  const std::vector<ParameterRef> refs = groups[0].params;
  REQUIRE(clip_grad_norm(refs, 1.0) == 5.0);
  REQUIRE(m.c_grad[0] == Approx(3.0 / (5.0 + 1e-6)).epsilon(1e-7));
  const std::vector<float> g = m.c_grad;
  Sgd sgd(groups);
  sgd.step();  // momentum 0, weight decay 0.01 (ParamGroup's defaults): c ← c − lr·(g + wd·c)
  for (std::size_t k = 0; k < kK; ++k)
    REQUIRE(m.c[k] ==
            Approx(initial_bias(k) - 1e-4 * (g[k] + 0.01 * initial_bias(k))).epsilon(1e-7));
  const auto state = AdamW(groups).state_dict();
  const auto& shape = state.at("linear.weight.exp_avg").shape();
  REQUIRE(std::vector<std::size_t>(shape.begin(), shape.end()) == std::vector<std::size_t>{kK, kD});
  const EmaModel ema = EmaModel::from_module(m);
  REQUIRE(ema.state_dict().at("linear.bias")(1) == m.c[1]);

  // A view must be as long as its shape says; a view under another name is refused.
  std::vector<float> short_value(3), grad(3);
  REQUIRE_THROWS_WITH(ParameterRef(ParameterView{"w", short_value, grad, {2, 2}}),
                      Catch::Contains("parameter 'w' has 3 values, expected 4 (its shape [2,2])"));
  ParamGroup renamed;
  renamed.params = {ParameterView{"w", short_value, grad, {3}}};
  renamed.names = {"v"};
  REQUIRE_THROWS_WITH(AdamW({renamed}),
                      Catch::Contains("parameter view 'w' is listed under the name 'v'"));
  ParamGroup frozen;
  frozen.params = {ParameterView{"w", short_value, {}, {3}}};
  frozen.names = {"w"};
  REQUIRE_THROWS_WITH(AdamW({frozen}), Catch::Contains("'w' is frozen, expected trainable"));
}

TEST_CASE("checkpoint resume of the std::vector<float> model repeats the uninterrupted run") {
  test::TempDir dir("pluggable_resume");
  TrainerOptions o = base_options("adamw");
  o.output_dir = dir.str();
  o.checkpointing_steps = 2;
  VectorModel full;
  const Run uninterrupted = run(full, o);
  fs::remove_all(checkpoint_path(dir.path(), 4));  // resume from step 2

  // The manifest records the step's seed (11), not TrainerOptions::seed (0).
  const CheckpointContents saved = read_checkpoint(checkpoint_path(dir.path(), 2));
  REQUIRE(saved.manifest.at("seed").get<std::uint64_t>() == 11);
  REQUIRE(saved.manifest.at("optimizer").get<std::string>() == "adamw");
  REQUIRE(saved.tensor_files.at("model.safetensors").size() == 2);

  o.resume_from_checkpoint = "latest";
  VectorModel resumed(/*shift=*/0.5f);  // other weights: everything must come from the files
  const Run second = run(resumed, o);
  REQUIRE(second.logs.size() == 2);
  REQUIRE(second.logs[0].step == 3);
  REQUIRE(second.logs[0].loss == uninterrupted.logs[2].loss);
  REQUIRE(second.logs[1].loss == uninterrupted.logs[3].loss);
  REQUIRE(second.values == uninterrupted.values);  // bitwise
  for (const auto& [name, shadow] : uninterrupted.ema) REQUIRE((second.ema.at(name) == shadow));

  // A step with another seed does not continue this run.
  VectorModel other;
  QuadraticStep<VectorModel> step(other, 12);
  Trainer trainer(step, other, o);
  REQUIRE_THROWS_WITH(trainer.resume("latest"), Catch::Contains("seed = 11, expected 12"));
}

TEST_CASE("a user-written optimizer: θ ← θ − lr·λ(step)·g with the model's gradient") {
  const bool views = GENERATE(true, false);  // the std::vector model, or the nn::Parameter one
  INFO((views ? "VectorModel" : "ParamModel"));
  auto check = [](auto& model) {
    using M = std::remove_reference_t<decltype(model)>;
    test::TempDir dir("pluggable_optimizer");
    TrainerOptions o;
    o.lr_scheduler = "constant_with_warmup";  // λ = 0, 1/2, 1, 1
    o.lr_warmup_steps = 2;
    o.max_train_steps = 4;
    o.max_grad_norm = 0;  // no clipping: the optimizer sees the gradient itself
    o.output_dir = dir.str();
    o.checkpointing_steps = 0;
    const double lr = 0.1;
    QuadraticStep<M> step(model, 11);
    Trainer trainer(step, model, PlainSgd(named_trainable_parameters(model), lr), o);
    const Data data;
    const double lambda[] = {0.0, 0.5, 1.0, 1.0};
    for (std::uint64_t s = 0; s < 4; ++s) {
      const std::vector<float> before = model.values();
      const StepLog log = trainer.train_step(data);
      REQUIRE(log.lr == lr * lambda[s]);
      const std::vector<float>& g = trainer.optimizer().seen_grads.at(s);
      // The gradient the optimizer saw, against dL/dθ worked out in double from the formula.
      const std::vector<float> x = noisy_inputs(data(s).images, 11, s);
      std::vector<double> expected(kK * kD + kK, 0.0);
      for (std::size_t b = 0; b < kB; ++b)
        for (std::size_t k = 0; k < kK; ++k) {
          double r = before[kK * kD + k] - (k == 0 ? x[b * kD] : -x[b * kD + 1]);
          for (std::size_t d = 0; d < kD; ++d) r += double(before[k * kD + d]) * x[b * kD + d];
          for (std::size_t d = 0; d < kD; ++d) expected[k * kD + d] += r * x[b * kD + d] / kB;
          expected[kK * kD + k] += r / kB;
        }
      for (std::size_t i = 0; i < expected.size(); ++i)
        REQUIRE(g[i] == Approx(expected[i]).epsilon(1e-5).margin(1e-6));
      // The closed form (float, so up to its rounding).
      const float step_size = float(lr * lambda[s]);
      const std::vector<float> after = model.values();
      for (std::size_t i = 0; i < after.size(); ++i)
        REQUIRE(after[i] ==
                Approx(double(before[i]) - double(step_size) * g[i]).epsilon(1e-6).margin(1e-7));
    }
    REQUIRE(trainer.optimizer_step() == 4);
    REQUIRE(trainer.seed() == 11);
    const CheckpointContents c = read_checkpoint(trainer.save_checkpoint());
    REQUIRE(c.manifest.at("optimizer").get<std::string>() == "plain_sgd");
    REQUIRE(c.manifest.at("learning_rate").get<double>() == lr);
    REQUIRE(c.tensor_files.at("optimizer.safetensors").empty());
  };
  if (views) {
    VectorModel m;
    check(m);
  } else {
    ParamModel m;
    check(m);
  }
}

TEST_CASE("an unconditional model: empty token ids pass through to the step") {
  VectorModel model;
  QuadraticStep<VectorModel> step(model, 11);
  TrainerOptions o = base_options("adamw");
  o.max_train_steps = 2;
  Trainer trainer(step, model, o);
  const Data unconditional{false};
  REQUIRE(unconditional(0).token_ids.shape()[0] == 0);
  const StepLog log = trainer.train_step(unconditional);
  REQUIRE(std::isfinite(log.loss));
  REQUIRE(step.token_rows == std::vector<std::size_t>{0, 0});  // 2 micro-batches, no token rows

  // compose_batch: no token rows, with prior preservation too (no class token rows).
  TrainBatch batch = unconditional(0);
  batch.class_images =
      xt::zeros<float>({std::size_t{2}, std::size_t{1}, std::size_t{2}, std::size_t{2}});
  const ComposedBatch c = compose_batch(batch, true, 1.0, 1);
  REQUIRE(c.images.shape()[0] == kB + 2);
  REQUIRE(c.token_ids.shape()[0] == 0);
  REQUIRE(c.num_instance == kB);
  batch.class_token_ids = xt::zeros<std::int64_t>({std::size_t{2}, std::size_t{2}});
  REQUIRE_THROWS_WITH(compose_batch(batch, true, 1.0, 1),
                      Catch::Contains("class_token_ids have shape [2,2], expected 0 rows"));
  batch = Data{}(0);
  batch.token_ids = xt::zeros<std::int64_t>({std::size_t{2}, std::size_t{2}});
  REQUIRE_THROWS_WITH(compose_batch(batch, false, 1.0, 1),
                      Catch::Contains("token_ids have shape [2,2], expected 3 rows (or 0"));
}
