// Fuzz target: a training checkpoint folder. The input is split at kFileSeparator lines into
// trainer_state.json (the manifest) and safetensors files; the folder is checked
// (checkpoint_problem), read (read_checkpoint) and taken as `latest` (load_checkpoint, which also
// recovers leftovers). Refusal is a difftrain::Error; anything else is a finding.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "difftrain/train/checkpoint.hpp"
#include "fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace difftrain;
  const fuzz::Scratch& scratch = fuzz::Scratch::get();
  scratch.clear();
  const std::vector<std::string_view> parts = fuzz::split_files(fuzz::as_text(data, size));
  const char* names[] = {"model.safetensors", "optimizer.safetensors", "ema.safetensors"};
  scratch.write("output/checkpoint-7/trainer_state.json", parts[0]);
  for (std::size_t i = 1; i < parts.size() && i <= 3; ++i)
    scratch.write(std::string("output/checkpoint-7/") + names[i - 1], parts[i]);
  const auto output = scratch.path() / "output";
  fuzz::expect_only_errors([&] { (void)train::checkpoint_problem(output / "checkpoint-7"); });
  fuzz::expect_only_errors([&] { (void)train::read_checkpoint(output / "checkpoint-7"); });
  fuzz::expect_only_errors([&] { (void)train::load_checkpoint(output, "latest"); });
  return 0;
}
