#pragma once
// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011): a counter-based generator. The output is a pure function of (counter, key), so any
// element of a random sequence is computed without state, on any thread, in any order.
// Written once over a word type U: uint32_t (scalar) or xsimd::batch<uint32_t, Arch> (SIMD lanes
// with different counters and the same key).

#include <array>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <xsimd/xsimd.hpp>

// Forces inlining of the small SIMD steps of the random fills: GCC otherwise keeps Box–Muller and
// the group functions out of line, and every call reloads its constants and round keys.
#if defined(__GNUC__)
#define DIFFTRAIN_INLINE [[gnu::always_inline]] inline
#else
#define DIFFTRAIN_INLINE inline
#endif

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

// SIMD lanes, any instruction set (xsimd): the even and odd 32-bit lanes are widened to 64 bits
// and multiplied separately.
template <class Arch>
inline void mulhilo_generic(xsimd::batch<std::uint32_t, Arch> a, std::uint32_t m,
                            xsimd::batch<std::uint32_t, Arch>& hi,
                            xsimd::batch<std::uint32_t, Arch>& lo) {
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

// SIMD lanes, AVX2 / AVX-512: mul_epu32 multiplies the even 32-bit lanes into 64-bit products
// with no masking; the odd lanes are shifted down first, and the halves are merged back by
// (masked) shuffles. 5 instructions on AVX-512 against the generic path's ~10 with a 64-bit
// multiply (which AVX2 lacks and AVX-512 runs at half rate); Philox is most of the cost of a
// normal number. xsimd 8.1 has no 32x32->64 lane multiply, hence the intrinsics. Same bits as
// the generic path (both tested against the scalar product).
template <class Arch>
DIFFTRAIN_INLINE void mulhilo(xsimd::batch<std::uint32_t, Arch> a, std::uint32_t m,
                              xsimd::batch<std::uint32_t, Arch>& hi,
                              xsimd::batch<std::uint32_t, Arch>& lo) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of_v<xsimd::avx512f, Arch>) {
    const __m512i x = a;
    const __m512i mm = _mm512_set1_epi64(m);
    const __m512i even = _mm512_mul_epu32(x, mm);                        // lanes 0, 2, ...
    const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), mm);  // lanes 1, 3, ...
    hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);    // even's high halves
    lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);    // odd's low halves
    return;
  }
#endif
#if XSIMD_WITH_AVX2
  if constexpr (std::is_base_of_v<xsimd::avx2, Arch>) {
    const __m256i x = a;
    const __m256i mm = _mm256_set1_epi64x(m);
    const __m256i even = _mm256_mul_epu32(x, mm);
    const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), mm);
    hi = _mm256_blend_epi32(odd, _mm256_shuffle_epi32(even, _MM_PERM_DDBB), 0x55);
    lo = _mm256_blend_epi32(even, _mm256_shuffle_epi32(odd, _MM_PERM_CCAA), 0xAA);
    return;
  }
#endif
  mulhilo_generic<Arch>(a, m, hi, lo);
}
}  // namespace philox_detail

/// Philox4x32-10's key schedule: round r uses (key0 + r·0x9E3779B9, key1 + r·0xBB67AE85). Computed
/// once per stream, so a loop over many blocks reads the round keys instead of re-deriving and
/// re-broadcasting them for every block.
struct PhiloxKeys {
  std::array<std::uint32_t, 10> key0{}, key1{};

  constexpr PhiloxKeys(std::uint32_t k0, std::uint32_t k1) {
    for (std::size_t round = 0; round < 10; ++round) {
      key0[round] = k0;
      key1[round] = k1;
      k0 += philox_detail::kWeyl0;
      k1 += philox_detail::kWeyl1;
    }
  }
};

/// Philox4x32 with 10 rounds: 4 counter words and the key schedule → 4 random words.
template <class U>
DIFFTRAIN_INLINE std::array<U, 4> philox4x32_10(std::array<U, 4> counter, const PhiloxKeys& keys) {
  using namespace philox_detail;
#pragma GCC unroll 10
  for (std::size_t round = 0; round < 10; ++round) {
    U hi0, lo0, hi1, lo1;
    mulhilo(counter[0], kMul0, hi0, lo0);
    mulhilo(counter[2], kMul1, hi1, lo1);
    counter = {hi1 ^ counter[1] ^ U(keys.key0[round]), lo1, hi0 ^ counter[3] ^ U(keys.key1[round]),
               lo0};
  }
  return counter;
}

/// Philox4x32 with 10 rounds: 4 counter words and 2 key words → 4 random words.
template <class U>
DIFFTRAIN_INLINE std::array<U, 4> philox4x32_10(std::array<U, 4> counter, std::uint32_t key0,
                                                std::uint32_t key1) {
  return philox4x32_10(counter, PhiloxKeys(key0, key1));
}

}  // namespace difftrain
