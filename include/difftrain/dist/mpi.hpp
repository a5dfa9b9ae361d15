#pragma once
// Data-parallel training over MPI: train::Collective on an MPI communicator, and the MPI session
// of a program. Needs the difftrain::dist CMake target (MPI::MPI_CXX; Open MPI from Debian's
// libopenmpi-dev); the rest of difftrain does not include this header.
//
//   dist::MpiSession mpi(argc, argv);        // MPI_Init_thread … MPI_Finalize
//   dist::MpiCollective world;               // MPI_COMM_WORLD
//   train::Trainer trainer(step, model, options);
//   trainer.set_collective(&world);          // rank 0's weights everywhere, gradients summed
//
// Errors: a failed MPI call is a difftrain::Error naming it (the communicator returns errors
// instead of aborting). A rank that dies makes mpirun end the others (Open MPI's default); a
// rank that fails in a step makes every rank throw the same Error (Collective::agree); a rank
// that fails elsewhere should end the job with MpiSession::abort.

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <span>
#include <string>

#include "difftrain/core/error.hpp"
#include "difftrain/train/collective.hpp"

namespace difftrain::dist {

namespace mpi_detail {
inline void check(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(rc, text, &length);
  fail("MPI", call, " failed: ", std::string(text, std::size_t(length)));
}
// MPI counts are int: larger buffers go in pieces.
template <class T, class F>
void in_pieces(std::span<T> x, F&& f) {
  constexpr std::size_t kMax = std::size_t(INT_MAX) / 2;
  for (std::size_t at = 0; at < x.size(); at += kMax)
    f(x.data() + at, int(std::min(kMax, x.size() - at)));
}
}  // namespace mpi_detail

/// The MPI library for the program's lifetime: MPI_Init_thread (FUNNELED: only the main thread
/// calls MPI; OpenMP threads compute) and MPI_Finalize.
class MpiSession {
 public:
  MpiSession(int& argc, char**& argv) {
    int provided = 0;
    mpi_detail::check(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided),
                      "MPI_Init_thread");
  }
  ~MpiSession() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  /// Ends every rank of the job now (after a failure the others cannot learn of by a collective).
  [[noreturn]] static void abort(int code) {
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);
  }
  /// Whether this process was started by an MPI launcher (mpirun / mpiexec, Open MPI or MPICH).
  static bool launched() {
    return std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMI_SIZE") != nullptr;
  }
};

/// train::Collective on a communicator (MPI_COMM_WORLD by default), which it duplicates so that
/// its messages never mix with the caller's.
class MpiCollective final : public train::Collective {
 public:
  explicit MpiCollective(MPI_Comm comm = MPI_COMM_WORLD) {
    mpi_detail::check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    mpi_detail::check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    mpi_detail::check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    mpi_detail::check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }
  ~MpiCollective() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }
  MpiCollective(const MpiCollective&) = delete;
  MpiCollective& operator=(const MpiCollective&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void allreduce_sum(std::span<float> x) override { allreduce(x, MPI_FLOAT); }
  void allreduce_sum(std::span<double> x) override { allreduce(x, MPI_DOUBLE); }

  void broadcast(std::span<float> x, int root) override {
    bytes_ += x.size_bytes();
    mpi_detail::in_pieces(x, [&](float* p, int n) {
      mpi_detail::check(MPI_Bcast(p, n, MPI_FLOAT, root, comm_), "MPI_Bcast");
    });
  }

  // The lowest failing rank (MPI_MIN over rank-or-size), then its message from it.
  std::optional<train::RankError> agree(const std::optional<std::string>& error) override {
    int mine = error ? rank_ : size_, first = size_;
    mpi_detail::check(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm_), "MPI_Allreduce");
    if (first == size_) return std::nullopt;
    std::uint64_t length = rank_ == first ? error->size() : 0;
    mpi_detail::check(MPI_Bcast(&length, 1, MPI_UINT64_T, first, comm_), "MPI_Bcast");
    std::string message = rank_ == first ? *error : std::string(length, '\0');
    mpi_detail::in_pieces(std::span<char>(message.data(), message.size()), [&](char* p, int n) {
      mpi_detail::check(MPI_Bcast(p, n, MPI_CHAR, first, comm_), "MPI_Bcast");
    });
    return train::RankError{first, std::move(message)};
  }

  void barrier() override { mpi_detail::check(MPI_Barrier(comm_), "MPI_Barrier"); }
  std::size_t bytes_reduced() const override { return bytes_; }
  MPI_Comm communicator() const { return comm_; }

 private:
  template <class T>
  void allreduce(std::span<T> x, MPI_Datatype type) {
    bytes_ += x.size_bytes();
    mpi_detail::in_pieces(x, [&](T* p, int n) {
      mpi_detail::check(MPI_Allreduce(MPI_IN_PLACE, p, n, type, MPI_SUM, comm_), "MPI_Allreduce");
    });
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  std::size_t bytes_ = 0;
};

}  // namespace difftrain::dist
