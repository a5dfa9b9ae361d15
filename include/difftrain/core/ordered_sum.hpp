#pragma once
// Sums whose rounding depends only on the values, never on where the buffer starts.
//
// Eigen's .sum() and rowwise().sum() begin their packets at the first aligned address, so the
// same numbers summed from two buffers of different alignment can differ in the last bit. A
// gradient must not depend on that: gradient checkpointing recomputes activations into fresh
// buffers and promises the very same gradients. These sums keep W fixed lanes (element i goes to
// lane i mod W, added in order), then add the lanes in order; the lane loop vectorises with
// unaligned loads, so they cost what Eigen's do.

#include <cstddef>

namespace difftrain {

inline constexpr std::size_t kOrderedSumLanes = 16;

// Σ x[i], i < n: lanes (i mod W) in order, then the lanes in order, then the tail
template <class T>
T ordered_sum(const T* x, std::size_t n) {
  constexpr std::size_t W = kOrderedSumLanes;
  T lane[W] = {};
  std::size_t i = 0;
  for (; i + W <= n; i += W)
    for (std::size_t j = 0; j < W; ++j) lane[j] += x[i + j];
  T s = 0;
  for (std::size_t j = 0; j < W; ++j) s += lane[j];
  for (; i < n; ++i) s += x[i];
  return s;
}

// out[c] += Σ_r x[r·cols + c] over rows r in order (column sums of a row-major [rows, cols] block)
template <class T>
void add_column_sums(const T* x, std::size_t rows, std::size_t cols, T* out) {
  for (std::size_t r = 0; r < rows; ++r) {
    const T* row = x + r * cols;
    for (std::size_t c = 0; c < cols; ++c) out[c] += row[c];
  }
}

}  // namespace difftrain
