// difftrain: command-line access to the library. Each subcommand is declared in
// tools/cmd_<name>.hpp as `void add_<name>_command(CLI::App& app, int& exit_code)` and defined in
// tools/cmd_<name>.cpp (compiled once into difftrain_tools): it registers a CLI11 subcommand whose
// callback sets exit_code (0 on success, 1 with a message on stderr on error).
//
// Built with MPI (difftrain::dist) and started by mpirun, the process is one rank of a
// data-parallel `difftrain train`; a rank that fails ends the whole job (MPI_Abort).
#include <CLI/CLI.hpp>
#include <optional>

#include "cmd_bench.hpp"
#include "cmd_sample.hpp"
#include "cmd_text.hpp"
#include "cmd_train.hpp"
#include "cmd_unet.hpp"
#include "cmd_vae.hpp"
#ifdef DIFFTRAIN_WITH_MPI
#include "difftrain/dist/mpi.hpp"
#endif

int main(int argc, char** argv) {
  difftrain::train::Collective* collective = nullptr;
#ifdef DIFFTRAIN_WITH_MPI
  std::optional<difftrain::dist::MpiSession> mpi;
  std::optional<difftrain::dist::MpiCollective> world;
  if (difftrain::dist::MpiSession::launched()) {
    mpi.emplace(argc, argv);
    world.emplace();
    collective = &*world;
  }
#endif
  CLI::App app{"difftrain: the training step of text-to-image diffusion models"};
  app.require_subcommand(1);
  int exit_code = 0;
  difftrain::tools::add_bench_commands(app, exit_code, collective);
  difftrain::tools::add_sample_command(app, exit_code);
  difftrain::tools::add_text_commands(app, exit_code);
  difftrain::tools::add_train_command(app, exit_code, collective);
  difftrain::tools::add_unet_command(app, exit_code);
  difftrain::tools::add_vae_commands(app, exit_code);
  CLI11_PARSE(app, argc, argv);
#ifdef DIFFTRAIN_WITH_MPI
  // An error on one rank may leave the others waiting in a collective: end them all now.
  if (exit_code == 1 && world && world->size() > 1) difftrain::dist::MpiSession::abort(exit_code);
#endif
  return exit_code;
}
