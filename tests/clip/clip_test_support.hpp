#pragma once
// Shared helpers of the CLIP tests: the golden error rule and a temporary folder.

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <filesystem>
#include <string>

namespace difftrain::test {

// The golden README's rule: max|got − ref| / max|ref| (inf on a size mismatch or non-finite got).
template <class A, class E>
double golden_error(const A& got, const E& ref) {
  if (got.size() != ref.size()) return INFINITY;
  double diff = 0, scale = 0;
  auto g = got.begin();
  for (auto r = ref.begin(); r != ref.end(); ++r, ++g) {
    const double x = static_cast<double>(*g), y = static_cast<double>(*r);
    if (!std::isfinite(x)) return INFINITY;
    diff = std::max(diff, std::abs(x - y));
    scale = std::max(scale, std::abs(y));
  }
  return diff / scale;
}

// A fresh folder under the system temp dir, removed with its content at scope exit.
class TempDir {
 public:
  explicit TempDir(const std::string& tag) {
    static std::atomic<int> counter{0};
    path_ = std::filesystem::temp_directory_path() /
            ("difftrain_test_" + tag + "_" + std::to_string(::getpid()) + "_" +
             std::to_string(counter++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

}  // namespace difftrain::test
