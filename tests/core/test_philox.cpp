// Philox4x32-10 against the known-answer vectors of Random123 (kat_vectors, "philox4x32 10"),
// through the scalar path and through xsimd batches of every instruction set the build enables.

#include <array>
#include <catch2/catch.hpp>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <xsimd/xsimd.hpp>

#include "difftrain/core/philox.hpp"

using namespace difftrain;

namespace {

using Words = std::array<std::uint32_t, 4>;

struct KnownAnswer {
  Words counter;
  std::uint32_t key0, key1;
  Words expected;
};

// Random123 kat_vectors: philox4x32 10 (all zeros, all ones, digits of pi).
constexpr std::array<KnownAnswer, 3> kKnownAnswers = {{
    {{0x00000000u, 0x00000000u, 0x00000000u, 0x00000000u},
     0x00000000u,
     0x00000000u,
     {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
    {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
     0xffffffffu,
     0xffffffffu,
     {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
    {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
     0xa4093822u,
     0x299f31d0u,
     {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
}};

// Every x86 instruction set xsimd 8.1 can target in this build (the guards are xsimd's own
// compile-time availability macros, so a -march=none build tests SSE2 only).
using TestArchs = std::tuple<
#if XSIMD_WITH_SSE2
    xsimd::sse2,
#endif
#if XSIMD_WITH_SSE4_2
    xsimd::sse4_2,
#endif
#if XSIMD_WITH_FMA3_SSE
    xsimd::fma3<xsimd::sse4_2>,
#endif
#if XSIMD_WITH_AVX
    xsimd::avx,
#endif
#if XSIMD_WITH_AVX2
    xsimd::avx2,
#endif
#if XSIMD_WITH_FMA3_AVX2
    xsimd::fma3<xsimd::avx2>,
#endif
#if XSIMD_WITH_AVX512F
    xsimd::avx512f,
#endif
#if XSIMD_WITH_AVX512BW
    xsimd::avx512bw,
#endif
    xsimd::default_arch>;

// A counter that differs from `base` in every word and depends on the lane, so that each lane
// of a batch computes a different block (and carries through the 64-bit multiply halves).
Words lane_counter(const Words& base, std::size_t lane) {
  const auto k = static_cast<std::uint32_t>(lane);
  return {base[0] + 0x9E3779B9u * k, base[1] ^ (k << 16), base[2] - 7u * k, base[3] + k * k};
}

}  // namespace

TEST_CASE("philox4x32_10 scalar matches the Random123 known answers", "[philox]") {
  for (const KnownAnswer& kat : kKnownAnswers) {
    const Words actual = philox4x32_10<std::uint32_t>(kat.counter, kat.key0, kat.key1);
    INFO("counter " << std::hex << kat.counter[0] << ' ' << kat.counter[1] << ' ' << kat.counter[2]
                    << ' ' << kat.counter[3] << " key " << kat.key0 << ' ' << kat.key1);
    for (std::size_t w = 0; w < 4; ++w) {
      INFO("word " << w);
      CHECK(actual[w] == kat.expected[w]);
    }
  }
}

TEST_CASE("philox4x32_10 differs in every word when one counter or key bit flips", "[philox]") {
  // Avalanche sanity check: a single-bit change of input changes all four output words.
  const KnownAnswer& kat = kKnownAnswers[2];
  const Words reference = philox4x32_10<std::uint32_t>(kat.counter, kat.key0, kat.key1);
  for (std::size_t w = 0; w < 4; ++w) {
    for (int bit : {0, 13, 31}) {
      Words counter = kat.counter;
      counter[w] ^= 1u << bit;
      const Words flipped = philox4x32_10<std::uint32_t>(counter, kat.key0, kat.key1);
      for (std::size_t out = 0; out < 4; ++out) CHECK(flipped[out] != reference[out]);
    }
  }
  const Words key_flipped = philox4x32_10<std::uint32_t>(kat.counter, kat.key0, kat.key1 ^ 1u);
  for (std::size_t out = 0; out < 4; ++out) CHECK(key_flipped[out] != reference[out]);
}

TEMPLATE_LIST_TEST_CASE("philox4x32_10 on xsimd batches gives each lane's scalar result",
                        "[philox][simd]", TestArchs) {
  using Arch = TestType;
  using U = xsimd::batch<std::uint32_t, Arch>;
  constexpr std::size_t width = U::size;
  INFO("arch " << Arch::name() << ", " << width << " lanes");

  for (const KnownAnswer& kat : kKnownAnswers) {
    // The known-answer counter goes into each lane position in turn, the other lanes get
    // distinct counters: lanes must not leak into each other.
    for (std::size_t kat_lane = 0; kat_lane < width; ++kat_lane) {
      std::array<std::array<std::uint32_t, width>, 4> lanes{};
      for (std::size_t lane = 0; lane < width; ++lane) {
        const Words c = lane == kat_lane ? kat.counter : lane_counter(kat.counter, lane + 1);
        for (std::size_t w = 0; w < 4; ++w) lanes[w][lane] = c[w];
      }
      const std::array<U, 4> counter = {
          U::load_unaligned(lanes[0].data()), U::load_unaligned(lanes[1].data()),
          U::load_unaligned(lanes[2].data()), U::load_unaligned(lanes[3].data())};
      const std::array<U, 4> result = philox4x32_10<U>(counter, kat.key0, kat.key1);

      std::array<std::array<std::uint32_t, width>, 4> out{};
      for (std::size_t w = 0; w < 4; ++w) result[w].store_unaligned(out[w].data());
      for (std::size_t lane = 0; lane < width; ++lane) {
        const Words c = {lanes[0][lane], lanes[1][lane], lanes[2][lane], lanes[3][lane]};
        const Words scalar = philox4x32_10<std::uint32_t>(c, kat.key0, kat.key1);
        for (std::size_t w = 0; w < 4; ++w) {
          INFO("lane " << lane << " (known-answer lane " << kat_lane << "), word " << w);
          REQUIRE(out[w][lane] == scalar[w]);
          if (lane == kat_lane) REQUIRE(out[w][lane] == kat.expected[w]);
        }
      }
    }
  }
}

TEMPLATE_LIST_TEST_CASE("philox mulhilo on batches equals the 64-bit scalar product",
                        "[philox][simd]", TestArchs) {
  // The SIMD 32x32->64 multiply splits even/odd lanes; check extreme operands in every lane,
  // through the instruction set's path (mul_epu32 on AVX2 / AVX-512) and the generic xsimd one.
  using Arch = TestType;
  using U = xsimd::batch<std::uint32_t, Arch>;
  constexpr std::size_t width = U::size;
  INFO("arch " << Arch::name());
  constexpr std::array<std::uint32_t, 8> operands = {
      0u, 1u, 0x7FFFFFFFu, 0x80000000u, 0xFFFFFFFFu, 0xFFFFFFFEu, 0x12345678u, 0xDEADBEEFu};
  for (std::uint32_t m : {philox_detail::kMul0, philox_detail::kMul1, 0xFFFFFFFFu}) {
    for (std::size_t shift = 0; shift < operands.size(); ++shift) {
      std::array<std::uint32_t, width> a{};
      for (std::size_t lane = 0; lane < width; ++lane)
        a[lane] = operands[(lane + shift) % operands.size()];
      for (const bool generic : {false, true}) {
        U hi, lo;
        if (generic) {
          philox_detail::mulhilo_generic<Arch>(U::load_unaligned(a.data()), m, hi, lo);
        } else {
          philox_detail::mulhilo<Arch>(U::load_unaligned(a.data()), m, hi, lo);
        }
        std::array<std::uint32_t, width> hi_out{}, lo_out{};
        hi.store_unaligned(hi_out.data());
        lo.store_unaligned(lo_out.data());
        for (std::size_t lane = 0; lane < width; ++lane) {
          const std::uint64_t product = std::uint64_t{a[lane]} * m;
          INFO((generic ? "generic" : "arch")
               << " path, lane " << lane << ": " << a[lane] << " * " << m);
          REQUIRE(hi_out[lane] == static_cast<std::uint32_t>(product >> 32));
          REQUIRE(lo_out[lane] == static_cast<std::uint32_t>(product));
        }
      }
    }
  }
}

TEST_CASE("PhiloxKeys holds the Weyl key schedule", "[philox]") {
  // Round r uses key + r·(0x9E3779B9, 0xBB67AE85) modulo 2^32 (Salmon et al., the "bumped" key);
  // the all-ones key wraps around in the first round.
  for (const KnownAnswer& kat : kKnownAnswers) {
    const PhiloxKeys keys(kat.key0, kat.key1);
    for (std::uint32_t round = 0; round < 10; ++round) {
      INFO("round " << round);
      CHECK(keys.key0[round] ==
            static_cast<std::uint32_t>(kat.key0 + std::uint64_t{round} * 0x9E3779B9u));
      CHECK(keys.key1[round] ==
            static_cast<std::uint32_t>(kat.key1 + std::uint64_t{round} * 0xBB67AE85u));
    }
    const Words with_keys = philox4x32_10<std::uint32_t>(kat.counter, keys);
    for (std::size_t w = 0; w < 4; ++w) CHECK(with_keys[w] == kat.expected[w]);
  }
}
