// `difftrain unet` against diffusers' golden files: unet_tiny (all 208 parameter gradients) and
// unet_tiny_lora (kohya and PEFT files, adapter gradients), with the golden README's error rule.
#include <CLI/CLI.hpp>
#include <catch2/catch.hpp>
#include <filesystem>
#include <vector>
#include <xtensor/xadapt.hpp>

#include "cmd_unet.hpp"
#include "difftrain/io/safetensors.hpp"
#include "support/temp_dir.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
namespace fs = std::filesystem;

namespace {
int run(std::vector<std::string> args) {
  CLI::App app;
  int exit_code = -1;
  tools::add_unet_command(app, exit_code);
  args.insert(args.begin(), "difftrain");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  app.parse(int(argv.size()), argv.data());
  return exit_code;
}

// error = max|got − ref| / max(max|ref|, floor); floor = 1e-3 × the largest max|ref| over the
// grad.<name> tensors for parameter gradients, else 0. Forward ≤ 1e-4, gradients ≤ 1e-3.
void compare_with_golden(const std::string& produced, const std::string& expected) {
  const auto got = io::SafetensorsFile::open(produced);
  const auto ref = io::SafetensorsFile::open(expected);
  double largest_param_grad = 0;
  for (const auto& name : ref.names())
    if (name.rfind("grad.", 0) == 0)
      for (float v : ref.read<float>(name))
        largest_param_grad = std::max(largest_param_grad, double(std::abs(v)));
  for (const auto& name : ref.names()) {
    INFO(name);
    REQUIRE(got.contains(name));
    REQUIRE(got.info(name).shape == ref.info(name).shape);
    const auto a = got.read<float>(name), r = ref.read<float>(name);
    double max_ref = 0, max_diff = 0;
    for (std::size_t i = 0; i < r.size(); ++i) {
      REQUIRE(std::isfinite(a[i]));
      max_ref = std::max(max_ref, double(std::abs(r[i])));
      max_diff = std::max(max_diff, double(std::abs(a[i] - r[i])));
    }
    const bool param_grad = name.rfind("grad.", 0) == 0;
    const double floor = param_grad ? 1e-3 * largest_param_grad : 0.0;
    const double error = max_diff / std::max(max_ref, floor);
    INFO("error " << error);
    REQUIRE(error <= (name.rfind("grad", 0) == 0 ? 1e-3 : 1e-4));
  }
}

using test::TempDir;
}  // namespace

TEST_CASE("difftrain unet: unet_tiny output and every gradient match diffusers") {
  TempDir dir;
  const std::string out = dir.file("out.safetensors");
  REQUIRE(run({"unet", "--model", test::data_path("unet_tiny"), "--inputs",
               test::data_path("unet_tiny/inputs.safetensors"), "--out", out}) == 0);
  compare_with_golden(out, test::data_path("unet_tiny/expected.safetensors"));
  REQUIRE(io::SafetensorsFile::open(out).size() == 3 + 208);
}

TEST_CASE("difftrain unet --lora: kohya and PEFT files give diffusers' output and adapter grads") {
  TempDir dir;
  for (const char* file : {"lora_kohya.safetensors", "lora_peft.safetensors"}) {
    INFO(file);
    const std::string out = dir.file(std::string("out_") + file);
    REQUIRE(run({"unet", "--model", test::data_path("unet_tiny"), "--inputs",
                 test::data_path("unet_tiny/inputs.safetensors"), "--out", out, "--lora",
                 test::data_path(std::string("lora/") + file)}) == 0);
    compare_with_golden(out, test::data_path("unet_tiny_lora/expected.safetensors"));
    REQUIRE(io::SafetensorsFile::open(out).size() == 3 + 64);  // only the adapters' gradients
  }
  // --lora-scale 0 gives the plain UNet's output and input gradients.
  const std::string out = dir.file("scale0.safetensors");
  REQUIRE(run({"unet", "--model", test::data_path("unet_tiny"), "--inputs",
               test::data_path("unet_tiny/inputs.safetensors"), "--out", out, "--lora",
               test::data_path("lora/lora_kohya.safetensors"), "--lora-scale", "0"}) == 0);
  const auto got = io::SafetensorsFile::open(out);
  const auto plain = io::SafetensorsFile::open(test::data_path("unet_tiny/expected.safetensors"));
  for (const char* name : {"output", "grad_sample", "grad_encoder_hidden_states"}) {
    const auto r = plain.read<float>(name);
    REQUIRE_CLOSE(got.read<float>(name), r, 0, 1e-4 * xt::amax(xt::abs(xt::adapt(r)))());
  }
}

TEST_CASE("difftrain unet: bad inputs exit 1 and write nothing") {
  TempDir dir;
  const std::string out = dir.file("never.safetensors");
  REQUIRE(run({"unet", "--model", test::data_path("unet_tiny"), "--inputs",
               test::data_path("lora/lora_peft.safetensors"), "--out", out}) == 1);
  REQUIRE(run({"unet", "--model", dir.file("missing"), "--inputs",
               test::data_path("unet_tiny/inputs.safetensors"), "--out", out}) == 1);
  REQUIRE(run({"unet", "--model", test::data_path("unet_tiny"), "--inputs",
               test::data_path("unet_tiny/inputs.safetensors"), "--out", out, "--lora-scale",
               "0.5"}) == 1);
  REQUIRE(!fs::exists(out));
}

TEST_CASE("difftrain unet: SDXL's text_time UNet (unet_sdxl_tiny) matches diffusers") {
  TempDir dir;
  const std::string out = dir.file("out.safetensors");
  REQUIRE(run({"unet", "--model", test::data_path("unet_sdxl_tiny"), "--inputs",
               test::data_path("unet_sdxl_tiny/inputs.safetensors"), "--out", out}) == 0);
  compare_with_golden(out, test::data_path("unet_sdxl_tiny/expected.safetensors"));
  REQUIRE(io::SafetensorsFile::open(out).size() == 4 + 428);  // with grad_text_embeds

  // an SDXL UNet without text_embeds / time_ids, and an SD UNet given them, are refused
  const std::string never = dir.file("never.safetensors");
  REQUIRE(run({"unet", "--model", test::data_path("unet_sdxl_tiny"), "--inputs",
               test::data_path("unet_tiny/inputs.safetensors"), "--out", never}) == 1);
  REQUIRE(!fs::exists(never));
}

TEST_CASE("difftrain unet --lora on SDXL: kohya SGM-named and PEFT files match diffusers") {
  TempDir dir;
  const std::string model = test::data_path("unet_sdxl_tiny_lora");
  const std::string inputs = test::data_path("unet_sdxl_tiny_lora/inputs.safetensors");
  for (const char* file : {"lora_kohya.safetensors", "lora_peft.safetensors"}) {
    INFO(file);
    const std::string out = dir.file(std::string("out_") + file);
    REQUIRE(run({"unet", "--model", model, "--inputs", inputs, "--out", out, "--lora",
                 test::data_path(std::string("unet_sdxl_tiny_lora/") + file)}) == 0);
    compare_with_golden(out, test::data_path("unet_sdxl_tiny_lora/expected.safetensors"));
    REQUIRE(io::SafetensorsFile::open(out).size() == 4 + 192);
  }
  // --lora-scale 0 gives the plain SDXL UNet's output and input gradients.
  const std::string out = dir.file("scale0.safetensors");
  REQUIRE(run({"unet", "--model", model, "--inputs", inputs, "--out", out, "--lora",
               test::data_path("unet_sdxl_tiny_lora/lora_kohya.safetensors"), "--lora-scale",
               "0"}) == 0);
  const auto got = io::SafetensorsFile::open(out);
  const auto plain =
      io::SafetensorsFile::open(test::data_path("unet_sdxl_tiny/expected.safetensors"));
  for (const char* name :
       {"output", "grad_sample", "grad_encoder_hidden_states", "grad_text_embeds"}) {
    INFO(name);
    const auto r = plain.read<float>(name);
    REQUIRE_CLOSE(got.read<float>(name), r, 0, 1e-4 * xt::amax(xt::abs(xt::adapt(r)))());
  }
}
