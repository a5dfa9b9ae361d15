// `difftrain bench`, `bench-vae`, `bench-clip` (tools/cmd_bench.hpp): the JSON each prints on tiny
// models, its parameter counts against the golden checkpoints and an independent LoRA count, the
// FLOP count against the figures of benchmarks/configs/README, and the errors for bad options.
#include <CLI/CLI.hpp>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "cmd_bench.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/unet/unet2d_condition.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using Json = nlohmann::ordered_json;

namespace {

// Number of values in a diffusers / transformers checkpoint, buffers excluded.
std::size_t checkpoint_parameters(const std::string& path) {
  const auto file = io::SafetensorsFile::open(path);
  std::size_t n = 0;
  for (const auto& name : file.names()) {
    if (name.ends_with("position_ids")) continue;  // a buffer, not a parameter
    std::size_t size = 1;
    for (auto d : file.info(name).shape) size *= d;
    n += size;
  }
  return n;
}

double number(const Json& j, const char* key) {
  INFO(key);
  REQUIRE(j.contains(key));
  REQUIRE(j[key].is_number());
  const double v = j[key].get<double>();
  REQUIRE(std::isfinite(v));
  return v;
}

// The timing and memory fields every benchmark prints.
void check_timing(const Json& j, const char* unit) {
  const std::string median = std::string("median_") + unit, min = std::string("min_") + unit,
                    mean = std::string("mean_") + unit;
  CHECK(number(j, min.c_str()) > 0);
  CHECK(number(j, min.c_str()) <= number(j, median.c_str()));
  CHECK(number(j, min.c_str()) <= number(j, mean.c_str()));
  CHECK(number(j, (std::string("median_cpu_") + unit).c_str()) > 0);
  CHECK(number(j, "peak_rss_mb") > 1);
  REQUIRE(j.contains("step_peak_rss_mb"));
  if (!j["step_peak_rss_mb"].is_null()) {
    CHECK(number(j, "step_peak_rss_mb") > 1);
    CHECK(number(j, "step_peak_rss_mb") <= number(j, "peak_rss_mb") + 1);
  }
  CHECK(j["threads"] == 1);
}

tools::BenchOptions tiny_options(const std::string& mode) {
  tools::BenchOptions o;
  o.config = test::data_path("unet_tiny/config.json");
  o.mode = mode;
  o.batch = 2;
  o.latent = 8;
  o.seq_len = 5;
  o.rank = 2;
  o.steps = 1;
  o.warmup = 0;
  o.threads = 1;
  return o;
}

int run_cli(std::vector<std::string> args) {
  CLI::App app;
  int exit_code = -1;
  tools::add_bench_commands(app, exit_code);
  args.insert(args.begin(), "difftrain");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  app.parse(int(argv.size()), argv.data());
  return exit_code;
}

}  // namespace

TEST_CASE("bench lora: one step of the tiny UNet, adapters counted independently") {
  const Json j = tools::run_bench(tiny_options("lora"));
  INFO(j.dump());
  check_timing(j, "ms");
  CHECK(number(j, "gflops") > 0);
  CHECK(number(j, "gflops_per_cpu_s") > 0);
  CHECK(number(j, "loss") > 0);
  CHECK(j["mode"] == "lora");
  CHECK(j["batch"] == 2);
  CHECK(j["latent"] == 8);
  CHECK(j["seq_len"] == 5);
  CHECK(j["rank"] == 2);
  CHECK(j["steps"] == 1);
  // unet_tiny: channels 32 (down block 0: 1 transformer, up block 1: 2) and 64 (mid: 1), context
  // D = 32. A rank-r adapter on [out, in] holds r·(in + out) values: attn1's q, k, v, out are
  // C → C (8rC); attn2's q and out are C → C, k and v are D → C (r(6C + 2D)).
  const std::size_t r = 2, D = 32;
  auto per_block = [&](std::size_t C) { return 8 * r * C + r * (6 * C + 2 * D); };
  const std::size_t lora = 3 * per_block(32) + per_block(64);
  const std::size_t base =
      checkpoint_parameters(test::data_path("unet_tiny/"
                                            "diffusion_pytorch_model.safetensors"));
  CHECK(j["trainable_params"] == lora);
  CHECK(j["params"] == base + lora);
}

TEST_CASE("bench lora on an SDXL UNet (text_time): pooled embedding and time ids supplied") {
  tools::BenchOptions o = tiny_options("lora");
  o.config = test::data_path("unet_sdxl_tiny/config.json");
  const Json j = tools::run_bench(o);
  INFO(j.dump());
  check_timing(j, "ms");
  CHECK(number(j, "loss") > 0);
  // unet_sdxl_tiny: attention only at level 1 (C = 16), whose transformers have 2 layers
  // (transformer_layers_per_block [1, 2]): 2 down + 3 up transformers, and the mid block's (the
  // last entry, 2); context D = 64. Adapters: r(8C) + r(6C + 2D) per transformer layer.
  const std::size_t r = 2, C = 16, D = 64;
  const std::size_t per_layer = 8 * r * C + r * (6 * C + 2 * D);
  const std::size_t layers = 2 * 2 + 3 * 2 + 2;  // down 2×2, up 3×2, mid 2
  const std::size_t base =
      checkpoint_parameters(test::data_path("unet_sdxl_tiny/diffusion_pytorch_model.safetensors"));
  CHECK(j["trainable_params"] == layers * per_layer);
  CHECK(j["params"] == base + layers * per_layer);
}

TEST_CASE("bench full: every parameter trains, the step counts 3x the forward FLOPs") {
  const Json j = tools::run_bench(tiny_options("full"));
  INFO(j.dump());
  check_timing(j, "ms");
  CHECK(j["mode"] == "full");
  CHECK(j["rank"].is_null());
  const std::size_t base =
      checkpoint_parameters(test::data_path("unet_tiny/"
                                            "diffusion_pytorch_model.safetensors"));
  CHECK(j["params"] == base);
  CHECK(j["trainable_params"] == base);
  CHECK(number(j, "step_gflop") == Approx(3 * number(j, "forward_gflop")).epsilon(1e-12));
}

TEST_CASE("bench errors: bad mode, missing config, bad sizes") {
  auto o = tiny_options("half");
  CHECK_THROWS_WITH(tools::run_bench(o), Catch::Contains("--mode is 'half'"));
  o = tiny_options("lora");
  o.config = test::data_path("no_such_config.json");
  CHECK_THROWS_WITH(tools::run_bench(o), Catch::Contains("no_such_config.json"));
  o = tiny_options("lora");
  o.steps = 0;
  CHECK_THROWS_AS(tools::run_bench(o), Error);
  o = tiny_options("lora");
  o.latent = 0;
  CHECK_THROWS_AS(tools::run_bench(o), Error);
  // through the command line: a message and exit code 1, not an exception
  CHECK(run_cli({"bench", "--config", test::data_path("unet_tiny/config.json"), "--batch", "1",
                 "--latent", "8", "--seq-len", "4", "--mode", "half"}) == 1);
  CHECK(run_cli({"bench", "--config", test::data_path("missing.json"), "--batch", "1", "--latent",
                 "8", "--seq-len", "4", "--mode", "lora"}) == 1);
}

// The forward GFLOP given for these configurations in the benchmark brief (../shared/bench/
// README.md: 9.2, 18.1, 922, to the digits printed) count the cross-attention (attn2) matmuls as
// if the context had N tokens like the image (N×N scores) instead of L = 77 (N×L). Restating the
// transformer blocks of each config by hand — (count, N tokens, width C) — the figure must be
// ours + 4·B·Σ count·N·(N − L)·C.
TEST_CASE("unet_forward_macs matches the benchmark configurations' FLOP figures") {
  struct Blocks {
    double count, tokens, width;
  };
  struct Case {
    const char* file;
    std::size_t batch, latent;
    std::vector<Blocks> blocks;  // down + up transformer blocks per level, then the mid block's
    double gflop, half_ulp;
  };
  const std::vector<Case> cases{
      // [32, 64], layers 2: level 0 has 2 down + 3 up blocks; the mid block runs at 16×16
      {"unet_tiny.json", 4, 32, {{5, 1024, 32}, {1, 256, 64}}, 9.2, 0.05},
      // [64, 128, 256], attention in down blocks 0 and 1 and up blocks 1 and 2
      {"unet_big.json", 2, 32, {{5, 1024, 64}, {5, 256, 128}, {1, 64, 256}}, 18.1, 0.05},
      // SD 1.5: [320, 640, 1280, 1280], attention in levels 0–2, the mid block at 8×8
      {"unet_sd15.json",
       1,
       64,
       {{5, 4096, 320}, {5, 1024, 640}, {5, 256, 1280}, {1, 64, 1280}},
       922,
       0.5}};
  const double L = 77;
  for (const Case& c : cases) {
    INFO(c.file);
    const auto config = models::UNet2DConditionConfig::from_file(
        std::string(DIFFTRAIN_BENCH_CONFIG_DIR) + "/" + c.file);
    const models::UNet2DConditionModel<float> shapes(config, models::Allocation::shapes_only);
    const tools::UnetMacs macs =
        tools::unet_forward_macs(config, c.batch, c.latent, std::size_t(L),
                                 [&](auto&& visit) { shapes.for_each_parameter_shape("", visit); });
    double n_by_n = 0;  // FLOPs the brief adds by taking N context tokens
    for (const Blocks& b : c.blocks)
      n_by_n += 4.0 * double(c.batch) * b.count * b.tokens * (b.tokens - L) * b.width;
    INFO("forward GFLOP " << macs.forward_flops() * 1e-9 << ", brief's count "
                          << (macs.forward_flops() + n_by_n) * 1e-9);
    CHECK(std::abs((macs.forward_flops() + n_by_n) * 1e-9 - c.gflop) <= c.half_ulp);
    CHECK(macs.adapters == 0);
  }
}

TEST_CASE("bench-vae and bench-clip on the tiny encoders") {
  tools::EncoderBenchOptions o;
  o.steps = 1;
  o.warmup = 0;
  o.threads = 1;
  o.config = test::data_path("vae_tiny/config.json");
  o.size = 16;
  Json j = tools::run_bench_vae(o);
  INFO(j.dump());
  check_timing(j, "s");
  CHECK(j["benchmark"] == "vae_encode");
  CHECK(j["params"] ==
        checkpoint_parameters(test::data_path("vae_tiny/diffusion_pytorch_model.safetensors")));
  CHECK(number(j, "weights_mb") == Approx(j["params"].get<double>() * 4 / (1 << 20)));

  o.config = test::data_path("clip_tiny/config.json");
  o.batch = 3;
  o.seq_len = 7;
  j = tools::run_bench_clip(o);
  INFO(j.dump());
  check_timing(j, "s");
  CHECK(j["benchmark"] == "clip_text_encode");
  CHECK(j["params"] == checkpoint_parameters(test::data_path("clip_tiny/model.safetensors")));

  o.seq_len = 78;  // beyond max_position_embeddings
  CHECK_THROWS_AS(tools::run_bench_clip(o), Error);
  o.seq_len = 7;
  o.config = test::data_path("missing.json");
  CHECK_THROWS_AS(tools::run_bench_vae(o), Error);
}
