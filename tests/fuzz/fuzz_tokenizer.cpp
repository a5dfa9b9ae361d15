// Fuzz target: a CLIP tokenizer folder. The input is split at kFileSeparator lines into
// vocab.json, merges.txt, tokenizer_config.json and a text to encode (missing parts: no such
// file, and a fixed prompt); the folder is loaded (ClipTokenizer::from_folder) and the text
// encoded. Refusal is a difftrain::Error; anything else is a finding.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "difftrain/models/clip_tokenizer.hpp"
#include "fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace difftrain;
  const fuzz::Scratch& scratch = fuzz::Scratch::get();
  scratch.clear();
  const std::vector<std::string_view> parts = fuzz::split_files(fuzz::as_text(data, size));
  const char* names[] = {"vocab.json", "merges.txt", "tokenizer_config.json"};
  for (std::size_t i = 0; i < parts.size() && i < 3; ++i)
    scratch.write(std::string("tokenizer/") + names[i], parts[i]);
  const std::string text = parts.size() > 3 ? std::string(parts[3]) : "a photo of a cat, 4k";
  fuzz::expect_only_errors([&] {
    const ClipTokenizer tokenizer =
        ClipTokenizer::from_folder((scratch.path() / "tokenizer").string());
    (void)tokenizer.encode(text);
    (void)tokenizer.encode(text, 8);
    (void)tokenizer.bpe_tokens(text);
  });
  return 0;
}
