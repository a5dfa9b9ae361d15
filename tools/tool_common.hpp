#pragma once
// Shared pieces of the `difftrain` subcommands: reading inputs, writing outputs, errors.

#include <cstdio>
#include <exception>
#include <new>
#include <string>

namespace CLI {
class App;
}  // namespace CLI

namespace difftrain::tools {

/// Registers --threads N on a subcommand, bound to `threads` (0: all; set_threads applies it).
/// Every subcommand registers it here, once.
void add_threads_option(CLI::App& cmd, int& threads);

/// A model given as an original single file: where its configs and tokenizer come from
/// (pipeline::SingleFileOptions).
struct SingleFileFlags {
  std::string single_file_config;  // a diffusers pipeline folder of the same model (configs only)
  std::string tokenizer_name;      // diffusers' --tokenizer_name: a tokenizer folder
};

/// Registers --single_file_config and --tokenizer_name, bound to `flags` (every command that
/// loads a pipeline registers them here, once).
void add_single_file_options(CLI::App& cmd, SingleFileFlags& flags);

/// Sets OpenMP's and Eigen's thread counts to n (n > 0; 0 keeps OpenMP's default, or under an
/// MPI job without OMP_NUM_THREADS the cores divided by the ranks on this machine) and returns
/// the count in effect. Throws difftrain::Error naming `command` for n < 0. Definition in
/// tool_common.cpp.
int set_threads(const char* command, int n);

/// Runs a subcommand body, turning difftrain::Error (and other exceptions) into a message on
/// stderr and exit code 1 instead of a crash.
template <class Body>
int run_command(const char* name, Body&& body) {
  try {
    body();
    return 0;
  } catch (const std::bad_alloc&) {  // not a bare "std::bad_alloc": say what ran out
    std::fprintf(stderr,
                 "difftrain %s: out of memory: an allocation failed (a model, batch, image or "
                 "rank larger than this machine's memory?)\n",
                 name);
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "difftrain %s: %s\n", name, e.what());
    return 1;
  }
}

}  // namespace difftrain::tools
