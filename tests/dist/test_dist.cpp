// Data-parallel `difftrain train` over MPI, run as two ranks by mpirun (tests/dist/CMakeLists.txt):
// two ranks × batch B repeat the one-process run with batch 2·B (the trajectory, within float
// summation order), bitwise the same on a second two-rank run; checkpoints move between rank
// counts; a rank's error stops both ranks with that error; a rank that dies ends the job.

#define CATCH_CONFIG_RUNNER
#include <mpi.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "cmd_train.hpp"
#include "difftrain/dist/mpi.hpp"
#include "difftrain/io/safetensors.hpp"
#include "image_io.hpp"
#include "shapes_pipeline.hpp"
#include "support/temp_dir.hpp"
#include "support/tiny_pipelines.hpp"

namespace fs = std::filesystem;
using namespace difftrain;
using difftrain::tools::TrainCommandOptions;

namespace {

dist::MpiCollective* world = nullptr;

// A temporary folder that rank 0 creates and fills with `write`, whose path every rank receives.
struct SharedDir {
  std::optional<test::TempDir> owned;
  fs::path dir;

  explicit SharedDir(const std::function<void(const fs::path&)>& write) {
    std::string path;
    if (world->rank() == 0) {
      owned.emplace("dist");
      path = owned->str();
      write(fs::path(path));
    }
    std::uint64_t length = path.size();
    MPI_Bcast(&length, 1, MPI_UINT64_T, 0, world->communicator());
    path.resize(length);
    MPI_Bcast(path.data(), int(length), MPI_CHAR, 0, world->communicator());
    dir = path;
    world->barrier();
  }
  ~SharedDir() { world->barrier(); }  // no rank still reads when rank 0 removes the folder
};

// A tiny pixel-space model folder and `n` captioned images.
struct Fixture : SharedDir {
  std::string model, data;

  explicit Fixture(std::size_t n = 5)
      : SharedDir([n](const fs::path& dir) { write(dir, n); }),
        model((dir / "model").string()),
        data((dir / "data").string()) {}

  static void write(const fs::path& dir, std::size_t n) {
    shapes::ModelSizes sizes;
    sizes.image_size = 8;
    sizes.block_out_channels = {16, 16};
    sizes.text_hidden_size = 16;
    sizes.text_layers = 1;
    auto m = shapes::make_models(sizes, dir / "tok", 7);
    pipeline::save_model_folder(
        dir / "model", pipeline::ModelFolderParts<models::UNet2DConditionModel<float>,
                                                  models::ClipTextModel<float>>{
                           m.unet, m.unet_config, m.text.model(), m.text_config, m.tokenizer_dir,
                           shapes::scheduler_config_json(PredictionType::v_prediction)});
    const auto specs = shapes::base_specs();
    const Tensor4<float> images = shapes::draw_batch(specs, 8, RandomStream{3, 0});
    fs::create_directories(dir / "data");
    for (std::size_t i = 0; i < n; ++i) {
      const Tensor3<float> image = xt::view(images, i);
      const std::string stem = (dir / "data" / ("img" + std::to_string(i))).string();
      tools::save_png(stem + ".png", tools::tensor_to_image(image));
      std::ofstream(stem + ".txt") << shapes::caption(specs[i]) << "\n";
    }
  }

  // Every random draw of a step in play: LoRA dropouts, noise offset, input perturbation,
  // Min-SNR, random flips, caption dropout and shuffling.
  TrainCommandOptions options(const std::string& out, std::int64_t batch) const {
    TrainCommandOptions o;
    o.pretrained_model_name_or_path = model;
    o.train_data_dir = data;
    o.trainer.output_dir = (dir / out).string();
    o.resolution = 8;
    o.trainer.train_batch_size = batch;
    o.max_train_steps = 4;
    o.trainer.checkpointing_steps = 2;
    o.lr_warmup_steps = 0;
    o.trainer.optimizer = "sgd";  // AdamW would magnify summation-order noise in ~0 gradients
    o.trainer.learning_rate = 0.05;
    o.trainer.seed = 11;
    o.plain_log = true;
    o.lora_dropout = 0.1;
    o.network_dropout = 0.1;
    o.rank_dropout = 0.2;
    o.trainer.noise.noise_offset = 0.05;
    o.trainer.noise.input_perturbation = 0.1;
    o.snr_gamma = 5;
    o.random_flip = true;
    o.caption.caption_dropout_rate = 0.2;
    o.caption.shuffle_caption = true;
    return o;
  }
};

std::map<std::string, std::vector<float>> read_all(const fs::path& path) {
  std::map<std::string, std::vector<float>> out;
  const auto file = io::SafetensorsFile::open(path.string());
  for (const auto& name : file.names())
    if (file.info(name).dtype == io::Dtype::F32) out[name] = file.read<float>(name);
  return out;
}

// Rank 0's LoRA file of run `out`, as every rank sees it (the folder is shared).
std::map<std::string, std::vector<float>> lora_of(const SharedDir& f, const std::string& out) {
  return read_all(f.dir / out / "pytorch_lora_weights.safetensors");
}

// max |a − b| / max |b| over all tensors; both files hold the same names.
double relative_difference(const std::map<std::string, std::vector<float>>& a,
                           const std::map<std::string, std::vector<float>>& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0, scale = 0;
  for (const auto& [name, values] : b) {
    const auto& other = a.at(name);
    REQUIRE(other.size() == values.size());
    for (std::size_t i = 0; i < values.size(); ++i) {
      diff = std::max(diff, double(std::abs(other[i] - values[i])));
      scale = std::max(scale, double(std::abs(values[i])));
    }
  }
  return diff / scale;
}

std::vector<std::string> read_lines(const fs::path& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

// The one-process run, done by rank 0 alone (the other waits).
void single(const TrainCommandOptions& o) {
  if (world->rank() == 0) tools::run_train(o, nullptr);
  world->barrier();
}

}  // namespace

TEST_CASE("two ranks × batch 1 repeat one process × batch 2, bitwise on a rerun", "[dist]") {
  REQUIRE(world->size() == 2);
  Fixture f(5);  // 5 images: each epoch's last micro-batch has one row, rank 1's shard is empty
  const TrainCommandOptions two = f.options("two", 1);
  const tools::TrainRunResult r = tools::run_train(two, nullptr, {}, world);
  CHECK(r.global_step == 4);
  CHECK(fs::exists(f.dir / "two" / "checkpoint-2"));
  CHECK(fs::exists(f.dir / "two" / "checkpoint-4"));
  single(f.options("one", 2));

  const auto a = lora_of(f, "two"), b = lora_of(f, "one");
  INFO("relative difference " << relative_difference(a, b));
  CHECK(relative_difference(a, b) < 1e-5);
  // The runs moved the weights: the comparison is not between two untrained files.
  CHECK(relative_difference(read_all(f.dir / "two" / "checkpoint-4" / "model.safetensors"),
                            read_all(f.dir / "two" / "checkpoint-2" / "model.safetensors")) > 1e-4);
  // The logged losses are the global batch's: equal to the one-process run's.
  const auto la = read_lines(f.dir / "two" / "training_log.csv");
  const auto lb = read_lines(f.dir / "one" / "training_log.csv");
  REQUIRE(la.size() == 5);
  REQUIRE(lb.size() == 5);
  for (std::size_t i = 1; i < la.size(); ++i) {
    const double loss_a = std::stod(la[i].substr(la[i].find(',') + 1));
    const double loss_b = std::stod(lb[i].substr(lb[i].find(',') + 1));
    CHECK(loss_a == Approx(loss_b).epsilon(1e-5));
  }

  // A second two-rank run gives bitwise the same file.
  tools::run_train(f.options("again", 1), nullptr, {}, world);
  const auto c = lora_of(f, "again");
  CHECK(c == a);
}

TEST_CASE("checkpoints move between rank counts", "[dist]") {
  Fixture f(4);
  // Reference: one process, batch 2, four steps.
  single(f.options("whole", 2));
  const auto whole = lora_of(f, "whole");

  SECTION("two ranks to step 2, then one process resumes") {
    TrainCommandOptions o = f.options("moved", 1);
    o.max_train_steps = 2;
    tools::run_train(o, nullptr, {}, world);
    TrainCommandOptions rest = f.options("moved", 2);
    rest.trainer.resume_from_checkpoint = "latest";
    single(rest);
    INFO("relative difference " << relative_difference(lora_of(f, "moved"), whole));
    CHECK(relative_difference(lora_of(f, "moved"), whole) < 1e-5);
  }
  SECTION("one process to step 2, then two ranks resume") {
    TrainCommandOptions o = f.options("moved", 2);
    o.max_train_steps = 2;
    single(o);
    TrainCommandOptions rest = f.options("moved", 1);
    rest.trainer.resume_from_checkpoint = "latest";
    const tools::TrainRunResult r = tools::run_train(rest, nullptr, {}, world);
    CHECK(r.global_step == 4);
    INFO("relative difference " << relative_difference(lora_of(f, "moved"), whole));
    CHECK(relative_difference(lora_of(f, "moved"), whole) < 1e-5);
  }
}

// A latent model (the VAE samples each row's latents with its global row's noise), SDXL's time ids
// and pooled embeddings, both text encoders trained: 2 ranks × 1 repeat 1 process × 2, also with
// cached latents.
TEST_CASE("an SDXL folder with its text encoders, on two ranks", "[dist]") {
  const SharedDir f([](const fs::path& dir) {
    test::write_tiny_sdxl_folder(dir / "sdxl");
    fs::create_directories(dir / "data");
    const std::vector<std::pair<int, int>> sizes{{16, 16}, {24, 16}, {16, 20}, {32, 24}};
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      tools::Image image(sizes[i].first, sizes[i].second);
      for (std::size_t p = 0; p < image.rgb.size(); ++p)
        image.rgb[p] = std::uint8_t((p * (37 + 11 * i)) % 251);
      const fs::path stem = dir / "data" / ("img" + std::to_string(i));
      tools::save_png(stem.string() + ".png", image);
      std::ofstream(stem.string() + ".txt") << (i % 2 ? "a red circle" : "a blue square") << "\n";
    }
  });
  auto options = [&](const std::string& out, std::int64_t batch, bool cache) {
    TrainCommandOptions o;
    o.pretrained_model_name_or_path = (f.dir / "sdxl").string();
    o.train_data_dir = (f.dir / "data").string();
    o.trainer.output_dir = (f.dir / out).string();
    o.resolution = 16;
    o.trainer.train_batch_size = batch;
    o.max_train_steps = 3;
    o.trainer.checkpointing_steps = 0;
    o.lr_warmup_steps = 0;
    o.trainer.optimizer = "sgd";
    o.trainer.learning_rate = 0.05;
    o.trainer.seed = 5;
    o.train_text_encoder = true;
    o.random_flip = true;
    o.cache_latents = cache;
    o.plain_log = true;
    return o;
  };
  for (const bool cache : {false, true}) {
    const std::string tag = cache ? "_cached" : "";
    tools::run_train(options("two" + tag, 1, cache), nullptr, {}, world);
    single(options("one" + tag, 2, cache));
    const auto a = lora_of(f, "two" + tag), b = lora_of(f, "one" + tag);
    INFO("cache_latents " << cache << ": relative difference " << relative_difference(a, b));
    CHECK(relative_difference(a, b) < 1e-5);
  }
}

// A data source whose micro-batch 1 fails on rank 1 only (an image that became unreadable
// after the start, say): both ranks stop with rank 1's error, at the same step.
namespace {
struct OneParameter {
  nn::Parameter<float> w{{1}};
  template <class V>
  void for_each_parameter(const std::string& prefix, V&& visit) {
    visit(nn::join_name(prefix, "w"), w);
  }
};
// dL/dw = the row's sample weight (b/G of the global mean).
struct WeightStep {
  OneParameter& m;
  TrainStepResult step(const Tensor4<float>&, const TokenIds&, std::uint64_t,
                       const BatchExtras& extras) {
    const double w = extras.sample_weights.empty() ? 1.0 : extras.sample_weights[0];
    m.w.grad(0) += float(w);
    TrainStepResult r;
    r.loss = w;
    return r;
  }
};
}  // namespace

TEST_CASE("an error on one rank stops every rank with it", "[dist]") {
  OneParameter model;
  model.w.value(0) = 1.0f;
  WeightStep step{model};
  train::TrainerOptions o;
  o.optimizer = "sgd";
  o.sgd_momentum = 0;
  o.learning_rate = 1;
  o.max_grad_norm = 0;
  o.lr_warmup_steps = 0;
  o.max_train_steps = 3;
  train::Trainer trainer(step, model, o);
  trainer.set_collective(world);
  const int rank = world->rank();
  auto data = [rank](std::uint64_t m) {
    require(!(m == 1 && rank == 1), "ImageCaptionDataSource", "'img7.png' cannot be decoded");
    train::TrainBatch b;
    b.images = Tensor4<float>(std::array<std::size_t, 4>{1, 1, 1, 1});
    b.token_ids = TokenIds(std::array<std::size_t, 2>{1, 1});
    b.global_rows = {std::uint64_t(rank)};
    b.global_batch_size = 2;
    return b;
  };
  const train::StepLog first = trainer.train_step(data);
  CHECK(first.loss == Approx(1.0));         // ½ + ½: the shards' weights sum to the global mean
  CHECK(model.w.value(0) == Approx(0.0f));  // 1 − lr·(½ + ½)
  try {
    trainer.train_step(data);
    FAIL("no error");
  } catch (const Error& e) {
    CHECK_THAT(e.what(), Catch::Contains("rank 1 of 2 failed at global step 2") &&
                             Catch::Contains("'img7.png' cannot be decoded"));
  }
  CHECK(model.w.value(0) == Approx(0.0f));  // not updated by the failed step, on either rank
}

// Not part of test_dist: test_dist_rank_dies expects mpirun to end the job after rank 1 dies
// in the middle of a run (the other rank waits in a collective).
TEST_CASE("a rank that dies ends the job", "[abort]") {
  Fixture f(4);
  TrainCommandOptions o = f.options("dies", 1);
  o.max_train_steps = 1000;
  tools::run_train(
      o, nullptr,
      [](const train::StepLog& s) {
        if (s.step == 2 && world->rank() == 1) std::abort();
      },
      world);
  FAIL("the run went on after a rank died");
}

int main(int argc, char** argv) {
  dist::MpiSession mpi(argc, argv);
  int failed = 0;
  {
    dist::MpiCollective collective;
    world = &collective;
    failed = Catch::Session().run(argc, argv);
    // The job fails when any rank failed.
    int any = 0;
    MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, collective.communicator());
    failed = any;
    world = nullptr;
  }
  return failed;
}
