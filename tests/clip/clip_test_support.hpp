#pragma once
// Shared helpers of the CLIP tests: the golden folder, the golden error rule and a temporary
// folder.

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <filesystem>
#include <string>

#include "support/temp_dir.hpp"
#include "support/tensor_match.hpp"

namespace difftrain::test {

// A file of the golden clip_tiny folder ("" for the folder).
inline std::string clip_golden(const std::string& name) { return data_path("clip_tiny/" + name); }

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

}  // namespace difftrain::test
