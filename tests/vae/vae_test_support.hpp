#pragma once
// Shared helpers of the VAE tests: the golden comparison rule and the tiny model.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <string>

#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/vae/vae_load.hpp"
#include "support/temp_dir.hpp"
#include "support/tensor_match.hpp"

namespace difftrain::test {

// error = max|got − ref| / max|ref| (the golden README's rule for forward outputs)
template <class A, class E>
double relative_max_error(const A& got, const E& ref) {
  REQUIRE(got.size() == ref.size());
  double diff = 0, scale = 0;
  auto g = got.begin();
  for (auto r = ref.begin(); r != ref.end(); ++r, ++g) {
    const double d = std::abs(static_cast<double>(*g) - static_cast<double>(*r));
    diff = std::isnan(d) ? INFINITY : std::max(diff, d);
    scale = std::max(scale, std::abs(static_cast<double>(*r)));
  }
  return diff / scale;
}

inline std::string vae_tiny_dir() { return data_path("vae_tiny"); }

inline const models::AutoencoderKL<float>& vae_tiny() {
  static const models::AutoencoderKL<float> vae = models::load_vae<float>(vae_tiny_dir());
  return vae;
}

/// A file of the VAE tests' temporary folder (removed when the test executable exits).
inline std::string temp_path(const std::string& name) {
  static const TempDir dir("vae");
  return dir.file(name);
}

}  // namespace difftrain::test

/// CHECK that `expr` throws difftrain::Error whose message matches `matcher`.
#define CHECK_ERROR_WITH(expr, matcher)                          \
  do {                                                           \
    bool difftrain_thrown_ = false;                              \
    try {                                                        \
      static_cast<void>(expr);                                   \
    } catch (const ::difftrain::Error& difftrain_error_) {       \
      difftrain_thrown_ = true;                                  \
      CHECK_THAT(std::string(difftrain_error_.what()), matcher); \
    }                                                            \
    CHECK(difftrain_thrown_);                                    \
  } while (0)
