#pragma once
// Counter-based random fills (uniform, standard normal) on Philox4x32-10, vectorized with xsimd
// and threaded with OpenMP. The value at element i depends only on (seed, stream, i): identical
// for any thread count, any split of the range and any SIMD width that divides 16.
//
// Layout: elements come in groups of 64. Element i = 64·g + 16·q + j (q < 4, j < 16) is word q
// of Philox(counter = [16·g + j (64 bit), stream (64 bit)], key = seed). Normals pair words
// (0,1) and (2,3) by Box–Muller: word 2p gives the radius, word 2p+1 the angle, and element
// q = 2p holds r·cos θ, q = 2p+1 holds r·sin θ (rejection-free, one sincos per pair).

#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <numbers>
#include <span>
#include <utility>
#include <xsimd/xsimd.hpp>

#include "difftrain/core/error.hpp"
#include "difftrain/core/parallel.hpp"
#include "difftrain/core/philox.hpp"

namespace difftrain {

namespace random_detail {
// SplitMix64's finalizer: a bijection on 64-bit words that mixes every input bit into every
// output bit.
constexpr std::uint64_t mix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
}  // namespace random_detail

/// Every purpose id given to RandomStream::derive (and to lora_detail::substream) by difftrain,
/// its tools and examples, in one place. Two sub-streams can only coincide when they have the
/// same parent stream, step and purpose, so ids need to differ only among the purposes of one
/// parent: ids repeat across parents (e.g. 1 is the noise of a step's noise stream and the init
/// of a parameter), and the static_asserts below check that the ids sharing a parent are
/// distinct. The numbers are part of every random sequence (bitwise resume of a training run,
/// reproducible sampling depend on them): never renumber; add a new id to its parent's group.
enum class StreamPurpose : std::uint32_t {
  // Parent: RandomStream{seed, 0}, the root of a seed (a training run and sampling may share one).
  train_step = 0,               // step = s: training step s (train/diffusion_train_step.hpp)
  sample_noise = 0x534D'506Eu,  // "SMPn", step 0: initial sampling noise (schedule/sample.hpp)

  // Parent: a training step's stream (train_step); step 0 (train/diffusion_train_step.hpp).
  step_timesteps = 16,  // the timesteps t_b (TimestepSampler)
  step_noise = 17,      // the step's noise stream: parent of the noise_* purposes (NoiseSampler)

  // Parent: a step's noise stream (step_noise); step 0 (kernels/noise.hpp).
  noise = 1,                        // eps ~ N(0, I)
  noise_offset = 2,                 // the noise-offset normals
  noise_offset_strength = 3,        // U(0, 1) of noise_offset_random_strength
  noise_pyramid = 4,                // the pyramid stream: parent of the pyramid_* purposes
  noise_perturbation = 5,           // the input-perturbation noise xi
  noise_perturbation_strength = 6,  // U(0, 1) of input_perturbation_random_strength

  // Parent: the pyramid stream (noise_pyramid); step = level i (kernels/noise.hpp).
  pyramid_scale = 1,  // r_i ~ U(2, 4)
  pyramid_level = 2,  // the level's N(0, I) at its reduced resolution

  // Parent: the stream given to init_like_pytorch; step = parameter index (nn/init.hpp; also
  // examples/shapes_pipeline.hpp init_pytorch_like).
  parameter_init = 1,

  // Parent: an AutoencoderKL encoder's sampling stream; step = call count k
  // (models/vae/vae_encoder.hpp).
  vae_noise = 0x5641'456Eu,  // "VAEn"

  // LoRA, through lora_detail::substream(parent, a, purpose) rather than derive
  // (lora/inject.hpp, lora/lora_linear.hpp).
  // Parent: the stream given to inject_lora; a = name_hash(module name).
  lora_adapter = 0,  // the adapter's stream: parent of the lora_* purposes below
  // Parent: an adapter's stream (lora_adapter); a = 0 (init) or the adapter's forward step.
  lora_init = 1,
  lora_dropout = 2,
  lora_rank_dropout = 3,
  lora_module_dropout = 4,
  lora_network_dropout = 5,

  // tools/dataset.cpp. Parent: ImageCaptionDataSource's RandomStream{seed, "data"}; step = epoch.
  data_permutation = 1,
  data_crop = 2,          // + set (0 instance, 1 class): ids 2, 3
  data_flip = 4,          // + set (0 instance, 1 class): ids 4, 5
  data_caption = 6,       // + set: ids 6, 7 (a metadata.jsonl caption list's choice)
  data_caption_edit = 8,  // + set: ids 8, 9 (kohya's caption dropout, shuffle, tag dropout);
                          // its sub-stream derive(i, 0) per dataset index i

  // tools/cmd_train.cpp. Parent: the cached-latents source's RandomStream{seed, "lat"}; step =
  // micro-batch m. The id of row r is base + 4·r.
  latent_sample_instance = 1,
  latent_sample_class = 2,

  // examples/shapes_pipeline.hpp. Parent: the base data's RandomStream{seed, 7} or the
  // DreamBooth data's RandomStream{seed, 8}; step = micro-batch m.
  shapes_specs = 1,
  shapes_placements = 3,
  shapes_class = 4,

  // examples/toy_model.hpp. Parent: RandomStream{seed, 1000 + step}; step 0.
  toy_pattern = 1,
};

/// The number of a purpose, for the purposes that take a range of ids (base + offset).
constexpr std::uint32_t purpose_id(StreamPurpose p) { return static_cast<std::uint32_t>(p); }

namespace random_detail {
// True when no two of the ids are equal.
template <class... Ids>
constexpr bool distinct_ids(Ids... ids) {
  const std::uint32_t v[] = {static_cast<std::uint32_t>(ids)...};
  for (std::size_t i = 0; i < sizeof...(Ids); ++i)
    for (std::size_t j = i + 1; j < sizeof...(Ids); ++j)
      if (v[i] == v[j]) return false;
  return true;
}
}  // namespace random_detail

// The purposes of each parent stream are distinct (see StreamPurpose).
static_assert(random_detail::distinct_ids(StreamPurpose::train_step, StreamPurpose::sample_noise),
              "purposes under RandomStream{seed, 0} collide");
static_assert(random_detail::distinct_ids(StreamPurpose::step_timesteps, StreamPurpose::step_noise),
              "purposes under a training step's stream collide");
static_assert(random_detail::distinct_ids(StreamPurpose::noise, StreamPurpose::noise_offset,
                                          StreamPurpose::noise_offset_strength,
                                          StreamPurpose::noise_pyramid,
                                          StreamPurpose::noise_perturbation,
                                          StreamPurpose::noise_perturbation_strength),
              "purposes under a step's noise stream collide");
static_assert(random_detail::distinct_ids(StreamPurpose::pyramid_scale,
                                          StreamPurpose::pyramid_level),
              "purposes under the pyramid-noise stream collide");
static_assert(random_detail::distinct_ids(StreamPurpose::lora_init, StreamPurpose::lora_dropout,
                                          StreamPurpose::lora_rank_dropout,
                                          StreamPurpose::lora_module_dropout,
                                          StreamPurpose::lora_network_dropout),
              "purposes under a LoRA adapter's stream collide");
static_assert(random_detail::distinct_ids(
                  StreamPurpose::data_permutation, StreamPurpose::data_crop,
                  purpose_id(StreamPurpose::data_crop) + 1, StreamPurpose::data_flip,
                  purpose_id(StreamPurpose::data_flip) + 1, StreamPurpose::data_caption,
                  purpose_id(StreamPurpose::data_caption) + 1, StreamPurpose::data_caption_edit,
                  purpose_id(StreamPurpose::data_caption_edit) + 1),
              "purposes under the data source's stream collide");
static_assert(purpose_id(StreamPurpose::latent_sample_instance) < 4 &&
                  purpose_id(StreamPurpose::latent_sample_class) < 4 &&
                  random_detail::distinct_ids(StreamPurpose::latent_sample_instance,
                                              StreamPurpose::latent_sample_class),
              "purposes under the cached-latents stream collide (ids are base + 4·row)");
static_assert(random_detail::distinct_ids(StreamPurpose::shapes_specs,
                                          StreamPurpose::shapes_placements,
                                          StreamPurpose::shapes_class),
              "purposes under the shapes demo's data stream collide");

/// An independent random sequence: the seed is the Philox key, the stream the upper half of
/// the counter. Use `derive` for sub-streams (a training step, a purpose).
struct RandomStream {
  std::uint64_t seed = 0;
  std::uint64_t stream = 0;

  /// A sub-stream for (step, purpose): the stream number is hashed with each in turn. For a fixed
  /// parent, different steps (or purposes) give different streams (each hash is a bijection);
  /// across other combinations a coincidence has probability 2^-64.
  [[nodiscard]] constexpr RandomStream derive(std::uint64_t step, std::uint32_t purpose) const {
    using random_detail::mix64;
    return {seed, mix64(mix64(mix64(stream) ^ step) ^ purpose)};
  }
  /// derive(step, id of `purpose`): the purpose ids all live in StreamPurpose.
  [[nodiscard]] constexpr RandomStream derive(std::uint64_t step, StreamPurpose purpose) const {
    return derive(step, static_cast<std::uint32_t>(purpose));
  }
};

inline constexpr std::size_t kRandomGroup = 64;  // elements per group of 16 counters

/// What every group of a stream shares, prepared once per fill: the Philox key schedule (from the
/// seed) and the counter's upper words (the stream number).
struct PreparedStream {
  PhiloxKeys keys;
  std::uint32_t stream_low, stream_high;

  explicit constexpr PreparedStream(RandomStream rs)
      : keys(static_cast<std::uint32_t>(rs.seed), static_cast<std::uint32_t>(rs.seed >> 32)),
        stream_low(static_cast<std::uint32_t>(rs.stream)),
        stream_high(static_cast<std::uint32_t>(rs.stream >> 32)) {}
};

namespace random_detail {
inline constexpr float kTwoPow24Inv = 1.0f / 16777216.0f;

// 0, 1, ..., 15: the lane offsets of a group's counters (one aligned load for any width).
alignas(64) inline constexpr std::array<std::uint32_t, 16> kLaneOffset = {
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// Words q = 0..3 of the 16 counters of group g, lanes [h, h + width).
template <class Arch>
DIFFTRAIN_INLINE std::array<xsimd::batch<std::uint32_t, Arch>, 4> group_words(
    const PreparedStream& ps, std::uint64_t group, std::size_t h) {
  using U = xsimd::batch<std::uint32_t, Arch>;
  const std::uint64_t base = group * 16 + h;  // multiple of the width: no carry into the high word
  const std::array<U, 4> counter = {
      U(static_cast<std::uint32_t>(base)) + U::load_aligned(kLaneOffset.data()),
      U(static_cast<std::uint32_t>(base >> 32)), U(ps.stream_low), U(ps.stream_high)};
  return philox4x32_10(counter, ps.keys);
}

// k·2^-24 with k the top 24 bits: uniform on [0, 1), exact in float.
template <class Arch>
DIFFTRAIN_INLINE xsimd::batch<float, Arch> to_unit_interval(
    xsimd::batch<std::uint32_t, Arch> bits) {
  using I = xsimd::batch<std::int32_t, Arch>;
  const I top = xsimd::bitwise_cast<I>(bits >> 8);
  return xsimd::batch_cast<float>(top) * xsimd::batch<float, Arch>(kTwoPow24Inv);
}

// (sin 2πu, cos 2πu) for u = k·2^-24 in [0, 1). The angle is split exactly into a quadrant
// q = round(4u) and φ = (4u − q)·π/2 ∈ [−π/4, π/4], where short minimax polynomials (Cephes'
// sinf/cosf coefficients, ≤ 1 ulp) suffice; no general range reduction is needed.
template <class Arch>
DIFFTRAIN_INLINE std::pair<xsimd::batch<float, Arch>, xsimd::batch<float, Arch>> sincos_two_pi(
    xsimd::batch<float, Arch> u) {
  using F = xsimd::batch<float, Arch>;
  using I = xsimd::batch<std::int32_t, Arch>;
  const F x = u * F(4.0f);
  const F q = xsimd::nearbyint(x);
  const F phi = (x - q) * F(std::numbers::pi_v<float> / 2);
  const F z = phi * phi;
  F sin_phi = xsimd::fma(z, F(-1.9515295891e-4f), F(8.3321608736e-3f));
  sin_phi = xsimd::fma(sin_phi, z, F(-1.6666654611e-1f));
  sin_phi = xsimd::fma(sin_phi * z, phi, phi);
  F cos_phi = xsimd::fma(z, F(2.443315711809948e-5f), F(-1.388731625493765e-3f));
  cos_phi = xsimd::fma(cos_phi, z, F(4.166664568298827e-2f));
  cos_phi = xsimd::fma(cos_phi * z, z, xsimd::fnma(F(0.5f), z, F(1.0f)));
  // Rotate by q quarter turns: odd q swaps sin and cos, then the quadrant sets the signs
  // (sign bits XORed in: bit 1 of q for sin, bit 1 of q + 1 for cos).
  const I quadrant = xsimd::batch_cast<std::int32_t>(q);
  // odd q as a float mask (q is integer-valued, so q/2 is exact): xsimd 8.1's select on int32
  // batches does not compile at -O0 on AVX-512BW.
  const F half_q = q * F(0.5f);
  const auto odd = xsimd::floor(half_q) != half_q;
  const F s = xsimd::select(odd, cos_phi, sin_phi);
  const F c = xsimd::select(odd, sin_phi, cos_phi);
  const F sin_sign = xsimd::bitwise_cast<F>((quadrant & I(2)) << 30);
  const F cos_sign = xsimd::bitwise_cast<F>(((quadrant + I(1)) & I(2)) << 30);
  return {s ^ sin_sign, c ^ cos_sign};
}

// ln u for u in [2^-24, 1]: xsimd 8.1's float log (fdlibm's logf: u = 2^k·(1 + f) with
// sqrt(2)/2 <= 1 + f < sqrt(2), s = f/(2 + f), ln u = k·ln 2 + f − f²/2 + s·(f²/2 + R(s²))) without
// its branches and selects for zero, subnormal, infinite and negative inputs, which Box–Muller's
// u1 never is. The same operations in the same order, so the same bits as xsimd::log on that
// range (tested on all 2^24 inputs).
template <class Arch>
DIFFTRAIN_INLINE xsimd::batch<float, Arch> log_unit_interval(xsimd::batch<float, Arch> u) {
  using F = xsimd::batch<float, Arch>;
  using I = xsimd::batch<std::int32_t, Arch>;
  constexpr std::int32_t sqrt_half_bits = 0x3f3504f3;  // sqrt(2)/2
  I ix = xsimd::bitwise_cast<I>(u) + I(0x3f800000 - sqrt_half_bits);
  const I k = (ix >> 23) - I(0x7f);
  ix = (ix & I(0x007fffff)) + I(sqrt_half_bits);
  const F f = xsimd::bitwise_cast<F>(ix) - F(1.0f);
  const F s = f / (F(2.0f) + f);
  const F z = s * s;
  const F w = z * z;
  const F t1 =
      w * xsimd::fma(w, F(std::bit_cast<float>(0x3e789e26)), F(std::bit_cast<float>(0x3eccce13)));
  const F t2 =
      z * xsimd::fma(w, F(std::bit_cast<float>(0x3e91e9ee)), F(std::bit_cast<float>(0x3f2aaaaa)));
  const F r = t2 + t1;
  const F hfsq = F(0.5f) * f * f;
  const F dk = xsimd::batch_cast<float>(k);
  const F ln2_hi(std::bit_cast<float>(0x3f318000)), ln2_lo(std::bit_cast<float>(0xb95e8083));
  return xsimd::fma(dk, ln2_hi, xsimd::fma(s, hfsq + r, dk * ln2_lo) - hfsq + f);
}

// Box–Muller: r = sqrt(-2 ln u1) with u1 in (0, 1], θ = 2π u2 with u2 in [0, 1).
template <class Arch>
DIFFTRAIN_INLINE void box_muller(xsimd::batch<std::uint32_t, Arch> radius_bits,
                                 xsimd::batch<std::uint32_t, Arch> angle_bits, float* cos_out,
                                 float* sin_out) {
  using F = xsimd::batch<float, Arch>;
  const F u1 = F(1.0f) - to_unit_interval(radius_bits);
  const F radius = xsimd::sqrt(F(-2.0f) * log_unit_interval(u1));
  const auto [sin_theta, cos_theta] = sincos_two_pi(to_unit_interval(angle_bits));
  (radius * cos_theta).store_unaligned(cos_out);
  (radius * sin_theta).store_unaligned(sin_out);
}
}  // namespace random_detail

/// The 64 standard normals of group g (elements 64g .. 64g+63) into out[0..64).
template <class Arch = xsimd::default_arch>
DIFFTRAIN_INLINE void normal_group(const PreparedStream& ps, std::uint64_t group, float* out) {
  constexpr std::size_t width = xsimd::batch<std::uint32_t, Arch>::size;
  static_assert(16 % width == 0, "SIMD width must divide 16");
  for (std::size_t h = 0; h < 16; h += width) {
    const auto words = random_detail::group_words<Arch>(ps, group, h);
    random_detail::box_muller<Arch>(words[0], words[1], out + h, out + 16 + h);
    random_detail::box_muller<Arch>(words[2], words[3], out + 32 + h, out + 48 + h);
  }
}

/// The same from the stream itself (prepares it for this one group: loops use the overload above).
template <class Arch = xsimd::default_arch>
inline void normal_group(RandomStream rs, std::uint64_t group, float* out) {
  normal_group<Arch>(PreparedStream(rs), group, out);
}

/// The 64 uniforms on [0, 1) of group g into out[0..64).
template <class Arch = xsimd::default_arch>
DIFFTRAIN_INLINE void uniform_group(const PreparedStream& ps, std::uint64_t group, float* out) {
  constexpr std::size_t width = xsimd::batch<std::uint32_t, Arch>::size;
  static_assert(16 % width == 0, "SIMD width must divide 16");
  for (std::size_t h = 0; h < 16; h += width) {
    const auto words = random_detail::group_words<Arch>(ps, group, h);
    for (std::size_t q = 0; q < 4; ++q)
      random_detail::to_unit_interval<Arch>(words[q]).store_unaligned(out + 16 * q + h);
  }
}

/// The same from the stream itself (prepares it for this one group: loops use the overload above).
template <class Arch = xsimd::default_arch>
inline void uniform_group(RandomStream rs, std::uint64_t group, float* out) {
  uniform_group<Arch>(PreparedStream(rs), group, out);
}

/// The raw 32-bit word of element i (scalar; for integer draws such as timesteps).
inline std::uint32_t random_bits(RandomStream rs, std::uint64_t index) {
  const std::uint64_t group = index / kRandomGroup;
  const std::uint64_t within = index % kRandomGroup;
  const std::uint64_t counter = group * 16 + within % 16;
  const std::array<std::uint32_t, 4> words = philox4x32_10<std::uint32_t>(
      {static_cast<std::uint32_t>(counter), static_cast<std::uint32_t>(counter >> 32),
       static_cast<std::uint32_t>(rs.stream), static_cast<std::uint32_t>(rs.stream >> 32)},
      static_cast<std::uint32_t>(rs.seed), static_cast<std::uint32_t>(rs.seed >> 32));
  return words[within / 16];
}

/// A uniform integer in [low, high) from element i's word (multiply-shift; its bias is at most
/// (high - low) / 2^32, below 3e-7 for 1000 timesteps). The range must hold 1 to 2^32 values.
inline std::int64_t uniform_int(RandomStream rs, std::uint64_t index, std::int64_t low,
                                std::int64_t high) {
  require(low < high && static_cast<std::uint64_t>(high - low) <= (std::uint64_t{1} << 32),
          "uniform_int", "range [", low, ", ", high, ") must hold 1 to 2^32 values");
  const auto range = static_cast<std::uint64_t>(high - low);
  return low + static_cast<std::int64_t>((std::uint64_t{random_bits(rs, index)} * range) >> 32);
}

/// A uniform double in [0, 1) from element i's word (32 bits of resolution).
inline double uniform_double(RandomStream rs, std::uint64_t index) {
  return static_cast<double>(random_bits(rs, index)) * 0x1p-32;
}

namespace random_detail {
// Applies group_fn(stream, g, buffer) to every group touching [offset, offset + n) and copies the
// part inside the range to out; groups are independent, so threads split them freely. One call
// site and a compile-time function, so that group_fn inlines into the loop and its constants
// stay out of it.
using GroupFn = void (*)(const PreparedStream&, std::uint64_t, float*);
template <GroupFn group_fn>
inline void fill_groups(std::span<float> out, RandomStream rs, std::uint64_t offset) {
  if (out.empty()) return;
  const PreparedStream ps(rs);
  const std::uint64_t first = offset / kRandomGroup;
  const std::uint64_t last = (offset + out.size() - 1) / kRandomGroup;
  const auto groups = static_cast<std::int64_t>(last - first + 1);
#pragma omp parallel for schedule(static) if (parallel::exceeds(groups, parallel::kRandomGroups))
  for (std::int64_t k = 0; k < groups; ++k) {
    const std::uint64_t g = first + static_cast<std::uint64_t>(k);
    const std::uint64_t begin = std::max(g * kRandomGroup, offset);
    const std::uint64_t end = std::min((g + 1) * kRandomGroup, offset + out.size());
    float* dst = out.data() + (begin - offset);
    const bool whole = begin == g * kRandomGroup && end - begin == kRandomGroup;
    alignas(64) float buffer[kRandomGroup];
    group_fn(ps, g, whole ? dst : buffer);
    if (!whole)
      std::copy(buffer + (begin - g * kRandomGroup), buffer + (end - g * kRandomGroup), dst);
  }
}
}  // namespace random_detail

/// out[k] = standard normal number (offset + k) of the stream.
template <class Arch = xsimd::default_arch>
inline void fill_normal(std::span<float> out, RandomStream rs, std::uint64_t offset = 0) {
  random_detail::fill_groups<normal_group<Arch>>(out, rs, offset);
}

/// out[k] = uniform number (offset + k) of the stream, on [0, 1).
template <class Arch = xsimd::default_arch>
inline void fill_uniform(std::span<float> out, RandomStream rs, std::uint64_t offset = 0) {
  random_detail::fill_groups<uniform_group<Arch>>(out, rs, offset);
}

/// Rows of a batch-major buffer of `size` elements, R = size/rows.size() per row, as rows of a
/// larger batch (a data-parallel shard): f(b·R, rows[b]·R, R) for each row b, so that element
/// b·R + i takes number rows[b]·R + i of a stream; f(0, 0, size) when rows is empty (the batch is
/// the whole batch). Throws difftrain::Error when size is not a multiple of the row count.
template <class F>
void for_each_global_row(std::size_t size, std::span<const std::uint64_t> rows, F&& f) {
  if (rows.empty()) {
    f(std::size_t{0}, std::uint64_t{0}, size);
    return;
  }
  require(size % rows.size() == 0, "for_each_global_row", "a buffer of ", size,
          " elements does not split into ", rows.size(), " rows (expected batch-major layout)");
  const std::size_t per_row = size / rows.size();
  for (std::size_t b = 0; b < rows.size(); ++b) f(b * per_row, rows[b] * per_row, per_row);
}

/// out[b·R + i] = standard normal number (rows[b]·R + i) of the stream (for_each_global_row);
/// fill_normal(out, rs) when rows is empty.
template <class Arch = xsimd::default_arch>
inline void fill_normal_rows(std::span<float> out, RandomStream rs,
                             std::span<const std::uint64_t> rows) {
  for_each_global_row(out.size(), rows,
                      [&](std::size_t local, std::uint64_t global, std::size_t n) {
                        fill_normal<Arch>(out.subspan(local, n), rs, global);
                      });
}

}  // namespace difftrain
