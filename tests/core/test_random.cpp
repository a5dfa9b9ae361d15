// Counter-based random fills: the documented layout recomputed from scalar Philox, bitwise
// determinism across threads, range splits and instruction sets, and the statistics of the
// uniforms, normals and integers (moments, Kolmogorov–Smirnov, correlations, chi-square).

#include <omp.h>

#include <algorithm>
#include <array>
#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numbers>
#include <random>
#include <span>
#include <tuple>
#include <utility>
#include <vector>
#include <xsimd/xsimd.hpp>

#include "difftrain/core/error.hpp"
#include "difftrain/core/philox.hpp"
#include "difftrain/core/random.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;

namespace {

// Sample sizes of the statistical tests. The sanitizer build (-O1 + ASan/UBSan) runs the same
// checks on fewer samples to stay within its time budget; the bounds scale with 1/sqrt(n).
#ifdef __SANITIZE_ADDRESS__
constexpr std::size_t kDistributionSamples = 2'000'000;
#else
constexpr std::size_t kDistributionSamples = 10'000'000;
#endif
constexpr std::size_t kCorrelationSamples = 1'000'000;

constexpr std::size_t kNone = std::numeric_limits<std::size_t>::max();

// Every x86 instruction set xsimd 8.1 can target in this build, guarded by xsimd's own
// compile-time availability macros.
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

// The four words of element i's counter, recomputed from the layout documented in random.hpp:
// i = 64g + 16q + j is word q of Philox(counter = [16g + j as 64 bits, stream as 64 bits],
// key = seed), low 32-bit halves first.
std::array<std::uint32_t, 4> reference_counter_words(RandomStream rs, std::uint64_t i) {
  const std::uint64_t counter = 16 * (i / 64) + i % 16;
  const auto low = [](std::uint64_t v) { return static_cast<std::uint32_t>(v & 0xFFFFFFFFu); };
  const auto high = [](std::uint64_t v) { return static_cast<std::uint32_t>(v >> 32); };
  return philox4x32_10<std::uint32_t>(
      {low(counter), high(counter), low(rs.stream), high(rs.stream)}, low(rs.seed), high(rs.seed));
}

std::uint32_t reference_word(RandomStream rs, std::uint64_t i) {
  return reference_counter_words(rs, i)[(i % 64) / 16];
}

// u = (top 24 bits of the word) · 2^-24, in double (exact in float too).
double reference_uniform(RandomStream rs, std::uint64_t i) {
  return std::ldexp(static_cast<double>(reference_word(rs, i) >> 8), -24);
}

// Box–Muller in double: element q = 2p uses words (2p, 2p+1) of its counter as (radius, angle),
// r = sqrt(-2 ln(1 - u_r)), θ = 2π u_θ; q = 2p holds r cos θ, q = 2p + 1 holds r sin θ.
double reference_normal(RandomStream rs, std::uint64_t i) {
  const std::size_t q = static_cast<std::size_t>((i % 64) / 16);
  const std::size_t pair = q / 2;
  const std::array<std::uint32_t, 4> words = reference_counter_words(rs, i);
  const double u_radius = std::ldexp(static_cast<double>(words[2 * pair] >> 8), -24);
  const double u_angle = std::ldexp(static_cast<double>(words[2 * pair + 1] >> 8), -24);
  const double radius = std::sqrt(-2.0 * std::log(1.0 - u_radius));
  const double theta = 2.0 * std::numbers::pi * u_angle;
  return q % 2 == 0 ? radius * std::cos(theta) : radius * std::sin(theta);
}

// Index of the first element whose bit pattern differs, or kNone.
std::size_t first_bit_difference(std::span<const float> a, std::span<const float> b) {
  if (a.size() != b.size()) return 0;
  for (std::size_t k = 0; k < a.size(); ++k)
    if (std::bit_cast<std::uint32_t>(a[k]) != std::bit_cast<std::uint32_t>(b[k])) return k;
  return kNone;
}

template <class Fill>
std::vector<float> filled(std::size_t n, RandomStream rs, std::uint64_t offset, Fill fill) {
  std::vector<float> out(n);
  fill(std::span<float>(out), rs, offset);
  return out;
}

void normal_fill(std::span<float> out, RandomStream rs, std::uint64_t offset) {
  fill_normal(out, rs, offset);
}
void uniform_fill(std::span<float> out, RandomStream rs, std::uint64_t offset) {
  fill_uniform(out, rs, offset);
}

struct NamedFill {
  const char* name;
  void (*fill)(std::span<float>, RandomStream, std::uint64_t);
};
constexpr std::array<NamedFill, 2> kFills = {
    {{"fill_normal", normal_fill}, {"fill_uniform", uniform_fill}}};

// Pearson correlation of x[k] and y[k], k < n.
double correlation(std::span<const float> x, std::span<const float> y) {
  const std::size_t n = std::min(x.size(), y.size());
  double sx = 0, sy = 0;
  for (std::size_t k = 0; k < n; ++k) sx += x[k], sy += y[k];
  const double mx = sx / static_cast<double>(n), my = sy / static_cast<double>(n);
  double sxy = 0, sxx = 0, syy = 0;
  for (std::size_t k = 0; k < n; ++k) {
    const double dx = x[k] - mx, dy = y[k] - my;
    sxy += dx * dy, sxx += dx * dx, syy += dy * dy;
  }
  return sxy / std::sqrt(sxx * syy);
}

// Kolmogorov–Smirnov statistic sqrt(n)·sup|F_n - F| of the samples (sorted in place).
template <class Cdf>
double ks_statistic(std::vector<float>& samples, Cdf cdf) {
  std::sort(samples.begin(), samples.end());
  const double n = static_cast<double>(samples.size());
  double d = 0;
  for (std::size_t k = 0; k < samples.size(); ++k) {
    const double f = cdf(static_cast<double>(samples[k]));
    d = std::max({d, f - static_cast<double>(k) / n, static_cast<double>(k + 1) / n - f});
  }
  return d * std::sqrt(n);
}

double normal_cdf(double x) { return 0.5 * std::erfc(-x / std::numbers::sqrt2); }

// Streams that exercise every word of the seed and the stream number.
const std::array<RandomStream, 4> kStreams = {{{0, 0},
                                               {42, 7},
                                               {0xFEDCBA9876543210ull, 0x0123456789ABCDEFull},
                                               {0xFFFFFFFFFFFFFFFFull, 0xFFFFFFFFFFFFFFFFull}}};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Layout

TEST_CASE("random_bits and fill_uniform follow the documented layout", "[random][layout]") {
  // Offsets around 0, inside a group, and across the carry of the counter's low word (element
  // 2^34 is counter 2^32).
  const std::array<std::uint64_t, 3> offsets = {0, 1000 + 13, (std::uint64_t{1} << 34) - 150};
  for (const RandomStream& rs : kStreams) {
    for (std::uint64_t offset : offsets) {
      INFO("seed " << rs.seed << ", stream " << rs.stream << ", offset " << offset);
      const std::size_t n = 300;
      const std::vector<float> uniforms = filled(n, rs, offset, uniform_fill);
      for (std::size_t k = 0; k < n; ++k) {
        const std::uint64_t i = offset + k;
        INFO("element " << i);
        REQUIRE(random_bits(rs, i) == reference_word(rs, i));
        REQUIRE(static_cast<double>(uniforms[k]) == reference_uniform(rs, i));
      }
    }
  }
}

TEST_CASE("fill_normal follows the documented Box-Muller layout", "[random][layout]") {
  // Float vs double Box–Muller: θ = 2π·u rounds to within 2.4e-7 (half an ulp of 2π), sqrt and
  // log are within a few float ulp, and |r| <= sqrt(2·24·ln 2) = 5.77, so |float - double| is at
  // most about 5.77 · 5e-7 = 3e-6. A wrong pairing or cos/sin swap gives O(1) differences.
  const std::array<std::uint64_t, 2> offsets = {0, (std::uint64_t{1} << 34) - 150};
  for (const RandomStream& rs : kStreams) {
    for (std::uint64_t offset : offsets) {
      INFO("seed " << rs.seed << ", stream " << rs.stream << ", offset " << offset);
      const std::size_t n = 4096;
      const std::vector<float> normals = filled(n, rs, offset, normal_fill);
      std::vector<double> expected(n);
      for (std::size_t k = 0; k < n; ++k) expected[k] = reference_normal(rs, offset + k);
      REQUIRE_CLOSE(normals, expected, 0.0, 4e-6);
    }
  }
}

TEST_CASE("uniform_double is the element's word times 2^-32", "[random][layout]") {
  const RandomStream rs{2024, 3};
  for (std::uint64_t i : {std::uint64_t{0}, std::uint64_t{17}, std::uint64_t{64 * 1000 + 63},
                          std::uint64_t{1} << 40}) {
    const double u = uniform_double(rs, i);
    REQUIRE(u == std::ldexp(static_cast<double>(reference_word(rs, i)), -32));
    REQUIRE(u >= 0.0);
    REQUIRE(u < 1.0);
  }
}

// ---------------------------------------------------------------------------------------------
// Determinism: threads, splits, instruction sets

TEST_CASE("fills are bitwise identical for any number of OpenMP threads", "[random][determinism]") {
  // 1'000'003 elements from an odd offset: ~15'600 groups, far above the threshold (64 groups)
  // at which fill_groups goes parallel, with partial groups at both ends.
  const std::size_t n = 1'000'003;
  const std::uint64_t offset = 77;
  const RandomStream rs{123456789, 5};
  const int saved_threads = omp_get_max_threads();

  omp_set_num_threads(1);
  const std::vector<float> normal_1 = filled(n, rs, offset, normal_fill);
  const std::vector<float> uniform_1 = filled(n, rs, offset, uniform_fill);
  for (int threads : {2, 3}) {
    INFO(threads << " threads");
    omp_set_num_threads(threads);
    const std::vector<float> normal_t = filled(n, rs, offset, normal_fill);
    const std::vector<float> uniform_t = filled(n, rs, offset, uniform_fill);
    CHECK(first_bit_difference(normal_1, normal_t) == kNone);
    CHECK(first_bit_difference(uniform_1, uniform_t) == kNone);
  }
  omp_set_num_threads(saved_threads);
}

TEST_CASE("fills are bitwise identical for any split of the range", "[random][determinism]") {
  const std::size_t n = 20'000;  // > 64 groups: the one-piece fill runs in parallel
  // Cut points at group edges, one off them, and odd places; then random cuts.
  std::vector<std::size_t> cuts = {0,    1,    2,    63,   64,   65,     127,    129,
                                   1000, 1001, 4097, 9000, 9001, 12'345, 19'999, n};
  std::mt19937_64 engine(2718);
  std::uniform_int_distribution<std::size_t> cut(0, n);
  for (int k = 0; k < 40; ++k) cuts.push_back(cut(engine));
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());

  const RandomStream rs{99, 1};
  // Base offsets: aligned, odd, and straddling the carry into the counter's high word.
  for (std::uint64_t base :
       {std::uint64_t{0}, std::uint64_t{33}, (std::uint64_t{1} << 34) - 10'007}) {
    INFO("base offset " << base);
    for (const auto& [name, fill] : kFills) {
      INFO(name);
      const std::vector<float> whole = filled(n, rs, base, fill);
      std::vector<float> pieces(n, std::numeric_limits<float>::quiet_NaN());
      for (std::size_t c = 0; c + 1 < cuts.size(); ++c) {
        const std::span<float> piece(pieces.data() + cuts[c], cuts[c + 1] - cuts[c]);
        fill(piece, rs, base + cuts[c]);
      }
      REQUIRE(first_bit_difference(whole, pieces) == kNone);

      // One element at a time over the first 200 elements.
      for (std::size_t k = 0; k < 200; ++k) {
        float single = std::numeric_limits<float>::quiet_NaN();
        fill(std::span<float>(&single, 1), rs, base + k);
        INFO("element " << k);
        REQUIRE(std::bit_cast<std::uint32_t>(single) == std::bit_cast<std::uint32_t>(whole[k]));
      }
    }
  }
}

TEST_CASE("an empty fill writes nothing", "[random][determinism]") {
  std::vector<float> guard(4, -1.0f);
  fill_normal(std::span<float>(guard.data(), 0), RandomStream{1, 2}, 12345);
  fill_uniform(std::span<float>(guard.data() + 2, 0), RandomStream{1, 2}, 0);
  REQUIRE(std::all_of(guard.begin(), guard.end(), [](float x) { return x == -1.0f; }));
}

TEMPLATE_LIST_TEST_CASE("fills agree across instruction sets", "[random][determinism][simd]",
                        TestArchs) {
  // Uniforms are integer operations and an exact int→float conversion scaled by 2^-24: they
  // must be bitwise identical on every instruction set. Normals go through xsimd's log, sqrt and
  // sincos, whose polynomials are fused (FMA) on some instruction sets and not on others, so
  // they are compared with the default architecture within 2 ulp of the larger magnitude of
  // the pair: |a - b| <= 2 ulp(max(|a|, |b|)). Measured with xsimd 8.1 / g++ 12 -march=native
  // on an AVX-512 machine: sse2, sse4_2, avx, avx2 and avx512f are bitwise identical to the
  // default (avx512bw); fma3<avx2> differs in ~0.1% of the elements, by at most 2 ulp (20M
  // elements checked).
  using Arch = TestType;
  INFO("arch " << Arch::name());
  const std::size_t n = 100'000 + 29;
  const std::uint64_t offset = 5;
  const RandomStream rs{0xC0FFEE, 11};

  std::vector<float> uniform_arch(n), uniform_default(n);
  fill_uniform<Arch>(uniform_arch, rs, offset);
  fill_uniform<xsimd::default_arch>(uniform_default, rs, offset);
  REQUIRE(first_bit_difference(uniform_arch, uniform_default) == kNone);

  std::vector<float> normal_arch(n), normal_default(n);
  fill_normal<Arch>(normal_arch, rs, offset);
  fill_normal<xsimd::default_arch>(normal_default, rs, offset);
  std::int64_t worst = 0;
  std::size_t worst_index = 0, differing = 0;
  for (std::size_t k = 0; k < n; ++k) {
    const float a = normal_arch[k], b = normal_default[k];
    if (!std::isfinite(a)) FAIL("element " << k << " is " << a);
    if (a == b) continue;
    ++differing;
    // Express |a - b| in ulps of the larger magnitude of the pair.
    const float big = std::max(std::abs(a), std::abs(b));
    const float ulp = std::nextafter(big, std::numeric_limits<float>::infinity()) - big;
    const auto ulps = static_cast<std::int64_t>(std::ceil(std::abs(a - b) / ulp));
    if (ulps > worst) worst = ulps, worst_index = k;
  }
  INFO(differing << " of " << n << " normals differ from the default arch; worst " << worst
                 << " ulp at element " << worst_index << ": " << normal_arch[worst_index] << " vs "
                 << normal_default[worst_index]);
  CHECK(worst <= 2);
}

TEMPLATE_LIST_TEST_CASE("Box-Muller's log is bitwise xsimd::log on every radius input",
                        "[random][determinism][simd]", TestArchs) {
  // log_unit_interval drops xsimd::log's branches for inputs Box–Muller never has (0, subnormal,
  // infinite, negative); on the 2^24 values it does have, u1 = 1 − k·2^-24, it must give the
  // same bits, or the normals of a stream would change. Release checks all 2^24 inputs; the
  // sanitizer build checks every 61st k (a prime stride, all binades) and the last.
  using Arch = TestType;
  using F = xsimd::batch<float, Arch>;
  INFO("arch " << Arch::name());
#ifdef __SANITIZE_ADDRESS__
  constexpr std::uint32_t stride = 61;
#else
  constexpr std::uint32_t stride = 1;
#endif
  constexpr std::uint32_t count = std::uint32_t{1} << 24;  // k = 0 .. 2^24 − 1
  std::size_t mismatches = 0;
  float first = 0;
  for (std::uint32_t k0 = 0; k0 < count; k0 += stride * F::size) {
    alignas(64) std::array<float, F::size> u{}, ours{}, theirs{};
    for (std::size_t j = 0; j < F::size; ++j) {
      const std::uint32_t k = std::min(k0 + static_cast<std::uint32_t>(j) * stride, count - 1);
      u[j] = 1.0f - static_cast<float>(k) * 0x1p-24f;
    }
    const F batch = F::load_unaligned(u.data());
    random_detail::log_unit_interval<Arch>(batch).store_unaligned(ours.data());
    xsimd::log(batch).store_unaligned(theirs.data());
    for (std::size_t j = 0; j < F::size; ++j) {
      if (std::bit_cast<std::uint32_t>(ours[j]) == std::bit_cast<std::uint32_t>(theirs[j]))
        continue;
      if (mismatches++ == 0) first = u[j];
    }
  }
  INFO(mismatches << " mismatches; first at u1 = " << first);
  REQUIRE(mismatches == 0);
}

// ---------------------------------------------------------------------------------------------
// Distributions

TEST_CASE("normals have the moments and tails of N(0, 1)", "[random][statistics]") {
  const std::size_t n = kDistributionSamples;
  std::vector<float> x(n);
  fill_normal(x, RandomStream{20240601, 0});

  // Every value finite and within the largest radius Box–Muller can produce from 24-bit
  // uniforms: u1 >= 2^-24, so |x| <= sqrt(-2 ln 2^-24) = sqrt(48 ln 2) = 5.768.
  const double max_radius = std::sqrt(48.0 * std::numbers::ln2);
  double sum = 0;
  std::size_t out_of_range = 0;
  for (float v : x) {
    out_of_range += !(std::isfinite(v) && std::abs(v) <= max_radius * (1 + 1e-6));
    sum += v;
  }
  REQUIRE(out_of_range == 0);
  const double nd = static_cast<double>(n);
  const double mean = sum / nd;
  double m2 = 0, m3 = 0, m4 = 0;
  std::size_t beyond_3 = 0, beyond_4 = 0;
  for (float v : x) {
    const double d = v - mean, d2 = d * d;
    m2 += d2, m3 += d2 * d, m4 += d2 * d2;
    beyond_3 += std::abs(v) > 3.0f;
    beyond_4 += std::abs(v) > 4.0f;
  }
  m2 /= nd, m3 /= nd, m4 /= nd;
  const double skewness = m3 / std::pow(m2, 1.5);
  const double excess_kurtosis = m4 / (m2 * m2) - 3.0;

  // For N(0, 1) the standard errors of the sample statistics are: mean 1/sqrt(n), variance
  // sqrt(2/n), skewness sqrt(6/n), excess kurtosis sqrt(24/n). Six standard errors: a correct
  // generator lands outside with probability ~2e-9 (and the seed is fixed, so the outcome is
  // deterministic); a biased transform (e.g. u1 in [0, 1) giving log 0, a wrong 2π, a missing
  // factor 2 in the radius) moves these by far more.
  constexpr double z = 6.0;
  INFO("n " << n << ", mean " << mean << ", variance " << m2 << ", skewness " << skewness
            << ", excess kurtosis " << excess_kurtosis);
  CHECK(std::abs(mean) < z * std::sqrt(1.0 / nd));
  CHECK(std::abs(m2 - 1.0) < z * std::sqrt(2.0 / nd));
  CHECK(std::abs(skewness) < z * std::sqrt(6.0 / nd));
  CHECK(std::abs(excess_kurtosis) < z * std::sqrt(24.0 / nd));

  // Tails: P(|x| > t) = erfc(t / sqrt 2); the count is binomial, standard error sqrt(n p (1-p)).
  for (const auto& [t, count] : {std::pair{3.0, beyond_3}, std::pair{4.0, beyond_4}}) {
    const double p = std::erfc(t / std::numbers::sqrt2);
    INFO("P(|x| > " << t << "): expected " << p * nd << ", got " << count);
    CHECK(std::abs(static_cast<double>(count) - p * nd) < z * std::sqrt(nd * p * (1 - p)));
  }

  // Kolmogorov–Smirnov against Φ(x) = erfc(-x / sqrt 2) / 2: sqrt(n)·D converges to the
  // Kolmogorov distribution, P(sqrt(n)·D > 1.95) = 0.001. The generator's discreteness (24-bit
  // uniforms, float rounding) shifts the CDF by < 1e-6, i.e. < 0.004 in sqrt(n)·D.
  const double ks = ks_statistic(x, normal_cdf);
  INFO("sqrt(n)·D = " << ks);
  CHECK(ks < 1.95);
}

TEST_CASE("uniforms lie in [0, 1) and pass Kolmogorov-Smirnov", "[random][statistics]") {
  const std::size_t n = kDistributionSamples;
  std::vector<float> u(n);
  fill_uniform(u, RandomStream{777, 3}, 12345);
  double sum = 0;
  std::size_t out_of_range = 0;
  for (float v : u) {
    out_of_range += !(v >= 0.0f && v < 1.0f);
    sum += v;
  }
  REQUIRE(out_of_range == 0);
  // Mean 1/2 with standard error sqrt(1/(12 n)); six standard errors as above.
  const double nd = static_cast<double>(n);
  INFO("mean " << sum / nd);
  CHECK(std::abs(sum / nd - 0.5) < 6.0 * std::sqrt(1.0 / (12.0 * nd)));
  // KS against F(u) = u; the 2^-24 grid moves the CDF by at most 6e-8 (2e-4 in sqrt(n)·D).
  const double ks = ks_statistic(u, [](double v) { return v; });
  INFO("sqrt(n)·D = " << ks);
  CHECK(ks < 1.95);
}

// ---------------------------------------------------------------------------------------------
// Independence

TEST_CASE("different streams, seeds and derived sub-streams are uncorrelated",
          "[random][statistics]") {
  // Under independence sqrt(n)·r is approximately N(0, 1): |r| < 5/sqrt(n) fails with
  // probability 6e-7 per pair for a correct generator. Overlapping or shifted streams give
  // |r| near 1.
  const std::size_t n = kCorrelationSamples;
  const double bound = 5.0 / std::sqrt(static_cast<double>(n));
  const RandomStream base{31337, 4};
  const std::array<std::pair<const char*, RandomStream>, 9> streams = {{
      {"base", base},
      {"stream + 1", RandomStream{base.seed, base.stream + 1}},
      {"seed + 1", RandomStream{base.seed + 1, base.stream}},
      {"seed with high word", RandomStream{base.seed | (std::uint64_t{1} << 32), base.stream}},
      {"derive(0, 0)", base.derive(0, 0)},
      {"derive(0, 1)", base.derive(0, 1)},
      {"derive(1, 0)", base.derive(1, 0)},
      {"derive(1, 1)", base.derive(1, 1)},
      {"derive(1000, 0).derive(0, 0)", base.derive(1000, 0).derive(0, 0)},
  }};
  std::vector<std::vector<float>> normals, uniforms;
  for (const auto& [name, rs] : streams) {
    normals.push_back(filled(n, rs, 0, normal_fill));
    uniforms.push_back(filled(n, rs, 0, uniform_fill));
  }
  for (std::size_t a = 0; a < streams.size(); ++a) {
    for (std::size_t b = a + 1; b < streams.size(); ++b) {
      INFO(streams[a].first << " vs " << streams[b].first);
      const double r_normal = correlation(normals[a], normals[b]);
      const double r_uniform = correlation(uniforms[a], uniforms[b]);
      INFO("normal r " << r_normal << ", uniform r " << r_uniform << ", bound " << bound);
      CHECK(std::abs(r_normal) < bound);
      CHECK(std::abs(r_uniform) < bound);
    }
  }
}

TEST_CASE("consecutive elements of a stream are uncorrelated", "[random][statistics]") {
  // Lag 1: neighbouring counters. Lag 16: words q and q+1 of one counter (for normals, the cos
  // and sin of one Box–Muller pair). Lag 32: the two Box–Muller pairs of one counter. Lag 64:
  // the next group. Squares too: x and y of a Box–Muller pair are independent, so their squares
  // are uncorrelated as well (a radius shared without the angle would correlate them).
  const std::size_t n = kCorrelationSamples;
  const RandomStream rs{55, 66};
  const std::vector<float> x = filled(n + 64, rs, 0, normal_fill);
  const std::vector<float> u = filled(n + 64, rs, 0, uniform_fill);
  std::vector<float> x_squared(x.size());
  std::transform(x.begin(), x.end(), x_squared.begin(), [](float v) { return v * v; });
  const double bound = 5.0 / std::sqrt(static_cast<double>(n));
  for (std::size_t lag : {1, 16, 32, 64}) {
    const auto head = [&](const std::vector<float>& v) {
      return std::span<const float>(v.data(), n);
    };
    const auto shifted = [&](const std::vector<float>& v) {
      return std::span<const float>(v.data() + lag, n);
    };
    const double r_normal = correlation(head(x), shifted(x));
    const double r_squared = correlation(head(x_squared), shifted(x_squared));
    const double r_uniform = correlation(head(u), shifted(u));
    INFO("lag " << lag << ": normal r " << r_normal << ", squared normal r " << r_squared
                << ", uniform r " << r_uniform << ", bound " << bound);
    CHECK(std::abs(r_normal) < bound);
    CHECK(std::abs(r_squared) < bound);
    CHECK(std::abs(r_uniform) < bound);
  }
}

// ---------------------------------------------------------------------------------------------
// Integers and sub-streams

TEST_CASE("uniform_int stays in [low, high) and is uniform", "[random][statistics]") {
  // Chi-square over k = 1000 bins with 1M draws (1000 expected per bin): the statistic follows
  // chi²(999), mean 999 and standard deviation sqrt(2·999) = 44.7. Accept 731 < chi² < 1270
  // (±6 sd; by the Wilson–Hilferty approximation each tail has probability < 1e-7). The lower
  // bound rejects draws that are too even (e.g. i mod k).
  const std::size_t draws = 1'000'000;
  for (const auto& [low, high, rs] :
       {std::tuple{std::int64_t{0}, std::int64_t{1000}, RandomStream{1, 0}},
        std::tuple{std::int64_t{-500}, std::int64_t{500}, RandomStream{2, 9}.derive(3, 1)}}) {
    INFO("[" << low << ", " << high << ")");
    const auto bins = static_cast<std::size_t>(high - low);
    std::vector<std::size_t> histogram(bins, 0);
    for (std::uint64_t i = 0; i < draws; ++i) {
      const std::int64_t t = uniform_int(rs, i, low, high);
      if (t < low || t >= high) FAIL("draw " << i << " is " << t);
      ++histogram[static_cast<std::size_t>(t - low)];
    }
    const double expected = static_cast<double>(draws) / static_cast<double>(bins);
    double chi_squared = 0;
    for (std::size_t count : histogram) {
      const double d = static_cast<double>(count) - expected;
      chi_squared += d * d / expected;
    }
    INFO("chi-square " << chi_squared << " with " << bins - 1 << " degrees of freedom");
    CHECK(chi_squared > 731.0);
    CHECK(chi_squared < 1270.0);
  }
}

TEST_CASE("uniform_int is the multiply-shift of the element's word", "[random]") {
  // With a range of exactly 2^32 the multiply-shift is the identity on the word; with a range
  // of 1 it is always low.
  const RandomStream rs{8, 8};
  const std::int64_t two_pow_32 = std::int64_t{1} << 32;
  for (std::uint64_t i = 0; i < 1000; ++i) {
    REQUIRE(uniform_int(rs, i, 0, two_pow_32) == std::int64_t{random_bits(rs, i)});
    REQUIRE(uniform_int(rs, i, -7, -7 + two_pow_32) == -7 + std::int64_t{random_bits(rs, i)});
    REQUIRE(uniform_int(rs, i, 41, 42) == 41);
  }
}

TEST_CASE("derive gives distinct streams for distinct steps and purposes", "[random]") {
  constexpr RandomStream base{5, 3};
  static_assert(base.derive(0, 0).seed == base.seed);
  static_assert(base.derive(0, 0).stream != base.stream);
  static_assert(base.derive(1, 0).stream != base.derive(0, 1).stream);
  // Steps below 2^32 and purposes below 2^8 (the documented packing) never collide.
  std::vector<std::uint64_t> seen;
  for (std::uint64_t step : {std::uint64_t{0}, std::uint64_t{1}, std::uint64_t{2},
                             std::uint64_t{999'999}, (std::uint64_t{1} << 32) - 1})
    for (std::uint32_t purpose : {0u, 1u, 2u, 255u})
      seen.push_back(base.derive(step, purpose).stream);
  std::sort(seen.begin(), seen.end());
  REQUIRE(std::adjacent_find(seen.begin(), seen.end()) == seen.end());
}

// ---------------------------------------------------------------------------------------------
// Regression tests of issues found in an earlier random.hpp (derive packed bits and collided;
// uniform_int wrapped for ranges over 2^32 and accepted empty ranges).

TEST_CASE("derive never maps two (step, purpose) pairs to one stream") {
  const RandomStream base{5, 3};
  CHECK(base.derive(0, 256).stream != base.derive(1, 0).stream);
  CHECK(base.derive(std::uint64_t{1} << 32, 0).stream != RandomStream{5, 2}.derive(0, 0).stream);
  CHECK(base.derive(65'536, 1).derive(0, 2).stream != base.derive(0, 1).derive(0, 2).stream);
  CHECK(RandomStream{5, std::uint64_t{1} << 24}.derive(7, 1).stream !=
        RandomStream{5, 0}.derive(7, 1).stream);
}

TEST_CASE("uniform_int rejects ranges wider than 2^32 and empty or reversed ranges") {
  const RandomStream rs{1, 2};
  CHECK_THROWS_AS(uniform_int(rs, 0, 0, (std::int64_t{1} << 32) + 1), Error);
  CHECK_NOTHROW(uniform_int(rs, 0, 0, std::int64_t{1} << 32));
  CHECK_THROWS_WITH(uniform_int(rs, 0, 5, 5), Catch::Contains("range [5, 5)"));
  CHECK_THROWS_AS(uniform_int(rs, 0, 10, 0), Error);
}

TEST_CASE("StreamPurpose keeps every purpose id and derive(step, purpose) uses it",
          "[random][derive]") {
  // The ids are part of every random sequence (bitwise resume): they must never change.
  using P = StreamPurpose;
  const std::vector<std::pair<P, std::uint32_t>> ids = {
      {P::train_step, 0},
      {P::sample_noise, 0x534D'506Eu},
      {P::step_timesteps, 16},
      {P::step_noise, 17},
      {P::noise, 1},
      {P::noise_offset, 2},
      {P::noise_offset_strength, 3},
      {P::noise_pyramid, 4},
      {P::noise_perturbation, 5},
      {P::noise_perturbation_strength, 6},
      {P::pyramid_scale, 1},
      {P::pyramid_level, 2},
      {P::parameter_init, 1},
      {P::vae_noise, 0x5641'456Eu},
      {P::lora_adapter, 0},
      {P::lora_init, 1},
      {P::lora_dropout, 2},
      {P::lora_rank_dropout, 3},
      {P::lora_module_dropout, 4},
      {P::lora_network_dropout, 5},
      {P::data_permutation, 1},
      {P::data_crop, 2},
      {P::data_flip, 4},
      {P::data_caption, 6},
      {P::data_caption_edit, 8},
      {P::latent_sample_instance, 1},
      {P::latent_sample_class, 2},
      {P::shapes_specs, 1},
      {P::shapes_placements, 3},
      {P::shapes_class, 4},
      {P::toy_pattern, 1},
  };
  constexpr RandomStream base{123, 45};
  for (const auto& [purpose, id] : ids) {
    INFO("id " << id);
    CHECK(static_cast<std::uint32_t>(purpose) == id);
    for (std::uint64_t step : {std::uint64_t{0}, std::uint64_t{7}, ~std::uint64_t{0}}) {
      CHECK(base.derive(step, purpose).seed == base.derive(step, id).seed);
      CHECK(base.derive(step, purpose).stream == base.derive(step, id).stream);
    }
  }
  static_assert(base.derive(3, P::step_noise).stream == base.derive(3, 17u).stream);
}
