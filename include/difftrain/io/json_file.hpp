#pragma once
// Reading a JSON file (a diffusers/transformers config, an index, a manifest) with errors that name
// the caller and the file: one reader for every config type's from_file; and writing one
// atomically.

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <system_error>

#include "difftrain/core/error.hpp"

namespace difftrain::io {

/// The JSON document in the file at `path`. Throws difftrain::Error "function: cannot open
/// 'path': it does not exist" (likewise "is not a regular file", or unreadable) or
/// "function: 'path' is not valid JSON: ...".
inline nlohmann::json read_json_file(std::string_view function, const std::string& path) {
  std::error_code ec;
  require(std::filesystem::exists(path, ec), function, "cannot open '", path,
          "': it does not exist");
  require(std::filesystem::is_regular_file(path, ec), function, "cannot open '", path,
          "': it is not a regular file");
  std::ifstream in(path);
  require(in.good(), function, "cannot open '", path, "'");
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail(function, "'", path, "' is not valid JSON: ", e.what());
  }
}

/// Writes `json` (indented) to path through a temporary file renamed into place.
inline void write_json_file(const std::filesystem::path& path, const nlohmann::json& json) {
  const std::filesystem::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    require(out.good(), "write_json_file", "cannot open '", tmp.string(), "' for writing");
    out << json.dump(2) << "\n";
    require(out.good(), "write_json_file", "writing '", tmp.string(), "' failed");
  }
  std::filesystem::rename(tmp, path);
}

}  // namespace difftrain::io
