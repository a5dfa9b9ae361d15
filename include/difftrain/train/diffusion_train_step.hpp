#pragma once
// DiffusionTrainStep: one training step of a latent diffusion model, composed from concepts.
//
//   x0     = LatentEncoder(images)                 (or given latents)
//   ctx    = TextEncoder(token ids)                (or given context; empty with NoTextEncoder)
//   τ[b]   ~ TimestepSamplerOf<time_type>          (DDPM: integer t; flow matching: σ)
//   (a, s, ce, cx, t_model, SNR) = TrainingSchedule.training_coefficients(τ[b])
//   eps    = NoiseSampler (fused with the next two lines for StandardNoise without pyramid noise)
//   x_t    = a·x0 + s·(eps + γ·ξ)                  (DDPM: a = sqrt(ᾱ_t), s = sqrt(1−ᾱ_t);
//                                                   flow: a = 1 − σ, s = σ)
//   target = ce·eps + cx·x0                        (eps | v = a·eps − s·x0 | x0 | flow: eps − x0)
//   pred   = Denoiser.forward(x_t, t_model, ctx)   (t_model: t, or σ·T as float; SDXL: also the
//                                                   batch's text_embeds and time_ids)
//   L      = mean_b w_b·mean_chw ℓ(pred − target),  w_b = LossWeighting · sample_weight_b
//   Denoiser.backward(dL/dpred)
//   TextEncoder.backward(dL/dctx)                 (a TrainableTextEncoder being trained)
//
// Randomness: every draw of step s comes from RandomStream{seed}.derive(s, purpose), so a step
// depends only on (seed, s, inputs) — a resumed run repeats the uninterrupted one. A denoiser with
// LoRA adapters draws its dropout masks for step s (lora::set_lora_step): fresh ones each
// micro-batch, as kohya draws them each forward, and the same again on resume.
//
// Data parallelism (BatchExtras::global_rows): N processes each run the step on a shard of the
// micro-batch, and the shards' gradients summed equal the one-process step's (sample weights
// scaled by n_shard/n so that each shard's loss is its part of the global mean). Row b of a shard
// draws the random numbers of row global_rows[b] of the one-process batch:
//   τ[b]      = value global_rows[b] of the timestep sampler's draw (samplers are index-pure:
//               value k depends only on (stream, k) — UniformTimesteps, BiasedTimesteps,
//               ConfiguredTimesteps, FlowMatchTimesteps all draw element k of the stream for
//               sample k; a custom sampler must too)
//   eps, ξ    = normal numbers global_rows[b]·C·H·W + i (fused pass), offsets global_rows[b]·C + c
//   LoRA      = dropout / network_dropout / rank_dropout masks of that row (lora::set_lora_step
//               with the rows, denoiser and a trained text encoder); module dropout: per step
//   latents   = LatentEncoder::encode(images, global_rows) when the encoder has that overload
//               (models::VaeEncoder); an encoder without it is used as is — it must then be
//               deterministic (precomputed latents) or row-pure on its own
// Pyramid noise (normalised over the whole batch) and custom NoiseSamplers (which see no rows)
// cannot be sharded: with global_rows they throw difftrain::Error. Per-step scalars (noise-offset
// and input-perturbation random strengths) are the same in every shard.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

#include "difftrain/concepts.hpp"
#include "difftrain/kernels/forward_diffusion.hpp"
#include "difftrain/kernels/loss.hpp"
#include "difftrain/kernels/noise.hpp"
#include "difftrain/lora/inject.hpp"
#include "difftrain/loss/huber_schedule.hpp"
#include "difftrain/loss/weighting.hpp"
#include "difftrain/schedule/timestep_sampler.hpp"
#include "difftrain/train/identity_encoder.hpp"

namespace difftrain {

struct TrainStepOptions {
  // Overrides the scheduler's (diffusers flag); only for schedules with a prediction type (DDPM).
  std::optional<PredictionType> prediction_type;
  kernels::NoiseOptions noise;  // also configures StandardNoise; γ applies to any NoiseSampler
  kernels::LossType loss_type = kernels::LossType::l2;
  loss::HuberOptions huber;  // for huber / smooth_l1
  std::uint64_t seed = 0;
  // diffusers --gradient_checkpointing: the step turns it on in a denoiser that has
  // set_gradient_checkpointing (UNet2DConditionModel); bitwise the same gradients, less memory.
  bool gradient_checkpointing = false;
};

/// Per-batch extras: per-sample weights (DreamBooth prior preservation: λ on class images, kohya's
/// prior_loss_weight), a loss mask ([B,1,H,W] or [B,C,H,W] at latent resolution) and SDXL's
/// added conditions (pooled text_embeds [B,P], time_ids [B,6]) for a DenoiserWithAddedConditions.
/// With a PooledTextEncoder, time_ids alone are given: the step pairs them with its pooled output.
struct BatchExtras {
  std::vector<float> sample_weights;  // [B] or empty (all 1)
  const Tensor4<float>* mask = nullptr;
  const AddedConditions<float>* added_conditions = nullptr;
  const Tensor<float, 2>* time_ids = nullptr;
  // Data parallelism: row b of this batch is row global_rows[b] of the micro-batch all processes
  // share, and draws that row's random numbers (timestep, noise, noise offset, perturbation,
  // LoRA dropout masks, VAE sampling), so that shards together repeat the one-process step.
  // Empty: rows 0..B−1.
  std::span<const std::uint64_t> global_rows;
};

struct TrainStepResult {
  double loss = 0;
  std::vector<double> per_sample_loss;  // mean_chw ℓ per sample, before weights
  std::vector<double> weights;          // w_b
  std::vector<double> timesteps;        // the denoiser's timestep of each sample: t_b, or σ_b·T
};

/// A schedule with a DDPM prediction type (eps / v / x0) that TrainStepOptions may override.
template <class S>
concept HasPredictionType = requires(const S& s) {
  { s.prediction_type() } -> std::same_as<PredictionType>;
};

template <TrainingSchedule SchedulerT, Denoiser DenoiserT, LatentEncoder LatentEncoderT,
          TextEncoder TextEncoderT, LossWeighting WeightingT = loss::Uniform,
          class SamplerT = UniformTimesteps, NoiseSampler NoiseT = kernels::StandardNoise>
requires TimestepSamplerOf<SamplerT, typename SchedulerT::time_type>
class DiffusionTrainStep {
 public:
  using time_type = typename SchedulerT::time_type;
  static_assert(FloatTimestepDenoiser<DenoiserT> || std::integral<time_type>,
                "DiffusionTrainStep: the schedule's training times are not integers (flow "
                "matching's model timesteps are σ·T), so the denoiser needs a forward(x_t, "
                "std::span<const float> timesteps, context) overload");
  static_assert(
      requires(const WeightingT& w, const TrainingCoefficients& c) { w.weight(c); } ||
          HasPredictionType<SchedulerT>,
      "DiffusionTrainStep: the weighting only has weight(snr, prediction_type), and the "
      "schedule has no prediction type (flow matching): use a weighting with "
      "weight(const TrainingCoefficients&), e.g. FlowMatchLossWeighting or loss::Uniform");

  /// The denoiser and the encoders are held by reference (the caller owns the models and their
  /// optimizer); the scheduler, weighting and samplers by value. Timesteps uniform on [0, T).
  DiffusionTrainStep(SchedulerT scheduler, DenoiserT& denoiser, LatentEncoderT& latent_encoder,
                     TextEncoderT& text_encoder, WeightingT weighting = {},
                     TrainStepOptions options = {})
      : DiffusionTrainStep(scheduler, denoiser, latent_encoder, text_encoder, std::move(weighting),
                           std::move(options), default_sampler(scheduler.num_train_timesteps())) {}

  /// The same with a given timestep sampler and noise sampler.
  DiffusionTrainStep(SchedulerT scheduler, DenoiserT& denoiser, LatentEncoderT& latent_encoder,
                     TextEncoderT& text_encoder, WeightingT weighting, TrainStepOptions options,
                     SamplerT timestep_sampler, NoiseT noise_sampler = {})
      : scheduler_(std::move(scheduler)),
        denoiser_(denoiser),
        latent_encoder_(latent_encoder),
        text_encoder_(text_encoder),
        weighting_(std::move(weighting)),
        sampler_(std::move(timestep_sampler)),
        noise_(std::move(noise_sampler)),
        options_(std::move(options)) {
    options_.noise.validate();
    // StandardNoise takes its options from TrainStepOptions::noise (one source of truth).
    if constexpr (std::is_same_v<NoiseT, kernels::StandardNoise>) noise_.options = options_.noise;
    if (kernels::uses_huber_c(options_.loss_type)) options_.huber.validate();
    if constexpr (!HasPredictionType<SchedulerT>)
      require(!options_.prediction_type, "DiffusionTrainStep", "prediction_type is ",
              to_string(options_.prediction_type.value_or(PredictionType::epsilon)),
              ", but the schedule has no prediction type (flow matching trains eps − x0)");
    if constexpr (requires { denoiser_.set_gradient_checkpointing(true); }) {
      if (options_.gradient_checkpointing) denoiser_.set_gradient_checkpointing(true);
    } else {
      require(!options_.gradient_checkpointing, "DiffusionTrainStep",
              "gradient_checkpointing is on, but the denoiser has no set_gradient_checkpointing");
    }
  }

  /// Encodes images and token ids, then runs the step. A TrainableTextEncoder with trainable
  /// parameters (is_training()) is run with encode_train and, after the denoiser's backward,
  /// given dL/dcontext: its gradients accumulate with the denoiser's.
  TrainStepResult step(const Tensor4<float>& images, const TokenIds& token_ids,
                       std::uint64_t step_index, const BatchExtras& extras = {}) {
    check_global_rows(extras.global_rows, images.shape()[0]);
    const Tensor4<float> latents = encode_latents(images, extras.global_rows);
    if constexpr (TrainableTextEncoder<TextEncoderT>) {
      if constexpr (!DenoiserWithContextGrad<DenoiserT>) {
        require(!text_encoder_.is_training(), "DiffusionTrainStep::step",
                "the text encoder has trainable parameters, but the denoiser gives no "
                "grad_encoder_hidden_states() to train it with");
      } else if (text_encoder_.is_training()) {
        if constexpr (lora::HasLoraSlots<TextEncoderT>)
          lora::set_lora_step(text_encoder_, step_index, extras.global_rows);
        const Tensor3<float> context = text_encoder_.encode_train(token_ids);
        AddedConditions<float> added;
        TrainStepResult result =
            step_latents(latents, context, step_index, with_pooled(extras, added));
        if constexpr (PooledTextEncoder<TextEncoderT> && DenoiserWithAddedConditions<DenoiserT>) {
          text_encoder_.backward(denoiser_.grad_encoder_hidden_states(),
                                 denoiser_.grad_text_embeds());
        } else {
          text_encoder_.backward(denoiser_.grad_encoder_hidden_states());
        }
        return result;
      }
    }
    if constexpr (std::is_same_v<TextEncoderT, NoTextEncoder>) {
      const Tensor3<float> none(std::array<std::size_t, 3>{latents.shape()[0], 0, 0});
      return step_latents(latents, none, step_index, extras);
    } else {
      const Tensor3<float> context = text_encoder_.encode(token_ids);
      AddedConditions<float> added;
      return step_latents(latents, context, step_index, with_pooled(extras, added));
    }
  }

  /// The step from precomputed latents x0 [B,C,H,W] and context [B,L,D].
  TrainStepResult step_latents(const Tensor4<float>& x0, const Tensor3<float>& context,
                               std::uint64_t step_index, const BatchExtras& extras = {}) {
    constexpr const char* fn = "DiffusionTrainStep::step";
    const std::size_t batch = x0.shape()[0];
    require(batch > 0, fn, "latents have shape ", shape_string(x0.shape()),
            ", expected a batch of at least one sample");
    require(context.shape()[0] == batch, fn, "context has shape ", shape_string(context.shape()),
            ", expected batch ", batch, " as the latents ", shape_string(x0.shape()));
    require(extras.sample_weights.empty() || extras.sample_weights.size() == batch, fn,
            "sample_weights has ", extras.sample_weights.size(), " entries, expected ", batch);
    const std::span<const std::uint64_t> rows = extras.global_rows;
    check_global_rows(rows, batch);
    const RandomStream step_stream =
        RandomStream{options_.seed, 0}.derive(step_index, StreamPurpose::train_step);

    const std::vector<time_type> times =
        sample_times(step_stream.derive(0, StreamPurpose::step_timesteps), x0, rows);
    const std::int64_t T = scheduler_.num_train_timesteps();
    TrainStepResult result;
    std::vector<TrainingCoefficients> coefficients(batch);
    std::vector<float> huber_c(batch), weights(batch);
    result.timesteps.resize(batch);
    result.weights.resize(batch);
    for (std::size_t b = 0; b < batch; ++b) {
      const time_type t = times[b];
      if constexpr (std::integral<time_type>)
        require(0 <= t && t < T, fn, "timestep sampler gave t = ", t, ", expected [0, ", T, ")");
      TrainingCoefficients& c = coefficients[b] = scheduler_.training_coefficients(t);
      if (options_.prediction_type) {
        const TargetCoefficients target =
            prediction_target(*options_.prediction_type, c.x0_coef, c.eps_coef);
        c.target_eps_coef = target.eps;
        c.target_x0_coef = target.x0;
      }
      result.timesteps[b] = c.model_timestep;
      double w = weight(c);
      if (!extras.sample_weights.empty()) w *= extras.sample_weights[b];
      require(std::isfinite(w), fn, "loss weight of sample ", b, " (t = ", c.model_timestep,
              ") is ", w, ", expected a finite value");
      result.weights[b] = w;
      weights[b] = static_cast<float>(w);
      if (kernels::uses_huber_c(options_.loss_type))
        huber_c[b] = static_cast<float>(loss::huber_c(options_.huber, T, c));
    }

    const kernels::DiffusionCoefficients k(coefficients);
    const RandomStream noise_stream = step_stream.derive(0, StreamPurpose::step_noise);
    make_noisy_input(x0, k, noise_stream, rows);

    if constexpr (lora::HasLoraSlots<DenoiserT>) lora::set_lora_step(denoiser_, step_index, rows);
    const Tensor4<float> pred = forward(context, result.timesteps, extras.added_conditions);
    check_same_shape(fn, "prediction", pred.shape(), x0.shape());
    const std::span<const float> c = kernels::uses_huber_c(options_.loss_type)
                                         ? std::span<const float>(huber_c)
                                         : std::span<const float>();
    const kernels::LossResult l =
        kernels::loss_and_grad(pred, target_, options_.loss_type, weights, c, extras.mask, &grad_);
    if (!std::isfinite(l.loss)) {
      throw NonFiniteLoss(message(fn, ": loss is ", l.loss, " at step ", step_index,
                                  " (the prediction holds NaN or Inf)"));
    }
    denoiser_.backward(grad_);
    result.loss = l.loss;
    result.per_sample_loss = l.per_sample;
    return result;
  }

  /// The prediction type trained (DDPM schedules).
  PredictionType prediction_type() const requires HasPredictionType<SchedulerT> {
    return options_.prediction_type.value_or(scheduler_.prediction_type());
  }
  const SchedulerT& scheduler() const { return scheduler_; }
  const TrainStepOptions& options() const { return options_; }
  /// The last step's model input and target (for inspection and tests).
  const Tensor4<float>& noisy_latents() const { return x_t_; }
  const Tensor4<float>& target() const { return target_; }

 private:
  static SamplerT default_sampler(std::int64_t T) {
    if constexpr (std::is_constructible_v<SamplerT, std::int64_t>) {
      return SamplerT(T);
    } else {
      return SamplerT{};
    }
  }

  // global_rows: empty, or one distinct global row per sample of the batch.
  static void check_global_rows(std::span<const std::uint64_t> rows, std::size_t batch) {
    constexpr const char* fn = "DiffusionTrainStep::step";
    if (rows.empty()) return;
    require(rows.size() == batch, fn, "global_rows has ", rows.size(), " entries, expected ", batch,
            " (one per sample of the batch) or 0");
    std::vector<std::uint64_t> sorted(rows.begin(), rows.end());
    std::sort(sorted.begin(), sorted.end());
    const auto twin = std::adjacent_find(sorted.begin(), sorted.end());
    require(twin == sorted.end(), fn, "global_rows holds row ", twin == sorted.end() ? 0 : *twin,
            " twice, expected distinct rows");
  }

  // x0 = LatentEncoder(images), with the shard's rows when the encoder takes them.
  Tensor4<float> encode_latents(const Tensor4<float>& images, std::span<const std::uint64_t> rows) {
    if constexpr (requires { latent_encoder_.encode(images, rows); }) {
      if (!rows.empty()) return latent_encoder_.encode(images, rows);
    }
    return latent_encoder_.encode(images);
  }

  // τ[b] = value rows[b] (or b) of the sampler's draw: it draws max(rows) + 1 values.
  std::vector<time_type> sample_times(RandomStream time_stream, const Tensor4<float>& x0,
                                      std::span<const std::uint64_t> rows) const {
    const std::size_t batch = x0.shape()[0];
    const std::size_t count =
        rows.empty() ? batch
                     : static_cast<std::size_t>(*std::max_element(rows.begin(), rows.end())) + 1;
    std::vector<time_type> drawn(count);
    if constexpr (requires { sampler_.sample(std::span<time_type>(drawn), time_stream, 0, 0); }) {
      sampler_.sample(std::span<time_type>(drawn), time_stream,
                      static_cast<std::int64_t>(x0.shape()[2]),
                      static_cast<std::int64_t>(x0.shape()[3]));
    } else {
      sampler_.sample(std::span<time_type>(drawn), time_stream);
    }
    if (rows.empty()) return drawn;
    std::vector<time_type> times(batch);
    for (std::size_t b = 0; b < batch; ++b) times[b] = drawn[rows[b]];
    return times;
  }

  // With a PooledTextEncoder: extras whose added conditions are its pooled output and the
  // batch's time_ids (kept in `added`); otherwise the extras as given.
  BatchExtras with_pooled(const BatchExtras& extras, AddedConditions<float>& added) const {
    if constexpr (PooledTextEncoder<TextEncoderT>) {
      require(extras.time_ids != nullptr && extras.added_conditions == nullptr,
              "DiffusionTrainStep::step",
              extras.time_ids ? "the batch gives added_conditions, but the text encoder gives "
                                "the pooled embeddings: give time_ids alone"
                              : "the text encoder gives pooled embeddings (SDXL), but the batch "
                                "has no time_ids (original size, crop, target size)");
      added.text_embeds = text_encoder_.pooled_prompt_embeds();
      added.time_ids = *extras.time_ids;
      BatchExtras out = extras;
      out.added_conditions = &added;
      out.time_ids = nullptr;
      return out;
    } else {
      require(extras.time_ids == nullptr, "DiffusionTrainStep::step",
              "the batch has time_ids, but the text encoder gives no pooled embeddings to go "
              "with them (not an SDXL text encoder)");
      (void)added;
      return extras;
    }
  }

  // w_b: weight(c) when the weighting has it, else weight(SNR, prediction type).
  double weight(const TrainingCoefficients& c) const {
    if constexpr (requires { weighting_.weight(c); }) {
      return weighting_.weight(c);
    } else {
      return weighting_.weight(c.snr, prediction_type());
    }
  }

  // The denoiser's forward with float timesteps when it takes them, else integer ones; with the
  // added conditions when the batch has them.
  Tensor4<float> forward(const Tensor3<float>& context, std::span<const double> timesteps,
                         const AddedConditions<float>* added) {
    if (added) {
      if constexpr (DenoiserWithAddedConditions<DenoiserT>) {
        const std::vector<float> t(timesteps.begin(), timesteps.end());
        return denoiser_.forward(x_t_, std::span<const float>(t), context, *added);
      } else {
        fail("DiffusionTrainStep::step",
             "the batch has added conditions (text_embeds, time_ids), but the denoiser takes "
             "none (no forward(x_t, t, context, AddedConditions))");
      }
    }
    if constexpr (FloatTimestepDenoiser<DenoiserT>) {
      const std::vector<float> t(timesteps.begin(), timesteps.end());
      return denoiser_.forward(x_t_, std::span<const float>(t), context);
    } else {
      std::vector<std::int64_t> t(timesteps.size());
      for (std::size_t b = 0; b < t.size(); ++b) {
        t[b] = static_cast<std::int64_t>(timesteps[b]);
        require(static_cast<double>(t[b]) == timesteps[b], "DiffusionTrainStep::step",
                "the denoiser takes integer timesteps, but sample ", b, "'s is ", timesteps[b]);
      }
      return denoiser_.forward(x_t_, std::span<const std::int64_t>(t), context);
    }
  }

  // x_t_ and target_: fused with the noise draw for StandardNoise without pyramid noise; the
  // shard's rows draw their numbers of the whole batch (global_rows, see the top).
  void make_noisy_input(const Tensor4<float>& x0, const kernels::DiffusionCoefficients& k,
                        RandomStream noise_stream, std::span<const std::uint64_t> rows) {
    constexpr const char* fn = "DiffusionTrainStep::step";
    const kernels::NoiseOptions& noise_options = options_.noise;
    const float gamma = kernels::input_perturbation_strength(noise_options, noise_stream);
    const RandomStream xi_stream = noise_stream.derive(0, StreamPurpose::noise_perturbation);
    constexpr bool standard = std::is_same_v<NoiseT, kernels::StandardNoise>;
    if (standard && noise_options.multires_noise_iterations == 0) {
      const std::vector<float> offset =
          kernels::noise_offsets(noise_options, x0, noise_stream, rows);
      const kernels::FusedNoise fused{noise_stream.derive(0, StreamPurpose::noise), offset, gamma,
                                      xi_stream};
      kernels::fused_noise_forward_target(x0, k, fused, x_t_, target_, nullptr, rows);
      return;
    }
    // A shard cannot repeat noise normalised over the whole batch, nor a sampler that sees no
    // rows; even rows 0..B−1 may be a prefix of a larger batch, so any global_rows is refused.
    if constexpr (standard) {
      require(rows.empty(), fn,
              "multires_noise_iterations with data-parallel shards: pyramid "
              "noise is normalised over the whole batch, which a shard (global_rows given) does "
              "not hold; use multires_noise_iterations = 0 or one process");
    } else {
      require(rows.empty(), fn,
              "a custom NoiseSampler with data-parallel shards: it draws for "
              "the shard's rows 0..B−1, not for its global_rows; use StandardNoise or one "
              "process");
    }
    noise_.sample(eps_, x0, noise_stream);
    check_same_shape(fn, "noise", eps_.shape(), x0.shape());
    const Tensor4<float>* perturbation = nullptr;
    if (gamma != 0) {
      xi_.resize(x0.shape());
      fill_normal(std::span<float>(xi_.data(), xi_.size()), xi_stream);
      xi_ *= gamma;
      perturbation = &xi_;
    }
    kernels::forward_target(x0, eps_, k, x_t_, target_, perturbation);
  }

  SchedulerT scheduler_;
  DenoiserT& denoiser_;
  LatentEncoderT& latent_encoder_;
  TextEncoderT& text_encoder_;
  WeightingT weighting_;
  SamplerT sampler_;
  NoiseT noise_;
  TrainStepOptions options_;
  Tensor4<float> x_t_, target_, grad_, eps_, xi_;  // workspace reused across steps
};

}  // namespace difftrain
