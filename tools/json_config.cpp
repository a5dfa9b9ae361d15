// apply_json_config (json_config.hpp): a subcommand's flags from a JSON file.
#include "json_config.hpp"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>

#include "difftrain/core/error.hpp"

namespace difftrain::tools {

namespace {

/// The strings CLI11 would have received on the command line for a JSON value.
std::vector<std::string> config_value_strings(const std::string& key, const nlohmann::json& value) {
  auto scalar = [&](const nlohmann::json& v) -> std::string {
    if (v.is_string()) return v.get<std::string>();
    if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
    if (v.is_number_integer()) return std::to_string(v.get<long long>());
    if (v.is_number()) return v.dump();
    throw Error(message("config: key '", key, "' has value ", v.dump(),
                        ", expected a string, number or boolean"));
  };
  std::vector<std::string> out;
  if (value.is_array())
    for (const auto& v : value) out.push_back(scalar(v));
  else
    out.push_back(scalar(value));
  return out;
}

}  // namespace

void apply_json_config(CLI::App& cmd, const std::string& path,
                       const std::vector<std::string>& skip) {
  constexpr const char* fn = "config";
  std::ifstream in(path);
  require(in.good(), fn, "cannot open config file '", path, "'");
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw Error(message(fn, ": '", path, "' is not valid JSON: ", e.what()));
  }
  require(json.is_object(), fn, "'", path, "' holds ", json.type_name(),
          ", expected a JSON object of flag names to values");
  for (const auto& [key, value] : json.items()) {
    CLI::Option* opt = cmd.get_option_no_throw("--" + key);
    const bool skipped = std::find(skip.begin(), skip.end(), key) != skip.end();
    require(opt != nullptr && !skipped, fn, "'", path, "' has unknown key '", key,
            "' (keys are the flags of `", cmd.get_name(), "` without --)");
    if (opt->count() > 0 || value.is_null()) continue;  // the command line wins
    try {
      for (const auto& s : config_value_strings(key, value)) opt->add_result(s);
      opt->run_callback();
    } catch (const CLI::Error& e) {
      throw Error(
          message(fn, ": '", path, "' key '", key, "' has value ", value.dump(), ": ", e.what()));
    }
  }
}

}  // namespace difftrain::tools
