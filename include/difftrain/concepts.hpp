#pragma once
// The C++20 concepts of difftrain, all in this header: those that compose a training step (any
// type satisfying them plugs into DiffusionTrainStep: the reference models are one choice, a
// user's own GPU UNet wrapper, an identity encoder or a custom weighting are others), the
// sampler's scheduler, and nn::Module, lora::HasLoraSlots and train::TrainDataSource (with the
// micro-batch type it yields). Static polymorphism, no virtual calls.

#include <concepts>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "difftrain/core/prediction_type.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/core/tensor.hpp"

namespace difftrain {

/// Token ids [B, L] (int64, as transformers' tokenizers return them).
using TokenIds = Tensor<std::int64_t, 2>;

/// What a training schedule gives for one sampled training time: x_t = x0_coef·x0 + eps_coef·eps,
/// target = target_x0_coef·x0 + target_eps_coef·eps, the timestep the denoiser is given and the
/// SNR for loss weightings. DDPM: (√ᾱ_t, √(1 − ᾱ_t)), its eps / v / x0 target, t, ᾱ_t/(1 − ᾱ_t);
/// flow matching: (1 − σ, σ), eps − x0, σ·T, ((1 − σ)/σ)².
struct TrainingCoefficients {
  double x0_coef = 0, eps_coef = 0;
  double target_x0_coef = 0, target_eps_coef = 0;
  double model_timestep = 0;
  double snr = 0;
};

/// A schedule on the training side: its training times are values of `time_type` (an integer
/// timestep for DDPM, σ for flow matching) that a TimestepSamplerOf<time_type> draws, and
/// `training_coefficients(time)` defines the step at each. Admits DdpmScheduler and
/// FlowMatchEulerDiscreteScheduler; a user's own schedule needs these three members.
template <class S>
concept TrainingSchedule = requires(const S& s, const typename S::time_type& time) {
  { s.num_train_timesteps() } -> std::convertible_to<std::int64_t>;
  { s.training_coefficients(time) } -> std::same_as<TrainingCoefficients>;
};

/// A DDPM noise schedule: T discrete timesteps t ∈ [0, T), with sqrt(ᾱ_t), sqrt(1 − ᾱ_t) and
/// SNR(t) = ᾱ_t / (1 − ᾱ_t), and the prediction type (eps / v / x0) the model is trained for.
/// Admits DdpmScheduler.
template <class S>
concept Scheduler = TrainingSchedule<S> && requires(const S& s, std::int64_t t) {
  { s.sqrt_alpha_prod(t) } -> std::convertible_to<double>;
  { s.sqrt_one_minus_alpha_prod(t) } -> std::convertible_to<double>;
  { s.snr(t) } -> std::convertible_to<double>;
  { s.prediction_type() } -> std::same_as<PredictionType>;
};

/// A denoiser taking float timesteps (fractional ones: σ·1000 for flow matching), as diffusers'
/// models take float32 timesteps.
template <class D>
concept FloatTimestepDenoiser = requires(D& d, const Tensor4<float>& x_t, std::span<const float> t,
                                         const Tensor3<float>& context,
                                         const Tensor4<float>& grad_pred) {
  { d.forward(x_t, t, context) } -> std::convertible_to<Tensor4<float>>;
  d.backward(grad_pred);
};

/// diffusers' `added_cond_kwargs` of SDXL's UNet (addition_embed_type "text_time"): the pooled,
/// projected text embedding [B, P] and the micro-conditioning time ids [B, K] (SDXL: K = 6,
/// original height and width, crop top and left, target height and width, in pixels). The ids
/// are float32 whatever T is: their sinusoids are computed in float32, as diffusers does.
template <class T = float>
struct AddedConditions {
  Tensor<T, 2> text_embeds;
  Tensor<float, 2> time_ids;
};

/// A denoiser that also takes SDXL's added conditions: forward(x_t, t, context, added) and, after
/// backward, grad_text_embeds() (to train the encoder giving text_embeds).
template <class D>
concept DenoiserWithAddedConditions = requires(D& d, const Tensor4<float>& x_t,
                                               std::span<const float> t,
                                               const Tensor3<float>& context,
                                               const AddedConditions<float>& added) {
  { d.forward(x_t, t, context, added) } -> std::convertible_to<Tensor4<float>>;
  { d.uses_added_conditions() } -> std::convertible_to<bool>;
};

/// A denoiser taking integer timesteps (DDPM's t ∈ [0, T)).
template <class D>
concept IntegerTimestepDenoiser = requires(D& d, const Tensor4<float>& x_t,
                                           std::span<const std::int64_t> t,
                                           const Tensor3<float>& context,
                                           const Tensor4<float>& grad_pred) {
  { d.forward(x_t, t, context) } -> std::convertible_to<Tensor4<float>>;
  d.backward(grad_pred);
};

/// A trainable network predicting the training target from (x_t [B,C,H,W], timesteps [B],
/// context [B,L,D]), with float or integer timesteps (integer-only ones train DDPM schedules).
/// `backward(dL/dpred)` accumulates gradients into its trainable parameters (and keeps what it
/// needs from the last forward). Admits the reference UNet and any user wrapper.
template <class D>
concept Denoiser = FloatTimestepDenoiser<D> || IntegerTimestepDenoiser<D>;

/// A frozen map from In to Out: `encode(in)`. Declares `input_type` and `output_type`, which
/// must be exactly In and Out (xtensor converts between tensor types implicitly, so
/// convertibility alone would admit an image encoder as a text encoder).
template <class E, class In, class Out>
concept EncoderOf = requires(E& e, const In& in) {
  requires std::same_as<typename E::input_type, In>;
  requires std::same_as<typename E::output_type, Out>;
  { e.encode(in) } -> std::convertible_to<Out>;
};

/// Any frozen encoder declaring its input and output types.
template <class E>
concept Encoder = requires {
  typename E::input_type;
  typename E::output_type;
}
&&EncoderOf<E, typename E::input_type, typename E::output_type>;

/// Images [B,3,H,W] in [-1, 1] (or pixels for pixel-space diffusion) → latents x0 [B,C,h,w],
/// already multiplied by the VAE scaling factor. Admits the VAE encoder and IdentityEncoder.
template <class E>
concept LatentEncoder = EncoderOf<E, Tensor4<float>, Tensor4<float>>;

/// Token ids [B,L] → context [B,L,D]. Admits the CLIP text encoder and fixed embeddings.
template <class E>
concept TextEncoder = EncoderOf<E, TokenIds, Tensor3<float>>;

/// A TextEncoder that can also be trained: encode_train(ids) saves what backward(dL/dcontext)
/// needs to accumulate its parameter gradients; is_training() says whether it has trainable
/// parameters now (a step calls encode() alone otherwise, at frozen speed).
template <class E>
concept TrainableTextEncoder = TextEncoder<E> &&
    requires(E& e, const TokenIds& ids, const Tensor3<float>& grad_context) {
  { e.encode_train(ids) } -> std::convertible_to<Tensor3<float>>;
  e.backward(grad_context);
  { e.is_training() } -> std::convertible_to<bool>;
};

/// A TextEncoder that also gives a pooled embedding [B,P] of its last encode / encode_train
/// (SDXL's text_embeds): a step hands it to a DenoiserWithAddedConditions with the batch's
/// time_ids. If trainable, backward(dL/dcontext, dL/dpooled) takes both gradients.
template <class E>
concept PooledTextEncoder = TextEncoder<E> && requires(const E& e) {
  { e.pooled_prompt_embeds() } -> std::convertible_to<Tensor<float, 2>>;
};

/// A Denoiser that gives dL/dcontext of its last backward (to train the text encoder).
template <class D>
concept DenoiserWithContextGrad = Denoiser<D> && requires(const D& d) {
  { d.grad_encoder_hidden_states() } -> std::convertible_to<Tensor3<float>>;
};

/// Per-sample loss weight w(SNR(t), prediction type), multiplied into that sample's mean
/// loss. Must be finite for every SNR in [0, ∞) (zero terminal SNR gives SNR = 0). A weighting
/// may instead (or also) define weight(const TrainingCoefficients&): the step prefers it, and a
/// schedule without a prediction type (flow matching) needs it.
template <class W>
concept LossWeighting = requires(const W& w, double snr, PredictionType type) {
  { w.weight(snr, type) } -> std::convertible_to<double>;
}
|| requires(const W& w, const TrainingCoefficients& c) {
  { w.weight(c) } -> std::convertible_to<double>;
};

/// Fills one training time of type Time per sample from a random stream: `sample(out, stream)`;
/// deterministic in the stream. A sampler may also take the latent height and width
/// (`sample(out, stream, h, w)`: resolution-dependent shifts), which the step then uses.
template <class S, class Time>
concept TimestepSamplerOf = requires(const S& s, std::span<Time> out, RandomStream rs) {
  s.sample(out, rs);
};

/// A sampler of integer timesteps (DDPM).
template <class S>
concept TimestepSampler = TimestepSamplerOf<S, std::int64_t>;

/// Draws the training noise eps [B,C,H,W] for latents x0 (same shape) from a random stream:
/// `sample(noise, x0, stream)`. x0 is given for schemes that adapt to it.
template <class N>
concept NoiseSampler = requires(const N& n, Tensor4<float>& noise, const Tensor4<float>& x0,
                                RandomStream rs) {
  n.sample(noise, x0, rs);
};

/// A sampler's scheduler: set_timesteps(n), then for t in timesteps() scale the model input,
/// run the model and step x in place. Admits DdimScheduler and EulerDiscreteScheduler.
template <class S>
concept SamplingScheduler = requires(S& s, const S& cs, std::int64_t t, Tensor4<float>& x,
                                     const Tensor4<float>& out) {
  s.set_timesteps(t);
  { cs.timesteps() } -> std::convertible_to<std::span<const std::int64_t>>;
  { cs.init_noise_sigma() } -> std::convertible_to<double>;
  cs.scale_model_input(x, t);
  cs.step(out, t, x);
};

}  // namespace difftrain

namespace difftrain::nn {

/// A type that names its parameters: for_each_parameter(prefix, visitor) with
/// visitor(std::string name, Parameter<T>&) and a const overload.
template <class M>
concept Module = requires(M& m) {
  m.for_each_parameter(std::string{}, [](const std::string&, auto&) {});
};

}  // namespace difftrain::nn

namespace difftrain::lora {

/// A model whose adaptable layers are visited by for_each_slot(prefix, visitor).
template <class M>
concept HasLoraSlots = requires(M& m) {
  m.for_each_slot(std::string{}, [](const std::string&, auto&) {});
};

}  // namespace difftrain::lora

namespace difftrain::train {

/// One micro-batch. With prior preservation, class_images / class_token_ids hold the class
/// examples (appended after the instance ones). sample_weights (optional) and mask (optional)
/// cover all rows, instance then class.
struct TrainBatch {
  Tensor4<float> images;
  TokenIds token_ids;
  Tensor4<float> class_images;
  TokenIds class_token_ids;
  std::vector<float> sample_weights;
  std::optional<Tensor4<float>> mask;
  // SDXL's size conditioning (models::sdxl_time_ids) [B,6] of the rows, and of the class rows.
  std::optional<Tensor<float, 2>> time_ids, class_time_ids;
  // Data-parallel shard (a sharded data source, dist/): the micro-batch of all processes has
  // global_batch_size instance rows (and as many class rows); these rows are its rows
  // global_rows[i] (class row i pairs with instance row i). Empty: the batch is the whole
  // micro-batch. A shard may have no rows (a short last micro-batch of an epoch).
  std::vector<std::uint64_t> global_rows;
  std::size_t global_batch_size = 0;
};

/// A source of micro-batches: data(m) is micro-batch m, a function of m only (resume relies on it).
template <class D>
concept TrainDataSource = requires(D& d, std::uint64_t m) {
  { d(m) } -> std::convertible_to<TrainBatch>;
};

}  // namespace difftrain::train
