// Fuzz target: the trainer's config files, the same input read as a --config JSON file and as a
// kohya TOML file (tools/config_file.hpp read_config_file), and as a kohya --dataset_config
// (tools/dataset_config.hpp read_dataset_config). Refusal is a difftrain::Error; anything else
// is a finding.
#include <cstddef>
#include <cstdint>
#include <string>

#include "config_file.hpp"
#include "dataset_config.hpp"
#include "fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace difftrain;
  const fuzz::Scratch& scratch = fuzz::Scratch::get();
  const std::string_view text = fuzz::as_text(data, size);
  const std::string json = scratch.write("config.json", text);
  const std::string toml = scratch.write("config.toml", text);
  fuzz::expect_only_errors([&] { (void)tools::read_config_file(json); });
  fuzz::expect_only_errors([&] { (void)tools::read_config_file(toml); });
  fuzz::expect_only_errors([&] {
    tools::TrainCommandOptions options;
    (void)tools::read_dataset_config(toml, options);
  });
  return 0;
}
