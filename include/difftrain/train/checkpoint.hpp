#pragma once
// Training checkpoints on disk: `<output_dir>/checkpoint-<step>/` holding safetensors files
// (trainable parameters, optimizer state, EMA shadow, …) and a JSON manifest
// (trainer_state.json: step counters, LR-scheduler position, data/RNG position, settings).
//
// Atomicity: everything is written into a hidden temporary folder `.checkpoint-<step>.tmp-…`
// in output_dir, which is renamed to checkpoint-<step> only once complete. A failure (or a crash)
// before the rename leaves the previous checkpoints as they were; a leftover temporary folder
// is never listed as a checkpoint. Pruning (checkpoints_total_limit) runs only after the new
// checkpoint is in place.

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>
#include <xtensor/xarray.hpp>

#include "difftrain/core/error.hpp"
#include "difftrain/io/safetensors.hpp"

namespace difftrain::train {

namespace fs = std::filesystem;

using TensorMap = std::map<std::string, xt::xarray<float>>;

/// What a checkpoint holds: safetensors files (file name → tensors, stored as F32) and the
/// manifest, written as trainer_state.json.
struct CheckpointContents {
  std::map<std::string, TensorMap> tensor_files;
  nlohmann::json manifest = nlohmann::json::object();
};

inline constexpr std::string_view kManifestName = "trainer_state.json";

/// Called with the complete temporary folder just before it is renamed into place. Tests throw
/// from it to simulate a crash during the write.
using CheckpointHook = std::function<void(const fs::path& temporary_folder)>;

/// `<output_dir>/checkpoint-<step>` (diffusers' naming).
inline fs::path checkpoint_path(const fs::path& output_dir, std::int64_t step) {
  return output_dir / ("checkpoint-" + std::to_string(step));
}

/// The step of a folder named exactly checkpoint-<digits>, or nothing.
inline std::optional<std::int64_t> checkpoint_step(std::string_view folder_name) {
  constexpr std::string_view prefix = "checkpoint-";
  if (folder_name.substr(0, prefix.size()) != prefix || folder_name.size() == prefix.size())
    return std::nullopt;
  const std::string_view digits = folder_name.substr(prefix.size());
  std::int64_t step = 0;
  const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), step);
  if (ec != std::errc{} || end != digits.data() + digits.size() || step < 0 ||
      digits.front() == '+' || digits.front() == '-')
    return std::nullopt;
  return step;
}

/// Checkpoint folders of output_dir, ascending by step (empty if output_dir does not exist).
inline std::vector<std::pair<std::int64_t, fs::path>> list_checkpoints(const fs::path& output_dir) {
  std::vector<std::pair<std::int64_t, fs::path>> out;
  std::error_code ec;
  if (!fs::is_directory(output_dir, ec)) return out;
  for (const fs::directory_entry& entry : fs::directory_iterator(output_dir)) {
    if (!entry.is_directory()) continue;
    if (auto step = checkpoint_step(entry.path().filename().string()))
      out.emplace_back(*step, entry.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

/// Removes the oldest checkpoints so that at most `keep_last` remain (keep_last >= 1).
inline void prune_checkpoints(const fs::path& output_dir, std::int64_t keep_last) {
  require(keep_last >= 1, "prune_checkpoints", "checkpoints_total_limit is ", keep_last,
          ", expected >= 1");
  auto all = list_checkpoints(output_dir);
  const std::size_t keep = static_cast<std::size_t>(keep_last);
  for (std::size_t i = 0; i + keep < all.size(); ++i) fs::remove_all(all[i].second);
}

namespace detail {

inline void write_tensor_file(const fs::path& path, const TensorMap& tensors) {
  std::vector<io::TensorToWrite> out;
  out.reserve(tensors.size());
  for (const auto& [name, t] : tensors) {
    std::vector<std::size_t> shape(t.shape().begin(), t.shape().end());
    out.push_back(io::TensorToWrite::from_span<float>(
        name, std::span<const float>(t.data(), t.size()), std::move(shape)));
  }
  io::save_safetensors(path.string(), out, {{"format", "pt"}});
}

inline TensorMap read_tensor_file(const fs::path& path) {
  const io::SafetensorsFile file = io::SafetensorsFile::open(path.string());
  TensorMap out;
  for (const std::string& name : file.names()) {
    xt::xarray<float> t = xt::xarray<float>::from_shape(file.info(name).shape);
    file.read_into(name, std::span<float>(t.data(), t.size()));
    out.emplace(name, std::move(t));
  }
  return out;
}

inline void write_text_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.flush();
  require(out.good(), "write_checkpoint", "cannot write '", path.string(), "'");
}

}  // namespace detail

/// Writes checkpoint-<step> in output_dir atomically (see the top of the file) and returns its
/// path. An existing checkpoint-<step> is replaced only once the new one is complete.
inline fs::path write_checkpoint(const fs::path& output_dir, std::int64_t step,
                                 const CheckpointContents& contents,
                                 const CheckpointHook& before_rename = {}) {
  constexpr const char* fn = "write_checkpoint";
  require(!output_dir.empty(), fn, "output_dir is empty");
  require(step >= 0, fn, "step is ", step, ", expected >= 0");
  for (const auto& [file, tensors] : contents.tensor_files)
    require(!file.empty() && file != kManifestName && file.find('/') == std::string::npos, fn,
            "file name '", file, "' is not a plain file name other than ", kManifestName);
  std::error_code ec;
  fs::create_directories(output_dir, ec);
  require(!ec, fn, "cannot create output_dir '", output_dir.string(), "': ", ec.message());

  static std::atomic<std::uint64_t> counter{0};
  const fs::path final_path = checkpoint_path(output_dir, step);
  const std::string tag = std::to_string(::getpid()) + "." + std::to_string(counter++);
  const fs::path temporary = output_dir / (".checkpoint-" + std::to_string(step) + ".tmp-" + tag);
  fs::create_directory(temporary, ec);
  require(!ec, fn, "cannot create '", temporary.string(), "': ", ec.message());
  try {
    for (const auto& [file, tensors] : contents.tensor_files)
      detail::write_tensor_file(temporary / file, tensors);
    detail::write_text_file(temporary / kManifestName, contents.manifest.dump(2) + "\n");
    if (before_rename) before_rename(temporary);
    fs::path replaced;
    if (fs::exists(final_path)) {  // move the old one aside: rename() cannot replace a folder
      replaced = output_dir / (".checkpoint-" + std::to_string(step) + ".old-" + tag);
      fs::rename(final_path, replaced);
    }
    try {
      fs::rename(temporary, final_path);
    } catch (...) {
      if (!replaced.empty()) fs::rename(replaced, final_path, ec);  // put the old one back
      throw;
    }
    if (!replaced.empty()) fs::remove_all(replaced, ec);
  } catch (const fs::filesystem_error& e) {
    fs::remove_all(temporary, ec);
    fail(fn, "cannot write '", final_path.string(), "': ", e.what());
  } catch (...) {
    fs::remove_all(temporary, ec);
    throw;
  }
  return final_path;
}

/// The checkpoint folder for `dir_or_latest`: "latest" is the highest-step checkpoint in
/// output_dir (Error if none); anything else is a path to a checkpoint folder.
inline fs::path resolve_checkpoint(const fs::path& output_dir, const std::string& dir_or_latest) {
  if (dir_or_latest == "latest") {
    auto all = list_checkpoints(output_dir);
    require(!all.empty(), "resolve_checkpoint", "no checkpoint-<step> folder in '",
            output_dir.string(), "' to resume from");
    return all.back().second;
  }
  require(fs::is_directory(dir_or_latest), "resolve_checkpoint", "'", dir_or_latest,
          "' is not a checkpoint folder (expected a folder or \"latest\")");
  return dir_or_latest;
}

/// Reads every *.safetensors file and the manifest of a checkpoint folder.
inline CheckpointContents read_checkpoint(const fs::path& folder) {
  constexpr const char* fn = "read_checkpoint";
  const fs::path manifest_path = folder / kManifestName;
  require(fs::is_regular_file(manifest_path), fn, "'", folder.string(), "' has no ", kManifestName);
  CheckpointContents contents;
  std::ifstream in(manifest_path, std::ios::binary);
  try {
    contents.manifest = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail(fn, "'", manifest_path.string(), "' is not valid JSON: ", e.what());
  }
  require(contents.manifest.is_object(), fn, "'", manifest_path.string(), "' holds no JSON object");
  for (const fs::directory_entry& entry : fs::directory_iterator(folder))
    if (entry.is_regular_file() && entry.path().extension() == ".safetensors")
      contents.tensor_files.emplace(entry.path().filename().string(),
                                    detail::read_tensor_file(entry.path()));
  return contents;
}

}  // namespace difftrain::train
