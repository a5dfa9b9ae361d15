#pragma once
// Shared pieces of the `difftrain` subcommands: reading inputs, writing outputs, errors.

#include <cstdio>
#include <string>

#include <CLI/CLI.hpp>

namespace difftrain::tools {

/// Runs a subcommand body, turning difftrain::Error (and other exceptions) into a message on
/// stderr and exit code 1 instead of a crash.
template <class Body>
int run_command(const char* name, Body&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "difftrain %s: %s\n", name, e.what());
    return 1;
  }
}

}  // namespace difftrain::tools
