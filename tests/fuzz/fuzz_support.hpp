#pragma once
// What every fuzz target shares: a scratch folder of its own process (the readers take paths),
// splitting one input into several files, and the rule that a reader may fail only with
// difftrain::Error (anything else: another exception, a crash, a sanitizer report, a hang, a huge
// allocation, is a finding).

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/warning.hpp"

namespace difftrain::fuzz {

/// Separates the files of a multi-file input (tokenizer, checkpoint): a line of its own that no
/// JSON or merges.txt holds. The fuzzer learns it from the seeds and from fuzz.dict.
inline constexpr std::string_view kFileSeparator = "\n--8<--\n";

/// The input as text.
inline std::string_view as_text(const std::uint8_t* data, std::size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

/// The parts of `text` between kFileSeparator lines (one part when there is none).
inline std::vector<std::string_view> split_files(std::string_view text) {
  std::vector<std::string_view> parts;
  for (;;) {
    const std::size_t at = text.find(kFileSeparator);
    if (at == std::string_view::npos) break;
    parts.push_back(text.substr(0, at));
    text.remove_prefix(at + kFileSeparator.size());
  }
  parts.push_back(text);
  return parts;
}

/// A folder of this process (in /dev/shm when it exists: no disk writes per execution), removed
/// at exit; the targets write their files into it.
class Scratch {
 public:
  static Scratch& get() {
    static Scratch scratch;
    return scratch;
  }
  const std::filesystem::path& path() const { return path_; }

  /// Removes everything in the folder (each execution starts from an empty one).
  void clear() const {
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(path_, ec))
      std::filesystem::remove_all(entry.path(), ec);
  }

  /// Writes `bytes` to path()/name (creating its folders) and returns the full path.
  std::string write(const std::string& name, std::string_view bytes) const {
    const std::filesystem::path file = path_ / name;
    std::filesystem::create_directories(file.parent_path());
    std::ofstream out(file, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) {
      std::fprintf(stderr, "fuzz: cannot write %s\n", file.c_str());
      std::abort();
    }
    return file.string();
  }

  ~Scratch() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }

 private:
  Scratch() {
    std::error_code ec;
    const std::filesystem::path base =
        std::filesystem::is_directory("/dev/shm", ec) && ::access("/dev/shm", W_OK) == 0
            ? std::filesystem::path("/dev/shm")
            : std::filesystem::temp_directory_path();
    // A crash skips the destructor: remove the folders of processes that no longer run.
    const std::string prefix = "difftrain-fuzz-";
    for (const auto& entry : std::filesystem::directory_iterator(base, ec)) {
      const std::string name = entry.path().filename().string();
      if (name.rfind(prefix, 0) == 0 &&
          !std::filesystem::exists("/proc/" + name.substr(prefix.size()), ec))
        std::filesystem::remove_all(entry.path(), ec);
    }
    path_ = base / (prefix + std::to_string(::getpid()));
    std::filesystem::remove_all(path_, ec);
    std::filesystem::create_directories(path_);
    set_warning_handler({});  // accepted-with-a-fallback input is not a finding; keep logs quiet
  }
  std::filesystem::path path_;
};

/// Runs `read`; difftrain::Error (bad input, refused) is the expected failure and is swallowed.
/// Any other exception escapes LLVMFuzzerTestOneInput, which libFuzzer reports as a crash.
template <class Read>
void expect_only_errors(Read&& read) {
  try {
    read();
  } catch (const Error&) {
  }
}

}  // namespace difftrain::fuzz
