// `difftrain sample` and load_model_folder on tiny model folders built here: a pixel-space one
// (random UNet with 3 channels + the tiny CLIP and tokenizer) and a latent one (the golden tiny
// UNet, VAE and CLIP), checking the grid's size, determinism in the seed, LoRA and the errors.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "cmd_sample.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/unet/unet2d_condition.hpp"
#include "difftrain/models/unet/unet_config.hpp"
#include "difftrain/pipeline/generate_images.hpp"
#include "difftrain/pipeline/model_folder.hpp"
#include "difftrain/schedule/flow_match.hpp"
#include "image_io.hpp"
#include "support/temp_dir.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
namespace fs = std::filesystem;

namespace {

int run(std::vector<std::string> args) {
  CLI::App app;
  int exit_code = -1;
  tools::add_sample_command(app, exit_code);
  args.insert(args.begin(), {"difftrain", "sample"});
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  app.parse(int(argv.size()), argv.data());
  return exit_code;
}

using test::TempDir;

void copy_files(const std::string& from, const fs::path& to, std::vector<std::string> names) {
  fs::create_directories(to);
  for (const auto& n : names) fs::copy_file(test::data_path(from + "/" + n), to / n);
}

void write_text(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream(path) << text;
}

// A scheduler config as Stable Diffusion 1.5 ships it.
constexpr const char* kSchedulerConfig = R"({"_class_name": "PNDMScheduler",
  "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
  "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
  "steps_offset": 1, "clip_sample": false, "trained_betas": null})";

void add_text_parts(const fs::path& root) {
  copy_files("clip_tiny", root / "text_encoder", {"config.json", "model.safetensors"});
  copy_files("tokenizer_tiny", root / "tokenizer",
             {"vocab.json", "merges.txt", "tokenizer_config.json"});
  write_text(root / "scheduler" / "scheduler_config.json", kSchedulerConfig);
}

// unet_tiny's architecture, narrowed (8 and 16 channels, 2 heads, groups of 8) to keep the test
// fast under ASan, with 3 input/output channels, sample_size 8 and N(0, 0.05²) weights.
void write_pixel_unet(const fs::path& dir) {
  std::ifstream in(test::data_path("unet_tiny/config.json"));
  auto config = nlohmann::json::parse(in);
  config["in_channels"] = 3;
  config["out_channels"] = 3;
  config["block_out_channels"] = {8, 16};
  config["norm_num_groups"] = 8;
  config["attention_head_dim"] = 2;
  config["sample_size"] = 8;
  write_text(dir / "config.json", config.dump(2));
  models::UNet2DConditionModel<float> unet(models::UNet2DConditionConfig::from_json(config));
  std::vector<io::TensorToWrite> tensors;
  std::uint64_t k = 0;
  unet.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>& p) {
    fill_normal(std::span<float>(p.value.data(), p.value.size()),
                RandomStream{11, 0}.derive(k++, 0));
    p.value *= 0.05f;
    tensors.push_back(io::TensorToWrite::from_tensor(name, p.value));
  });
  io::save_safetensors((dir / "diffusion_pytorch_model.safetensors").string(), tensors);
}

struct PixelModel {
  TempDir dir{"pixel"};
  fs::path root = dir.path() / "model";
  PixelModel() {
    write_pixel_unet(root / "unet");
    add_text_parts(root);
  }
};

// The first tile of a grid (2 pixels of padding) is not one flat colour: the sampler produced an
// image, not a fill.
bool has_contrast(const tools::Image& grid, int tile_width, int tile_height) {
  const std::uint8_t* first = grid.pixel(2, 2);
  for (int y = 2; y < 2 + tile_height; ++y)
    for (int x = 2; x < 2 + tile_width; ++x)
      for (int c = 0; c < 3; ++c)
        if (grid.pixel(x, y)[c] != first[c]) return true;
  return false;
}

}  // namespace

TEST_CASE("difftrain sample on a pixel-space model folder", "[sample]") {
  PixelModel m;
  const std::string model = m.root.string();
  const auto grid = [&](const std::string& name, std::vector<std::string> extra,
                        const std::string& seed = "5") {
    std::vector<std::string> args = {"--model",
                                     model,
                                     "--prompt",
                                     "a red circle",
                                     "--prompt",
                                     "a blue square",
                                     "--num_images_per_prompt",
                                     "2",
                                     "--num_inference_steps",
                                     "3",
                                     "--seed",
                                     seed,
                                     "--out",
                                     m.dir.file(name)};
    args.insert(args.end(), extra.begin(), extra.end());
    return run(args);
  };
  // default size: sample_size 8 × factor 1; 2 columns (images per prompt) × 2 rows (prompts),
  // 2 pixels of padding: 2·(8 + 2) + 2 = 22
  REQUIRE(grid("a.png", {}) == 0);
  const auto a = tools::load_image(m.dir.file("a.png"));
  CHECK(a.width == 22);
  CHECK(a.height == 22);
  CHECK(has_contrast(a, 8, 8));

  REQUIRE(grid("b.png", {}) == 0);
  CHECK(tools::load_image(m.dir.file("b.png")) == a);  // same seed, same grid

  REQUIRE(grid("c.png", {}, "6") == 0);
  CHECK_FALSE(tools::load_image(m.dir.file("c.png")) == a);

  // Euler, no guidance, 8×24 pixels: 2·(24 + 2) + 2 wide, 2·(8 + 2) + 2 high
  REQUIRE(grid("d.png", {"--sampler", "euler", "--guidance_scale", "1", "--height", "8", "--width",
                         "24"}) == 0);
  const auto d = tools::load_image(m.dir.file("d.png"));
  CHECK(d.width == 54);
  CHECK(d.height == 22);

  // a negative prompt changes the guided images
  REQUIRE(grid("e.png", {"--negative_prompt", "blurry"}) == 0);
  CHECK_FALSE(tools::load_image(m.dir.file("e.png")) == a);

  // errors: exit code 1, no file
  CHECK(grid("f.png", {"--height", "15"}) == 1);  // the UNet halves the size once: 15 is odd
  CHECK(grid("g.png", {"--lora_scale", "0.5"}) == 1);
  CHECK_FALSE(fs::exists(m.dir.file("f.png")));
  CHECK_FALSE(fs::exists(m.dir.file("g.png")));
}

TEST_CASE("difftrain sample: a FlowMatchEulerDiscreteScheduler folder samples with flow Euler",
          "[sample]") {
  PixelModel m;
  FlowMatchEulerDiscreteSchedulerConfig flow;
  flow.shift = 3.0;
  io::write_json_file(m.root / "scheduler" / "scheduler_config.json", flow.to_json());
  const auto grid = [&](const std::string& name, std::vector<std::string> extra) {
    std::vector<std::string> args = {"--model",      m.root.string(),         "--prompt",
                                     "a red circle", "--num_inference_steps", "3",
                                     "--out",        m.dir.file(name)};
    args.insert(args.end(), extra.begin(), extra.end());
    return run(args);
  };
  REQUIRE(grid("auto.png", {}) == 0);
  REQUIRE(grid("flow.png", {"--sampler", "flow_euler"}) == 0);
  const auto a = tools::load_image(m.dir.file("auto.png"));
  CHECK(tools::load_image(m.dir.file("flow.png")) == a);  // the folder's config selects it
  CHECK(has_contrast(a, 8, 8));
  // DDPM samplers cannot sample a flow model, nor flow Euler a DDPM one.
  CHECK(grid("ddim.png", {"--sampler", "ddim"}) == 1);
  CHECK_FALSE(fs::exists(m.dir.file("ddim.png")));
  auto model = pipeline::load_model_folder(m.root.string());
  CHECK_THROWS_WITH(
      pipeline::generate_images(model, {"x"}, "", 1, pipeline::SamplerKind::euler, 8, 8, {}),
      Catch::Contains("FlowMatchEulerDiscreteScheduler's (use flow_euler)"));
  write_text(m.root / "scheduler" / "scheduler_config.json", kSchedulerConfig);
  auto ddpm = pipeline::load_model_folder(m.root.string());
  CHECK_THROWS_WITH(
      pipeline::generate_images(ddpm, {"x"}, "", 1, pipeline::SamplerKind::flow_euler, 8, 8, {}),
      Catch::Contains("is a DDPM one (use ddim or euler)"));
  CHECK_THROWS_WITH(DdimScheduler(model.scheduler), Catch::Contains("--sampler flow_euler"));
}

TEST_CASE("load_model_folder names what is missing or mismatched", "[sample]") {
  TempDir dir("errors");
  const fs::path root = dir.path() / "model";
  CHECK_THROWS_WITH(pipeline::load_model_folder(root.string()), Catch::Contains("does not exist"));
  CHECK(run({"--model", root.string(), "--prompt", "x", "--out", dir.file("x.png")}) == 1);
  CHECK_FALSE(fs::exists(dir.file("x.png")));

  fs::create_directories(root);
  CHECK_THROWS_WITH(pipeline::load_model_folder(root.string()),
                    Catch::Contains("unet/config.json"));
  write_pixel_unet(root / "unet");
  CHECK_THROWS_WITH(pipeline::load_model_folder(root.string()),
                    Catch::Contains("text_encoder/config.json"));
  add_text_parts(root);
  fs::remove_all(root / "tokenizer");
  CHECK_THROWS_WITH(pipeline::load_model_folder(root.string()), Catch::Contains("tokenizer"));
  copy_files("tokenizer_tiny", root / "tokenizer", {"vocab.json", "merges.txt"});
  fs::remove(root / "scheduler" / "scheduler_config.json");
  CHECK_THROWS_WITH(pipeline::load_model_folder(root.string()),
                    Catch::Contains("scheduler/scheduler_config.json"));
  write_text(root / "scheduler" / "scheduler_config.json", kSchedulerConfig);
  const auto folder = pipeline::load_model_folder(root.string());
  CHECK_FALSE(folder.vae.has_value());
  CHECK(folder.vae_scale_factor() == 1);
  CHECK(folder.scheduler.steps_offset == 1);

  // a 4-channel UNet without a VAE is not a pixel-space model
  fs::remove_all(root / "unet");
  copy_files("unet_tiny", root / "unet", {"config.json", "diffusion_pytorch_model.safetensors"});
  CHECK_THROWS_WITH(pipeline::load_model_folder(root.string()), Catch::Contains("pixel space"));
}

TEST_CASE("difftrain sample through a VAE with a LoRA", "[sample]") {
  TempDir dir("latent");
  const fs::path root = dir.path() / "model";
  copy_files("unet_tiny", root / "unet", {"config.json", "diffusion_pytorch_model.safetensors"});
  copy_files("vae_tiny", root / "vae", {"config.json", "diffusion_pytorch_model.safetensors"});
  add_text_parts(root);
  const auto folder = pipeline::load_model_folder(root.string());
  REQUIRE(folder.vae.has_value());
  CHECK(folder.vae_scale_factor() == 4);
  CHECK(folder.latent_shape(32, 16) == std::array<std::size_t, 3>{4, 8, 4});

  const auto grid = [&](const std::string& name, std::vector<std::string> extra) {
    std::vector<std::string> args = {
        "--model", root.string(), "--prompt", "a cat", "--num_inference_steps", "2", "--height",
        "16",      "--width",     "16",       "--out", dir.file(name)};
    args.insert(args.end(), extra.begin(), extra.end());
    return run(args);
  };
  REQUIRE(grid("plain.png", {}) == 0);
  const auto plain = tools::load_image(dir.file("plain.png"));
  CHECK(plain.width == 20);  // one 16×16 image + 2·2 padding
  CHECK(plain.height == 20);
  CHECK(has_contrast(plain, 16, 16));

  const std::string lora = test::data_path("lora/lora_kohya.safetensors");
  REQUIRE(grid("lora0.png", {"--lora", lora, "--lora_scale", "0"}) == 0);
  CHECK(tools::load_image(dir.file("lora0.png")) == plain);  // multiplier 0: the base model
  REQUIRE(grid("lora1.png", {"--lora", lora}) == 0);
  CHECK_FALSE(tools::load_image(dir.file("lora1.png")) == plain);
}
