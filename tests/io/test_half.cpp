// F16 / BF16 conversions against hand-computed bit patterns, exhaustive round trips, and (where
// the compiler has _Float16) the hardware/compiler IEEE conversion as an independent reference.
#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "difftrain/core/half.hpp"

using namespace difftrain;
using namespace difftrain::io;

namespace {
std::uint32_t bits_of(float x) { return std::bit_cast<std::uint32_t>(x); }
float from_bits(std::uint32_t b) { return std::bit_cast<float>(b); }
}  // namespace

TEST_CASE("f16_to_float decodes hand-computed bit patterns exactly") {
  CHECK(bits_of(f16_to_float(0x0000)) == bits_of(0.0f));
  CHECK(bits_of(f16_to_float(0x8000)) == bits_of(-0.0f));
  CHECK(f16_to_float(0x3C00) == 1.0f);
  CHECK(f16_to_float(0xC000) == -2.0f);
  CHECK(f16_to_float(0x3555) == 0.333251953125f);        // 1.0101010101b · 2^-2
  CHECK(f16_to_float(0x7BFF) == 65504.0f);               // largest finite
  CHECK(f16_to_float(0x0400) == std::ldexp(1.0f, -14));  // smallest normal
  CHECK(f16_to_float(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(f16_to_float(0x03FF) == std::ldexp(1023.0f, -24));
  CHECK(f16_to_float(0x8001) == -std::ldexp(1.0f, -24));
  CHECK(f16_to_float(0x7C00) == std::numeric_limits<float>::infinity());
  CHECK(f16_to_float(0xFC00) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(f16_to_float(0x7E00)));
  CHECK(std::isnan(f16_to_float(0x7C01)));  // signalling-NaN pattern stays NaN
  CHECK(std::signbit(f16_to_float(0xFE00)));
  CHECK(bits_of(f16_to_float(0x7E01)) == 0x7FC02000u);  // payload moves up by 13 bits
}

TEST_CASE("float_to_f16 rounds to nearest even, saturates to inf, keeps NaN") {
  CHECK(float_to_f16(0.0f) == 0x0000);
  CHECK(float_to_f16(-0.0f) == 0x8000);
  CHECK(float_to_f16(1.0f) == 0x3C00);
  CHECK(float_to_f16(-2.0f) == 0xC000);
  CHECK(float_to_f16(65504.0f) == 0x7BFF);
  CHECK(float_to_f16(65519.0f) == 0x7BFF);  // below the midpoint 65520
  CHECK(float_to_f16(65520.0f) == 0x7C00);  // the midpoint: ties to even = inf
  CHECK(float_to_f16(1e6f) == 0x7C00);
  CHECK(float_to_f16(-1e6f) == 0xFC00);
  CHECK(float_to_f16(std::numeric_limits<float>::infinity()) == 0x7C00);
  CHECK(float_to_f16(-std::numeric_limits<float>::infinity()) == 0xFC00);
  // Ties at 1: 1 + 2^-11 is half an ulp above 1 (even) → 1; 1 + 3·2^-11 → 1 + 2^-9 (even).
  CHECK(float_to_f16(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);
  CHECK(float_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3C02);
  CHECK(float_to_f16(std::nextafter(1.0f + std::ldexp(1.0f, -11), 2.0f)) == 0x3C01);
  // Subnormals: k · 2^-24.
  CHECK(float_to_f16(std::ldexp(1.0f, -24)) == 0x0001);
  CHECK(float_to_f16(std::ldexp(1.0f, -25)) == 0x0000);  // tie with 0 → 0 (even)
  CHECK(float_to_f16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001);
  CHECK(float_to_f16(std::ldexp(3.0f, -25)) == 0x0002);     // 1.5 → 2 (even)
  CHECK(float_to_f16(std::ldexp(5.0f, -25)) == 0x0002);     // 2.5 → 2 (even)
  CHECK(float_to_f16(std::ldexp(1023.5f, -24)) == 0x0400);  // rounds up into the normals
  CHECK(float_to_f16(-std::ldexp(1.0f, -24)) == 0x8001);
  CHECK(float_to_f16(1e-10f) == 0x0000);
  CHECK(float_to_f16(-1e-10f) == 0x8000);
  CHECK(float_to_f16(std::numeric_limits<float>::denorm_min()) == 0x0000);
  // NaN stays NaN (quiet bit set, sign kept), even a signalling NaN with low payload bits only.
  CHECK(float_to_f16(std::numeric_limits<float>::quiet_NaN()) == 0x7E00);
  CHECK(float_to_f16(-std::numeric_limits<float>::quiet_NaN()) == 0xFE00);
  CHECK(float_to_f16(from_bits(0x7F800001u)) == 0x7E00);
}

TEST_CASE("double_to_f16 and double_to_bf16 round once, not through float") {
  // x = 1 + 2^-11 + 2^-40: rounding to float first gives the tie 1 + 2^-11 → 1.0 (wrong);
  // one rounding gives 1 + 2^-10.
  const double x = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
  CHECK(float_to_f16(static_cast<float>(x)) == 0x3C00);
  CHECK(double_to_f16(x) == 0x3C01);
  const double y = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);
  CHECK(float_to_bf16(static_cast<float>(y)) == 0x3F80);
  CHECK(double_to_bf16(y) == 0x3F81);
  CHECK(double_to_f16(1e300) == 0x7C00);
  CHECK(double_to_bf16(-1e300) == 0xFF80);
  CHECK(double_to_f16(1e-300) == 0x0000);
  CHECK(double_to_bf16(std::numeric_limits<double>::quiet_NaN()) == 0x7FC0);
}

TEST_CASE("f16: every bit pattern survives f16 → float → f16") {
  for (std::uint32_t h = 0; h <= 0xFFFF; ++h) {
    const float f = f16_to_float(static_cast<std::uint16_t>(h));
    const std::uint16_t back = float_to_f16(f);
    const bool is_nan = (h & 0x7C00) == 0x7C00 && (h & 0x3FF) != 0;
    if (is_nan) {
      REQUIRE(std::isnan(f));
      REQUIRE((back & 0x7C00) == 0x7C00);
      REQUIRE((back & 0x3FF) != 0);
      REQUIRE((back & 0x8000) == (h & 0x8000));
    } else {
      INFO("pattern " << h);
      REQUIRE(back == h);
    }
  }
}

#if defined(__FLT16_MAX__)
TEST_CASE("float_to_f16 and f16_to_float agree with the compiler's _Float16") {
  std::mt19937 rng(1234);
  std::uniform_int_distribution<std::uint32_t> any_bits;
  // Random bit patterns concentrated on f16's range: exponents 2^-27 .. 2^17.
  std::uniform_int_distribution<std::uint32_t> exponent(127 - 27, 127 + 17);
  for (int i = 0; i < 200000; ++i) {
    std::uint32_t b = any_bits(rng);
    if (i % 2 == 0) b = (b & 0x807FFFFFu) | (exponent(rng) << 23);
    const float x = from_bits(b);
    const auto reference = std::bit_cast<std::uint16_t>(static_cast<_Float16>(x));
    if (std::isnan(x)) {
      REQUIRE(std::isnan(f16_to_float(float_to_f16(x))));
      continue;
    }
    INFO("float bits " << b);
    REQUIRE(float_to_f16(x) == reference);
  }
  for (std::uint32_t h = 0; h <= 0xFFFF; ++h) {
    const float reference =
        static_cast<float>(std::bit_cast<_Float16>(static_cast<std::uint16_t>(h)));
    const float ours = f16_to_float(static_cast<std::uint16_t>(h));
    if (std::isnan(reference)) {
      REQUIRE(std::isnan(ours));
    } else {
      REQUIRE(bits_of(ours) == bits_of(reference));
    }
  }
}
#endif

TEST_CASE("bf16 conversions: hand-computed patterns") {
  CHECK(bf16_to_float(0x3F80) == 1.0f);
  CHECK(bf16_to_float(0xC040) == -3.0f);
  CHECK(bf16_to_float(0x7F7F) == std::ldexp(255.0f, 120));  // largest finite (2 − 2^-7)·2^127
  CHECK(bf16_to_float(0x0001) == std::ldexp(1.0f, -133));   // smallest subnormal
  CHECK(bf16_to_float(0x7F80) == std::numeric_limits<float>::infinity());
  CHECK(std::isnan(bf16_to_float(0x7FC0)));
  CHECK(bits_of(bf16_to_float(0x8000)) == 0x80000000u);

  CHECK(float_to_bf16(1.0f) == 0x3F80);
  CHECK(float_to_bf16(-0.0f) == 0x8000);
  CHECK(float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3F80);      // tie → even
  CHECK(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3F82);  // tie → even (up)
  CHECK(float_to_bf16(std::nextafter(1.0f + std::ldexp(1.0f, -8), 2.0f)) == 0x3F81);
  CHECK(float_to_bf16(std::numeric_limits<float>::max()) == 0x7F80);  // above max + ulp/2
  CHECK(float_to_bf16(std::numeric_limits<float>::infinity()) == 0x7F80);
  CHECK(float_to_bf16(-std::numeric_limits<float>::infinity()) == 0xFF80);
  CHECK(float_to_bf16(std::numeric_limits<float>::quiet_NaN()) == 0x7FC0);
  CHECK(float_to_bf16(from_bits(0x7F800001u)) == 0x7FC0);  // signalling NaN is not inf
  CHECK(float_to_bf16(from_bits(0xFF800001u)) == 0xFFC0);
  CHECK(float_to_bf16(from_bits(0x00008000u)) == 0x0000);  // subnormal tie → even 0
  CHECK(float_to_bf16(from_bits(0x00018000u)) == 0x0002);  // subnormal tie → even 2
  CHECK(float_to_bf16(from_bits(0x00008001u)) == 0x0001);
}

TEST_CASE("float_to_bf16 is the nearest bf16 (ties to even), by brute force over neighbours") {
  std::mt19937 rng(99);
  std::uniform_int_distribution<std::uint32_t> any_bits;
  for (int i = 0; i < 200000; ++i) {
    const std::uint32_t b = any_bits(rng);
    const float x = from_bits(b);
    if (!std::isfinite(x)) continue;
    // The two bf16 values around x: truncation and the next pattern away from zero.
    const auto low = static_cast<std::uint16_t>(b >> 16);
    const auto high = static_cast<std::uint16_t>(low + 1);
    const double d_low = std::abs(static_cast<double>(x) - bf16_to_float(low));
    const double hi_value = (high & 0x7F80) == 0x7F80 && (high & 0x7F) == 0
                                ? std::ldexp(1.0, 128) * (std::signbit(x) ? -1 : 1)  // inf edge
                                : static_cast<double>(bf16_to_float(high));
    const double d_high = std::abs(static_cast<double>(x) - hi_value);
    std::uint16_t expected = d_low < d_high ? low : d_high < d_low ? high : (low & 1 ? high : low);
    INFO("float bits " << b);
    REQUIRE(float_to_bf16(x) == expected);
    REQUIRE(bits_of(bf16_to_float(float_to_bf16(x))) ==
            (static_cast<std::uint32_t>(expected) << 16));
  }
}

TEST_CASE("float8 decoding: E4M3FN and E5M2 hand-computed patterns") {
  CHECK(f8_e4m3_to_float(0x38) == 1.0f);                  // 0.0111.000
  CHECK(f8_e4m3_to_float(0xC0) == -2.0f);                 // 1.1000.000
  CHECK(f8_e4m3_to_float(0x7E) == 448.0f);                // largest finite 1.75 · 2^8
  CHECK(f8_e4m3_to_float(0x08) == std::ldexp(1.0f, -6));  // smallest normal
  CHECK(f8_e4m3_to_float(0x01) == std::ldexp(1.0f, -9));  // smallest subnormal
  CHECK(f8_e4m3_to_float(0x07) == std::ldexp(7.0f, -9));  // largest subnormal
  CHECK(f8_e4m3_to_float(0x78) == 256.0f);                // exponent 15 is finite in FN
  CHECK(std::isnan(f8_e4m3_to_float(0x7F)));
  CHECK(std::isnan(f8_e4m3_to_float(0xFF)));
  CHECK(std::signbit(f8_e4m3_to_float(0x80)));
  CHECK(f8_e5m2_to_float(0x3C) == 1.0f);
  CHECK(f8_e5m2_to_float(0x7B) == 57344.0f);               // largest finite 1.75 · 2^15
  CHECK(f8_e5m2_to_float(0x01) == std::ldexp(1.0f, -16));  // smallest subnormal
  CHECK(f8_e5m2_to_float(0xFC) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(f8_e5m2_to_float(0x7D)));
  // Every E4M3 pattern is monotone in its magnitude bits (a structural check of the decoder).
  for (int b = 1; b < 0x7F; ++b) {
    REQUIRE(f8_e4m3_to_float(static_cast<std::uint8_t>(b)) >
            f8_e4m3_to_float(static_cast<std::uint8_t>(b - 1)));
  }
}
