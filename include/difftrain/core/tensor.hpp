#pragma once
// Tensor aliases and shape checks. Activations are NCHW, row-major, float32 by default.
// Dims legend used throughout: B batch, C channels, H height, W width, L tokens, D features.

#include <cstddef>
#include <initializer_list>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>
#include <xtensor/xtensor.hpp>

#include "difftrain/core/error.hpp"

namespace difftrain {

template <class T, std::size_t N>
using Tensor = xt::xtensor<T, N>;
template <class T = float>
using Tensor4 = Tensor<T, 4>;  // [B, C, H, W]
template <class T = float>
using Tensor3 = Tensor<T, 3>;  // [B, L, D]

/// "[2,4,8,8]"
template <class Shape>
std::string shape_string(const Shape& shape) {
  std::ostringstream out;
  out << '[';
  bool first = true;
  for (auto extent : shape) {
    if (!first) out << ',';
    out << extent;
    first = false;
  }
  out << ']';
  return out.str();
}

/// Throws "function: argument has shape [actual], expected [expected]" on mismatch.
template <class Shape>
void check_shape(std::string_view function, std::string_view argument, const Shape& actual,
                 std::initializer_list<std::size_t> expected) {
  bool same = actual.size() == expected.size();
  if (same) {
    auto e = expected.begin();
    for (auto extent : actual) same = same && static_cast<std::size_t>(extent) == *e++;
  }
  if (!same) {
    fail(function, argument, " has shape ", shape_string(actual), ", expected ",
         shape_string(std::vector<std::size_t>(expected)));
  }
}

/// Same as above with the expected shape taken from another tensor's shape.
template <class Shape, class ExpectedShape>
void check_same_shape(std::string_view function, std::string_view argument, const Shape& actual,
                      const ExpectedShape& expected) {
  bool same = actual.size() == expected.size();
  for (std::size_t i = 0; same && i < actual.size(); ++i)
    same = static_cast<std::size_t>(actual[i]) == static_cast<std::size_t>(expected[i]);
  if (!same) {
    fail(function, argument, " has shape ", shape_string(actual), ", expected ",
         shape_string(expected));
  }
}

/// Throws unless a span has `expected` elements.
template <class T>
void check_size(std::string_view function, std::string_view argument, std::span<T> values,
                std::size_t expected) {
  require(values.size() == expected, function, argument, " has ", values.size(),
          " elements, expected ", expected);
}

}  // namespace difftrain
