// Original single-file checkpoints loaded as a ModelFolder (pipeline/single_file.hpp): tiny SD 1.x,
// SD 2.x and SDXL pipeline folders written as one file each with the original names (UNet
// model.diffusion_model.*, VAE first_stage_model.*, text encoders by family), detected by family,
// loaded with the folder as config_dir, and compared bitwise with the folder: prompt embeddings,
// UNet prediction, VAE decode. Also the presets, the errors and load_pipeline's dispatch.

#include <catch2/catch.hpp>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "difftrain/core/random.hpp"
#include "difftrain/models/ldm_names.hpp"
#include "difftrain/models/unet/load.hpp"
#include "difftrain/models/vae/vae_load.hpp"
#include "difftrain/nn/parameter.hpp"
#include "difftrain/pipeline/generate_images.hpp"
#include "difftrain/pipeline/model_folder.hpp"
#include "difftrain/pipeline/single_file.hpp"
#include "support/error_of.hpp"
#include "support/ldm_file_builder.hpp"
#include "support/temp_dir.hpp"
#include "support/tensor_match.hpp"
#include "support/tiny_pipelines.hpp"

namespace fs = std::filesystem;
using namespace difftrain;
using Catch::Matchers::Contains;
using pipeline::ModelFamily;

namespace {

// An SD 1.x folder as one file (text encoder cond_stage_model.transformer.*), or as an SD 2.x one
// (OpenCLIP names under cond_stage_model.model., with the 24th block SD 2.x files have).
void write_sd_file(const fs::path& folder, const std::string& path, ModelFamily family) {
  test::FileBuilder file;
  test::add_unet_and_vae(file, folder);
  if (family == ModelFamily::sd1) {
    test::add_transformers(file, test::component_weights(folder, "text_encoder"),
                           "cond_stage_model.transformer.");
  } else {
    test::OpenClipOptions options;
    options.extra_block = true;
    test::add_open_clip(file, test::component_weights(folder, "text_encoder"),
                        "cond_stage_model.model.", options);
  }
  file.add("alphas_cumprod", std::vector<float>(1000, 0.5f), {1000});
  file.write(path);
}

const std::vector<std::string> kPrompts{"a red circle", "a blue square!"};

Tensor4<float> random_tensor(std::array<std::size_t, 4> shape, std::uint64_t seed) {
  Tensor4<float> x(shape);
  fill_normal(std::span<float>(x.data(), x.size()), RandomStream{seed, 0});
  return x;
}

void check_same_scheduler(const SamplingConfig& a, const SamplingConfig& b) {
  CHECK(a.train.num_train_timesteps == b.train.num_train_timesteps);
  CHECK(a.train.beta_start == b.train.beta_start);
  CHECK(a.train.beta_end == b.train.beta_end);
  CHECK(a.train.beta_schedule == b.train.beta_schedule);
  CHECK(a.train.prediction_type == b.train.prediction_type);
  CHECK(a.timestep_spacing == b.timestep_spacing);
  CHECK(a.steps_offset == b.steps_offset);
  CHECK(a.set_alpha_to_one == b.set_alpha_to_one);
}

// UNet prediction and VAE decode of the two pipelines, bitwise, for the context `context`.
void check_same_unet_and_vae(pipeline::ModelFolder& a, pipeline::ModelFolder& b,
                             const Tensor3<float>& context, const AddedConditions<float>* added) {
  const Tensor4<float> x = random_tensor({2, 4, 4, 4}, 8);
  const std::vector<std::int64_t> t{10, 500};
  const std::span<const std::int64_t> ts(t);
  const Tensor4<float> ua =
      added ? a.unet.forward(x, ts, context, *added) : a.unet.forward(x, ts, context);
  const Tensor4<float> ub =
      added ? b.unet.forward(x, ts, context, *added) : b.unet.forward(x, ts, context);
  REQUIRE_CLOSE(ub, ua, 0.0, 0.0);
  REQUIRE(a.vae.has_value());
  REQUIRE(b.vae.has_value());
  CHECK(b.vae->config().scaling_factor == a.vae->config().scaling_factor);
  const Tensor4<float> z = random_tensor({1, 4, 4, 4}, 9);
  REQUIRE_CLOSE(b.decode(z), a.decode(z), 0.0, 0.0);
  check_same_scheduler(a.scheduler, b.scheduler);
}

void check_same_sdxl(pipeline::ModelFolder& folder, pipeline::ModelFolder& file) {
  REQUIRE(file.is_sdxl());
  const TokenIds ids = folder.tokenize(kPrompts);
  REQUIRE_CLOSE(file.tokenize(kPrompts), ids, 0.0, 0.0);
  const auto ea = folder.encode_sdxl_prompts(kPrompts);
  const auto eb = file.encode_sdxl_prompts(kPrompts);
  REQUIRE_CLOSE(eb.prompt_embeds, ea.prompt_embeds, 0.0, 0.0);
  REQUIRE_CLOSE(eb.pooled_prompt_embeds, ea.pooled_prompt_embeds, 0.0, 0.0);
  const auto added = pipeline::sdxl_added_conditions(ea.pooled_prompt_embeds, nullptr, 16, 16);
  check_same_unet_and_vae(folder, file, ea.prompt_embeds, &added);
}

void check_same_sd(pipeline::ModelFolder& folder, pipeline::ModelFolder& file) {
  REQUIRE_FALSE(file.is_sdxl());
  REQUIRE_CLOSE(file.tokenize(kPrompts), folder.tokenize(kPrompts), 0.0, 0.0);
  const Tensor3<float> context = folder.encode_prompts(kPrompts);
  REQUIRE_CLOSE(file.encode_prompts(kPrompts), context, 0.0, 0.0);
  check_same_unet_and_vae(folder, file, context, nullptr);
}

pipeline::SingleFileOptions with_config_dir(const fs::path& folder) {
  pipeline::SingleFileOptions o;
  o.config_dir = folder.string();
  return o;
}

}  // namespace

TEST_CASE("single file: an SDXL checkpoint loads as its pipeline folder",
          "[pipeline][single_file]") {
  test::TempDir dir("single_file_sdxl");
  const fs::path folder = dir.path() / "sdxl";
  test::write_tiny_sdxl_folder(folder);
  const std::string file = dir.file("sd_xl_tiny.safetensors");
  test::write_tiny_sdxl_file(folder, file);

  CHECK(pipeline::detect_model_family(file) == ModelFamily::sdxl);
  auto reference = pipeline::load_model_folder(folder.string());

  SECTION("configs and tokenizers from config_dir") {
    auto m = pipeline::load_model_single_file(file, with_config_dir(folder));
    CHECK(m.root == fs::path(file));
    check_same_sdxl(reference, m);
  }
  SECTION("tokenizer_dir: tokenizer_2 is the same files padding with \"!\"") {
    auto options = with_config_dir(folder);
    options.tokenizer_dir = (folder / "tokenizer").string();
    auto m = pipeline::load_model_single_file(file, options);
    REQUIRE(m.tokenizer_2.has_value());
    CHECK(m.tokenizer_2->pad_token_id() == 0);  // "!"
    CHECK(m.tokenizer.pad_token_id() == reference.tokenizer.pad_token_id());
    check_same_sdxl(reference, m);
  }
  SECTION("clip_skip and load_vae reach the pipeline") {
    auto options = with_config_dir(folder);
    options.folder.clip_skip = 1;
    options.folder.load_vae = false;
    auto m = pipeline::load_model_single_file(file, options);
    CHECK(m.clip_skip == 1);
    CHECK_FALSE(m.vae.has_value());
    CHECK(m.latent_channels() == 4);
  }
  SECTION("load_pipeline: a file, a folder, neither") {
    auto m = pipeline::load_pipeline(file, with_config_dir(folder));
    CHECK(m.root == fs::path(file));
    CHECK(m.is_sdxl());
    auto f = pipeline::load_pipeline(folder.string());
    CHECK(f.root == folder);
    CHECK(f.is_sdxl());
    CHECK_THROWS_WITH(pipeline::load_pipeline(folder.string(), with_config_dir(folder)),
                      Contains("config_dir and tokenizer_dir apply to a single-file checkpoint"));
    const std::string missing = dir.file("missing.safetensors");
    CHECK_THROWS_WITH(pipeline::load_pipeline(missing, with_config_dir(folder)),
                      Contains("load_pipeline") && Contains(missing) && Contains("does not exist"));
  }
  SECTION("no tokenizer: an Error naming tokenizer_dir (before any weight is read)") {
    CHECK_THROWS_WITH(pipeline::load_model_single_file(file, {}),
                      Contains("sd_xl_tiny.safetensors") && Contains("tokenizer_dir"));
    CHECK_THROWS_WITH(pipeline::load_pipeline(file, {}), Contains("tokenizer_dir"));
  }
  SECTION("parts that do not fit: the folder's checks, naming the file") {
    auto options = with_config_dir(folder);
    options.folder.clip_skip = 3;  // of 3-layer encoders
    CHECK_THROWS_WITH(pipeline::load_model_single_file(file, options),
                      Contains("load_model_single_file") && Contains(file) &&
                          Contains("clip_skip 3 leaves no layer"));
    nlohmann::json tok =
        io::read_json_file("test", folder / "tokenizer_2" / "tokenizer_config.json");
    tok["model_max_length"] = 64;
    io::write_json_file(folder / "tokenizer_2" / "tokenizer_config.json", tok);
    CHECK_THROWS_WITH(pipeline::load_model_single_file(file, with_config_dir(folder)),
                      Contains(file) && Contains("tokenizer_2's model_max_length is 64"));
  }
  SECTION("a config_dir without text_encoder_2/ is named") {
    fs::remove_all(folder / "text_encoder_2");
    CHECK_THROWS_WITH(pipeline::load_model_single_file(file, with_config_dir(folder)),
                      Contains("text_encoder_2/config.json") && Contains(folder.string()));
  }
}

TEST_CASE("single file: SD 1.x and SD 2.x checkpoints load as their pipeline folder",
          "[pipeline][single_file]") {
  test::TempDir dir("single_file_sd");
  const fs::path folder = dir.path() / "sd";
  test::write_tiny_sd_folder(folder);
  auto reference = pipeline::load_model_folder(folder.string());
  for (const ModelFamily family : {ModelFamily::sd1, ModelFamily::sd2}) {
    INFO(pipeline::to_string(family));
    const std::string file = dir.file(std::string(pipeline::to_string(family)) + ".safetensors");
    write_sd_file(folder, file, family);
    CHECK(pipeline::detect_model_family(file) == family);
    auto m = pipeline::load_model_single_file(file, with_config_dir(folder));
    CHECK(m.root == fs::path(file));
    check_same_sd(reference, m);
  }
}

TEST_CASE("single file: files that are not SD checkpoints", "[pipeline][single_file]") {
  test::TempDir dir("single_file_errors");
  const fs::path folder = dir.path() / "sd";
  test::write_tiny_sd_folder(folder);

  SECTION("no text encoder of a known family: the prefixes looked for") {
    const std::string file = dir.file("unet_only.safetensors");
    test::FileBuilder builder;
    test::add_unet_and_vae(builder, folder);
    builder.write(file);
    // (Catch v2 matchers combine by reference: each check builds its own)
    const auto check_named = [](const std::string& message) {
      CHECK_THAT(message, Contains("unet_only.safetensors") &&
                              Contains("conditioner.embedders.1.model.*") &&
                              Contains("cond_stage_model.model.*") &&
                              Contains("cond_stage_model.transformer.*"));
    };
    check_named(test::error_of([&] { pipeline::detect_model_family(file); }));
    check_named(
        test::error_of([&] { pipeline::load_model_single_file(file, with_config_dir(folder)); }));
  }
  SECTION("no VAE: named") {
    const std::string file = dir.file("no_vae.safetensors");
    test::FileBuilder builder;
    test::add_transformers(builder, test::component_weights(folder, "text_encoder"),
                           "cond_stage_model.transformer.");
    builder.add("model.diffusion_model.out.2.bias", std::vector<float>(4, 0.25f), {4});
    builder.write(file);
    CHECK(pipeline::detect_model_family(file) == ModelFamily::sd1);
    CHECK_THROWS_WITH(pipeline::load_model_single_file(file, with_config_dir(folder)),
                      Contains("no_vae.safetensors") && Contains("first_stage_model.*"));
  }
}

TEST_CASE("single file: the presets of each family", "[pipeline][single_file]") {
  using models::AdditionEmbedType;
  const auto xl = pipeline::single_file_configs(ModelFamily::sdxl);
  CHECK(xl.unet.addition_embed_type == AdditionEmbedType::text_time);
  for (const std::size_t d : xl.unet.cross_attention_dim) CHECK(d == 2048);
  CHECK(xl.vae.scaling_factor == 0.13025);
  CHECK(xl.vae.block_out_channels == std::vector<std::size_t>{128, 256, 512, 512});
  CHECK(xl.text_encoder.hidden_size == 768);
  REQUIRE(xl.text_encoder_2.has_value());
  CHECK(xl.text_encoder_2->projection_dim == 1280);
  CHECK(xl.text_encoder_2->hidden_size == 1280);
  // the parts fit as load_model_folder requires
  CHECK(xl.unet.projection_class_embeddings_input_dim ==
        xl.text_encoder_2->projection_dim + 6 * xl.unet.addition_time_embed_dim);
  CHECK(xl.text_encoder.hidden_size + xl.text_encoder_2->hidden_size == 2048);

  const auto sd2 = pipeline::single_file_configs(ModelFamily::sd2);
  CHECK(sd2.unet.addition_embed_type == AdditionEmbedType::none);
  for (const std::size_t d : sd2.unet.cross_attention_dim) CHECK(d == 1024);
  CHECK(sd2.text_encoder.hidden_size == 1024);
  CHECK(sd2.vae.scaling_factor == 0.18215);
  CHECK_FALSE(sd2.text_encoder_2.has_value());

  const auto sd1 = pipeline::single_file_configs(ModelFamily::sd1);
  for (const std::size_t d : sd1.unet.cross_attention_dim) CHECK(d == 768);
  CHECK(sd1.text_encoder.hidden_size == 768);
  CHECK(sd1.vae.scaling_factor == 0.18215);

  for (const auto* c : {&xl, &sd2, &sd1}) {  // diffusers' SD scheduler; SD 2.x 768-v unknowable
    CHECK(c->scheduler.train.beta_schedule == BetaSchedule::scaled_linear);
    CHECK(c->scheduler.train.beta_start == 0.00085);
    CHECK(c->scheduler.train.beta_end == 0.012);
    CHECK(c->scheduler.train.num_train_timesteps == 1000);
    CHECK(c->scheduler.train.prediction_type == PredictionType::epsilon);
    CHECK(c->scheduler.steps_offset == 1);
  }
  CHECK(pipeline::to_string(ModelFamily::sdxl) == "sdxl");
}
