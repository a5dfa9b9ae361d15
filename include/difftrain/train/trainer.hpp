#pragma once
// Trainer: the loop around a training step (diffusers' train_*.py loop with accelerate).
//
// One call of train_step() is one optimizer step ("global step"):
//   zero the gradients
//   for k in [0, n): micro-batch m = micro_batch_index + k, n = gradient_accumulation_steps, or
//       fewer at the end of an epoch (micro_batches_per_epoch set: accelerate also steps after
//       an epoch's last micro-batch, so an accumulation group never spans two epochs)
//       batch = data(m);  step.step(images, token_ids, m, {weights w_b / accum})  (backward +=)
//   ‖g‖ = global grad norm (before clipping); clip to max_grad_norm
//   a NaN/Inf loss or ‖g‖ → skip (gradients dropped, counted) or Error naming the step
//   else optimizer.step(lr · λ(scheduler_step)); scheduler_step += 1; EMA update
//
// Accumulation convention: each micro-batch's loss is divided by gradient_accumulation_steps
// (through its per-sample weights), as accelerate's backward() does, so the accumulated gradient
// is the gradient of the mean loss over the micro-batches — the same as one batch of
// accum × micro-batch samples — and learning rates keep their meaning when accum changes.
// The optimizer, the LR schedule and the EMA advance only on these boundaries. A short group at
// an epoch's end keeps the 1/gradient_accumulation_steps factor (accelerate divides by it too).
//
// Prior preservation (DreamBooth): the batch is the instance examples, then the class examples;
// L = L_instance + λ·L_prior, each the weighted mean (Min-SNR etc. with the sample's own
// timestep) over its half. The step computes (1/B)·Σ_b w_b·W(t_b)·L_b over all B = B_i + B_c
// rows, so the trainer passes sample weights w_b = B/B_i for instance rows and λ·B/B_c for class
// rows (times any user weight, over accum).
//
// Randomness: micro-batch m is step index m of the DiffusionTrainStep (its noise and timesteps
// depend only on (seed, m)), and data(m) must depend only on m. A checkpoint stores m, so a
// resumed run repeats the uninterrupted one bit for bit.
//
// Data parallelism (set_collective; dist/mpi.hpp over MPI): each of R ranks gets its shard of
// every micro-batch from its data source (TrainBatch::global_rows: b of the global batch's G
// rows, class rows paired), runs the step on it with those rows' random numbers and sample
// weights × b/G, then the ranks agree on errors and non-finite losses and sum their gradients
// (buckets of ≤ 16 MiB): every rank holds the gradient of the global batch's mean loss, so R
// ranks × batch B follow the one-process run with batch R·B (up to float summation order) and
// stay identical. Rank 0 writes the checkpoints, which any number of ranks can resume.
//
// One seed: the seed that draws noise and timesteps is the step's. The Trainer records it in
// checkpoints (and a resume must find the same one): the step's options().seed when the step
// has one, else TrainerOptions::seed (a step without options).
//
// What is trained and by what (each pluggable):
// - the model: any TrainableModel (parameter_view.hpp): an nn::Module (its trainable
//   nn::Parameter<float>s) or a type whose trainable_parameters() returns ParameterViews of its
//   own storage (std::vector<float> weights, host mirrors of GPU buffers, …);
// - the optimizer: built from TrainerOptions::optimizer by name (AnyOptimizer), or any object
//   satisfying the Optimizer concept (optimizer.hpp) handed to the constructor;
// - the step: any type with `TrainStepResult step(images, token_ids, step_index, BatchExtras)`.
//   token_ids may have 0 rows: an unconditional model (no text encoder).

#include <array>
#include <chrono>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>
#include <xtensor/xbuilder.hpp>

#include "difftrain/concepts.hpp"
#include "difftrain/core/choice.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/prediction_type.hpp"
#include "difftrain/kernels/loss.hpp"
#include "difftrain/loss/configured_weighting.hpp"
#include "difftrain/loss/huber_schedule.hpp"
#include "difftrain/nn/parameter.hpp"
#include "difftrain/schedule/timestep_sampler.hpp"
#include "difftrain/train/checkpoint.hpp"
#include "difftrain/train/collective.hpp"
#include "difftrain/train/configured_timesteps.hpp"
#include "difftrain/train/diffusion_train_step.hpp"
#include "difftrain/train/ema.hpp"
#include "difftrain/train/grad_clip.hpp"
#include "difftrain/train/lr_schedule.hpp"
#include "difftrain/train/optimizers.hpp"
#include "difftrain/train/parameter_view.hpp"

namespace difftrain::train {

/// The name of the first trainable parameter holding a NaN or ±Inf (in their order), or
/// nothing. Σ v·0 is NaN exactly when some v is not finite, and vectorises.
inline std::optional<std::string> first_non_finite_trainable(
    const std::vector<NamedParameter>& params) {
  for (const auto& [name, p] : params) {
    if (!p.trainable()) continue;
    float acc = 0;
    const std::span<const float> v = p.value();
    for (std::size_t i = 0, n = v.size(); i < n; ++i) acc += v[i] * 0.0f;
    if (!std::isfinite(acc)) return name;
  }
  return std::nullopt;
}
/// The same over a model's trainable parameters.
template <TrainableModel M>
std::optional<std::string> first_non_finite_trainable(M& model) {
  return first_non_finite_trainable(named_trainable_parameters(model));
}

/// What to do when a micro-batch's loss or the gradient norm is NaN/Inf. Either way the weights,
/// the optimizer state, the LR schedule and the EMA are left untouched.
enum class NonFinitePolicy : std::uint8_t {
  skip,   // drop the gradients, count the step as skipped, go on with the next batch
  error,  // throw difftrain::Error naming the global step and the micro-batch
};
/// Its names as the CLI's --on_nonfinite takes them.
inline constexpr std::array<Choice<NonFinitePolicy>, 2> kNonFinitePolicies{
    {{"skip", NonFinitePolicy::skip}, {"stop", NonFinitePolicy::error}}};

/// The loop's settings, named after diffusers' training-script arguments where they exist.
struct TrainerOptions {
  // Optimizer (optimizers.hpp): adamw (diffusers' default), sgd, lion, adafactor, prodigy,
  // adamw_schedulefree, or kohya's spellings; optimizer_args: kohya's "key=value" extras.
  std::string optimizer = "adamw";
  std::vector<std::string> optimizer_args;
  double learning_rate = 1e-4;
  bool scale_lr = false;              // lr ← lr · accum · train_batch_size (one process)
  std::int64_t train_batch_size = 1;  // only used by scale_lr
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_weight_decay = 1e-2;
  double adam_epsilon = 1e-8;
  double sgd_momentum = 0.9;
  bool sgd_nesterov = false;
  double sgd_weight_decay = 0.0;
  double loraplus_lr_ratio = 1.0;  // kohya: lr of lora_B / lora_up parameters × ratio
  // kohya --text_encoder_lr: the lr of the parameters named "text_encoder.…" (a model trained
  // with its text encoder, nn::ModulePair); unset: learning_rate. scale_lr scales it too.
  std::optional<double> text_encoder_lr;

  // Learning-rate schedule (lr_schedule.hpp).
  std::string lr_scheduler = "constant";
  std::int64_t lr_warmup_steps = 500;
  double lr_num_cycles = -1;  // cosine_with_restarts only; < 0: its default, 1
  double lr_power = 1.0;
  double lr_end = 1e-7;

  // Loop.
  std::int64_t max_train_steps = 1000;
  std::int64_t gradient_accumulation_steps = 1;
  // Micro-batches of one epoch (the data loader's length): accumulation groups end with the
  // epoch, as with accelerate. 0: no epochs, every group has gradient_accumulation_steps.
  std::int64_t micro_batches_per_epoch = 0;
  double max_grad_norm = 1.0;  // <= 0: no clipping (the norm is still computed and logged)
  NonFinitePolicy non_finite = NonFinitePolicy::skip;

  // EMA of the trainable parameters.
  bool use_ema = false;
  EmaOptions ema;

  // Loss composition. Prior preservation is done by the trainer; the rest configures the step:
  // make_train_step() builds a DiffusionTrainStep from all of it (or train_step_options(),
  // the weighting member and timestep_sampler() give the parts for a step of other types).
  bool with_prior_preservation = false;
  double prior_loss_weight = 1.0;
  std::optional<PredictionType> prediction_type;  // unset: the scheduler's (parse_prediction_type)
  // diffusers --gradient_checkpointing (TrainStepOptions): recompute the denoiser's block
  // activations in backward instead of keeping them.
  bool gradient_checkpointing = false;
  // The seed of make_train_step / train_step_options (noise and timesteps); the Trainer records
  // the step's own seed when the step has options(), this one otherwise.
  std::uint64_t seed = 0;

  // Loss weighting: snr_gamma (Min-SNR-γ), debiased_estimation_loss, p2_gamma,
  // scale_v_pred_loss_like_noise_pred (loss::ConfiguredWeighting; enabled ones multiply, as in
  // kohya).
  loss::WeightingOptions weighting;

  // Loss type (kohya --loss_type, --huber_schedule, --huber_c, --huber_scale).
  std::string loss_type = "l2";        // l2, l1, huber or smooth_l1
  std::string huber_schedule = "snr";  // constant, exponential or snr (c per timestep)
  double huber_c = 0.1;                // in (0, 1]
  double huber_scale = 1.0;

  // Noise: noise_offset, input_perturbation (diffusers), noise_offset_random_strength,
  // adaptive_noise_scale, multires_noise_iterations / _discount (pyramid noise) and
  // input_perturbation_random_strength (kohya's flags; --ip_noise_gamma is input_perturbation).
  kernels::NoiseOptions noise;

  // Timesteps: kohya's range, or diffusers' bias (train_text_to_image_sdxl.py); not both.
  std::optional<std::int64_t> min_timestep;     // unset: 0
  std::optional<std::int64_t> max_timestep;     // unset: num_train_timesteps (exclusive)
  std::string timestep_bias_strategy = "none";  // none, earlier, later or range
  double timestep_bias_multiplier = 1.0;
  std::int64_t timestep_bias_begin = 0;  // range: [begin, end)
  std::int64_t timestep_bias_end = 1000;
  double timestep_bias_portion = 0.25;  // earlier / later: this fraction of T

  // Checkpoints (fit() saves every checkpointing_steps global steps when output_dir is set).
  std::string output_dir;
  std::int64_t checkpointing_steps = 500;
  std::optional<std::int64_t> checkpoints_total_limit;
  std::string resume_from_checkpoint;  // "", "latest" or a checkpoint folder; used by fit()
};

/// The DiffusionTrainStep options that TrainerOptions carries (diffusers keeps them together).
/// Throws difftrain::Error for an unknown loss_type / huber_schedule or bad noise or Huber values.
inline TrainStepOptions train_step_options(const TrainerOptions& o) {
  TrainStepOptions s;
  s.prediction_type = o.prediction_type;
  s.noise = o.noise;
  s.noise.validate();
  s.loss_type = kernels::parse_loss_type(o.loss_type);
  s.huber.schedule = loss::parse_huber_schedule(o.huber_schedule);
  s.huber.huber_c = o.huber_c;
  s.huber.huber_scale = o.huber_scale;
  if (kernels::uses_huber_c(s.loss_type)) s.huber.validate();
  s.seed = o.seed;
  s.gradient_checkpointing = o.gradient_checkpointing;
  return s;
}

/// The timestep sampler of TrainerOptions for a schedule of T timesteps.
inline ConfiguredTimesteps timestep_sampler(const TrainerOptions& o, std::int64_t T) {
  TimestepBiasOptions bias;
  bias.strategy = parse_timestep_bias_strategy(o.timestep_bias_strategy);
  bias.multiplier = o.timestep_bias_multiplier;
  bias.portion = o.timestep_bias_portion;
  bias.begin = o.timestep_bias_begin;
  bias.end = o.timestep_bias_end;
  return ConfiguredTimesteps(T, o.min_timestep, o.max_timestep, bias);
}

/// The step whose weighting and timestep sampler are chosen at run time (make_train_step).
template <Scheduler SchedulerT, Denoiser DenoiserT, LatentEncoder LatentEncoderT,
          TextEncoder TextEncoderT>
using ConfiguredTrainStep = DiffusionTrainStep<SchedulerT, DenoiserT, LatentEncoderT, TextEncoderT,
                                               loss::ConfiguredWeighting, ConfiguredTimesteps>;

/// A DiffusionTrainStep configured entirely by TrainerOptions: prediction type, seed, noise,
/// loss type and Huber schedule, loss weighting and timestep sampling. Every bad value throws
/// difftrain::Error here, before any step runs. The models are held by reference (as the step
/// does); give the same options to the Trainer.
///
///   auto step = train::make_train_step(DdpmScheduler::sd15(), unet, vae, text, options);
///   train::Trainer trainer(step, unet, options);
template <Scheduler SchedulerT, Denoiser DenoiserT, LatentEncoder LatentEncoderT,
          TextEncoder TextEncoderT>
ConfiguredTrainStep<SchedulerT, DenoiserT, LatentEncoderT, TextEncoderT> make_train_step(
    SchedulerT scheduler, DenoiserT& denoiser, LatentEncoderT& latent_encoder,
    TextEncoderT& text_encoder, const TrainerOptions& options) {
  TrainStepOptions step_options = train_step_options(options);
  const loss::ConfiguredWeighting weighting(options.weighting);
  weighting.check_prediction_type(
      step_options.prediction_type.value_or(scheduler.prediction_type()));
  ConfiguredTimesteps sampler = timestep_sampler(options, scheduler.num_train_timesteps());
  return {std::move(scheduler),    denoiser,          latent_encoder, text_encoder, weighting,
          std::move(step_options), std::move(sampler)};
}

/// What the callback receives after every global step.
struct StepLog {
  std::int64_t step = 0;  // global step just completed (1-based)
  double loss = 0;        // mean over micro-batches of the step's loss (L_inst + λ·L_prior)
  std::vector<double> per_sample_loss;  // mean_chw ℓ of every row of every micro-batch, in order
  std::vector<double> weights;     // the step's w_b for those rows (all factors, incl. 1/accum)
  std::vector<double> timesteps;   // their denoiser timesteps: t (DDPM), σ·1000 (flow matching)
  double lr = 0;                   // learning rate of the first group used for this update
  double grad_norm = 0;            // global gradient norm before clipping
  double it_per_s = 0;             // global steps per second (this step)
  bool skipped = false;            // non-finite loss or gradient: no update
  std::int64_t skipped_steps = 0;  // total so far
};

/// The batch handed to the step: instance rows then class rows, with per-sample weights.
struct ComposedBatch {
  Tensor4<float> images;
  TokenIds token_ids;                 // 0 rows for an unconditional model
  std::vector<float> sample_weights;  // empty when all are 1
  std::size_t num_instance = 0;
  std::optional<Tensor<float, 2>> time_ids;  // SDXL: the rows' size conditioning [B,6]
  // A shard (TrainBatch::global_rows): the rows' indices in the global micro-batch, instance
  // rows then class rows (class row i of a global batch of G is row G + i); else empty.
  std::vector<std::uint64_t> global_rows;
};

/// Rows and weights for one micro-batch (see the top of the file for the weights). token_ids
/// with 0 rows (an unconditional model, no text encoder) pass through as they are; class_token_ids
/// must then have 0 rows too. A shard of b of the global batch's G rows has its weights scaled by
/// b/G: the shards' losses (and gradients) then sum to the global batch's mean.
inline ComposedBatch compose_batch(const TrainBatch& batch, bool with_prior_preservation,
                                   double prior_loss_weight, std::int64_t accumulation_steps) {
  constexpr const char* fn = "compose_batch";
  require(batch.images.dimension() == 4 && batch.images.shape()[0] > 0, fn, "images have shape ",
          shape_string(batch.images.shape()), ", expected [B,C,H,W] with B > 0");
  const bool unconditional = batch.token_ids.shape()[0] == 0;
  require(unconditional || batch.token_ids.shape()[0] == batch.images.shape()[0], fn,
          "token_ids have shape ", shape_string(batch.token_ids.shape()), ", expected ",
          batch.images.shape()[0], " rows (or 0: an unconditional model)");
  ComposedBatch out;
  const std::size_t bi = batch.images.shape()[0];
  std::size_t bc = 0;
  if (with_prior_preservation) {
    bc = batch.class_images.shape()[0];
    require(batch.class_images.size() > 0 && bc > 0, fn,
            "with_prior_preservation needs class_images, got shape ",
            shape_string(batch.class_images.shape()));
    require(std::equal(batch.class_images.shape().begin() + 1, batch.class_images.shape().end(),
                       batch.images.shape().begin() + 1),
            fn, "class_images have shape ", shape_string(batch.class_images.shape()),
            ", expected [", bc, ",", batch.images.shape()[1], ",", batch.images.shape()[2], ",",
            batch.images.shape()[3], "] like the instance images");
    if (unconditional)
      require(batch.class_token_ids.shape()[0] == 0, fn, "class_token_ids have shape ",
              shape_string(batch.class_token_ids.shape()),
              ", expected 0 rows as token_ids (an unconditional model)");
    else
      require(batch.class_token_ids.shape()[0] == bc &&
                  batch.class_token_ids.shape()[1] == batch.token_ids.shape()[1],
              fn, "class_token_ids have shape ", shape_string(batch.class_token_ids.shape()),
              ", expected [", bc, ",", batch.token_ids.shape()[1], "]");
    require(std::isfinite(prior_loss_weight) && prior_loss_weight >= 0, fn, "prior_loss_weight is ",
            prior_loss_weight, ", expected a finite value >= 0");
    require(batch.time_ids.has_value() == batch.class_time_ids.has_value(), fn,
            "time_ids are given for ", batch.time_ids ? "the instance rows" : "the class rows",
            " only, expected both or neither");
    out.images = xt::concatenate(xt::xtuple(batch.images, batch.class_images), 0);
    if (batch.time_ids)
      out.time_ids = xt::concatenate(xt::xtuple(*batch.time_ids, *batch.class_time_ids), 0);
    if (unconditional)
      out.token_ids = batch.token_ids;
    else
      out.token_ids = xt::concatenate(xt::xtuple(batch.token_ids, batch.class_token_ids), 0);
  } else {
    out.images = batch.images;
    out.token_ids = batch.token_ids;
    out.time_ids = batch.time_ids;
  }
  const std::size_t b = bi + bc;
  if (out.time_ids)
    require(out.time_ids->shape() == std::array<std::size_t, 2>{b, 6}, fn, "time_ids have shape ",
            shape_string(out.time_ids->shape()), ", expected [", b, ",6] (one row per image)");
  out.num_instance = bi;
  require(batch.sample_weights.empty() || batch.sample_weights.size() == b, fn,
          "sample_weights has ", batch.sample_weights.size(), " entries, expected ", b,
          " (instance then class rows)");
  double shard = 1;  // b/G
  if (!batch.global_rows.empty()) {
    const std::size_t g = batch.global_batch_size;
    require(batch.global_rows.size() == bi && bi <= g, fn, "the shard has ", bi, " rows and ",
            batch.global_rows.size(), " global_rows of a global batch of ", g,
            ", expected one global row per row and at most global_batch_size rows");
    out.global_rows = batch.global_rows;
    for (std::size_t r = 0; r < bi; ++r) {
      require(batch.global_rows[r] < g, fn, "global row ", batch.global_rows[r],
              " is outside the global batch of ", g);
      if (with_prior_preservation) out.global_rows.push_back(g + batch.global_rows[r]);
    }
    shard = double(bi) / double(g);
  }
  if (!with_prior_preservation && accumulation_steps == 1 && shard == 1) {
    out.sample_weights = batch.sample_weights;
    return out;
  }
  out.sample_weights.resize(b);
  const double accum = double(accumulation_steps);
  for (std::size_t r = 0; r < b; ++r) {
    double w = batch.sample_weights.empty() ? 1.0 : double(batch.sample_weights[r]);
    if (with_prior_preservation)
      w *= r < bi ? double(b) / double(bi) : prior_loss_weight * double(b) / double(bc);
    out.sample_weights[r] = static_cast<float>(w * shard / accum);
  }
  return out;
}

/// The loop around a step type StepT (DiffusionTrainStep or any type with
/// `TrainStepResult step(images, token_ids, step_index, BatchExtras)`) training the trainable
/// parameters of ModelT (a TrainableModel) with an OptimizerT (an Optimizer). The step and the
/// model are held by reference.
///
///   train::Trainer trainer(step, model, options);            // the optimizer options names
///   train::Trainer trainer(step, model, std::move(my_optimizer), options);  // any Optimizer
template <class StepT, class ModelT, class OptimizerT = AnyOptimizer>
class Trainer {
  static_assert(TrainableModel<ModelT>,
                "Trainer: the model type is not a train::TrainableModel: it needs either "
                "trainable_parameters() returning a range of train::ParameterView, or "
                "for_each_parameter(prefix, visitor) over nn::Parameter<float> (an nn::Module)");
  static_assert(Optimizer<OptimizerT>,
                "Trainer: the optimizer type is not a train::Optimizer: it needs step(lr_scale), "
                "step_count(), param_groups() (groups with an lr), state_dict(), "
                "load_state_dict(state, step_count) and name() or kName (see optimizer.hpp)");

 public:
  using Callback = std::function<void(const StepLog&)>;

  /// The optimizer TrainerOptions::optimizer names (with optimizer_args, its hyperparameters,
  /// learning_rate (scale_lr), LoRA+ and text_encoder_lr groups) over the trainable parameters.
  Trainer(StepT& step, ModelT& model,
          TrainerOptions options) requires std::same_as<OptimizerT, AnyOptimizer>
      : Trainer(step, model, AnyOptimizer(std::in_place_type<Sgd>, std::vector<ParamGroup>{}),
                std::move(options), /*by_name=*/true) {}

  /// A user-built optimizer (over the model's trainable parameters, e.g. from
  /// make_param_groups(model, hyper)); TrainerOptions' optimizer fields are not read, and the
  /// run's learning rate (the LR schedule's base) is its first group's lr.
  Trainer(StepT& step, ModelT& model, OptimizerT optimizer, TrainerOptions options)
      : Trainer(step, model, std::move(optimizer), std::move(options), /*by_name=*/false) {}

  /// One global step from gradient_accumulation_steps micro-batches of `data`.
  template <TrainDataSource D>
  StepLog train_step(D&& data) {
    const auto start = std::chrono::steady_clock::now();
    const std::int64_t accum = options_.gradient_accumulation_steps;
    const std::int64_t group = group_size();
    StepLog log;
    log.step = global_step_ + 1;
    zero_grad();
    std::optional<std::string> non_finite, failed;
    try {
      for (std::int64_t k = 0; k < group && !non_finite; ++k) {
        const std::uint64_t m = micro_batch_index_ + std::uint64_t(k);
        const TrainBatch batch = data(m);
        if (collective_ && collective_->size() > 1) {
          require(batch.global_batch_size > 0, "Trainer::train_step", "micro-batch ", m,
                  " is not a shard (TrainBatch::global_rows): with ", collective_->size(),
                  " ranks every rank would train on the same rows");
          if (batch.images.dimension() == 4 && batch.images.shape()[0] == 0)
            continue;  // an empty shard of a short micro-batch: no gradient from this rank
        }
        const ComposedBatch c = compose_batch(batch, options_.with_prior_preservation,
                                              options_.prior_loss_weight, accum);
        BatchExtras extras;
        extras.sample_weights = c.sample_weights;
        if (batch.mask) extras.mask = &*batch.mask;
        if (c.time_ids) extras.time_ids = &*c.time_ids;
        extras.global_rows = c.global_rows;
        TrainStepResult r;
        try {
          r = step_.step(c.images, c.token_ids, m, extras);
        } catch (const NonFiniteLoss& e) {
          non_finite = message("micro-batch ", m, ": ", e.what());
          break;
        }
        if (!std::isfinite(r.loss)) {
          non_finite = message("micro-batch ", m, ": loss is ", r.loss);
          break;
        }
        log.loss += r.loss;
        log.per_sample_loss.insert(log.per_sample_loss.end(), r.per_sample_loss.begin(),
                                   r.per_sample_loss.end());
        log.weights.insert(log.weights.end(), r.weights.begin(), r.weights.end());
        log.timesteps.insert(log.timesteps.end(), r.timesteps.begin(), r.timesteps.end());
      }
    } catch (const std::exception& e) {
      zero_grad();  // bad input: no partial gradients left behind
      if (!collective_) throw;
      failed = e.what();
    } catch (...) {
      zero_grad();
      throw;
    }
    if (collective_) {
      // Every rank stops on any rank's error, goes on or skips together, and steps with the sum
      // of the shards' gradients (each shard's weights carry b/G: the sum is the global mean's).
      if (const std::optional<RankError> e = collective_->agree(failed))
        fail("Trainer::train_step", "rank ", e->rank, " of ", collective_->size(),
             " failed at global step ", log.step, ": ", e->message);
      double sums[2] = {log.loss, non_finite ? 1.0 : 0.0};
      collective_->allreduce_sum(std::span<double>(sums));
      log.loss = sums[0];
      if (sums[1] > 0 && !non_finite) non_finite = "another rank's micro-batch: loss is not finite";
      if (!non_finite) allreduce_sum_gradients(*collective_, params_, bucket_);
    }
    if (!non_finite) {
      log.grad_norm = clip_grad_norm(params_, options_.max_grad_norm);
      if (!std::isfinite(log.grad_norm)) non_finite = message("gradient norm is ", log.grad_norm);
    }
    const double multiplier = schedule_.multiplier(scheduler_step_);
    log.lr = first_group_lr() * multiplier;
    if (non_finite) {
      zero_grad();
      require(options_.non_finite != NonFinitePolicy::error, "Trainer::train_step",
              "non-finite value at global step ", log.step, " (", *non_finite,
              "); the weights were not updated");
      ++skipped_steps_;
      log.skipped = true;
    } else {
      optimizer_.step(multiplier);
      // A finite loss and gradient can still give a non-finite weight (a huge learning rate, a
      // damaged optimizer state): stop before anything broken is saved.
      if (const auto bad = first_non_finite_trainable(trainable_))
        fail("Trainer::train_step", "parameter '", *bad,
             "' is not finite after the update of global step ", log.step, " (learning rate ",
             log.lr, "); stopped: the checkpoints and files already written are untouched");
      ++scheduler_step_;
      if (ema_) ema_->step();
      zero_grad();
    }
    micro_batch_index_ += std::uint64_t(group);
    ++global_step_;
    log.skipped_steps = skipped_steps_;
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    log.it_per_s = seconds > 0 ? 1.0 / seconds : 0.0;
    return log;
  }

  /// Deals with leftovers of an interrupted earlier run in output_dir (recover_checkpoints),
  /// resumes from options.resume_from_checkpoint if set ("latest" with no checkpoint yet starts
  /// fresh, as diffusers does), then runs global steps until max_train_steps, saving a
  /// checkpoint every checkpointing_steps steps when output_dir is set.
  template <TrainDataSource D>
  void fit(D&& data, const Callback& callback = {}) {
    // At the start rather than at the first save, so that what is recovered is reported first.
    // With several ranks, rank 0 does the housekeeping before any rank reads a checkpoint.
    if (!options_.output_dir.empty() && writes_files())
      recover_checkpoints(options_.output_dir, log_);
    if (collective_) collective_->barrier();
    const std::string& from = options_.resume_from_checkpoint;
    if (!from.empty() && global_step_ == 0 &&
        !(from == "latest" && list_checkpoints(options_.output_dir, log_).empty()))
      resume(from);
    while (global_step_ < options_.max_train_steps) {
      const StepLog log = train_step(data);
      if (callback) callback(log);
      if (!options_.output_dir.empty() && options_.checkpointing_steps > 0 &&
          global_step_ % options_.checkpointing_steps == 0)
        save_checkpoint();
    }
  }

  /// Writes output_dir/checkpoint-<global_step> (model.safetensors: trainable parameters;
  /// optimizer.safetensors; ema.safetensors; trainer_state.json) and prunes to
  /// checkpoints_total_limit. Returns the folder. A checkpoint of the same step is replaced
  /// atomically (checkpoint.hpp); checkpoint_saves_in_progress counts the whole save.
  std::filesystem::path save_checkpoint() {
    require(!options_.output_dir.empty(), "Trainer::save_checkpoint", "output_dir is empty");
    if (!writes_files()) return checkpoint_path(options_.output_dir, global_step_);  // rank 0 does
    const CheckpointSaveScope saving;
    CheckpointContents c;
    TensorMap& model = c.tensor_files["model.safetensors"];
    for (const auto& [name, p] : trainable_) {
      xt::xarray<float> value = xt::xarray<float>::from_shape(p.shape());
      std::copy(p.value().begin(), p.value().end(), value.begin());
      model.emplace(name, std::move(value));
    }
    c.tensor_files["optimizer.safetensors"] = optimizer_.state_dict();
    if (ema_) c.tensor_files["ema.safetensors"] = ema_->state_dict();
    c.manifest = {
        {"format", "difftrain.checkpoint"},
        {"version", 1},
        {"global_step", global_step_},
        {"scheduler_step", scheduler_step_},
        {"optimizer_step", optimizer_step()},
        {"micro_batch_index", micro_batch_index_},
        {"skipped_steps", skipped_steps_},
        {"ema_optimization_step", ema_ ? ema_->optimization_step() : 0},
        {"optimizer", optimizer_name(optimizer_)},
        {"seed", seed()},
        {"gradient_accumulation_steps", options_.gradient_accumulation_steps},
        {"micro_batches_per_epoch", options_.micro_batches_per_epoch},
        {"lr_scheduler", options_.lr_scheduler},
        {"learning_rate", base_lr_},
        {"use_ema", ema_.has_value()},
    };
    const std::filesystem::path path =
        write_checkpoint(options_.output_dir, global_step_, c, hooks_, log_);
    if (options_.checkpoints_total_limit)
      prune_checkpoints(options_.output_dir, *options_.checkpoints_total_limit, log_, hooks_);
    return path;
  }

  /// Loads a checkpoint folder, or for "latest" the newest complete one in output_dir (newer
  /// incomplete or damaged ones are skipped; the checkpoint log says which and why, and which
  /// was taken): parameters, optimizer state, EMA, counters and data position. Settings that
  /// would change the continuation (seed(), the optimizer's name, accumulation, EMA on/off) must
  /// match the checkpoint's. Returns the folder loaded.
  std::filesystem::path resume(const std::string& dir_or_latest) {
    constexpr const char* fn = "Trainer::resume";
    std::vector<std::string> required = {"model.safetensors", "optimizer.safetensors"};
    if (ema_) required.emplace_back("ema.safetensors");
    const LoadedCheckpoint loaded =
        load_checkpoint(options_.output_dir, dir_or_latest, required, log_);
    const std::filesystem::path& folder = loaded.folder;
    const CheckpointContents& c = loaded.contents;
    const nlohmann::json& m = c.manifest;
    const std::string where = folder.string();
    auto field = [&]<class T>(const char* key, T) -> T {
      require(m.contains(key), fn, "'", where, "/", kManifestName, "' has no \"", key, "\"");
      try {
        return m.at(key).get<T>();
      } catch (const nlohmann::json::exception& e) {
        fail(fn, "'", where, "' field \"", key, "\": ", e.what());
      }
    };
    require(field("format", std::string{}) == "difftrain.checkpoint", fn, "'", where,
            "' is not a difftrain checkpoint");
    auto same = [&]<class T>(const char* key, const T& expected, const char* from) {
      const T actual = field(key, T{});
      require(actual == expected, fn, "checkpoint '", where, "' has ", key, " = ", actual,
              ", expected ", expected, " (", from, ")");
    };
    same("optimizer", optimizer_name(optimizer_), "the optimizer");
    same("seed", seed(), "the step's seed");
    same("gradient_accumulation_steps", options_.gradient_accumulation_steps, "TrainerOptions");
    // Where accumulation groups end; checkpoints written before it existed had no epochs.
    if (m.contains("micro_batches_per_epoch") || options_.micro_batches_per_epoch != 0)
      same("micro_batches_per_epoch", options_.micro_batches_per_epoch, "TrainerOptions");
    same("use_ema", ema_.has_value(), "TrainerOptions");
    auto file = [&](const std::string& name) -> const TensorMap& {
      auto it = c.tensor_files.find(name);
      require(it != c.tensor_files.end(), fn, "checkpoint '", where, "' has no ", name);
      return it->second;
    };
    // Validate everything before changing any state.
    const TensorMap& model = file("model.safetensors");
    std::vector<std::string> problems;
    for (const auto& [name, p] : trainable_) {
      auto it = model.find(name);
      if (it == model.end())
        problems.push_back("missing " + name);
      else if (const std::vector<std::size_t> shape = p.shape();
               !std::equal(shape.begin(), shape.end(), it->second.shape().begin(),
                           it->second.shape().end()))
        problems.push_back(name + " has shape " + shape_string(it->second.shape()) + ", expected " +
                           shape_string(shape));
    }
    if (model.size() != trainable_.size())
      for (const auto& entry : model)  // no structured binding: clang cannot capture one
        if (std::none_of(trainable_.begin(), trainable_.end(),
                         [&](const auto& t) { return t.first == entry.first; }))
          problems.push_back("unexpected " + entry.first);
    if (!problems.empty()) {
      std::string message = std::string(fn) + ": '" + where +
                            "/model.safetensors' does not match the trainable parameters: ";
      for (std::size_t i = 0; i < problems.size(); ++i) message += (i ? "; " : "") + problems[i];
      throw Error(message);
    }
    // Load into copies and commit only when everything has loaded.
    const std::int64_t optimizer_steps = field("optimizer_step", std::int64_t{});
    const std::int64_t global_step = field("global_step", std::int64_t{});
    const std::int64_t scheduler_step = field("scheduler_step", std::int64_t{});
    const std::uint64_t micro_batch_index = field("micro_batch_index", std::uint64_t{});
    const std::int64_t skipped_steps = field("skipped_steps", std::int64_t{});
    require(global_step >= 0 && scheduler_step >= 0 && scheduler_step <= global_step &&
                skipped_steps >= 0,
            fn, "checkpoint '", where, "' has inconsistent counters: global_step ", global_step,
            ", scheduler_step ", scheduler_step, ", skipped_steps ", skipped_steps);
    // The EMA loads into a copy; the optimizer in place, last (a load that throws leaves an
    // Optimizer as it was), so a failure anywhere changes nothing.
    std::optional<EmaModel> ema = ema_;
    if (ema)
      ema->load_state_dict(file("ema.safetensors"), field("ema_optimization_step", std::int64_t{}));
    optimizer_.load_state_dict(file("optimizer.safetensors"), optimizer_steps);
    ema_ = std::move(ema);
    for (const auto& [name, p] : trainable_) {
      const auto& v = model.at(name);
      std::copy(v.begin(), v.end(), p.value().begin());
    }
    global_step_ = global_step;
    scheduler_step_ = scheduler_step;
    micro_batch_index_ = micro_batch_index;
    skipped_steps_ = skipped_steps;
    return folder;
  }

  std::int64_t global_step() const { return global_step_; }
  std::int64_t scheduler_step() const { return scheduler_step_; }
  std::int64_t optimizer_step() const { return std::int64_t(optimizer_.step_count()); }
  /// The seed of the run's noise and timesteps (the top of the file): the step's
  /// options().seed, else TrainerOptions::seed. Checkpoints record it; a resume must match it.
  std::uint64_t seed() const {
    if constexpr (requires { step_.options().seed; })
      return std::uint64_t(step_.options().seed);
    else
      return options_.seed;
  }
  std::uint64_t micro_batch_index() const { return micro_batch_index_; }
  std::int64_t skipped_steps() const { return skipped_steps_; }
  /// The learning rate of the first group at the next update.
  double current_lr() const { return first_group_lr() * schedule_.multiplier(scheduler_step_); }
  const LrSchedule& lr_schedule() const { return schedule_; }
  const TrainerOptions& options() const { return options_; }
  OptimizerT& optimizer() { return optimizer_; }
  const OptimizerT& optimizer() const { return optimizer_; }
  /// Schedule-free optimizers: the weights to evaluate (x) into the model before sampling or
  /// saving them, and back to the training weights (y) before the next step. Else (an optimizer
  /// without eval() / train()) no-ops.
  void eval_weights() {
    if constexpr (requires { optimizer_.eval(); }) optimizer_.eval();
  }
  void train_weights() {
    if constexpr (requires { optimizer_.train(); }) optimizer_.train();
  }
  EmaModel* ema() { return ema_ ? &*ema_ : nullptr; }
  /// Views of the trainable parameters as they are now (names, values, gradients, shapes), in
  /// the model's order.
  std::vector<ParameterView> trainable_parameters() const {
    std::vector<ParameterView> out;
    for (const auto& [name, p] : trainable_) out.push_back(p.view(name));
    return out;
  }
  /// Data-parallel training over `collective`'s ranks (nullptr: one process). Each rank's data
  /// source gives its shard of every micro-batch (TrainBatch::global_rows); the trainable
  /// parameters start as rank 0's (broadcast here); gradients are summed before clipping, so the
  /// ranks take the same steps. Only rank 0 writes checkpoints; all ranks resume from them.
  void set_collective(Collective* collective) {
    collective_ = collective;
    if (!collective_) return;
    require(global_step_ == 0, "Trainer::set_collective", "called at global step ", global_step_,
            ", expected before the first step (and before resume)");
    for (const ParameterRef& p : params_) collective_->broadcast(p.value(), 0);
    if (ema_) ema_.emplace(trainable_, options_.ema);  // the shadows of the broadcast weights
  }
  Collective* collective() const { return collective_; }
  /// Whether this process writes checkpoints (and, for a caller, result files): rank 0 or alone.
  bool writes_files() const { return !collective_ || collective_->rank() == 0; }
  /// Test hook: called before a checkpoint's temporary folder is renamed into place.
  void set_checkpoint_hook(CheckpointHook hook) { hooks_.before_rename = std::move(hook); }
  /// Test hooks of checkpoint saving and pruning (CheckpointHooks: simulated kills).
  void set_checkpoint_hooks(CheckpointHooks hooks) { hooks_ = std::move(hooks); }
  /// Receives checkpoint housekeeping messages (the trainer prints nothing itself): leftovers of
  /// interrupted saves recovered or removed, which checkpoint "latest" took and what it skipped.
  void set_checkpoint_log(CheckpointLog log) { log_ = std::move(log); }

 private:
  // Both public constructors: checks the options, collects the trainable parameters, builds the
  // optimizer by name (by_name) or takes `optimizer`, then the LR schedule and the EMA.
  Trainer(StepT& step, ModelT& model, OptimizerT optimizer, TrainerOptions options, bool by_name)
      : step_(step), model_(model), options_(std::move(options)), optimizer_(std::move(optimizer)) {
    constexpr const char* fn = "Trainer";
    const TrainerOptions& o = options_;
    require(o.micro_batches_per_epoch >= 0, fn, "micro_batches_per_epoch is ",
            o.micro_batches_per_epoch, ", expected >= 0 (0: no epochs)");
    require(o.gradient_accumulation_steps >= 1, fn, "gradient_accumulation_steps is ",
            o.gradient_accumulation_steps, ", expected >= 1");
    require(o.max_train_steps >= 1, fn, "max_train_steps is ", o.max_train_steps,
            ", expected >= 1");
    require(!std::isnan(o.max_grad_norm), fn, "max_grad_norm is NaN");
    require(o.checkpointing_steps >= 0, fn, "checkpointing_steps is ", o.checkpointing_steps,
            ", expected >= 0");
    require(!o.checkpoints_total_limit || *o.checkpoints_total_limit >= 1, fn,
            "checkpoints_total_limit is ", o.checkpoints_total_limit.value_or(0),
            ", expected >= 1");
    double lr = o.learning_rate;
    if (by_name) {
      if (o.scale_lr) lr = train::scale_lr(lr, o.gradient_accumulation_steps, o.train_batch_size);
      require(std::isfinite(lr) && lr >= 0, fn, "learning_rate is ", lr,
              ", expected a finite value >= 0");
    }

    trainable_ = named_trainable_parameters(model_);
    for (const auto& [name, p] : trainable_) params_.push_back(p);
    require(!params_.empty(), fn, "the model has no trainable parameters");

    if constexpr (std::same_as<OptimizerT, AnyOptimizer>)
      if (by_name) optimizer_ = optimizer_by_name(lr);
    if (!by_name) lr = first_group_lr();
    base_lr_ = lr;
    LrScheduleOptions so;
    so.num_warmup_steps = o.lr_warmup_steps;
    so.num_training_steps = o.max_train_steps;
    so.num_cycles = o.lr_num_cycles;
    so.power = o.lr_power;
    so.lr_end = o.lr_end;
    so.lr_init = lr > 0 ? lr : 1.0;
    schedule_ = get_scheduler(o.lr_scheduler, so);
    if (o.use_ema) ema_.emplace(trainable_, o.ema);
  }

  // TrainerOptions::optimizer over groups of the trainable parameters with learning rate `lr`.
  AnyOptimizer optimizer_by_name(double lr) {
    const TrainerOptions& o = options_;
    ParamGroup hyper;
    hyper.lr = lr;
    const bool sgd = parse_optimizer_name(o.optimizer).name == Sgd::kName;
    hyper.weight_decay = sgd ? o.sgd_weight_decay : o.adam_weight_decay;
    hyper.betas = {o.adam_beta1, o.adam_beta2};
    hyper.eps = o.adam_epsilon;
    hyper.momentum = o.sgd_momentum;
    hyper.nesterov = o.sgd_nesterov;
    std::vector<PrefixLr> prefix_lrs;
    if (o.text_encoder_lr) {
      double te_lr = *o.text_encoder_lr;
      if (o.scale_lr)
        te_lr = train::scale_lr(te_lr, o.gradient_accumulation_steps, o.train_batch_size);
      prefix_lrs.push_back({"text_encoder.", te_lr});
    }
    return make_optimizer(o.optimizer,
                          make_param_groups(model_, hyper, o.loraplus_lr_ratio, prefix_lrs), hyper,
                          o.optimizer_args);
  }

  void zero_grad() {
    for (const ParameterRef& p : params_) p.zero_grad();
  }

  // Micro-batches of the next optimizer step: gradient_accumulation_steps, or what is left of
  // the epoch.
  std::int64_t group_size() const {
    const std::int64_t accum = options_.gradient_accumulation_steps,
                       per_epoch = options_.micro_batches_per_epoch;
    if (per_epoch <= 0) return accum;
    const auto left = per_epoch - std::int64_t(micro_batch_index_ % std::uint64_t(per_epoch));
    return std::min(accum, left);
  }

  double first_group_lr() const {
    const auto& groups = optimizer_.param_groups();  // a reference or a temporary kept alive
    require(std::begin(groups) != std::end(groups), "Trainer",
            "the optimizer has no parameter groups, expected at least one");
    return double((*std::begin(groups)).lr);
  }

  StepT& step_;
  ModelT& model_;
  TrainerOptions options_;
  double base_lr_ = 0;
  std::vector<NamedParameter> trainable_;
  std::vector<ParameterRef> params_;
  OptimizerT optimizer_;
  LrSchedule schedule_;
  std::optional<EmaModel> ema_;
  std::int64_t global_step_ = 0, scheduler_step_ = 0, skipped_steps_ = 0;
  std::uint64_t micro_batch_index_ = 0;
  CheckpointHooks hooks_;
  CheckpointLog log_;
  Collective* collective_ = nullptr;
  std::vector<float> bucket_;  // allreduce_sum_gradients' buffer, kept across steps
};

}  // namespace difftrain::train
