// Fuzz target: a safetensors file (io::SafetensorsFile::open, then every tensor read as float,
// viewed in place and its raw bytes touched). Refusal is a difftrain::Error; anything else is a
// finding.
#include <cstddef>
#include <cstdint>
#include <string>

#include "difftrain/io/safetensors.hpp"
#include "fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace difftrain;
  const fuzz::Scratch& scratch = fuzz::Scratch::get();
  const std::string path = scratch.write("model.safetensors", fuzz::as_text(data, size));
  fuzz::expect_only_errors([&] {
    const io::SafetensorsFile file = io::SafetensorsFile::open(path);
    volatile float sink = 0;
    for (const auto& [key, value] : file.metadata()) sink = sink + float(key.size() + value.size());
    for (const std::string& name : file.names()) {
      const auto& raw = file.raw(name);
      if (!raw.empty()) sink = sink + float(raw.back());
      fuzz::expect_only_errors([&] {
        for (float v : file.read<float>(name)) sink = sink + v;
      });
      fuzz::expect_only_errors([&] {
        for (float v : file.view<float>(name)) sink = sink + v;
      });
    }
    (void)file.contains("missing");
    fuzz::expect_only_errors([&] { (void)file.info("missing"); });
  });
  return 0;
}
