// `difftrain train` end to end on a tiny pixel-space model folder (the shapes demo's model,
// written as a diffusers folder) and a folder of drawn, captioned PNGs.

#include <CLI/CLI.hpp>
#include <catch2/catch.hpp>
#include <cmath>
#include <csignal>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "cmd_train.hpp"
#include "config_file.hpp"
#include "difftrain/io/sha256.hpp"
#include "difftrain/nn/init.hpp"
#include "difftrain/pipeline/model_folder.hpp"
#include "image_io.hpp"
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
    o.lr_warmup_steps = 0;
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
  // kohya's metadata from the model and options (kohya_metadata.hpp formats it).
  CHECK(meta.at("ss_v2") == "False");
  CHECK(meta.at("ss_base_model_version") == "sd_v1");
  CHECK(meta.at("ss_learning_rate") == "0.001");
  CHECK(meta.at("ss_optimizer") == "torch.optim.adamw.AdamW");
  CHECK(meta.count("ss_network_args") == 0);  // kohya writes it only with network args
  CHECK(meta.at("modelspec.architecture") == "stable-diffusion-v1/lora");
  CHECK(meta.at("modelspec.resolution") == "8x8");
  CHECK(meta.at("modelspec.title") == o.output_name);
  // sshs_model_hash: SHA-256 of the bytes after the header, as sd-webui-additional-networks.
  {
    std::ifstream in(r.lora_file, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::uint64_t n = 0;
    std::memcpy(&n, bytes.data(), 8);
    CHECK(meta.at("sshs_model_hash") == io::sha256_hex(std::string_view(bytes).substr(8 + n)));
    CHECK(meta.at("sshs_legacy_hash") == "e3b0c442");  // < 1 MiB: the hash of nothing
  }

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

TEST_CASE("difftrain train: JSON and TOML configs, command line wins, errors") {
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
  CHECK_THROWS_WITH(tools::apply_config_file(*app.get_subcommand("train"), f.dir / "bad.json"),
                    Catch::Contains("unknown key 'learning_rat'"));

  // kohya's TOML config (--config_file, ".toml" implied): [sections] only group keys; kohya's
  // spellings (network_dim) are keys too.
  const std::string toml_out = f.dir / "toml";
  f.dir.write("kohya.toml", "[model_arguments]\npretrained_model_name_or_path = '" + f.model +
                                "'\n[dataset_arguments]\ntrain_data_dir = '" + f.data +
                                "'\nresolution = 8\n[training_arguments]\n"
                                "train_batch_size = 2\nmax_train_steps = 2\nnetwork_dim = 2\n"
                                "learning_rate = 1e-4\nlr_warmup_steps = 0\n"
                                "checkpointing_steps = 0\nplain_log = true\n");
  CHECK(run_cli({"--config_file", f.dir / "kohya", "--output_dir", toml_out}) == 0);
  CHECK(read_lines(fs::path(toml_out) / "training_log.csv").size() == 3);
  const std::vector<tools::ConfigEntry> entries = tools::read_config_file(f.dir / "kohya.toml");
  REQUIRE(entries.size() == 10);
  auto value_of = [&](const std::string& key) {
    for (const auto& e : entries)
      if (e.key == key) return e.values;
    return std::vector<std::string>{"missing"};
  };
  CHECK(std::stod(value_of("learning_rate").at(0)) == 1e-4);  // the shortest round-trip text
  CHECK(value_of("network_dim") == std::vector<std::string>{"2"});
  CHECK(value_of("plain_log") == std::vector<std::string>{"true"});
  f.dir.write("list.toml", "lora_target_modules = ['to_q', 'to_v']\n");
  CHECK(tools::read_config_file(f.dir / "list.toml").at(0).values ==
        std::vector<std::string>{"to_q", "to_v"});
  auto toml_error = [&](const std::string& text) {
    f.dir.write("bad.toml", text);
    CLI::App a;
    int c = 0;
    tools::add_train_command(a, c);
    try {
      tools::apply_config_file(*a.get_subcommand("train"), f.dir / "bad.toml");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK_THAT(toml_error("[a]\nlearning_rat = 1.0\n"),
             Catch::Contains("unknown key 'learning_rat'"));
  CHECK_THAT(toml_error("rank = 4\n[b]\nnetwork_dim = 8\n"), Catch::Contains("sets --rank twice"));
  CHECK_THAT(toml_error("rank = = 4\n"), Catch::Contains("not valid TOML (line 1"));
  CHECK_THAT(toml_error("rank = 'four'\n"), Catch::Contains("key 'rank' has value"));
  CHECK_THAT(toml_error("seed = 1979-05-27\n"), Catch::Contains("expected a string, number"));
  CHECK_THROWS_WITH(tools::read_config_file(f.dir / "nothing"), Catch::Contains("does not exist"));

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
  o.image_interpolation_mode = "cubic";
  CHECK_THROWS_WITH(tools::run_train(o), Catch::Contains("--image_interpolation_mode"));
  o = f.options(f.dir / "err");
  o.save_model_as = "ckpt";
  CHECK_THROWS_WITH(tools::run_train(o), Catch::Contains("--save_model_as is 'ckpt'"));
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
                                         "--network_dropout",
                                         "0.15",
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
                                         "--zero_terminal_snr",
                                         "--v_pred_like_loss",
                                         "0.3",
                                         "--lr_warmup_steps",
                                         "0.25",
                                         "--unet_lr",
                                         "3e-4",
                                         "--network_train_unet_only",
                                         "--text_encoder_lr",
                                         "3e-5",
                                         "--train_text_encoder",
                                         "--network_train_text_encoder_only",
                                         "--save_model_as",
                                         "safetensors",
                                         "--image_interpolation_mode",
                                         "lanczos",
                                         "--caption_prefix",
                                         "sks",
                                         "--caption_suffix",
                                         "photo",
                                         "--proportion_empty_prompts",
                                         "0.05",
                                         "--caption_dropout_every_n_epochs",
                                         "4",
                                         "--shuffle_caption",
                                         "--keep_tokens",
                                         "2",
                                         "--keep_tokens_separator",
                                         "|||",
                                         "--caption_separator",
                                         ";",
                                         "--secondary_separator",
                                         ";;;",
                                         "--caption_tag_dropout_rate",
                                         "0.1"};
  app.parse(std::vector<std::string>(args.rbegin(), args.rend()));

  const lora::LoraConfig l = tools::lora_config(o);
  CHECK(l.rank == 8);
  CHECK(l.alpha == 4);
  CHECK(l.use_rslora);
  CHECK(l.dropout == 0.1);
  CHECK(l.rank_dropout == 0.2);
  CHECK(l.network_dropout == 0.15);
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
  CHECK(t.weighting.v_pred_like_loss == 0.3);
  CHECK(o.image_interpolation_mode == "lanczos");
  CHECK(o.caption.caption_prefix == "sks");
  CHECK(o.caption.caption_suffix == "photo");
  CHECK(o.caption.caption_dropout_rate == 0.05);
  CHECK(o.caption.caption_dropout_every_n_epochs == 4);
  CHECK(o.caption.shuffle_caption);
  CHECK(o.caption.keep_tokens == 2);
  CHECK(o.caption.keep_tokens_separator == "|||");
  CHECK(o.caption.caption_separator == ";");
  CHECK(o.caption.secondary_separator == ";;;");
  CHECK(o.caption.caption_tag_dropout_rate == 0.1);
  CHECK(t.learning_rate == 3e-4);
  CHECK(t.text_encoder_lr == 3e-5);
  CHECK(o.train_text_encoder);
  CHECK(o.network_train_text_encoder_only);
  CHECK(t.max_train_steps == 1000);  // 100 epochs of 10 steps
  CHECK(t.lr_warmup_steps == 250);   // kohya: a ratio below 1
  o.lr_warmup_steps = 7;
  CHECK(tools::trainer_options(o, 10).lr_warmup_steps == 7);
  o.lr_warmup_steps = 7.5;
  CHECK_THROWS_WITH(tools::trainer_options(o, 10), Catch::Contains("--lr_warmup_steps is 7.5"));
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
  CHECK(base != lora_of("netdrop", [](TrainCommandOptions& o) { o.network_dropout = 0.5; }));
  // The caption options reach the prompts: dropping every caption by rate 1 or by "every epoch"
  // trains the same empty prompts; a prefix changes the prompts.
  const auto empty =
      lora_of("drop_rate", [](TrainCommandOptions& o) { o.caption.caption_dropout_rate = 1; });
  CHECK(base != empty);
  CHECK(empty == lora_of("drop_every", [](TrainCommandOptions& o) {
          o.caption.caption_dropout_every_n_epochs = 1;
        }));
  CHECK(base != lora_of("prefix", [](TrainCommandOptions& o) { o.caption.caption_prefix = "a"; }));
}

TEST_CASE("difftrain train: kohya folders with repeats, regularisation images and buckets") {
  Fixture f;
  // train/3_shapes: two images (one 16×8, wide), reg/1_shape: three images with one caption file.
  const fs::path train = f.dir / "kohya_train", reg = f.dir / "kohya_reg";
  fs::create_directories(train / "3_shapes");
  fs::create_directories(reg / "1_shape");
  for (const auto& entry : fs::directory_iterator(f.data)) {
    const std::string stem = entry.path().stem().string();
    if (entry.path().extension() != ".png") continue;
    if (stem == "img0" || stem == "img1") {
      fs::copy(entry.path(), train / "3_shapes" / entry.path().filename());
      fs::copy(fs::path(f.data) / (stem + ".txt"), train / "3_shapes" / (stem + ".txt"));
    } else if (stem == "img2" || stem == "img3" || stem == "img4") {
      fs::copy(entry.path(), reg / "1_shape" / entry.path().filename());
    }
  }
  tools::Image wide(16, 8);
  tools::save_png((train / "3_shapes" / "img0.png").string(), wide);  // replaces img0 by 16×8
  TrainCommandOptions o = f.options(f.dir / "kohya_out");
  o.train_data_dir = train.string();
  o.reg_data_dir = reg.string();
  o.trainer.prior_loss_weight = 0.5;
  o.enable_bucket = true;
  o.buckets.min_bucket_reso = 4;
  o.buckets.max_bucket_reso = 16;
  o.buckets.bucket_reso_steps = 4;
  o.caption.shuffle_caption = true;
  o.caption.keep_tokens = 1;
  const auto r = tools::run_train(o, stdout);
  CHECK(r.global_step == 4);
  const auto meta = io::SafetensorsFile::open(r.lora_file.string()).metadata();
  CHECK(meta.at("ss_num_train_images") == "6");  // 2 images × 3 repeats
  CHECK(meta.at("ss_num_reg_images") == "3");
  CHECK(meta.at("ss_dataset_dirs") == "{\"3_shapes\": {\"n_repeats\": 3, \"img_count\": 2}}");
  CHECK(meta.at("ss_reg_dataset_dirs") == "{\"1_shape\": {\"n_repeats\": 1, \"img_count\": 3}}");
  CHECK(meta.at("ss_enable_bucket") == "True");
  CHECK(meta.at("ss_min_bucket_reso") == "4");
  CHECK(meta.at("ss_shuffle_caption") == "True");
  CHECK(meta.at("ss_keep_tokens") == "1");
  // Buckets of area <= 64 from 4 to 16 by 4: (4,12) (4,16) (8,8) (12,4) (16,4); the 16×8 image
  // (aspect 2) has error 1 to both (8,8) and (12,4): the first, (8,8) at index 2, as numpy's
  // argmin. So every image is in (8,8): 6 + 6 reg views (3 images balanced to 2 repeats each).
  CHECK(meta.at("ss_bucket_info") ==
        "{\"buckets\": {\"2\": {\"resolution\": [8, 8], \"count\": 12}}, \"mean_img_ar_error\": "
        "0.2}");

  // Resume with all of it on (repeats, reg images, buckets, shuffled captions, a random crop
  // and flip) repeats the uninterrupted run.
  o.random_flip = true;
  o.trainer.output_dir = f.dir / "kohya_full";
  const auto full = tools::run_train(o, stdout);
  TrainCommandOptions interrupted = o;
  interrupted.trainer.output_dir = f.dir / "kohya_resumed";
  const auto first = tools::run_train(interrupted, stdout, [](const train::StepLog& s) {
    if (s.step == 2) std::raise(SIGINT);
  });
  CHECK(first.interrupted);
  interrupted.trainer.resume_from_checkpoint = "latest";
  CHECK(read_all(tools::run_train(interrupted, stdout).lora_file) == read_all(full.lora_file));

  // The same folders as kohya's dataset config (--dataset_config) train the same LoRA.
  const fs::path toml = f.dir / "dataset.toml";
  std::ofstream(toml) << "[general]\nshuffle_caption = true\nkeep_tokens = 1\n[[datasets]]\n"
                      << "[[datasets.subsets]]\nimage_dir = '" << (train / "3_shapes").string()
                      << "'\nnum_repeats = 3\nclass_tokens = 'shapes'\n"
                      << "[[datasets.subsets]]\nimage_dir = '" << (reg / "1_shape").string()
                      << "'\nis_reg = true\nclass_tokens = 'shape'\n";
  TrainCommandOptions from_toml = o;
  from_toml.train_data_dir.clear();
  from_toml.reg_data_dir.clear();
  from_toml.caption = {};  // from the file's [general]
  from_toml.dataset_config = toml.string();
  from_toml.trainer.output_dir = f.dir / "kohya_toml";
  CHECK(read_all(tools::run_train(from_toml, stdout).lora_file) == read_all(full.lora_file));

  o.trainer.with_prior_preservation = true;
  CHECK_THROWS_WITH(tools::run_train(o), Catch::Contains("--reg_data_dir"));
}

TEST_CASE("difftrain train: --alpha_mask and --masked_loss weight the loss by the mask") {
  Fixture f;
  // The data again as RGBA PNGs with a constant alpha, and a mask folder of the same names.
  auto with_alpha = [&](const std::string& name, std::uint8_t alpha) {
    const fs::path dir = f.dir / name;
    fs::create_directories(dir);
    for (const auto& entry : fs::directory_iterator(f.data)) {
      if (entry.path().extension() == ".txt") fs::copy(entry.path(), dir / entry.path().filename());
      if (entry.path().extension() != ".png") continue;
      const tools::Image im = tools::load_image(entry.path().string());
      std::vector<std::uint8_t> rgba;
      for (std::size_t p = 0; p < im.rgb.size(); p += 3)
        rgba.insert(rgba.end(), {im.rgb[p], im.rgb[p + 1], im.rgb[p + 2], alpha});
      REQUIRE(stbi_write_png((dir / entry.path().filename()).c_str(), im.width, im.height, 4,
                             rgba.data(), im.width * 4));
    }
    return dir.string();
  };
  auto run = [&](const std::string& out, auto&& change) {
    TrainCommandOptions o = f.options(f.dir / out);
    o.trainer.checkpointing_steps = 0;
    change(o);
    return tools::run_train(o, stdout);
  };
  const auto plain = run("plain", [](TrainCommandOptions&) {});
  const std::string opaque = with_alpha("opaque", 255), clear = with_alpha("clear", 0);
  // Mask 1 everywhere: the loss and the LoRA are those of the run without a mask.
  const auto ones = run("ones", [&](TrainCommandOptions& o) {
    o.train_data_dir = opaque;
    o.alpha_mask = true;
  });
  CHECK(read_all(ones.lora_file) == read_all(plain.lora_file));
  // Mask 0 everywhere: the loss is 0 and the up matrices keep their zero init.
  const auto zeros = run("zeros", [&](TrainCommandOptions& o) {
    o.train_data_dir = clear;
    o.alpha_mask = true;
  });
  for (const std::string& line : read_lines(fs::path(f.dir / "zeros") / "training_log.csv"))
    if (line.rfind("step", 0) != 0) CHECK(line.substr(line.find(',') + 1, 2) == "0,");
  auto m = pipeline::load_model_folder(f.model);
  for (const auto& [name, w] :
       lora::read_lora(zeros.lora_file.string(), lora::module_names(m.unet)))
    for (float v : w.up) REQUIRE(v == 0.0f);
  // The same zero masks from a mask folder of black images (--masked_loss
  // --conditioning_data_dir: the red channel).
  const fs::path black = f.dir / "black";
  fs::create_directories(black);
  for (const auto& entry : fs::directory_iterator(f.data))
    if (entry.path().extension() == ".png")
      tools::save_png((black / entry.path().filename()).string(), tools::Image(8, 8));
  const auto folder = run("folder", [&](TrainCommandOptions& o) {
    o.masked_loss = true;
    o.conditioning_data_dir = black.string();
  });
  CHECK(read_all(folder.lora_file) == read_all(zeros.lora_file));
  TrainCommandOptions bad = f.options(f.dir / "bad");
  bad.masked_loss = true;
  CHECK_THROWS_WITH(tools::run_train(bad), Catch::Contains("--masked_loss needs masks"));
}

TEST_CASE(
    "difftrain train: an unreadable image is skipped, or stops the run with --strict_images") {
  Fixture f;
  const fs::path data = f.dir / "with_bad";
  fs::copy(f.data, data, fs::copy_options::recursive);
  std::ofstream(data / "bad.png") << "not a PNG";
  std::ofstream(data / "bad.txt") << "a red circle";
  {  // a PNG whose header is fine and whose pixel data is cut off
    std::ifstream in(data / "img0.png", std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    std::ofstream(data / "cut.png", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
    std::ofstream(data / "cut.txt") << "a blue square";
    REQUIRE(bytes.size() > 100);
  }
  TrainCommandOptions o = f.options(f.dir / "skip");
  o.train_data_dir = data.string();
  o.max_train_steps = 2;
  const auto r = tools::run_train(o, stdout);
  CHECK(r.global_step == 2);
  CHECK(io::SafetensorsFile::open(r.lora_file.string()).metadata().at("ss_num_train_images") ==
        "6");
  o.strict_images = true;
  o.trainer.output_dir = f.dir / "strict";
  CHECK_THROWS_WITH(tools::run_train(o),
                    Catch::Contains("bad.png") && Catch::Contains("--strict_images"));
  fs::remove(data / "bad.png");
  CHECK_THROWS_WITH(tools::run_train(o),
                    Catch::Contains("cut.png") && Catch::Contains("--strict_images"));
}

// The fixture's pixel-space folder plus the golden tiny VAE (4 latent channels, factor 4) and a
// UNet taking its latents.
fs::path make_latent_model(const Fixture& f) {
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
  return model;
}

TEST_CASE("difftrain train: a latent model (VAE) with and without --cache_latents") {
  Fixture f;
  const fs::path model = make_latent_model(f);
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

// Adds `delta` to the first value of tensor `name` in the safetensors file (its other tensors and
// metadata unchanged).
void perturb_weight(const fs::path& path, const std::string& name, float delta) {
  std::vector<std::vector<float>> values;
  std::vector<io::TensorToWrite> tensors;
  std::map<std::string, std::string> metadata;
  {
    const auto file = io::SafetensorsFile::open(path.string());
    metadata = file.metadata();
    for (const auto& n : file.names()) values.push_back(file.read<float>(n));
    std::size_t i = 0;
    for (const auto& n : file.names()) {
      if (n == name) values[i][0] += delta;
      tensors.push_back(io::TensorToWrite::from_bytes(
          n, io::Dtype::F32, file.info(n).shape, std::as_bytes(std::span<const float>(values[i]))));
      ++i;
    }
    REQUIRE(file.contains(name));
  }
  io::save_safetensors(path.string(), tensors, metadata);
}

std::set<std::string> folder_captions(const fs::path& folder) {
  std::set<std::string> captions;
  for (const auto& e : fs::directory_iterator(folder))
    if (e.path().extension() == ".txt") captions.insert(read_lines(e.path()).at(0));
  return captions;
}

TEST_CASE("difftrain train: disk caches are reused for the same input, model and options only") {
  Fixture f;
  const fs::path base_model = make_latent_model(f);
  const fs::path data = f.dir / "cached_data", cache = f.dir / "disk_cache";
  fs::copy(f.data, data, fs::copy_options::recursive);
  int runs = 0;
  auto run = [&](auto&& change, const fs::path& model) {
    TrainCommandOptions o = f.options(f.dir / ("run" + std::to_string(runs++)));
    o.pretrained_model_name_or_path = model.string();
    o.train_data_dir = data.string();
    o.resolution = 16;
    o.max_train_steps = 3;  // 3 micro-batches of 2: each of the 6 images once
    o.trainer.checkpointing_steps = 0;
    o.cache_latents_to_disk = true;
    o.cache_text_encoder_outputs_to_disk = true;
    o.disk_cache_dir = cache.string();
    change(o);
    return tools::run_train(o);
  };
  const auto same_options = [](TrainCommandOptions&) {};
  auto check = [](const tools::DiskCache::Counts& c, std::size_t loaded, std::size_t stored) {
    CHECK(c.loaded == loaded);
    CHECK(c.stored == stored);
    CHECK(c.damaged == 0);
  };
  const std::size_t captions = folder_captions(data).size();
  REQUIRE(captions >= 2);

  const auto first = run(same_options, base_model);
  check(first.latent_cache, 0, 6);
  check(first.text_encoder_cache, 0, captions);
  const auto again = run(same_options, base_model);
  check(again.latent_cache, 6, 0);
  check(again.text_encoder_cache, captions, 0);
  // What is read back is what was computed: the same LoRA, bitwise.
  CHECK(read_all(again.lora_file) == read_all(first.lora_file));

  SECTION("a changed image") {
    tools::Image image = tools::load_image((data / "img0.png").string());
    image.pixel(0, 0)[0] ^= 0xff;
    tools::save_png((data / "img0.png").string(), image);
    const auto r = run(same_options, base_model);
    check(r.latent_cache, 5, 1);
    check(r.text_encoder_cache, captions, 0);
  }
  SECTION("a changed caption") {
    std::ofstream(data / "img1.txt") << "a purple hexagon\n";
    const std::size_t now = folder_captions(data).size();
    const auto r = run(same_options, base_model);
    check(r.latent_cache, 6, 0);
    check(r.text_encoder_cache, now - 1, 1);
  }
  SECTION("another resolution (bucket size)") {
    const auto r = run([](TrainCommandOptions& o) { o.resolution = 24; }, base_model);
    check(r.latent_cache, 0, 6);
    check(r.text_encoder_cache, captions, 0);
  }
  SECTION("another resize filter") {
    const auto r =
        run([](TrainCommandOptions& o) { o.image_interpolation_mode = "nearest"; }, base_model);
    check(r.latent_cache, 0, 6);
  }
  SECTION("another clip_skip") {
    const auto r = run([](TrainCommandOptions& o) { o.clip_skip = 2; }, base_model);
    check(r.latent_cache, 6, 0);
    check(r.text_encoder_cache, 0, captions);
  }
  SECTION("changed model weights: the VAE encoder's, the text encoder's, not the VAE decoder's") {
    const fs::path model = f.dir / "changed_model";
    fs::copy(base_model, model, fs::copy_options::recursive);
    const fs::path vae = model / "vae" / "diffusion_pytorch_model.safetensors";
    perturb_weight(vae, "decoder.conv_in.weight", 0.25f);
    auto r = run(same_options, model);
    check(r.latent_cache, 6, 0);
    perturb_weight(vae, "encoder.conv_in.weight", 0.25f);
    r = run(same_options, model);
    check(r.latent_cache, 0, 6);
    check(r.text_encoder_cache, captions, 0);
    perturb_weight(model / "text_encoder" / "model.safetensors", "text_model.final_layer_norm.bias",
                   0.25f);
    r = run(same_options, model);
    check(r.latent_cache, 6, 0);
    check(r.text_encoder_cache, 0, captions);
  }
  SECTION("a damaged entry is computed again, with a warning naming it") {
    fs::path entry;
    for (const auto& e : fs::directory_iterator(cache))
      if (e.path().filename().string().starts_with("latents-")) entry = e.path();
    REQUIRE(!entry.empty());
    fs::resize_file(entry, fs::file_size(entry) - 4);
    std::FILE* log = std::tmpfile();
    TrainCommandOptions o = f.options(f.dir / "damaged");
    o.pretrained_model_name_or_path = base_model.string();
    o.train_data_dir = data.string();
    o.resolution = 16;
    o.max_train_steps = 3;
    o.cache_latents_to_disk = true;
    o.disk_cache_dir = cache.string();
    const auto r = tools::run_train(o, log);
    CHECK(r.latent_cache.loaded == 5);
    CHECK(r.latent_cache.stored == 1);
    CHECK(r.latent_cache.damaged == 1);
    std::rewind(log);
    std::string text(1 << 16, '\0');
    text.resize(std::fread(text.data(), 1, text.size(), log));
    std::fclose(log);
    CHECK_THAT(text, Catch::Contains(entry.string()) && Catch::Contains("damaged"));
    CHECK(read_all(r.lora_file) == read_all(first.lora_file));
  }
}

TEST_CASE("difftrain train: --cache_text_encoder_outputs gives the uncached run's result") {
  Fixture f;
  auto run = [&](const std::string& out, bool cache) {
    TrainCommandOptions o = f.options(f.dir / out);
    o.trainer.checkpointing_steps = 0;
    o.cache_text_encoder_outputs = cache;
    return read_all(tools::run_train(o).lora_file);
  };
  const auto cached = run("cached", true), uncached = run("uncached", false);
  REQUIRE(cached.size() == uncached.size());
  for (const auto& [name, values] : uncached) {
    INFO(name);
    const auto& other = cached.at(name);
    REQUIRE(other.size() == values.size());
    double worst = 0, scale = 0;
    for (std::size_t i = 0; i < values.size(); ++i) {
      worst = std::max(worst, double(std::abs(values[i] - other[i])));
      scale = std::max(scale, double(std::abs(values[i])));
    }
    CHECK(worst <= 1e-5 * std::max(scale, 1.0));
  }
  TrainCommandOptions bad = f.options(f.dir / "bad");
  bad.cache_text_encoder_outputs = true;
  bad.caption.shuffle_caption = true;
  CHECK_THROWS_WITH(tools::run_train(bad), Catch::Contains("--shuffle_caption"));
  bad.caption.shuffle_caption = false;
  bad.train_text_encoder = true;
  CHECK_THROWS_WITH(tools::run_train(bad), Catch::Contains("--train_text_encoder"));
}

TEST_CASE("difftrain train: out-of-range flags are refused, naming the flag") {
  Fixture f;
  auto refused = [&](auto&& change) {
    TrainCommandOptions o = f.options(f.dir / "bad");
    change(o);
    std::string what;
    try {
      tools::run_train(o);
    } catch (const Error& e) {
      what = e.what();
    }
    CHECK_FALSE(fs::exists(fs::path(f.dir / "bad") / "pytorch_lora_weights.safetensors"));
    return what;
  };
  using O = TrainCommandOptions;
  CHECK_THAT(refused([](O& o) { o.lora_alpha = -5; }), Catch::Contains("--lora_alpha is -5"));
  CHECK_THAT(refused([](O& o) { o.lora_alpha = std::nan(""); }), Catch::Contains("--lora_alpha"));
  CHECK_THAT(refused([](O& o) { o.snr_gamma = -1; }), Catch::Contains("--snr_gamma is -1"));
  CHECK_THAT(refused([](O& o) { o.checkpoints_total_limit = -1; }),
             Catch::Contains("--checkpoints_total_limit is -1"));
  CHECK_THAT(refused([](O& o) { o.max_train_steps = -5; }),
             Catch::Contains("--max_train_steps is -5"));
  CHECK_THAT(refused([](O& o) { o.rank = 1000000000; }), Catch::Contains("--rank is 1000000000"));
  CHECK_THAT(refused([](O& o) { o.resolution = 100000; }),
             Catch::Contains("--resolution is 100000"));
  CHECK_THAT(refused([](O& o) { o.output_name = "../escaped"; }),
             Catch::Contains("--output_name is '../escaped'"));
  CHECK_FALSE(fs::exists(f.dir / "escaped.safetensors"));
  CHECK_THAT(refused([](O& o) {
               o.max_train_steps = 0;
               o.num_train_epochs = std::numeric_limits<std::int64_t>::max();
             }),
             Catch::Contains("--num_train_epochs 9223372036854775807"));
  CHECK_THAT(refused([](O& o) { o.on_nonfinite = "ignore"; }),
             Catch::Contains("--on_nonfinite") && Catch::Contains("skip or stop"));
  // --learning_rate 1e300: AdamW's first update makes the weights infinite (loss and gradient
  // were finite): stopped, naming the parameter; nothing written after the step.
  const std::string blown = refused([](O& o) {
    o.trainer.learning_rate = 1e300;
    o.trainer.checkpointing_steps = 1;
  });
  CHECK_THAT(blown, Catch::Contains("is not finite after the update of global step 1") &&
                        Catch::Contains("lora"));
  CHECK(train::list_checkpoints(f.dir / "bad").empty());
  // A negative seed would wrap around to 2^64 − 1: refused by the parser, naming the flag.
  CHECK_THROWS_WITH(run_cli({"--pretrained_model_name_or_path", f.model, "--train_data_dir", f.data,
                             "--output_dir", f.dir / "seed", "--seed", "-1"}),
                    Catch::Contains("--seed"));
}

TEST_CASE("difftrain train: kohya's target set and LoCon (--conv_dim) train every adapter") {
  Fixture f;
  auto run = [&](const std::string& out, auto&& change) {
    TrainCommandOptions o = f.options(f.dir / out);
    o.trainer.checkpointing_steps = 0;
    o.rank = 4;
    o.lora_target_set = "kohya";
    change(o);
    const auto r = tools::run_train(o);
    auto m = pipeline::load_model_folder(f.model);
    return lora::read_lora(r.lora_file.string(), lora::module_names(m.unet));
  };
  const lora::LoraState state = run("locon", [](TrainCommandOptions& o) {
    o.conv_dim = 2;
    o.conv_alpha = 1;
  });
  // The expected set, from the model's module names by kohya's rule (its module classes).
  auto m = pipeline::load_model_folder(f.model);
  std::map<std::string, std::size_t> expected;  // name → rank
  for (const std::string& name : lora::module_names(m.unet)) {
    const bool in_transformer = name.find(".attentions.") != std::string::npos;
    const bool in_resnet_or_sampler =
        name.find(".resnets.") != std::string::npos || name.find("samplers.") != std::string::npos;
    auto leaf_is = [&](std::string_view leaf) {
      return name.size() > leaf.size() && name.ends_with(leaf) &&
             name[name.size() - leaf.size() - 1] == '.';
    };
    if (in_transformer) expected[name] = 4;
    if (in_resnet_or_sampler)
      expected[name] = (leaf_is("time_emb_proj") || leaf_is("conv_shortcut")) ? 4 : 2;
  }
  REQUIRE(expected.size() > 20);
  REQUIRE(state.size() == expected.size());
  for (const auto& [name, w] : state) {
    INFO(name);
    REQUIRE(expected.count(name));
    CHECK(w.rank() == expected.at(name));
    CHECK(w.alpha == (expected.at(name) == 2 ? 1.0 : 4.0));
    CHECK(xt::amax(xt::abs(w.up))() > 0);  // trained: B starts at zero
  }
  CHECK(state.count("conv_in") == 0);
  CHECK(state.count("time_embedding.linear_1") == 0);

  // kohya's --network_args spelling gives the same file; without conv_dim only the transformers.
  const lora::LoraState via_args = run("args", [](TrainCommandOptions& o) {
    o.network_args = {"conv_dim=2", "conv_alpha=1"};
  });
  REQUIRE(via_args.size() == state.size());
  for (const auto& [name, w] : state) CHECK(via_args.at(name).up == w.up);
  const lora::LoraState linear_only = run("linear", [](TrainCommandOptions&) {});
  for (const auto& [name, w] : linear_only) CHECK(name.find(".attentions.") != std::string::npos);

  TrainCommandOptions bad = f.options(f.dir / "bad");
  bad.network_args = {"conv_dims=2"};
  CHECK_THROWS_WITH(tools::run_train(bad), Catch::Contains("key 'conv_dims' is not supported"));
  bad.network_args = {"conv_dim"};
  CHECK_THROWS_WITH(tools::run_train(bad), Catch::Contains("expected key=value"));
  bad.network_args = {};
  bad.lora_target_set = "all";
  CHECK_THROWS_WITH(tools::run_train(bad),
                    Catch::Contains("--lora_target_set") &&
                        Catch::Contains("unknown value 'all', expected attention or kohya"));
}

TEST_CASE("difftrain train: DreamBooth defaults and --num_class_images generation") {
  // train_dreambooth_lora.py's defaults apply in DreamBooth mode to the flags not given.
  {
    CLI::App app;
    TrainCommandOptions o;
    tools::add_train_options(app, o);
    const std::vector<std::string> args = {"--instance_data_dir", "x", "--learning_rate", "2e-4"};
    app.parse(std::vector<std::string>(args.rbegin(), args.rend()));
    tools::apply_dreambooth_defaults(app, o);
    CHECK(o.trainer.train_batch_size == 4);
    CHECK(o.trainer.learning_rate == 2e-4);  // given: kept
    CHECK(o.num_train_epochs == 1);
    CHECK(o.validation_epochs == 50);
    CHECK(o.trainer.output_dir == "lora-dreambooth-model");
    CHECK(o.num_class_images == 100);
  }
  {
    CLI::App app;
    TrainCommandOptions o;
    tools::add_train_options(app, o);
    app.parse(std::vector<std::string>{"data", "--train_data_dir"});
    tools::apply_dreambooth_defaults(app, o);
    CHECK(o.trainer.train_batch_size == 16);  // train_text_to_image_lora.py's
    CHECK(o.trainer.output_dir == "sd-model-finetuned-lora");
  }

  // Fewer class images than --num_class_images: the missing ones are drawn by the base model.
  Fixture f;
  TrainCommandOptions o = f.options(f.dir / "gen");
  o.train_data_dir.clear();
  o.instance_data_dir = f.instance;
  o.instance_prompt = "a sks shape";
  o.class_data_dir = f.dir / "class_gen";
  o.class_prompt = "a shape";
  o.trainer.with_prior_preservation = true;
  o.max_train_steps = 1;
  o.num_class_images = 3;
  o.sample_batch_size = 2;
  auto model = pipeline::load_model_folder(f.model);
  CHECK(tools::generate_class_images(o, model) == 3);  // an empty (missing) folder: 2 + 1
  for (int i = 0; i < 3; ++i) {
    const fs::path p = fs::path(o.class_data_dir) / (std::to_string(i) + "-generated.png");
    REQUIRE(fs::exists(p));
    const tools::Image image = tools::load_image(p.string());
    CHECK(image.width == 8);
    CHECK(image.height == 8);
  }
  CHECK(tools::generate_class_images(o, model) == 0);  // enough now
  o.num_class_images = 4;
  CHECK(tools::generate_class_images(o, model) == 1);
  CHECK(fs::exists(fs::path(o.class_data_dir) / "3-generated.png"));
  // The same draws as generate_images with the seed of their batch: image 0 is batch 0's first.
  SampleOptions so;
  so.num_inference_steps = 50;
  so.guidance_scale = 7.5;
  so.seed = o.trainer.seed;
  const Tensor4<float> direct =
      pipeline::generate_images(model, {"a shape"}, "", 2, pipeline::SamplerKind::ddim, 8, 8, so);
  const tools::Image first =
      tools::load_image((fs::path(o.class_data_dir) / "0-generated.png").string());
  const Tensor3<float> direct0 = xt::view(direct, 0);
  CHECK(first.rgb == tools::tensor_to_image(direct0).rgb);
  CHECK(tools::run_train(o).global_step == 1);
  o.num_class_images = 0;
  CHECK_THROWS_WITH(tools::run_train(o), Catch::Contains("--num_class_images is 0"));
}

TEST_CASE("difftrain train: --full_finetune trains every UNet weight and writes a model folder") {
  Fixture f;
  TrainCommandOptions o = f.options(f.dir / "full");
  o.full_finetune = true;
  o.trainer.checkpointing_steps = 0;
  o.max_train_steps = 2;
  const auto r = tools::run_train(o);
  CHECK(r.lora_file ==
        fs::path(o.trainer.output_dir) / "unet" / "diffusion_pytorch_model.safetensors");
  auto base = pipeline::load_model_folder(f.model);
  auto tuned = pipeline::load_model_folder(o.trainer.output_dir);  // a complete folder
  std::size_t changed = 0, total = 0;
  auto tuned_params = nn::named_parameters<float>(tuned.unet);
  std::map<std::string, nn::Parameter<float>*> by_name(tuned_params.begin(), tuned_params.end());
  for (auto& [name, p] : nn::named_parameters<float>(base.unet)) {
    ++total;
    changed += by_name.at(name)->value != p->value ? 1 : 0;
  }
  CHECK(changed > total / 2);  // not adapters: the weights themselves moved
  CHECK(read_all(fs::path(o.trainer.output_dir) / "text_encoder" / "model.safetensors") ==
        read_all(fs::path(f.model) / "text_encoder" / "model.safetensors"));
  CHECK(fs::exists(fs::path(o.trainer.output_dir) / "model_index.json"));

  o.trainer.output_dir = f.model;
  CHECK_THROWS_WITH(tools::run_train(o), Catch::Contains("give another one"));
}

namespace {

std::size_t count_prefixed(const std::map<std::string, std::vector<float>>& tensors,
                           const std::string& prefix) {
  std::size_t n = 0;
  for (const auto& [name, v] : tensors) n += name.starts_with(prefix) ? 1 : 0;
  return n;
}

}  // namespace

TEST_CASE("difftrain train: --train_text_encoder trains a text-encoder LoRA in the same file") {
  Fixture f;
  for (const std::string format : {"kohya", "peft"}) {
    INFO(format);
    TrainCommandOptions o = f.options(f.dir / ("te_" + format));
    o.train_text_encoder = true;
    o.text_encoder_lr = 2e-3;
    o.max_train_steps = 3;
    o.trainer.checkpointing_steps = 0;
    o.save_format = format;
    if (format == "peft") o.lora_target_set = "kohya";  // the text encoder's MLP too
    const auto r = tools::run_train(o, stdout);
    const auto tensors = read_all(r.lora_file);
    const bool kohya = format == "kohya";
    // one text-encoder layer: 4 modules (diffusers' set) or 6 (kohya's), A and B (+ alpha) each
    const std::size_t te_modules = kohya ? 4 : 6;
    CHECK(count_prefixed(tensors, kohya ? "lora_te_" : "text_encoder.") ==
          te_modules * (kohya ? 3 : 2));
    CHECK(count_prefixed(tensors, kohya ? "lora_unet_" : "unet.") > 0);

    auto m = pipeline::load_model_folder(f.model);
    const auto te = lora::read_lora(r.lora_file.string(), lora::module_names(m.text_encoder),
                                    lora::kLoraTextEncoder);
    REQUIRE(te.size() == te_modules);
    for (const auto& [name, w] : te) {
      INFO(name);
      CHECK(xt::amax(xt::abs(w.up))() > 0);  // every text-encoder adapter trained
    }
    const auto meta = io::SafetensorsFile::open(r.lora_file.string()).metadata();
    if (kohya) CHECK(meta.at("ss_text_encoder_lr") == "0.002");

    // The file applied to the pipeline changes the prompts' context (its text-encoder part); at
    // multiplier 0 the context is the base model's.
    const std::vector<std::string> prompts{"a red circle", "a blue square"};
    const Tensor3<float> base = m.encode_prompts(prompts);
    auto adapted = pipeline::load_model_folder(f.model);
    const auto applied = adapted.apply_lora(r.lora_file.string());
    CHECK(applied.size() ==
          te.size() + count_prefixed(tensors, kohya ? "lora_unet_" : "unet.") / (kohya ? 3 : 2));
    CHECK(xt::amax(xt::abs(adapted.encode_prompts(prompts) - base))() > 1e-6);
    auto off = pipeline::load_model_folder(f.model);
    off.apply_lora(r.lora_file.string(), 0.0);
    CHECK(xt::amax(xt::abs(off.encode_prompts(prompts) - base))() == 0);
  }
}

TEST_CASE("difftrain train: resume with a trained text encoder repeats the uninterrupted run") {
  Fixture f;
  auto options = [&](const std::string& out) {
    TrainCommandOptions o = f.options(out);
    o.train_text_encoder = true;
    o.network_args = {"rank_dropout=0.25"};  // masks redrawn each step, the same on resume
    o.clip_skip = 0;
    return o;
  };
  const std::string a = f.dir / "a", b = f.dir / "b";
  const auto full = tools::run_train(options(a), stdout);
  const auto first = tools::run_train(options(b), stdout, [](const train::StepLog& s) {
    if (s.step == 2) std::raise(SIGINT);
  });
  CHECK(first.global_step == 2);
  TrainCommandOptions resumed = options(b);
  resumed.trainer.resume_from_checkpoint = "latest";
  const auto second = tools::run_train(resumed, stdout);
  CHECK(second.global_step == 4);
  const auto got = read_all(second.lora_file), want = read_all(full.lora_file);
  CHECK(count_prefixed(want, "lora_te_") > 0);
  CHECK(got == want);
}

TEST_CASE("difftrain train: --network_train_text_encoder_only and the text-encoder flag errors") {
  Fixture f;
  TrainCommandOptions o = f.options(f.dir / "te_only");
  o.network_train_text_encoder_only = true;
  o.max_train_steps = 2;
  const auto r = tools::run_train(o, stdout);
  const auto tensors = read_all(r.lora_file);
  CHECK(count_prefixed(tensors, "lora_unet_") == 0);
  CHECK(count_prefixed(tensors, "lora_te_") == 4 * 3);

  TrainCommandOptions both = f.options(f.dir / "bad");
  both.train_text_encoder = true;
  both.network_train_unet_only = true;
  CHECK_THROWS_WITH(tools::run_train(both, stdout),
                    Catch::Contains("--network_train_unet_only contradicts --train_text_encoder"));
  TrainCommandOptions full = f.options(f.dir / "bad2");
  full.full_finetune = true;
  full.network_train_text_encoder_only = true;
  CHECK_THROWS_WITH(tools::run_train(full, stdout), Catch::Contains("--full_finetune"));
  TrainCommandOptions lr = f.options(f.dir / "bad3");
  lr.text_encoder_lr = -1;
  CHECK_THROWS_WITH(tools::run_train(lr, stdout), Catch::Contains("--text_encoder_lr is -1"));
}

TEST_CASE("difftrain train: --train_text_encoder with prior preservation and clip skip") {
  Fixture f;
  for (const std::size_t clip_skip : {1, 2}) {
    INFO("clip_skip " << clip_skip);
    TrainCommandOptions o = f.options(f.dir / ("db_te_" + std::to_string(clip_skip)));
    o.train_data_dir.clear();
    o.instance_data_dir = f.instance;
    o.instance_prompt = "a sks shape";
    o.class_data_dir = f.klass;
    o.class_prompt = "a shape";
    o.trainer.with_prior_preservation = true;
    o.train_text_encoder = true;
    o.clip_skip = clip_skip;
    o.max_train_steps = 2;
    const auto r = tools::run_train(o, stdout);
    CHECK(r.global_step == 2);
    auto m = pipeline::load_model_folder(f.model);
    const auto te = lora::read_lora(r.lora_file.string(), lora::module_names(m.text_encoder),
                                    lora::kLoraTextEncoder);
    REQUIRE(te.size() == 4);
    // The fixture's text model has one layer: clip skip 2 conditions on the embeddings, which
    // the layer's adapters do not reach, so they get no gradient and stay at B = 0.
    for (const auto& [name, w] : te) {
      INFO(name);
      CHECK((xt::amax(xt::abs(w.up))() > 0) == (clip_skip == 1));
    }
  }
}

TEST_CASE("difftrain train: --objective flow, and a FlowMatchEulerDiscreteScheduler folder") {
  Fixture f;
  // The same model folder with diffusers' FlowMatchEulerDiscreteScheduler config (shift 3).
  const fs::path flow_model = f.dir / "flow_model";
  fs::copy(f.model, flow_model, fs::copy_options::recursive);
  FlowMatchEulerDiscreteSchedulerConfig shifted;
  shifted.shift = 3.0;
  io::write_json_file(flow_model / "scheduler" / "scheduler_config.json", shifted.to_json());
  auto lora_of = [&](const std::string& out, auto&& change) {
    TrainCommandOptions o = f.options(f.dir / out);
    o.trainer.checkpointing_steps = 0;
    change(o);
    return read_all(tools::run_train(o).lora_file);
  };
  const auto ddpm = lora_of("ddpm", [](TrainCommandOptions&) {});
  // A DDPM folder trained with --objective flow uses FlowMatchEulerDiscreteScheduler(shift =
  // --discrete_flow_shift, 3 by default): the same run as the flow folder's, chosen by its config.
  const auto flow = lora_of("flow", [](TrainCommandOptions& o) { o.objective = "flow"; });
  CHECK(flow != ddpm);
  CHECK(flow == lora_of("auto", [&](TrainCommandOptions& o) {
          o.pretrained_model_name_or_path = flow_model.string();
        }));
  CHECK(flow != lora_of("shift1", [](TrainCommandOptions& o) {
          o.objective = "flow";
          o.flow.discrete_flow_shift = 1.0;  // other sigmas of the default `sigma` sampling
        }));
  // Every density and weighting runs, with validation sampled by flow Euler.
  for (const char* sampling :
       {"uniform", "sigmoid", "shift", "flux_shift", "inverted_parabola", "heavy_tail"}) {
    TrainCommandOptions o = f.options(f.dir / (std::string("d_") + sampling));
    o.objective = "flow";
    o.timestep_sampling = sampling;
    o.weighting_scheme = "cosmap";
    o.max_train_steps = 2;
    o.trainer.checkpointing_steps = 0;
    const auto r = tools::run_train(o);
    CHECK(r.global_step == 2);
  }
  {
    TrainCommandOptions o = f.options(f.dir / "validated");
    o.pretrained_model_name_or_path = flow_model.string();
    o.weighting_scheme = "logit_normal";
    o.validation_prompt = "a red circle";
    o.num_validation_images = 1;
    o.validation_inference_steps = 2;
    o.max_train_steps = 2;
    const auto r = tools::run_train(o);
    CHECK(r.validation_images.size() == 1);
    // kohya's flow metadata (flux_train_network.py); a DDPM run has none of it.
    const auto meta = io::SafetensorsFile::open(r.lora_file.string()).metadata();
    CHECK(meta.at("ss_weighting_scheme") == "logit_normal");
    CHECK(meta.at("ss_timestep_sampling") == "sigma");
    CHECK(meta.at("ss_discrete_flow_shift") == "3.0");
    CHECK(meta.at("ss_model_prediction_type") == "raw");
    TrainCommandOptions d = f.options(f.dir / "ddpm_meta");
    d.max_train_steps = 1;
    CHECK(io::SafetensorsFile::open(tools::run_train(d).lora_file.string())
              .metadata()
              .count("ss_weighting_scheme") == 0);
  }
  // --full_finetune of a DDPM folder for flow matching writes the flow scheduler config, so the
  // folder samples with flow Euler.
  {
    TrainCommandOptions o = f.options(f.dir / "full_flow");
    o.objective = "flow";
    o.full_finetune = true;
    o.max_train_steps = 1;
    o.trainer.checkpointing_steps = 0;
    tools::run_train(o);
    const auto tuned = pipeline::load_model_folder(o.trainer.output_dir);
    REQUIRE(tuned.scheduler.flow);
    CHECK(tuned.scheduler.flow->shift == 3.0);
    CHECK(pipeline::default_sampler(tuned.scheduler) == pipeline::SamplerKind::flow_euler);
  }
  // Flags of the other objective are refused, naming them.
  auto refused = [&](auto&& change, const std::string& what) {
    TrainCommandOptions o = f.options(f.dir / "refused");
    change(o);
    CHECK_THROWS_WITH(tools::run_train(o), Catch::Contains(what));
  };
  refused(
      [&](TrainCommandOptions& o) {
        o.pretrained_model_name_or_path = flow_model.string();
        o.snr_gamma = 5;
      },
      "--snr_gamma belongs to DDPM training");
  refused(
      [&](TrainCommandOptions& o) {
        o.objective = "flow";
        o.prediction_type = "epsilon";
      },
      "--prediction_type belongs to DDPM training");
  refused(
      [&](TrainCommandOptions& o) {
        o.objective = "flow";
        o.min_timestep = 10;
      },
      "--min_timestep / --max_timestep");
  refused(
      [&](TrainCommandOptions& o) {
        o.pretrained_model_name_or_path = flow_model.string();
        o.objective = "ddpm";
      },
      "has no DDPM noise schedule");
  refused([](TrainCommandOptions& o) { o.weighting_scheme = "logit_normal"; },
          "add --objective flow");
  refused([](TrainCommandOptions& o) { o.objective = "rectified"; },
          "--objective is 'rectified', expected ddpm or flow");
  refused(
      [](TrainCommandOptions& o) {
        o.objective = "flow";
        o.timestep_sampling = "beta";
      },
      "beta");
  refused(
      [](TrainCommandOptions& o) {
        o.objective = "flow";
        o.flow.discrete_flow_shift = -1;
      },
      "shift is -1");
}

TEST_CASE("difftrain train: the flow-matching flags reach their options") {
  CLI::App app;
  TrainCommandOptions o;
  tools::add_train_options(app, o);
  const std::vector<std::string> args = {"--objective",
                                         "flow",
                                         "--timestep_sampling",
                                         "heavy_tail",
                                         "--weighting_scheme",
                                         "mode",
                                         "--logit_mean",
                                         "0.5",
                                         "--logit_std",
                                         "1.5",
                                         "--mode_scale",
                                         "0.8",
                                         "--sigmoid_scale",
                                         "1.2",
                                         "--discrete_flow_shift",
                                         "3.5",
                                         "--noising_weight",
                                         "0.3",
                                         "--noising_bias",
                                         "0.1",
                                         "--timestep_shift",
                                         "2",
                                         "--min_noising_strength",
                                         "0.1",
                                         "--max_noising_strength",
                                         "0.9"};
  app.parse(std::vector<std::string>(args.rbegin(), args.rend()));
  CHECK(o.objective == "flow");
  CHECK(o.timestep_sampling == "heavy_tail");
  CHECK(o.weighting_scheme == "mode");
  CHECK(o.flow.logit_mean == 0.5);
  CHECK(o.flow.logit_std == 1.5);
  CHECK(o.flow.mode_scale == 0.8);
  CHECK(o.flow.sigmoid_scale == 1.2);
  CHECK(o.flow.discrete_flow_shift == 3.5);
  CHECK(o.flow.noising_weight == 0.3);
  CHECK(o.flow.noising_bias == 0.1);
  CHECK(o.flow.timestep_shift == 2);
  CHECK(o.flow.min_noising_strength == 0.1);
  CHECK(o.flow.max_noising_strength == 0.9);
}

TEST_CASE(
    "difftrain train: --gradient_checkpointing gives the same LoRA, --mixed_precision bf16 a "
    "close one") {
  Fixture f;
  auto run = [&](const std::string& name, auto&& configure) {
    TrainCommandOptions o = f.options(f.dir / name);
    o.trainer.checkpointing_steps = 0;
    o.max_train_steps = 3;
    configure(o);
    return tools::run_train(o).lora_file;
  };
  const fs::path plain = run("plain", [](TrainCommandOptions&) {});
  const fs::path checkpointed =
      run("ckpt", [](TrainCommandOptions& o) { o.trainer.gradient_checkpointing = true; });
  const fs::path bf16 = run("bf16", [](TrainCommandOptions& o) {
    o.mixed_precision = "bf16";
    o.trainer.gradient_checkpointing = true;
  });
  const auto expected = read_all(plain);
  CHECK(read_all(checkpointed) == expected);  // a recomputation: bitwise the same weights
  // bf16 weights: the LoRA moves as in fp32 to within the rounding of the frozen weights
  const auto got = read_all(bf16);
  REQUIRE(got.size() == expected.size());
  double diff = 0, norm = 0;
  for (const auto& [name, v] : expected) {
    const auto& w = got.at(name);
    for (std::size_t i = 0; i < v.size(); ++i) {
      diff += (double(w[i]) - v[i]) * (double(w[i]) - v[i]);
      norm += double(v[i]) * v[i];
    }
  }
  INFO("relative difference of the bf16 LoRA: " << std::sqrt(diff / norm));
  CHECK(diff > 0);
  CHECK(std::sqrt(diff / norm) < 2e-2);
  const auto meta = io::SafetensorsFile::open(bf16.string()).metadata();
  CHECK(meta.at("ss_mixed_precision") == "bf16");
  CHECK(meta.at("ss_gradient_checkpointing") == "True");

  TrainCommandOptions wrong = f.options(f.dir / "fp16");
  wrong.mixed_precision = "fp16";
  CHECK_THROWS_WITH(tools::run_train(wrong), Catch::Contains("--mixed_precision"));
}
