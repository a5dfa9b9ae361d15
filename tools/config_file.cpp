// read_config_file / apply_config_file (config_file.hpp): a subcommand's flags from a file.
#include "config_file.hpp"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <charconv>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "difftrain/core/error.hpp"
#include "difftrain/io/json_file.hpp"
#include "toml_file.hpp"

namespace difftrain::tools {

namespace {

constexpr const char* fn = "config";

// The shortest text that reads back as the same double (1e-4 stays "0.0001").
std::string shortest(double v) {
  char buf[64];
  const auto end = std::to_chars(buf, buf + sizeof buf, v).ptr;
  return std::string(buf, end);
}

std::vector<ConfigEntry> read_json(const std::string& path) {
  const nlohmann::json json = io::read_json_file(fn, path);
  require(json.is_object(), fn, "'", path, "' holds ", json.type_name(),
          ", expected a JSON object of flag names to values");
  std::vector<ConfigEntry> out;
  for (const auto& [key, value] : json.items()) {
    if (value.is_null()) continue;  // diffusers' None: the default
    auto scalar = [&](const nlohmann::json& v) -> std::string {
      if (v.is_string()) return v.get<std::string>();
      if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
      if (v.is_number_integer()) return std::to_string(v.get<long long>());
      if (v.is_number()) return shortest(v.get<double>());
      throw Error(message(fn, ": '", path, "' key '", key, "' has value ", io::json_excerpt(v),
                          ", expected a string, number or boolean"));
    };
    ConfigEntry e{key, {}, io::json_excerpt(value)};
    if (value.is_array())
      for (const auto& v : value) e.values.push_back(scalar(v));
    else
      e.values.push_back(scalar(value));
    out.push_back(std::move(e));
  }
  return out;
}

// A TOML value as written, briefly (for errors). Not toml++'s printer: 3.3.0 converts an
// infinite float to an integer when it lays out an array (undefined behaviour; found by fuzzing).
std::string shown(const toml::node& v, int depth = 0) {
  if (auto s = v.as_string()) return "\"" + s->get() + "\"";
  if (auto b = v.as_boolean()) return b->get() ? "true" : "false";
  if (auto i = v.as_integer()) return std::to_string(i->get());
  if (auto d = v.as_floating_point()) return shortest(d->get());
  if (auto a = v.as_array()) {
    if (depth == 4) return "[...]";
    std::string out = "[";
    std::size_t k = 0;
    for (const toml::node& e : *a) {
      if (k == 8) return out + ", ...]";
      out += (k++ ? ", " : "") + shown(e, depth + 1);
    }
    return out + "]";
  }
  return v.is_table() ? "{...}" : "(a date or time)";
}

// A TOML scalar as a command-line string; tables and dates are errors naming the key.
std::string toml_scalar(const std::string& path, const std::string& key, const toml::node& v) {
  if (auto s = v.as_string()) return s->get();
  if (auto b = v.as_boolean()) return b->get() ? "true" : "false";
  if (auto i = v.as_integer()) return std::to_string(i->get());
  if (auto d = v.as_floating_point()) return shortest(d->get());
  throw Error(message(fn, ": '", path, "' key '", key, "' has value ", shown(v),
                      ", expected a string, number, boolean or an array of them"));
}

void add_toml_entry(const std::string& path, const std::string& key, const toml::node& value,
                    std::vector<ConfigEntry>& out) {
  ConfigEntry e{key, {}, shown(value)};
  if (auto array = value.as_array())
    for (const toml::node& v : *array) e.values.push_back(toml_scalar(path, key, v));
  else
    e.values.push_back(toml_scalar(path, key, value));
  out.push_back(std::move(e));
}

std::vector<ConfigEntry> read_toml(const std::string& path) {
  const toml::table table = parse_toml_file(path, fn);
  // kohya's read_config_from_file: a table's keys count as top-level keys (sections only group).
  std::vector<ConfigEntry> out;
  for (const auto& [key, value] : table) {
    if (auto section = value.as_table()) {
      for (const auto& [inner, v] : *section) {
        require(!v.is_table(), fn, "'", path, "' has a table [", key.str(), ".", inner.str(),
                "], expected key = value pairs, optionally in one level of [sections]");
        add_toml_entry(path, std::string(inner.str()), v, out);
      }
    } else {
      add_toml_entry(path, std::string(key.str()), value, out);
    }
  }
  return out;
}

bool is_toml(const std::filesystem::path& p) { return p.extension() == ".toml"; }

}  // namespace

std::vector<ConfigEntry> read_config_file(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::exists(path, ec) && !is_toml(path) && fs::exists(path + ".toml", ec))
    return read_toml(path + ".toml");
  return is_toml(path) ? read_toml(path) : read_json(path);
}

void apply_config_file(CLI::App& cmd, const std::string& path,
                       const std::vector<std::string>& skip) {
  // Resolve every key first: a flag given on the command line wins over the file, and two keys
  // naming one flag (an alias and its flag) are an error rather than a silent choice.
  const std::vector<ConfigEntry> entries = read_config_file(path);
  std::vector<CLI::Option*> options;
  std::vector<bool> from_command_line;
  for (const ConfigEntry& e : entries) {
    CLI::Option* opt = cmd.get_option_no_throw("--" + e.key);
    const bool skipped = std::find(skip.begin(), skip.end(), e.key) != skip.end();
    require(opt != nullptr && !skipped, fn, "'", path, "' has unknown key '", e.key,
            "' (keys are the flags of `", cmd.get_name(), "` without --)");
    const auto twice = std::find(options.begin(), options.end(), opt);
    require(twice == options.end(), fn, "'", path, "' sets ", opt->get_name(), " twice (as '",
            twice == options.end() ? "" : entries[std::size_t(twice - options.begin())].key,
            "' and '", e.key, "')");
    options.push_back(opt);
    from_command_line.push_back(opt->count() > 0);
  }
  for (std::size_t i = 0; i < entries.size(); ++i) {
    if (from_command_line[i]) continue;
    try {
      for (const auto& s : entries[i].values) options[i]->add_result(s);
      options[i]->run_callback();
    } catch (const CLI::Error& error) {
      throw Error(message(fn, ": '", path, "' key '", entries[i].key, "' has value ",
                          entries[i].shown, ": ", error.what()));
    }
  }
}

}  // namespace difftrain::tools
