#pragma once
// Test helpers: compare tensors elementwise and report the first bad index, expected, actual and
// the max error, and locate the test data folder.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstddef>
#include <sstream>
#include <string>

namespace difftrain::test {

/// Folder of the files copied from the golden data (tests/data).
inline std::string data_path(const std::string& name) {
  return std::string(DIFFTRAIN_TEST_DATA_DIR) + "/" + name;
}

struct CloseReport {
  bool ok = true;
  std::size_t count = 0;
  std::size_t worst_index = 0;
  double max_error = 0;  // max |a - e| / (atol + rtol |e|) scaled error
  double worst_actual = 0, worst_expected = 0;
  std::string message;
};

/// |actual - expected| <= atol + rtol·|expected| elementwise over flat ranges of equal size.
template <class A, class E>
CloseReport compare_close(const A& actual, const E& expected, double rtol, double atol) {
  CloseReport r;
  auto a = std::begin(actual);
  auto e = std::begin(expected);
  const auto n_a = static_cast<std::size_t>(std::distance(std::begin(actual), std::end(actual)));
  const auto n_e =
      static_cast<std::size_t>(std::distance(std::begin(expected), std::end(expected)));
  r.count = n_a;
  if (n_a != n_e) {
    r.ok = false;
    r.message = "sizes differ: actual " + std::to_string(n_a) + ", expected " + std::to_string(n_e);
    return r;
  }
  for (std::size_t i = 0; i < n_a; ++i, ++a, ++e) {
    const double x = static_cast<double>(*a), y = static_cast<double>(*e);
    double err;
    if (std::isfinite(x) && std::isfinite(y)) {
      const double diff = std::abs(x - y);
      err = diff == 0 ? 0.0 : diff / (atol + rtol * std::abs(y));
    } else {
      const bool same = (std::isnan(x) && std::isnan(y)) || x == y;  // both NaN, or equal Inf
      err = same ? 0.0 : INFINITY;
    }
    if (err > r.max_error || (i == 0 && err == 0)) {
      r.max_error = err;
      r.worst_index = i;
      r.worst_actual = x;
      r.worst_expected = y;
    }
  }
  r.ok = r.max_error <= 1.0;
  std::ostringstream out;
  out.precision(9);
  out << "worst at flat index " << r.worst_index << ": actual " << r.worst_actual << ", expected "
      << r.worst_expected << " (error " << r.max_error << "× the tolerance rtol " << rtol
      << ", atol " << atol << ", " << r.count << " elements)";
  r.message = out.str();
  return r;
}

}  // namespace difftrain::test

/// REQUIRE that two flat ranges agree within atol + rtol·|expected|, printing the worst element.
#define REQUIRE_CLOSE(actual, expected, rtol, atol)                             \
  do {                                                                          \
    const auto difftrain_report_ =                                              \
        ::difftrain::test::compare_close((actual), (expected), (rtol), (atol)); \
    INFO(difftrain_report_.message);                                            \
    REQUIRE(difftrain_report_.ok);                                              \
  } while (0)
