// static_assert tests of types that do and do not satisfy each concept.
#include <catch2/catch.hpp>

#include "difftrain/concepts.hpp"

using namespace difftrain;

namespace {
struct ToySchedule {
  using time_type = std::int64_t;
  std::int64_t num_train_timesteps() const { return 10; }
  TrainingCoefficients training_coefficients(std::int64_t) const { return {}; }
  double sqrt_alpha_prod(std::int64_t) const { return 1; }
  double sqrt_one_minus_alpha_prod(std::int64_t) const { return 0; }
  double snr(std::int64_t) const { return 1; }
  PredictionType prediction_type() const { return PredictionType::epsilon; }
};
struct ScheduleWithoutSnr {
  using time_type = std::int64_t;
  std::int64_t num_train_timesteps() const { return 10; }
  TrainingCoefficients training_coefficients(std::int64_t) const { return {}; }
  double sqrt_alpha_prod(std::int64_t) const { return 1; }
  double sqrt_one_minus_alpha_prod(std::int64_t) const { return 0; }
  PredictionType prediction_type() const { return PredictionType::epsilon; }
};
// A user's continuous-time schedule: σ ∈ (0, 1], x_t = cos·x0 + sin·eps (no DDPM members).
struct CosineSchedule {
  using time_type = double;
  std::int64_t num_train_timesteps() const { return 1000; }
  TrainingCoefficients training_coefficients(double sigma) const { return {1 - sigma, sigma}; }
};
struct ScheduleWithoutTimeType {  // training_coefficients of what?
  std::int64_t num_train_timesteps() const { return 1000; }
  TrainingCoefficients training_coefficients(double) const { return {}; }
};
struct ScheduleOfOtherCoefficients {  // returns its own struct, not TrainingCoefficients
  using time_type = double;
  std::int64_t num_train_timesteps() const { return 1000; }
  double training_coefficients(double) const { return 0; }
};
struct FloatTimeDenoiser {
  Tensor4<float> forward(const Tensor4<float>& x, std::span<const float>, const Tensor3<float>&) {
    return x;
  }
  void backward(const Tensor4<float>&) {}
};
struct ToyDenoiser {
  Tensor4<float> forward(const Tensor4<float>& x, std::span<const std::int64_t>,
                         const Tensor3<float>&) {
    return x;
  }
  void backward(const Tensor4<float>&) {}
};
struct ForwardOnlyDenoiser {
  Tensor4<float> forward(const Tensor4<float>& x, std::span<const std::int64_t>,
                         const Tensor3<float>&) {
    return x;
  }
};
struct ImageIdentity {
  using input_type = Tensor4<float>;
  using output_type = Tensor4<float>;
  Tensor4<float> encode(const Tensor4<float>& x) { return x; }
};
struct ToyText {
  using input_type = TokenIds;
  using output_type = Tensor3<float>;
  Tensor3<float> encode(const TokenIds&) { return Tensor3<float>({1, 1, 1}); }
};
struct UndeclaredEncoder {  // no input_type / output_type
  Tensor4<float> encode(const Tensor4<float>& x) { return x; }
};
struct ConstantWeight {
  double weight(double, PredictionType) const { return 1; }
};
struct WeightOfCoefficients {  // flow matching's kind: no prediction type needed
  double weight(const TrainingCoefficients&) const { return 1; }
};
struct WeightOfTimestep {  // takes a timestep, not an SNR and a prediction type
  double weight(std::int64_t) const { return 1; }
};
struct ToySampler {
  void sample(std::span<std::int64_t> out, RandomStream) const {
    for (auto& t : out) t = 0;
  }
};
struct SigmaSampler {
  void sample(std::span<double> out, RandomStream) const {
    for (auto& s : out) s = 0.5;
  }
};
struct SamplerWithoutStream {
  void sample(std::span<std::int64_t>) const {}
};
struct ToyNoise {
  void sample(Tensor4<float>&, const Tensor4<float>&, RandomStream) const {}
};
struct ToySamplingScheduler {
  void set_timesteps(std::int64_t) {}
  std::span<const std::int64_t> timesteps() const { return {}; }
  double init_noise_sigma() const { return 1; }
  void scale_model_input(Tensor4<float>&, std::int64_t) const {}
  void step(const Tensor4<float>&, std::int64_t, Tensor4<float>&) const {}
};
struct SchedulerWithoutStep {  // cannot advance x
  void set_timesteps(std::int64_t) {}
  std::span<const std::int64_t> timesteps() const { return {}; }
  double init_noise_sigma() const { return 1; }
  void scale_model_input(Tensor4<float>&, std::int64_t) const {}
};
struct ToyModule {
  template <class Visitor>
  void for_each_parameter(const std::string& prefix, Visitor&& visit) {
    float weight = 0;
    visit(prefix + "weight", weight);
  }
};
struct ModuleWithoutNames {  // visits values without names
  template <class Visitor>
  void for_each_parameter(Visitor&&) {}
};
struct ToySlots {
  template <class Visitor>
  void for_each_slot(const std::string&, Visitor&&) {}
};
struct ToyData {
  train::TrainBatch operator()(std::uint64_t) { return {}; }
};
struct DataOfImages {  // yields images only, not a TrainBatch
  Tensor4<float> operator()(std::uint64_t) { return {}; }
};
}  // namespace

static_assert(Scheduler<ToySchedule> && TrainingSchedule<ToySchedule>);
static_assert(!Scheduler<ScheduleWithoutSnr> && TrainingSchedule<ScheduleWithoutSnr>);
static_assert(!Scheduler<int> && !TrainingSchedule<int>);
static_assert(TrainingSchedule<CosineSchedule> && !Scheduler<CosineSchedule>);
static_assert(!TrainingSchedule<ScheduleWithoutTimeType>);
static_assert(!TrainingSchedule<ScheduleOfOtherCoefficients>);
static_assert(Denoiser<ToyDenoiser> && IntegerTimestepDenoiser<ToyDenoiser>);
static_assert(!FloatTimestepDenoiser<ToyDenoiser>);
static_assert(Denoiser<FloatTimeDenoiser> && FloatTimestepDenoiser<FloatTimeDenoiser>);
static_assert(!Denoiser<ForwardOnlyDenoiser>);
static_assert(Encoder<ImageIdentity> && LatentEncoder<ImageIdentity>);
static_assert(Encoder<ToyText> && TextEncoder<ToyText>);
static_assert(!TextEncoder<ImageIdentity> && !LatentEncoder<ToyText>);
static_assert(!Encoder<UndeclaredEncoder> && !LatentEncoder<UndeclaredEncoder>);
static_assert(LossWeighting<ConstantWeight>);
static_assert(!LossWeighting<WeightOfTimestep>);
static_assert(LossWeighting<WeightOfCoefficients>);
static_assert(TimestepSampler<ToySampler>);
static_assert(TimestepSamplerOf<SigmaSampler, double> && !TimestepSampler<SigmaSampler>);
static_assert(!TimestepSamplerOf<ToySampler, double>);
static_assert(!TimestepSampler<SamplerWithoutStream>);
static_assert(NoiseSampler<ToyNoise>);
static_assert(!NoiseSampler<ToySampler>);
static_assert(SamplingScheduler<ToySamplingScheduler>);
static_assert(!SamplingScheduler<SchedulerWithoutStep> && !SamplingScheduler<ToySchedule>);
static_assert(nn::Module<ToyModule>);
static_assert(!nn::Module<ModuleWithoutNames> && !nn::Module<ToySlots>);
static_assert(lora::HasLoraSlots<ToySlots>);
static_assert(!lora::HasLoraSlots<ToyModule>);
static_assert(train::TrainDataSource<ToyData>);
static_assert(!train::TrainDataSource<DataOfImages> && !train::TrainDataSource<ToyNoise>);

TEST_CASE("concepts admit the toy types and reject the incomplete ones") {
  SUCCEED("checked by the static_asserts of this file at compile time");
}
