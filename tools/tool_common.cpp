// Shared pieces of the subcommands (tool_common.hpp).
#include "tool_common.hpp"

#include <omp.h>

#include <CLI/CLI.hpp>
#include <Eigen/Core>
#include <algorithm>
#include <cstdlib>

#include "difftrain/core/error.hpp"

namespace difftrain::tools {

void add_threads_option(CLI::App& cmd, int& threads) {
  cmd.add_option("--threads", threads, "OpenMP and Eigen threads (default: all)");
}

void add_single_file_options(CLI::App& cmd, SingleFileFlags& flags) {
  cmd.add_option("--single_file_config", flags.single_file_config,
                 "for a single-file model: a diffusers pipeline folder of the same model whose "
                 "configs, tokenizers and scheduler describe it (diffusers' from_single_file "
                 "config); default: the detected family's presets");
  cmd.add_option("--tokenizer_name", flags.tokenizer_name,
                 "tokenizer folder (vocab.json, merges.txt) for a single-file model; SDXL's "
                 "second tokenizer is the same, padding with \"!\"");
}

int set_threads(const char* command, int n) {
  require(n >= 0, command, "--threads is ", n, ", expected >= 0 (0: OpenMP's default)");
  // Several ranks of an MPI job on one machine (Open MPI says how many): by default each takes
  // its share of the cores, not all of them (OMP_NUM_THREADS, when set, still decides).
  if (const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
      n == 0 && local && !std::getenv("OMP_NUM_THREADS")) {
    const int ranks = std::max(1, std::atoi(local));
    n = std::max(1, omp_get_num_procs() / ranks);
  }
  if (n > 0) {
    omp_set_num_threads(n);
    Eigen::setNbThreads(n);
  }
  return omp_get_max_threads();
}

}  // namespace difftrain::tools
