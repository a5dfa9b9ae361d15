#pragma once
// 16-bit floats as stored in safetensors files: IEEE binary16 ("F16": 1 sign, 5 exponent,
// 10 mantissa bits, bias 15) and bfloat16 ("BF16": the upper half of a binary32); also the
// decoding (only) of the two OCP float8 formats found in fp8 checkpoints (F8_E4M3, F8_E5M2).
// Widening to float is exact for every bit pattern (subnormals, ±inf, NaN payloads). Narrowing
// rounds to nearest, ties to even, in one step from the exact input (no double rounding through
// float when the input is a double); overflow gives ±inf, NaN stays a quiet NaN of the same sign.

#include <bit>
#include <cmath>
#include <cstdint>

namespace difftrain {

namespace half_detail {

// Round a double to a binary format with `exp_bits` exponent and `man_bits` mantissa bits
// (sign bit at position exp_bits + man_bits): x = sig · 2^(e − 52), kept = round_even(x / ulp).
template <int exp_bits, int man_bits>
constexpr std::uint16_t narrow_from_double(double x) {
  constexpr int bias = (1 << (exp_bits - 1)) - 1;
  constexpr std::uint32_t exp_all_ones = (1u << exp_bits) - 1;
  constexpr int sign_shift = exp_bits + man_bits;
  const auto bits = std::bit_cast<std::uint64_t>(x);
  const auto sign = static_cast<std::uint32_t>(bits >> 63) << sign_shift;
  const int exp = static_cast<int>((bits >> 52) & 0x7FF);
  const std::uint64_t mantissa = bits & ((std::uint64_t{1} << 52) - 1);

  if (exp == 0x7FF) {
    if (mantissa == 0) return static_cast<std::uint16_t>(sign | (exp_all_ones << man_bits));
    // NaN: keep the top payload bits and force the quiet bit so it never turns into inf.
    const auto payload = static_cast<std::uint32_t>(mantissa >> (52 - man_bits));
    return static_cast<std::uint16_t>(sign | (exp_all_ones << man_bits) | payload |
                                      (1u << (man_bits - 1)));
  }
  // Double zeros and subnormals (< 2^-1022) are far below half the smallest target subnormal.
  if (exp == 0) return static_cast<std::uint16_t>(sign);

  const int e = exp - 1023;                                       // unbiased exponent
  const std::uint64_t sig = (std::uint64_t{1} << 52) | mantissa;  // 53 significant bits
  const bool normal = e >= 1 - bias;
  // Bits of sig dropped: normal results keep man_bits after the leading one; subnormal results
  // are multiples of 2^(1 − bias − man_bits).
  const int shift = normal ? 52 - man_bits : 52 - man_bits + (1 - bias - e);
  if (shift > 53) return static_cast<std::uint16_t>(sign);  // below half the smallest subnormal

  std::uint64_t kept = sig >> shift;
  const std::uint64_t rest = sig & ((std::uint64_t{1} << shift) - 1);
  const std::uint64_t half = std::uint64_t{1} << (shift - 1);
  if (rest > half || (rest == half && (kept & 1u))) ++kept;

  if (!normal) {
    // kept <= 2^man_bits; kept == 2^man_bits is exactly the smallest normal's bit pattern.
    return static_cast<std::uint16_t>(sign | static_cast<std::uint32_t>(kept));
  }
  int biased = e + bias;
  if (kept == (std::uint64_t{1} << (man_bits + 1))) {  // rounding carried into the exponent
    kept >>= 1;
    ++biased;
  }
  if (biased >= static_cast<int>(exp_all_ones)) {
    return static_cast<std::uint16_t>(sign | (exp_all_ones << man_bits));  // overflow: ±inf
  }
  const auto fraction = static_cast<std::uint32_t>(kept - (std::uint64_t{1} << man_bits));
  return static_cast<std::uint16_t>(sign | (static_cast<std::uint32_t>(biased) << man_bits) |
                                    fraction);
}

}  // namespace half_detail

/// binary16 bits → float, exact: subnormal m·2^-24, normal (1 + m/1024)·2^(e − 15), inf, NaN.
constexpr float f16_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1Fu;
  const std::uint32_t mantissa = h & 0x3FFu;
  if (exp == 0) {
    // Zero or subnormal: m · 2^-24 is exact in float (m < 2^10).
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  if (exp == 0x1F) return std::bit_cast<float>(sign | 0x7F800000u | (mantissa << 13));
  return std::bit_cast<float>(sign | ((exp - 15 + 127) << 23) | (mantissa << 13));
}

/// bfloat16 bits → float, exact: the bits are the upper half of the binary32.
constexpr float bf16_to_float(std::uint16_t b) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

/// OCP float8 E4M3FN bits → float, exact (read-only: fp8 checkpoints). Bias 7, no infinities,
/// S.1111.111 is NaN: subnormal m·2^-9, normal (1 + m/8)·2^(e − 7), largest 448.
constexpr float f8_e4m3_to_float(std::uint8_t b) {
  const std::uint32_t sign = static_cast<std::uint32_t>(b & 0x80u) << 24;
  const std::uint32_t exp = (b >> 3) & 0xFu;
  const std::uint32_t mantissa = b & 0x7u;
  if (exp == 0xF && mantissa == 0x7) return std::bit_cast<float>(sign | 0x7FC00000u);
  if (exp == 0) {
    const float magnitude = static_cast<float>(mantissa) * 0.001953125f;  // m · 2^-9, exact
    return sign ? -magnitude : magnitude;
  }
  return std::bit_cast<float>(sign | ((exp - 7 + 127) << 23) | (mantissa << 20));
}

/// OCP float8 E5M2 bits → float, exact: the upper byte of a binary16 (inf and NaN included).
constexpr float f8_e5m2_to_float(std::uint8_t b) {
  return f16_to_float(static_cast<std::uint16_t>(static_cast<std::uint16_t>(b) << 8));
}

/// double → binary16 bits, round to nearest even; |x| >= 65520 → ±inf; NaN → quiet NaN.
constexpr std::uint16_t double_to_f16(double x) {
  return half_detail::narrow_from_double<5, 10>(x);
}

/// float → binary16 bits (float → double is exact, so this rounds once).
constexpr std::uint16_t float_to_f16(float x) { return double_to_f16(static_cast<double>(x)); }

/// double → bfloat16 bits, round to nearest even in one step; NaN → quiet NaN.
constexpr std::uint16_t double_to_bf16(double x) {
  return half_detail::narrow_from_double<8, 7>(x);
}

/// float → bfloat16 bits: keep the upper 16 bits, round to nearest even on the lower 16.
constexpr std::uint16_t float_to_bf16(float x) {
  const auto bits = std::bit_cast<std::uint32_t>(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
    return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);  // NaN: set the quiet bit
  }
  // Adding 0x7FFF (+1 when the kept part is odd) carries exactly when the dropped half is
  // above one half ulp, or equal to it with an odd kept part; a carry out of the exponent
  // produces inf, as rounding should.
  const std::uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>((bits + rounding) >> 16);
}

}  // namespace difftrain
