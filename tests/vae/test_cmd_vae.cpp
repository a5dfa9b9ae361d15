// vae-encode / vae-decode through CLI11, as the `difftrain` tool runs them.
#include <CLI/CLI.hpp>
#include <catch2/catch.hpp>
#include <filesystem>
#include <string>
#include <vector>

#include "cmd_vae.hpp"
#include "support/tensor_match.hpp"
#include "vae/vae_test_support.hpp"

using namespace difftrain;
using difftrain::test::data_path;
using difftrain::test::relative_max_error;
using difftrain::test::temp_path;

namespace {
// Runs `difftrain <args...>` with the VAE commands registered; returns the exit code.
int run(std::vector<std::string> args) {
  CLI::App app{"difftrain"};
  app.require_subcommand(1);
  int exit_code = 0;
  tools::add_vae_commands(app, exit_code);
  args.insert(args.begin(), "difftrain");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  app.parse(static_cast<int>(argv.size()), argv.data());
  return exit_code;
}

void compare_all(const std::string& produced, const std::string& expected) {
  const auto got = io::SafetensorsFile::open(produced);
  const auto ref = io::SafetensorsFile::open(expected);
  for (const auto& name : ref.names()) {
    REQUIRE(got.contains(name));
    REQUIRE(got.info(name).shape == ref.info(name).shape);
    const double error = relative_max_error(got.read<float>(name), ref.read<float>(name));
    INFO(name << ": error " << error);
    CHECK(error <= 1e-4);
  }
}
}  // namespace

TEST_CASE("difftrain vae-encode and vae-decode reproduce the golden files", "[vae][cli]") {
  const std::string model = data_path("vae_tiny");
  const std::string encoded = temp_path("encoded.safetensors");
  const std::string decoded = temp_path("decoded.safetensors");
  REQUIRE(run({"vae-encode", "--model", model, "--inputs", model + "/inputs.safetensors", "--out",
               encoded}) == 0);
  compare_all(encoded, model + "/expected.safetensors");
  REQUIRE(run({"vae-decode", "--model", model, "--inputs", model + "/decode_inputs.safetensors",
               "--out", decoded}) == 0);
  compare_all(decoded, model + "/decode_expected.safetensors");
  std::filesystem::remove(encoded);
  std::filesystem::remove(decoded);
}

TEST_CASE("difftrain vae commands fail with exit code 1 on bad inputs", "[vae][cli]") {
  const std::string model = data_path("vae_tiny");
  const std::string out = temp_path("never.safetensors");
  // no `latents` tensor in the encoder's inputs; no `image` in the decoder's
  CHECK(run({"vae-decode", "--model", model, "--inputs", model + "/inputs.safetensors", "--out",
             out}) == 1);
  CHECK(run({"vae-encode", "--model", model, "--inputs", model + "/decode_inputs.safetensors",
             "--out", out}) == 1);
  // noise of the wrong shape: the golden noise [2,4,8,8] does not fit a [2,4,8,8]... mean? use
  // the decoder's expected image [2,3,32,32] as `image` and the decoder's latents [2,4,8,8] as
  // noise (fits) versus the encoder's image as noise (does not)
  const std::string bad = temp_path("bad_inputs.safetensors");
  const auto inputs = io::SafetensorsFile::open(model + "/inputs.safetensors");
  const Tensor4<float> image = inputs.read_tensor<float, 4>("image");
  io::save_safetensors(bad, {io::TensorToWrite::from_tensor("image", image),
                             io::TensorToWrite::from_tensor("noise", image)});
  CHECK(run({"vae-encode", "--model", model, "--inputs", bad, "--out", out}) == 1);
  // without noise, sampling is seeded: two runs with one seed agree
  io::save_safetensors(bad, {io::TensorToWrite::from_tensor("image", image)});
  const std::string a = temp_path("a.safetensors"), b = temp_path("b.safetensors");
  REQUIRE(run({"vae-encode", "--model", model, "--inputs", bad, "--out", a, "--seed", "3"}) == 0);
  REQUIRE(run({"vae-encode", "--model", model, "--inputs", bad, "--out", b, "--seed", "3"}) == 0);
  CHECK(io::SafetensorsFile::open(a).read<float>("latents") ==
        io::SafetensorsFile::open(b).read<float>("latents"));
  CHECK_FALSE(std::filesystem::exists(out));
  for (const auto& p : {bad, a, b}) std::filesystem::remove(p);
}
