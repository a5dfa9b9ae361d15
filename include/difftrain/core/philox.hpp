#pragma once
// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011): a counter-based generator. The output is a pure function of (counter, key), so any
// element of a random sequence is computed without state, on any thread, in any order.
// Written once over a word type U: uint32_t (scalar) or xsimd::batch<uint32_t, Arch> (SIMD lanes
// with different counters and the same key).

#include <array>
#include <cstdint>

#include <xsimd/xsimd.hpp>

namespace difftrain {

namespace philox_detail {
inline constexpr std::uint32_t kMul0 = 0xD2511F53u;
inline constexpr std::uint32_t kMul1 = 0xCD9E8D57u;
inline constexpr std::uint32_t kWeyl0 = 0x9E3779B9u;  // golden ratio
inline constexpr std::uint32_t kWeyl1 = 0xBB67AE85u;  // sqrt(3) - 1

// (hi, lo) = a * m as a 64-bit product.
inline void mulhilo(std::uint32_t a, std::uint32_t m, std::uint32_t& hi, std::uint32_t& lo) {
  const std::uint64_t product = std::uint64_t{a} * m;
  hi = static_cast<std::uint32_t>(product >> 32);
  lo = static_cast<std::uint32_t>(product);
}

// SIMD lanes: the even and odd 32-bit lanes are widened to 64 bits and multiplied separately.
template <class Arch>
inline void mulhilo(xsimd::batch<std::uint32_t, Arch> a, std::uint32_t m,
                    xsimd::batch<std::uint32_t, Arch>& hi, xsimd::batch<std::uint32_t, Arch>& lo) {
  using Wide = xsimd::batch<std::uint64_t, Arch>;
  const Wide low_mask(0xFFFFFFFFull);
  const Wide high_mask(0xFFFFFFFF00000000ull);
  const Wide multiplier(std::uint64_t{m});
  const Wide wide = xsimd::bitwise_cast<Wide>(a);
  const Wide even = (wide & low_mask) * multiplier;
  const Wide odd = (wide >> 32) * multiplier;
  using Narrow = xsimd::batch<std::uint32_t, Arch>;
  lo = xsimd::bitwise_cast<Narrow>((even & low_mask) | (odd << 32));
  hi = xsimd::bitwise_cast<Narrow>((even >> 32) | (odd & high_mask));
}
}  // namespace philox_detail

/// Philox4x32 with 10 rounds: 4 counter words and 2 key words → 4 random words.
template <class U>
inline std::array<U, 4> philox4x32_10(std::array<U, 4> counter, std::uint32_t key0,
                                      std::uint32_t key1) {
  using namespace philox_detail;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key0 += kWeyl0;
      key1 += kWeyl1;
    }
    U hi0, lo0, hi1, lo1;
    mulhilo(counter[0], kMul0, hi0, lo0);
    mulhilo(counter[2], kMul1, hi1, lo1);
    counter = {hi1 ^ counter[1] ^ U(key0), lo1, hi0 ^ counter[3] ^ U(key1), lo0};
  }
  return counter;
}

}  // namespace difftrain
