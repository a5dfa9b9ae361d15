// Shared pieces of the subcommands (tool_common.hpp).
#include "tool_common.hpp"

#include <omp.h>

#include <CLI/CLI.hpp>
#include <Eigen/Core>

#include "difftrain/core/error.hpp"

namespace difftrain::tools {

void add_threads_option(CLI::App& cmd, int& threads) {
  cmd.add_option("--threads", threads, "OpenMP and Eigen threads (default: all)");
}

int set_threads(const char* command, int n) {
  require(n >= 0, command, "--threads is ", n, ", expected >= 0 (0: OpenMP's default)");
  if (n > 0) {
    omp_set_num_threads(n);
    Eigen::setNbThreads(n);
  }
  return omp_get_max_threads();
}

}  // namespace difftrain::tools
