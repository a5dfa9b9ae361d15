// `difftrain train` end to end on a tiny pixel-space model folder (the shapes demo's model,
// written as a diffusers folder) and a folder of drawn, captioned PNGs.

#include <CLI/CLI.hpp>
#include <catch2/catch.hpp>
#include <csignal>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "cmd_train.hpp"
#include "difftrain/nn/init.hpp"
#include "difftrain/pipeline/model_folder.hpp"
#include "image_io.hpp"
#include "json_config.hpp"
#include "shapes_pipeline.hpp"
#include "support/temp_dir.hpp"
#include "support/tensor_match.hpp"

namespace fs = std::filesystem;
using namespace difftrain;
using difftrain::tools::TrainCommandOptions;

namespace {

// A tiny model folder and a data folder of n captioned images, built once per test case.
struct Fixture {
  test::TempDir dir;
  std::string model, data, instance, klass;

  Fixture() {
    shapes::ModelSizes sizes;
    sizes.image_size = 8;
    sizes.block_out_channels = {16, 16};
    sizes.text_hidden_size = 16;
    sizes.text_layers = 1;
    auto m = shapes::make_models(sizes, fs::path(dir.str()) / "tok", 7);
    model = dir / "model";
    pipeline::save_model_folder(
        model, pipeline::ModelFolderParts<models::UNet2DConditionModel<float>,
                                          models::ClipTextModel<float>>{
                   m.unet, m.unet_config, m.text.model(), m.text_config, m.tokenizer_dir,
                   shapes::scheduler_config_json(PredictionType::epsilon)});
    const auto specs = shapes::base_specs();
    const Tensor4<float> images = shapes::draw_batch(specs, 8, RandomStream{3, 0});
    data = dir / "data";
    instance = dir / "instance";
    klass = dir / "class";
    for (const auto& d : {data, instance, klass}) fs::create_directories(d);
    for (std::size_t i = 0; i < 6; ++i) {
      const Tensor3<float> image = xt::view(images, i);
      const std::string stem = "img" + std::to_string(i);
      tools::save_png(data + "/" + stem + ".png", tools::tensor_to_image(image));
      std::ofstream(data + "/" + stem + ".txt") << shapes::caption(specs[i]) << "\n";
      tools::save_png((i < 3 ? instance : klass) + "/" + stem + ".png",
                      tools::tensor_to_image(image));
    }
  }

  TrainCommandOptions options(const std::string& out) const {
    TrainCommandOptions o;
    o.pretrained_model_name_or_path = model;
    o.train_data_dir = data;
    o.trainer.output_dir = out;
    o.resolution = 8;
    o.trainer.train_batch_size = 2;
    o.max_train_steps = 4;
    o.trainer.checkpointing_steps = 2;
    o.trainer.lr_warmup_steps = 0;
    o.trainer.learning_rate = 1e-3;
    o.trainer.seed = 11;
    o.plain_log = true;
    return o;
  }
};

std::vector<std::string> read_lines(const fs::path& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

std::map<std::string, std::vector<float>> read_all(const fs::path& path) {
  std::map<std::string, std::vector<float>> out;
  const auto file = io::SafetensorsFile::open(path.string());
  for (const auto& name : file.names())
    if (file.info(name).dtype == io::Dtype::F32) out[name] = file.read<float>(name);
  return out;
}

int run_cli(const std::vector<std::string>& args) {
  CLI::App app;
  int exit_code = 0;
  tools::add_train_command(app, exit_code);
  std::vector<std::string> reversed(args.rbegin(), args.rend());
  reversed.push_back("train");
  app.parse(reversed);
  return exit_code;
}

}  // namespace

TEST_CASE("difftrain train: LoRA from a captioned folder, checkpoints, log, validation") {
  Fixture f;
  const std::string out = f.dir / "out";
  TrainCommandOptions o = f.options(out);
  o.validation_prompt = "a red circle";
  o.num_validation_images = 2;
  o.validation_inference_steps = 2;
  o.validation_epochs = 100;  // only the final validation
  const auto r = tools::run_train(o, stdout);
  CHECK(r.global_step == 4);
  CHECK_FALSE(r.interrupted);

  // The LoRA loads back with the model's module names; training moved B away from its zero init.
  auto m = pipeline::load_model_folder(f.model);
  const auto state = lora::read_lora(r.lora_file.string(), lora::module_names(m.unet));
  REQUIRE(state.size() > 0);
  double max_up = 0;
  for (const auto& [name, w] : state)
    for (float v : w.up) max_up = std::max(max_up, double(std::abs(v)));
  CHECK(max_up > 0);
  const auto meta = io::SafetensorsFile::open(r.lora_file.string()).metadata();
  CHECK(meta.at("ss_network_dim") == "4");
  CHECK(meta.at("ss_max_train_steps") == "4");
  CHECK(meta.at("ss_num_train_images") == "6");

  // One CSV row per step, finite losses; checkpoints at 2 and 4; the final validation grid.
  const auto lines = read_lines(fs::path(out) / "training_log.csv");
  REQUIRE(lines.size() == 5);
  CHECK(lines[0] == "step,loss,lr,grad_norm,skipped");
  CHECK(lines[4].rfind("4,", 0) == 0);
  CHECK(fs::is_directory(fs::path(out) / "checkpoint-2"));
  CHECK(fs::is_directory(fs::path(out) / "checkpoint-4"));
  REQUIRE(r.validation_images.size() == 1);
  const auto grid = tools::load_image(r.validation_images[0].string());
  CHECK(grid.width == 2 * 8 + 3 * 2);  // 2 columns of 8 px, padding 2 around
}

TEST_CASE("difftrain train: resume from a checkpoint repeats the uninterrupted run") {
  Fixture f;
  const std::string a = f.dir / "a", b = f.dir / "b";
  const auto full = tools::run_train(f.options(a), stdout);

  // Stop after step 2 (Ctrl-C: the checkpoint and the LoRA are saved), then resume "latest".
  const auto first = tools::run_train(f.options(b), stdout, [](const train::StepLog& s) {
    if (s.step == 2) std::raise(SIGINT);
  });
  CHECK(first.interrupted);
  CHECK(first.global_step == 2);
  CHECK(fs::exists(first.lora_file));
  TrainCommandOptions resumed = f.options(b);
  resumed.trainer.resume_from_checkpoint = "latest";
  const auto second = tools::run_train(resumed, stdout);
  CHECK(second.global_step == 4);
  CHECK(read_all(second.lora_file) == read_all(full.lora_file));
  CHECK(read_lines(fs::path(b) / "training_log.csv").size() == 5);
}

TEST_CASE("difftrain train: DreamBooth with prior preservation, PEFT output") {
  Fixture f;
  TrainCommandOptions o = f.options(f.dir / "db");
  o.train_data_dir.clear();
  o.instance_data_dir = f.instance;
  o.instance_prompt = "a sks shape";
  o.class_data_dir = f.klass;
  o.class_prompt = "a shape";
  o.trainer.with_prior_preservation = true;
  o.max_train_steps = 2;
  o.save_format = "peft";
  o.trainer.loss_type = "huber";  // kohya's further options reach the step
  o.min_timestep = 100;
  o.max_timestep = 900;
  o.trainer.noise.multires_noise_iterations = 2;
  const auto r = tools::run_train(o, stdout);
  CHECK(r.global_step == 2);
  const auto tensors = read_all(r.lora_file);
  REQUIRE(!tensors.empty());
  for (const auto& [name, v] : tensors) CHECK(name.rfind("unet.", 0) == 0);
}

TEST_CASE("difftrain train: JSON config, command line wins, errors") {
  Fixture f;
  const std::string out = f.dir / "cfg";
  f.dir.write("config.json", "{\"pretrained_model_name_or_path\": \"" + f.model +
                                 "\", \"train_data_dir\": \"" + f.data +
                                 "\", \"resolution\": 8, \"train_batch_size\": 2,"
                                 " \"max_train_steps\": 3, \"lr_warmup_steps\": 0,"
                                 " \"checkpointing_steps\": 0, \"plain_log\": true}");
  CHECK(run_cli({"--config", f.dir / "config.json", "--output_dir", out, "--max_train_steps",
                 "1"}) == 0);
  CHECK(read_lines(fs::path(out) / "training_log.csv").size() == 2);  // 1 step: the flag won

  f.dir.write("bad.json", "{\"learning_rat\": 0.1}");
  CHECK(run_cli({"--config", f.dir / "bad.json"}) == 1);
  CLI::App app;
  int code = 0;
  tools::add_train_command(app, code);
  CHECK_THROWS_WITH(tools::apply_json_config(*app.get_subcommand("train"), f.dir / "bad.json"),
                    Catch::Contains("unknown key 'learning_rat'"));

  TrainCommandOptions o = f.options(f.dir / "err");
  o.pretrained_model_name_or_path = f.dir / "missing";
  CHECK_THROWS_WITH(tools::run_train(o), Catch::Contains("does not exist"));
  o = f.options(f.dir / "err");
  o.instance_data_dir = f.instance;
  CHECK_THROWS_WITH(tools::run_train(o), Catch::Contains("exactly one of --train_data_dir"));
  o = f.options(f.dir / "err");
  o.save_format = "ckpt";
  CHECK_THROWS_WITH(tools::run_train(o), Catch::Contains("expected kohya or peft"));
  o = f.options(f.dir / "err");
  o.trainer.loss_type = "l3";
  CHECK_THROWS_WITH(tools::run_train(o), Catch::Contains("l3"));
  o = f.options(f.dir / "err");
  o.min_timestep = 500;
  o.trainer.timestep_bias_strategy = "later";
  CHECK_THROWS(tools::run_train(o));
  o = f.options(f.dir / "err");
  o.resolution = 0;
  CHECK_THROWS_WITH(tools::run_train(o), Catch::Contains("resolution"));
}

TEST_CASE("difftrain train: LoRA A starts as diffusers' scripts draw it (gaussian, std 1/r)") {
  // diffusers' train_text_to_image_lora.py / train_dreambooth_lora.py use
  // init_lora_weights="gaussian": A ~ N(0, (1/r)²), B = 0. --init_lora_weights kaiming_uniform is
  // kohya's (and PEFT's default): A ~ U(±1/√fan_in). One step at a negligible learning rate leaves
  // A as initialised.
  Fixture f;
  auto initial_down = [&](const std::string& init, const std::string& out) {
    TrainCommandOptions o = f.options(f.dir / out);
    o.max_train_steps = 1;
    o.trainer.checkpointing_steps = 0;
    o.trainer.learning_rate = 1e-30;
    o.init_lora_weights = init;
    const auto r = tools::run_train(o);
    auto m = pipeline::load_model_folder(f.model);
    return lora::read_lora(r.lora_file.string(), lora::module_names(m.unet));
  };
  const auto gaussian = initial_down("gaussian", "gaussian");
  double sum2 = 0, count = 0, beyond_kaiming = 0;
  for (const auto& [name, w] : gaussian) {
    const double bound = 1.0 / std::sqrt(double(w.down.shape()[1]));
    for (float v : w.down) {
      sum2 += double(v) * v;
      count += 1;
      beyond_kaiming += std::abs(v) > bound ? 1 : 0;
    }
  }
  REQUIRE(count >= 512);
  CHECK(std::sqrt(sum2 / count) == Approx(1.0 / 4).epsilon(0.08));  // rank 4
  CHECK(beyond_kaiming > 0);
  CHECK(TrainCommandOptions{}.init_lora_weights == "gaussian");

  for (const auto& [name, w] : initial_down("kaiming_uniform", "kaiming")) {
    const double bound = 1.0 / std::sqrt(double(w.down.shape()[1]));
    for (float v : w.down) REQUIRE(std::abs(v) <= bound);
  }
  TrainCommandOptions o = f.options(f.dir / "err");
  o.init_lora_weights = "pissa";
  CHECK_THROWS_WITH(tools::run_train(o), Catch::Contains("expected gaussian or kaiming_uniform"));
}

TEST_CASE("difftrain train: every flag reaches its option, under diffusers' and kohya's names") {
  CLI::App app;
  TrainCommandOptions o;
  tools::add_train_options(app, o);
  const std::vector<std::string> args = {"--network_dim",
                                         "8",
                                         "--network_alpha",
                                         "4",
                                         "--use_rslora",
                                         "--lora_dropout",
                                         "0.1",
                                         "--rank_dropout",
                                         "0.2",
                                         "--module_dropout",
                                         "0.3",
                                         "--init_lora_weights",
                                         "kaiming_uniform",
                                         "--min_snr_gamma",
                                         "5",
                                         "--p2_gamma",
                                         "1.5",
                                         "--scale_v_pred_loss_like_noise_pred",
                                         "--noise_offset",
                                         "0.05",
                                         "--noise_offset_random_strength",
                                         "--adaptive_noise_scale",
                                         "0.01",
                                         "--ip_noise_gamma",
                                         "0.1",
                                         "--ip_noise_gamma_random_strength",
                                         "--huber_scale",
                                         "2",
                                         "--lr_num_cycles",
                                         "3",
                                         "--lr_power",
                                         "2",
                                         "--loraplus_lr_ratio",
                                         "16",
                                         "--use_ema",
                                         "--v_parameterization",
                                         "--clip_skip",
                                         "2",
                                         "--zero_terminal_snr"};
  app.parse(std::vector<std::string>(args.rbegin(), args.rend()));

  const lora::LoraConfig l = tools::lora_config(o);
  CHECK(l.rank == 8);
  CHECK(l.alpha == 4);
  CHECK(l.use_rslora);
  CHECK(l.dropout == 0.1);
  CHECK(l.rank_dropout == 0.2);
  CHECK(l.module_dropout == 0.3);
  CHECK(l.init == lora::LoraInit::kaiming_uniform);

  const train::TrainerOptions t = tools::trainer_options(o, 10);
  CHECK(t.weighting.snr_gamma == 5.0);
  CHECK(t.weighting.p2_gamma == 1.5);
  CHECK(t.weighting.scale_v_pred_loss_like_noise_pred);
  CHECK(t.prediction_type == PredictionType::v_prediction);
  CHECK(t.lr_num_cycles == 3);
  CHECK(t.lr_power == 2);
  CHECK(t.loraplus_lr_ratio == 16);
  CHECK(t.use_ema);
  const TrainStepOptions step = train::train_step_options(t);
  CHECK(step.noise.noise_offset == 0.05f);
  CHECK(step.noise.noise_offset_random_strength);
  CHECK(step.noise.adaptive_noise_scale == 0.01f);
  CHECK(step.noise.input_perturbation == 0.1f);
  CHECK(step.noise.input_perturbation_random_strength);
  CHECK(step.huber.huber_scale == 2);
  CHECK(o.clip_skip == 2);
  CHECK(o.zero_terminal_snr);

  TrainCommandOptions bad;
  bad.prediction_type = "epsilon";
  bad.v_parameterization = true;
  CHECK_THROWS_WITH(tools::trainer_options(bad, 10), Catch::Contains("--v_parameterization"));
  bad = TrainCommandOptions{};
  bad.module_dropout = 1.5;
  CHECK_THROWS_WITH(tools::lora_config(bad), Catch::Contains("module_dropout"));
}

TEST_CASE("difftrain train: --clip_skip, --zero_terminal_snr and --use_ema change the result") {
  // Each changes what is trained (the context, the noise schedule) or what is saved (the EMA of
  // the adapters): the LoRA differs from the run without it, all else equal.
  Fixture f;
  auto lora_of = [&](const std::string& out, auto&& change) {
    TrainCommandOptions o = f.options(f.dir / out);
    o.trainer.checkpointing_steps = 0;
    change(o);
    return read_all(tools::run_train(o).lora_file);
  };
  const auto base = lora_of("base", [](TrainCommandOptions&) {});
  CHECK(base == lora_of("same", [](TrainCommandOptions&) {}));  // deterministic
  CHECK(base != lora_of("skip", [](TrainCommandOptions& o) { o.clip_skip = 2; }));
  CHECK(base == lora_of("skip1", [](TrainCommandOptions& o) { o.clip_skip = 1; }));  // last layer
  CHECK(base != lora_of("zsnr", [](TrainCommandOptions& o) { o.zero_terminal_snr = true; }));
  CHECK(base != lora_of("ema", [](TrainCommandOptions& o) { o.trainer.use_ema = true; }));
}

TEST_CASE("difftrain train: a latent model (VAE) with and without --cache_latents") {
  Fixture f;
  // The pixel-space folder plus the golden tiny VAE (4 latent channels, factor 4) and a UNet
  // taking its latents.
  const fs::path model = f.dir / "latent_model";
  fs::copy(f.model, model, fs::copy_options::recursive);
  fs::create_directories(model / "vae");
  for (const char* name : {"config.json", "diffusion_pytorch_model.safetensors"})
    fs::copy_file(test::data_path("vae_tiny/" + std::string(name)), model / "vae" / name);
  nlohmann::json unet_config;
  std::ifstream(model / "unet" / "config.json") >> unet_config;
  unet_config["in_channels"] = 4;
  unet_config["out_channels"] = 4;
  models::UNet2DConditionModel<float> unet(models::UNet2DConditionConfig::from_json(unet_config));
  nn::init_like_pytorch<float>(unet, RandomStream{5, 0});
  io::write_json_file(model / "unet" / "config.json", unet_config);
  pipeline::save_model_weights(unet, model / "unet" / "diffusion_pytorch_model.safetensors");

  for (const bool cache : {false, true}) {
    TrainCommandOptions o = f.options(f.dir / (cache ? "cached" : "uncached"));
    o.pretrained_model_name_or_path = model.string();
    o.resolution = 16;  // the 8-px images resized: 4×4 latents
    o.max_train_steps = 2;
    o.cache_latents = cache;
    const auto r = tools::run_train(o, stdout);
    CHECK(r.global_step == 2);
    const auto lines = read_lines(fs::path(o.trainer.output_dir) / "training_log.csv");
    REQUIRE(lines.size() == 3);
    const double loss = std::stod(lines[2].substr(lines[2].find(',') + 1));
    CHECK(std::isfinite(loss));
  }
}
