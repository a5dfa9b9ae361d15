#pragma once
// OpenMP helpers and the size thresholds below which a loop stays on one thread, in one place.
//
// An OpenMP region costs microseconds on an idle machine and far more on a busy one (a descheduled
// thread stalls the barrier), which dwarfs small loops such as gradient-check shapes or a tiny
// model's layers; each family of loops therefore opens a region only above its threshold. The
// thresholds change which thread computes what, never the result: every reduction in difftrain
// is ordered the same way for any thread count (bitwise-identical results are tested).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace difftrain::parallel {

/// Elements of an element-wise loop (activations, GEGLU, schedulers' steps, EMA, clipping, ...)
/// above which it runs in parallel.
inline constexpr std::size_t kElementwiseSize = std::size_t{1} << 16;
/// Elements of a normalisation or loss pass (statistics, then a scaled write) above which it runs
/// in parallel: two passes over the data make the region pay off earlier.
inline constexpr std::size_t kNormSize = std::size_t{1} << 15;
/// Output elements of an up-sampling (nearest) at and above which it runs in parallel.
inline constexpr std::size_t kUpsampleSize = std::size_t{1} << 16;
/// Multiply-adds of an attention core (QKᵀ and PV) at and above which it runs in parallel.
inline constexpr std::size_t kAttentionWork = std::size_t{1} << 16;
/// Multiply-adds of an nn::Conv2d call at and above which it uses every thread.
inline constexpr std::size_t kConvMacs = std::size_t{1} << 20;
/// Multiply-adds of a banded (VAE) conv at and above which it uses every thread, Eigen included.
inline constexpr std::size_t kBandedConvWork = std::size_t{1} << 22;
/// Groups of kRandomGroup normals (or of the fused noise kernel) above which filling runs in
/// parallel.
inline constexpr std::size_t kRandomGroups = 64;

/// n > threshold, for a count n of any integer type (OpenMP loops often count in signed types).
template <class N>
constexpr bool exceeds(N n, std::size_t threshold) {
  return n > 0 && static_cast<std::size_t>(n) > threshold;
}

/// omp_get_max_threads(), at least 1; 1 without OpenMP.
inline int max_threads() {
#ifdef _OPENMP
  return std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}
/// omp_get_thread_num(); 0 without OpenMP.
inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
/// omp_get_num_threads() (the current team); 1 without OpenMP.
inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

/// [begin, end) of one thread's part of a range.
struct Span {
  std::size_t begin, end;
  std::size_t size() const { return end - begin; }
};
/// Part t of n equal parts of [0, size), each boundary a multiple of `align` (except the last
/// end), so that threads' blocks start on SIMD-aligned offsets.
inline Span split(std::size_t size, int t, int n, std::size_t align = 1) {
  const std::size_t units = (size + align - 1) / align;
  const auto part = [&](int i) {
    return std::min(size,
                    units * static_cast<std::size_t>(i) / static_cast<std::size_t>(n) * align);
  };
  return {part(t), t + 1 == n ? size : part(t + 1)};
}

/// Runs f with Eigen's products kept on the calling thread. Outside a parallel region Eigen splits
/// every GEMM of more than ~50k multiply-adds over all OpenMP threads, which costs far more than
/// it saves for the small convs of a tiny model or a low-resolution block (10x slower measured on
/// a busy 2-core machine). The nthreads ICV set inside the one-thread region is local to it.
template <class F>
void without_eigen_threads(F&& f) {
#ifdef _OPENMP
#pragma omp parallel num_threads(1)
  {
    omp_set_num_threads(1);
    std::forward<F>(f)();
  }
#else
  std::forward<F>(f)();
#endif
}

}  // namespace difftrain::parallel
