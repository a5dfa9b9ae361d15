#pragma once
// A JSON config file holding a subcommand's flags: {"learning_rate": 1e-4, "rank": 8, ...}.
// Keys are the long flag names without "--"; a flag given on the command line wins over the file;
// an unknown key is an error naming it (a typo must not silently train with a default).
// The definitions are in json_config.cpp.

#include <string>
#include <vector>

namespace CLI {
class App;
}  // namespace CLI

namespace difftrain::tools {

/// Sets every option of `cmd` named in the JSON object at `path` that was not given on the
/// command line. `skip` names options that may not come from a file (e.g. "config" itself).
void apply_json_config(CLI::App& cmd, const std::string& path,
                       const std::vector<std::string>& skip = {"config"});

}  // namespace difftrain::tools
