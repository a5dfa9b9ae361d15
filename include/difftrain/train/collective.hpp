#pragma once
// Collective: what data-parallel training needs from a group of processes, without naming the
// transport. The Trainer uses one when it is given one (Trainer::set_collective); dist/mpi.hpp
// implements it with MPI, so the core library stays free of MPI.
//
// Every call is collective: all ranks make it, in the same order, with the same sizes. Results
// are the same on every rank (bitwise), so that ranks that start equal stay equal.

#include <algorithm>
#include <cstddef>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "difftrain/train/parameter_view.hpp"

namespace difftrain::train {

/// A failure one rank reported, as every rank learns it (Collective::agree).
struct RankError {
  int rank = 0;         // the lowest rank that failed
  std::string message;  // its message
};

class Collective {
 public:
  virtual ~Collective() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// x ← Σ over ranks of x, elementwise; every rank receives the same sums.
  virtual void allreduce_sum(std::span<float> x) = 0;
  virtual void allreduce_sum(std::span<double> x) = 0;
  /// x ← root's x.
  virtual void broadcast(std::span<float> x, int root) = 0;
  /// Every rank says whether it failed (its message) or not; all learn the lowest failing rank
  /// and its message, or nothing when none failed.
  virtual std::optional<RankError> agree(const std::optional<std::string>& error) = 0;
  /// Returns when every rank has called it.
  virtual void barrier() = 0;
  /// Bytes this rank has sent through allreduce_sum and broadcast so far (as payload; what the
  /// transport moves on the wire depends on its algorithm).
  virtual std::size_t bytes_reduced() const = 0;
};

/// g ← Σ over ranks of g for every parameter's gradient, in buckets of at most 16 MiB: small
/// gradients are packed into `bucket` (kept by the caller across steps) and sent together, a
/// larger one is reduced in place.
inline void allreduce_sum_gradients(Collective& collective, std::span<const ParameterRef> params,
                                    std::vector<float>& bucket) {
  constexpr std::size_t kBucket = std::size_t(1) << 22;  // floats
  std::size_t first = 0, filled = 0;                     // params[first, i) wait in the bucket
  auto flush = [&](std::size_t end) {
    if (filled == 0) return;
    bucket.resize(filled);
    std::size_t at = 0;
    for (std::size_t k = first; k < end; ++k) {
      std::copy(params[k].grad().begin(), params[k].grad().end(),
                bucket.begin() + std::ptrdiff_t(at));
      at += params[k].grad().size();
    }
    collective.allreduce_sum(std::span<float>(bucket));
    at = 0;
    for (std::size_t k = first; k < end; ++k) {
      std::copy_n(bucket.begin() + std::ptrdiff_t(at), params[k].grad().size(),
                  params[k].grad().begin());
      at += params[k].grad().size();
    }
    filled = 0;
  };
  for (std::size_t i = 0; i < params.size(); ++i) {
    const std::size_t n = params[i].grad().size();
    if (n >= kBucket || filled + n > kBucket) {
      flush(i);
      first = i;
    }
    if (n >= kBucket) {
      collective.allreduce_sum(params[i].grad());
      first = i + 1;
      continue;
    }
    filled += n;
  }
  flush(params.size());
}

}  // namespace difftrain::train
