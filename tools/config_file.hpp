#pragma once
// A config file holding a subcommand's flags, as JSON ({"learning_rate": 1e-4, "rank": 8}) or as
// kohya's TOML training config (--config_file: `learning_rate = 1e-4`, keys at the top level or
// in [sections], which only group them, as kohya's read_config_from_file flattens them).
// Keys are the long flag names without "--" (kohya's spellings are aliases of the flags); a flag
// given on the command line wins over the file; an unknown key is an error naming it (a typo must
// not silently train with a default). The definitions are in config_file.cpp.

#include <string>
#include <utility>
#include <vector>

namespace CLI {
class App;
}  // namespace CLI

namespace difftrain::tools {

/// One key of a config file and the strings CLI11 would have received on the command line.
struct ConfigEntry {
  std::string key;
  std::vector<std::string> values;
  std::string shown;  // the value as written, for errors
};

/// The entries of a JSON object or a TOML document. TOML is chosen by the ".toml" extension; a
/// path that does not exist gets ".toml" appended when that file exists (kohya's --config_file).
std::vector<ConfigEntry> read_config_file(const std::string& path);

/// Sets every option of `cmd` named in the config file at `path` that was not given on the
/// command line. `skip` names options that may not come from a file (the config options).
void apply_config_file(CLI::App& cmd, const std::string& path,
                       const std::vector<std::string>& skip = {"config", "config_file"});

}  // namespace difftrain::tools
