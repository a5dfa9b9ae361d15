#pragma once
// Refusing, before allocating, a model or buffer a config or flag makes larger than this machine's
// memory: a config with "block_out_channels": [1e8] must fail at once with a message naming it,
// not grow for a minute and die with std::bad_alloc.

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <string_view>

#include "difftrain/core/error.hpp"

namespace difftrain {

/// The largest integer a config field may hold (2^40): far beyond any real model dimension, and
/// exactly representable, so a value such as 1e30 is refused before a conversion to size_t
/// (undefined behaviour beyond 2^64).
inline constexpr double kMaxConfigInteger = 1099511627776.0;

/// This machine's physical memory in bytes (0 when the system does not say).
inline std::uint64_t physical_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page_size = ::sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page_size <= 0) return 0;
  return std::uint64_t(pages) * std::uint64_t(page_size);
}

/// Error "function: <what> needs ~N GB, more than this machine's M GB of memory" when `bytes`
/// (an estimate in double, so it cannot overflow) exceeds physical memory.
inline void require_fits_in_memory(std::string_view function, std::string_view what, double bytes) {
  const double memory = double(physical_memory_bytes());
  if (memory > 0 && !(bytes <= memory)) {
    const double gb = 1e9;
    fail(function, what, " needs ~", std::ceil(bytes / gb * 10) / 10, " GB, more than this ",
         "machine's ", std::floor(memory / gb * 10) / 10, " GB of memory");
  }
}

}  // namespace difftrain
