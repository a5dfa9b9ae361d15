// difftrain: command-line access to the library. Each subcommand is declared in
// tools/cmd_<name>.hpp as `void add_<name>_command(CLI::App& app, int& exit_code)` and defined in
// tools/cmd_<name>.cpp (compiled once into difftrain_tools): it registers a CLI11 subcommand whose
// callback sets exit_code (0 on success, 1 with a message on stderr on error).
#include <CLI/CLI.hpp>

#include "cmd_bench.hpp"
#include "cmd_sample.hpp"
#include "cmd_text.hpp"
#include "cmd_train.hpp"
#include "cmd_unet.hpp"
#include "cmd_vae.hpp"

int main(int argc, char** argv) {
  CLI::App app{"difftrain: the training step of text-to-image diffusion models"};
  app.require_subcommand(1);
  int exit_code = 0;
  difftrain::tools::add_bench_commands(app, exit_code);
  difftrain::tools::add_sample_command(app, exit_code);
  difftrain::tools::add_text_commands(app, exit_code);
  difftrain::tools::add_train_command(app, exit_code);
  difftrain::tools::add_unet_command(app, exit_code);
  difftrain::tools::add_vae_commands(app, exit_code);
  CLI11_PARSE(app, argc, argv);
  return exit_code;
}
