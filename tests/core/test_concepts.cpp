// static_assert tests of types that do and do not satisfy each concept.
#include <catch2/catch.hpp>

#include "difftrain/concepts.hpp"

using namespace difftrain;

namespace {
struct ToySchedule {
  std::int64_t num_train_timesteps() const { return 10; }
  double sqrt_alpha_prod(std::int64_t) const { return 1; }
  double sqrt_one_minus_alpha_prod(std::int64_t) const { return 0; }
  double snr(std::int64_t) const { return 1; }
  PredictionType prediction_type() const { return PredictionType::epsilon; }
};
struct ScheduleWithoutSnr {
  std::int64_t num_train_timesteps() const { return 10; }
  double sqrt_alpha_prod(std::int64_t) const { return 1; }
  double sqrt_one_minus_alpha_prod(std::int64_t) const { return 0; }
  PredictionType prediction_type() const { return PredictionType::epsilon; }
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
struct WeightOfTimestep {  // takes a timestep, not an SNR and a prediction type
  double weight(std::int64_t) const { return 1; }
};
struct ToySampler {
  void sample(std::span<std::int64_t> out, RandomStream) const {
    for (auto& t : out) t = 0;
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

static_assert(Scheduler<ToySchedule>);
static_assert(!Scheduler<ScheduleWithoutSnr>);
static_assert(!Scheduler<int>);
static_assert(Denoiser<ToyDenoiser>);
static_assert(!Denoiser<ForwardOnlyDenoiser>);
static_assert(Encoder<ImageIdentity> && LatentEncoder<ImageIdentity>);
static_assert(Encoder<ToyText> && TextEncoder<ToyText>);
static_assert(!TextEncoder<ImageIdentity> && !LatentEncoder<ToyText>);
static_assert(!Encoder<UndeclaredEncoder> && !LatentEncoder<UndeclaredEncoder>);
static_assert(LossWeighting<ConstantWeight>);
static_assert(!LossWeighting<WeightOfTimestep>);
static_assert(TimestepSampler<ToySampler>);
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
