// The shapes demo's pipeline (examples/shapes_pipeline.hpp) at a small budget:
// - the tokenizer written for the demo's words gives one token per word;
// - the saved base model folder and kohya LoRA file load back (pipeline/model_folder.hpp,
//   lora::read_lora + apply_lora) and sample the same images as the models in memory;
// - training from scratch learns the prompts: the pixel classifier agrees with the prompt for
//   most samples (colour; colour and shape for a stated fraction well above chance 1/9), and a
//   DreamBooth LoRA makes the instance prompt draw the new colour.
// The learning test needs optimised code: in a Debug build (ASan/UBSan in CI, 10-100× slower) it
// runs the same code for a few steps only and skips the quality assertions (with a WARN).

#include <catch2/catch.hpp>
#include <filesystem>
#include <string>
#include <vector>

#include "difftrain/pipeline/generate_images.hpp"
#include "difftrain/pipeline/model_folder.hpp"
#include "shapes_pipeline.hpp"
#include "support/temp_dir.hpp"
#include "support/tensor_match.hpp"

namespace fs = std::filesystem;
using namespace difftrain;

namespace {

#ifdef NDEBUG
constexpr bool kOptimised = true;
#else
constexpr bool kOptimised = false;
#endif

struct Scores {
  double colour = 0, both = 0;  // fractions of the samples
};

Scores score(const Tensor4<float>& images, const std::vector<shapes::ShapeSpec>& expected) {
  const auto readings = shapes::classify_batch(images);
  Scores s;
  for (std::size_t b = 0; b < readings.size(); ++b) {
    const auto& r = readings[b];
    s.colour += r.found && r.spec.colour == expected[b].colour;
    s.both += r.found && r.spec == expected[b];
  }
  s.colour /= static_cast<double>(readings.size());
  s.both /= static_cast<double>(readings.size());
  return s;
}

}  // namespace

TEST_CASE("the demo's tokenizer gives one token per word", "[demo]") {
  test::TempDir dir;
  shapes::write_tokenizer(dir.str(), shapes::demo_words(), 8);
  const auto tok = ClipTokenizer::from_folder(dir.str());
  CHECK(tok.model_max_length() == 8);
  std::vector<std::int64_t> ids;
  for (const auto& word : shapes::demo_words()) {
    const auto t = tok.token_ids(word);
    REQUIRE(t.size() == 1);
    ids.push_back(t[0]);
  }
  std::sort(ids.begin(), ids.end());
  CHECK(std::adjacent_find(ids.begin(), ids.end()) == ids.end());  // all distinct
  const auto e = tok.encode("a red circle", 8);
  const std::int64_t eos = tok.eos_token_id();
  CHECK(e.input_ids == std::vector<std::int64_t>{tok.bos_token_id(), tok.token_ids("a")[0],
                                                 tok.token_ids("red")[0],
                                                 tok.token_ids("circle")[0], eos, eos, eos, eos});
  CHECK(tok.bos_token_id() == static_cast<std::int64_t>(tok.vocab_size()) - 2);
  CHECK(eos == static_cast<std::int64_t>(tok.vocab_size()) - 1);
}

TEST_CASE("the saved base model and LoRA load back and sample the same images", "[demo]") {
  test::TempDir dir;
  shapes::ModelSizes sizes;
  sizes.image_size = 8;
  auto models = shapes::make_models(sizes, fs::path(dir.str()) / "tok", 3);
  const auto type = shapes::SampleSettings{}.prediction_type;  // the folder samples as in memory
  const fs::path folder = dir / "base_model";
  pipeline::save_model_folder(
      folder,
      pipeline::ModelFolderParts<models::UNet2DConditionModel<float>, models::ClipTextModel<float>>{
          models.unet, models.unet_config, models.text.model(), models.text_config,
          models.tokenizer_dir, shapes::scheduler_config_json(type)});

  shapes::DreamBoothSettings db;
  db.train.steps = 2;
  db.train.batch = 2;
  db.class_batch = 2;
  db.train.warmup = 0;
  shapes::train_lora(models, db);
  const std::string lora_path = dir / "lora.safetensors";
  lora::save_lora(lora_path, lora::collect_lora(models.unet), lora::LoraFormat::kohya);

  shapes::SampleSettings s;
  s.num_inference_steps = 3;
  const std::vector<std::string> prompts = {"a sks shape", "a red circle"};
  const Tensor4<float> expected = shapes::sample(models, prompts, s);

  pipeline::ModelFolder loaded = pipeline::load_model_folder(folder.string());
  REQUIRE_FALSE(loaded.vae.has_value());  // pixel space
  lora::apply_lora(loaded.unet, lora::read_lora(lora_path, lora::module_names(loaded.unet)));
  DdimScheduler scheduler(loaded.scheduler);
  SampleOptions o;
  o.num_inference_steps = 3;
  o.guidance_scale = s.guidance_scale;
  o.seed = s.seed;
  o.channels = 3;
  o.height = o.width = 8;
  const Tensor4<float> got = sample_latents(loaded.unet, scheduler, loaded.encode_prompts(prompts),
                                            loaded.encode_prompts({""}), o);
  REQUIRE_CLOSE(got, expected, 1e-4, 1e-5);
}

TEST_CASE("the pipeline learns the prompts and a DreamBooth LoRA learns the new concept",
          "[demo]") {
  test::TempDir dir;
  auto models = shapes::make_models(shapes::ModelSizes{}, fs::path(dir.str()) / "tok", 0);
  shapes::TrainSettings base;
  base.steps = kOptimised ? 120 : 2;
  base.warmup = kOptimised ? 10 : 0;
  if (!kOptimised) base.batch = 2;
  const auto losses = shapes::train_base(models, base);
  REQUIRE(losses.size() == static_cast<std::size_t>(base.steps));
  for (double l : losses) REQUIRE(std::isfinite(l));

  std::vector<std::string> prompts;
  std::vector<shapes::ShapeSpec> expected;
  const std::size_t per_prompt = kOptimised ? 4 : 1;
  for (const auto& spec : shapes::base_specs())
    for (std::size_t k = 0; k < per_prompt; ++k) {
      prompts.push_back(shapes::caption(spec));
      expected.push_back(spec);
    }
  shapes::SampleSettings s;
  s.num_inference_steps = kOptimised ? 20 : 2;
  const Scores base_scores = score(shapes::sample(models, prompts, s), expected);

  shapes::DreamBoothSettings db;
  db.train.steps = kOptimised ? 60 : 2;
  db.train.batch = kOptimised ? 8 : 2;
  db.class_batch = kOptimised ? 8 : 2;
  db.train.warmup = 0;
  shapes::train_lora(models, db);
  const std::vector<std::string> instance(per_prompt * 2, db.instance_prompt);
  const Scores lora_scores =
      score(shapes::sample(models, instance, s), std::vector(instance.size(), db.instance));

  if (!kOptimised) {
    WARN(
        "Debug build: the pipeline ran a few steps only; the quality assertions need a Release "
        "build and are skipped");
    return;
  }
  INFO("base prompts: colour right " << base_scores.colour << ", colour and shape right "
                                     << base_scores.both << "; LoRA instance prompt: colour "
                                     << lora_scores.colour << ", both " << lora_scores.both);
  // At this budget the colours are learned (1.0 measured) and the shapes in part; the LoRA
  // has learned the new colour but not yet the ring (the demo's 150 steps draw it).
  CHECK(base_scores.colour >= 0.8);  // chance: 1/3
  CHECK(base_scores.both >= 0.25);   // chance: 1/9
  CHECK(lora_scores.colour >= 0.6);  // yellow; chance: 1/4
}

TEST_CASE("flow matching: the saved folder selects flow Euler and samples as in memory", "[demo]") {
  test::TempDir dir;
  shapes::ModelSizes sizes;
  sizes.image_size = 8;
  auto models = shapes::make_models(sizes, fs::path(dir.str()) / "tok", 3);
  shapes::TrainSettings t;
  t.flow = true;
  t.steps = 2;
  t.batch = 2;
  t.warmup = 0;
  shapes::train_base(models, t);
  const fs::path folder = dir / "base_model";
  pipeline::save_model_folder(
      folder,
      pipeline::ModelFolderParts<models::UNet2DConditionModel<float>, models::ClipTextModel<float>>{
          models.unet, models.unet_config, models.text.model(), models.text_config,
          models.tokenizer_dir, shapes::scheduler_config_json(PredictionType::epsilon, true)});

  shapes::SampleSettings s;
  s.flow = true;
  s.num_inference_steps = 3;
  const std::vector<std::string> prompts = {"a red circle", "a blue square"};
  const Tensor4<float> expected = shapes::sample(models, prompts, s);

  pipeline::ModelFolder loaded = pipeline::load_model_folder(folder.string());
  REQUIRE(loaded.scheduler.flow.has_value());
  REQUIRE(pipeline::default_sampler(loaded.scheduler) == pipeline::SamplerKind::flow_euler);
  FlowMatchEulerDiscreteScheduler scheduler(*loaded.scheduler.flow);
  SampleOptions o;
  o.num_inference_steps = 3;
  o.guidance_scale = s.guidance_scale;
  o.seed = s.seed;
  o.channels = 3;
  o.height = o.width = 8;
  const Tensor4<float> got = sample_latents(loaded.unet, scheduler, loaded.encode_prompts(prompts),
                                            loaded.encode_prompts({""}), o);
  REQUIRE_CLOSE(got, expected, 1e-4, 1e-5);
}

TEST_CASE("flow matching: the pipeline learns the prompts at the DDPM test's budget", "[demo]") {
  test::TempDir dir;
  auto models = shapes::make_models(shapes::ModelSizes{}, fs::path(dir.str()) / "tok", 0);
  shapes::TrainSettings base;
  base.flow = true;
  base.steps = kOptimised ? 120 : 2;
  base.warmup = kOptimised ? 10 : 0;
  if (!kOptimised) base.batch = 2;
  const auto losses = shapes::train_base(models, base);
  for (double l : losses) REQUIRE(std::isfinite(l));
  std::vector<std::string> prompts;
  std::vector<shapes::ShapeSpec> expected;
  const std::size_t per_prompt = kOptimised ? 4 : 1;
  for (const auto& spec : shapes::base_specs())
    for (std::size_t k = 0; k < per_prompt; ++k) {
      prompts.push_back(shapes::caption(spec));
      expected.push_back(spec);
    }
  shapes::SampleSettings s;
  s.flow = true;
  s.num_inference_steps = kOptimised ? 20 : 2;
  const Scores scores = score(shapes::sample(models, prompts, s), expected);
  if (!kOptimised) {
    WARN("Debug build: a few steps only; the quality assertions need a Release build");
    return;
  }
  INFO("colour right " << scores.colour << ", colour and shape right " << scores.both);
  CHECK(scores.colour >= 0.8);  // chance: 1/3
  CHECK(scores.both >= 0.25);   // chance: 1/9
}
