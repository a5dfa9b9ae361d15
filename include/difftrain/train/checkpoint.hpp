#pragma once
// Training checkpoints on disk: `<output_dir>/checkpoint-<step>/` holding safetensors files
// (trainable parameters, optimizer state, EMA shadow, …) and a JSON manifest
// (trainer_state.json: step counters, LR-scheduler position, data/RNG position, settings).
//
// Atomicity against the process being killed at any moment (one writer per output_dir):
// - A save writes everything into a hidden folder `.checkpoint-<step>.tmp-<pid>.<n>` in
//   output_dir, renamed to checkpoint-<step> only once complete. A leftover .tmp folder is
//   incomplete by construction and never listed.
// - Replacing a checkpoint of the same step (Ctrl-C on a checkpointing step saves it again):
//   rename() cannot replace a non-empty folder, so the old one is first renamed to
//   `.checkpoint-<step>.old-<pid>.<n>`, then the new one is renamed into place, then the old one
//   is deleted. A kill between the two renames leaves the old one complete under its hidden
//   name, and recover_checkpoints() (run by every listing, "latest" and save) renames it back:
//   a complete checkpoint-<step> always exists or is recovered. This was chosen over
//   renameat2(RENAME_EXCHANGE): one portable code path, and the recovery is needed for
//   leftovers of older versions anyway.
// - Deleting a folder (pruning to checkpoints_total_limit, the replaced old one) first renames
//   it to a hidden `.checkpoint-<step>.del-<pid>.<n>`, so a deletion cut short never leaves a
//   half-deleted folder under a listed name.
// - recover_checkpoints() removes leftover .tmp / .del folders of processes no longer running
//   (and of this one: a reused pid, or an earlier failed save); another running process's are
//   left alone and reported.
// Only the tensor files are fsync'ed (by save_safetensors): this guards against kills, not
// against a power cut.

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
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
#include "difftrain/io/json_file.hpp"
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

/// A test hook, called with a folder at a point where a kill would leave things in a particular
/// state; tests throw from it to simulate that kill.
using CheckpointHook = std::function<void(const fs::path& folder)>;

/// The test hooks of write_checkpoint and prune_checkpoints. A throw from before_rename is
/// cleaned up like any failed write; a throw from the other two skips all cleanup, as a kill
/// would.
struct CheckpointHooks {
  CheckpointHook before_rename;     // the complete temporary folder, before anything is renamed
  CheckpointHook after_move_aside;  // the replaced checkpoint moved aside (.old), before the new
                                    // one is renamed into place
  CheckpointHook before_remove;     // a folder being deleted, already renamed to its hidden .del
                                    // name, before its files are removed
};

/// Receives one line for each thing checkpoint housekeeping did or found: leftovers of
/// interrupted saves recovered or removed, and which checkpoint "latest" took and why it skipped
/// newer ones.
using CheckpointLog = std::function<void(const std::string& message)>;

/// Checkpoint saves running in this process. An interrupt handler reads it to ignore a second
/// Ctrl-C during a save (tools/progress.hpp). A namespace-scope lock-free atomic is
/// constant-initialized (no guard variable), so reading it from a signal handler is safe.
inline std::atomic<int> checkpoint_saves_in_progress{0};
static_assert(std::atomic<int>::is_always_lock_free);

/// Counts a save in checkpoint_saves_in_progress for its lifetime.
class CheckpointSaveScope {
 public:
  CheckpointSaveScope() { checkpoint_saves_in_progress.fetch_add(1); }
  ~CheckpointSaveScope() { checkpoint_saves_in_progress.fetch_sub(1); }
  CheckpointSaveScope(const CheckpointSaveScope&) = delete;
  CheckpointSaveScope& operator=(const CheckpointSaveScope&) = delete;
};

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

namespace detail {

/// A hidden folder of an unfinished operation: `.checkpoint-<step>.<kind>-<pid>.<n>`.
struct HiddenFolder {
  std::int64_t step = 0;
  std::string kind;  // "tmp", "old" or "del"
  long pid = 0;      // 0: not readable from the name
};

inline std::optional<HiddenFolder> parse_hidden(std::string_view name) {
  constexpr std::string_view prefix = ".checkpoint-";
  if (!name.starts_with(prefix)) return std::nullopt;
  name.remove_prefix(prefix.size());
  const std::size_t dot = name.find('.');
  if (dot == std::string_view::npos || name.size() < dot + 5 || name[dot + 4] != '-')
    return std::nullopt;
  HiddenFolder h;
  const auto step = checkpoint_step("checkpoint-" + std::string(name.substr(0, dot)));
  h.kind = std::string(name.substr(dot + 1, 3));
  if (!step || (h.kind != "tmp" && h.kind != "old" && h.kind != "del")) return std::nullopt;
  h.step = *step;
  const std::string_view tag = name.substr(dot + 5);
  const auto [end, ec] = std::from_chars(tag.data(), tag.data() + tag.size(), h.pid);
  if (ec != std::errc{} || h.pid < 0) h.pid = 0;
  return h;
}

/// `<pid>.<n>`, unique among the hidden folders of this and other processes.
inline std::string unique_tag() {
  static std::atomic<std::uint64_t> counter{0};
  return std::to_string(::getpid()) + "." + std::to_string(counter++);
}

inline fs::path hidden_path(const fs::path& output_dir, std::int64_t step, std::string_view kind,
                            const std::string& tag) {
  return output_dir / (".checkpoint-" + std::to_string(step) + "." + std::string(kind) + "-" + tag);
}

/// Whether a hidden .tmp / .del folder may belong to an operation still running in another
/// process, and so must be left alone. This process's own are never in use when recovery runs:
/// it runs before a save or a prune creates any.
inline bool owned_by_running_process(long pid) {
  if (pid <= 0 || pid == long(::getpid())) return false;
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM;
}

/// Whether a std::filesystem error only says that the path does not exist (libstdc++ reports
/// that through the error_code too).
inline bool not_found(const std::error_code& ec) {
  return ec == std::errc::no_such_file_or_directory || ec == std::errc::not_a_directory;
}

/// The entries of a folder; Error naming it if it cannot be read (not std::filesystem's text).
inline std::vector<fs::path> list_folder(const fs::path& folder, std::string_view function) {
  std::vector<fs::path> out;
  std::error_code ec;
  for (fs::directory_iterator it(folder, ec), end; !ec && it != end; it.increment(ec))
    out.push_back(it->path());
  require(!ec, function, "cannot list '", folder.string(), "': ", ec.message());
  std::sort(out.begin(), out.end());
  return out;
}

/// remove_all without throwing: "" once removed, else the problem naming the folder.
inline std::string remove_folder(const fs::path& folder) {
  std::error_code ec;
  fs::remove_all(folder, ec);
  return ec ? message("cannot remove '", folder.string(), "': ", ec.message()) : std::string();
}

/// What delete_folder did: `moved` once the folder is off its name; `problem` (naming the
/// folder) if the rename or the removal failed. A leftover .del folder is retried by recovery.
struct Deletion {
  bool moved = false;
  std::string problem;
};

/// Deletes a checkpoint folder so that it is never seen half-deleted under its name: one atomic
/// rename to a hidden .del name, then the removal.
inline Deletion delete_folder(const fs::path& folder, const fs::path& output_dir, std::int64_t step,
                              const CheckpointHooks& hooks) {
  const fs::path doomed = hidden_path(output_dir, step, "del", unique_tag());
  std::error_code ec;
  fs::rename(folder, doomed, ec);
  if (ec)
    return {false, message("cannot move '", folder.string(), "' to '", doomed.string(),
                           "' to delete it: ", ec.message())};
  if (hooks.before_remove) hooks.before_remove(doomed);
  return {true, remove_folder(doomed)};
}

}  // namespace detail

/// Why `folder` is not a complete checkpoint, or nothing if it looks complete: trainer_state.json
/// present and not empty, every file of `required_files` present, and every *.safetensors file
/// with a sound header whose tensors fill the file (so not truncated). Reads no tensor data;
/// the manifest's JSON is checked when it is read (read_checkpoint, load_checkpoint).
inline std::optional<std::string> checkpoint_problem(
    const fs::path& folder, const std::vector<std::string>& required_files = {}) {
  std::error_code ec;
  const fs::file_status folder_status = fs::status(folder, ec);
  if (ec && !detail::not_found(ec))
    return message("cannot read '", folder.string(), "': ", ec.message());
  if (!fs::is_directory(folder_status)) return std::string("it is not a folder");
  auto missing = [&](const std::string& file) -> std::optional<std::string> {
    const fs::path path = folder / file;
    const fs::file_status st = fs::status(path, ec);
    if (ec && !detail::not_found(ec))
      return message("cannot read '", path.string(), "': ", ec.message());
    if (!fs::is_regular_file(st)) return message("it has no ", file);
    return std::nullopt;
  };
  if (auto problem = missing(std::string(kManifestName))) return problem;
  const std::uintmax_t manifest_size = fs::file_size(folder / kManifestName, ec);
  if (ec) return message("cannot read '", (folder / kManifestName).string(), "': ", ec.message());
  if (manifest_size == 0) return message("its ", kManifestName, " is empty");
  for (const std::string& file : required_files)
    if (auto problem = missing(file)) return problem;
  try {
    for (const fs::path& path : detail::list_folder(folder, "checkpoint_problem"))
      if (path.extension() == ".safetensors") (void)io::SafetensorsFile::open(path.string());
  } catch (const Error& e) {
    return std::string(e.what());
  }
  return std::nullopt;
}

/// Finishes or undoes what interrupted saves left in output_dir (see the top of the file),
/// reporting each through `log`:
/// - `.checkpoint-<step>.old-…` (a kill between the two renames of a replacement): renamed back
///   to checkpoint-<step> if that is missing, else deleted (it is the replaced copy);
/// - `.checkpoint-<step>.tmp-…` / `.del-…` of a process no longer running: removed.
/// Error (naming the folders) only if a checkpoint cannot be put back; a leftover that cannot be
/// removed is reported and kept.
inline void recover_checkpoints(const fs::path& output_dir, const CheckpointLog& log = {}) {
  constexpr const char* fn = "recover_checkpoints";
  std::error_code ec;
  if (!fs::is_directory(output_dir, ec)) return;
  auto say = [&](const std::string& text) {
    if (log) log(text);
  };
  std::vector<std::pair<detail::HiddenFolder, fs::path>> old;
  for (const fs::path& path : detail::list_folder(output_dir, fn)) {
    const auto hidden = detail::parse_hidden(path.filename().string());
    if (!hidden) continue;
    if (hidden->kind == "old") {
      old.emplace_back(*hidden, path);
      continue;
    }
    const char* what = hidden->kind == "tmp" ? "save" : "deletion";
    if (detail::owned_by_running_process(hidden->pid)) {
      say(message("left '", path.string(), "' alone: process ", hidden->pid,
                  " is still running (another run saving into this folder?)"));
      continue;
    }
    const std::string problem = detail::remove_folder(path);
    say(problem.empty() ? message("removed '", path.string(), "', left by an interrupted ", what)
                        : message(problem, " (left by an interrupted ", what, ")"));
  }
  // An .old folder is a complete checkpoint (folders are deleted through a .del name), whoever
  // owns it: if its owner is alive and between its two renames, putting it back only makes that
  // save fail with an error, never loses a checkpoint.
  for (const auto& [hidden, path] : old) {
    const fs::path target = checkpoint_path(output_dir, hidden.step);
    if (fs::exists(fs::symlink_status(target, ec))) {
      const std::string problem = detail::delete_folder(path, output_dir, hidden.step, {}).problem;
      say(problem.empty() ? message("removed '", path.string(), "', the replaced copy of '",
                                    target.string(), "' (a save of the same step was interrupted)")
                          : problem);
      continue;
    }
    if (const auto problem = checkpoint_problem(path)) {
      say(message("left '", path.string(), "' alone: it cannot replace the missing '",
                  target.string(), "': ", *problem));
      continue;
    }
    fs::rename(path, target, ec);
    require(!ec, fn, "cannot put '", path.string(), "' back as '", target.string(),
            "': ", ec.message());
    say(message("recovered '", target.string(), "' from '", path.string(),
                "': a save of the same step was interrupted while replacing it"));
  }
}

/// Checkpoint folders of output_dir, ascending by step (empty if output_dir does not exist),
/// after recover_checkpoints(output_dir, log).
inline std::vector<std::pair<std::int64_t, fs::path>> list_checkpoints(
    const fs::path& output_dir, const CheckpointLog& log = {}) {
  std::vector<std::pair<std::int64_t, fs::path>> out;
  std::error_code ec;
  if (!fs::is_directory(output_dir, ec)) return out;
  recover_checkpoints(output_dir, log);
  for (const fs::path& path : detail::list_folder(output_dir, "list_checkpoints")) {
    if (!fs::is_directory(path, ec)) continue;  // ec: e.g. a symlink loop, not a checkpoint
    if (auto step = checkpoint_step(path.filename().string())) out.emplace_back(*step, path);
  }
  std::sort(out.begin(), out.end());
  return out;
}

/// Removes the oldest checkpoints so that at most `keep_last` remain (keep_last >= 1). Each is
/// renamed to a hidden name before its files are removed, so none is ever listed half-deleted.
inline void prune_checkpoints(const fs::path& output_dir, std::int64_t keep_last,
                              const CheckpointLog& log = {}, const CheckpointHooks& hooks = {}) {
  require(keep_last >= 1, "prune_checkpoints", "checkpoints_total_limit is ", keep_last,
          ", expected >= 1");
  const CheckpointSaveScope saving;
  auto all = list_checkpoints(output_dir, log);
  const std::size_t keep = static_cast<std::size_t>(keep_last);
  for (std::size_t i = 0; i + keep < all.size(); ++i) {
    const detail::Deletion done =
        detail::delete_folder(all[i].second, output_dir, all[i].first, hooks);
    require(done.moved, "prune_checkpoints", done.problem);
    if (!done.problem.empty() && log) log(done.problem + " (retried on the next save)");
  }
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
/// path. An existing checkpoint-<step> is replaced only once the new one is complete. Leftovers
/// of interrupted saves are dealt with first (recover_checkpoints, reported through `log`).
inline fs::path write_checkpoint(const fs::path& output_dir, std::int64_t step,
                                 const CheckpointContents& contents,
                                 const CheckpointHooks& hooks = {}, const CheckpointLog& log = {}) {
  constexpr const char* fn = "write_checkpoint";
  const CheckpointSaveScope saving;
  require(!output_dir.empty(), fn, "output_dir is empty");
  require(step >= 0, fn, "step is ", step, ", expected >= 0");
  for (const auto& [file, tensors] : contents.tensor_files)
    require(!file.empty() && file != kManifestName && file.find('/') == std::string::npos, fn,
            "file name '", file, "' is not a plain file name other than ", kManifestName);
  std::error_code ec;
  const fs::file_status dir_status = fs::status(output_dir, ec);
  require(!fs::exists(dir_status) || fs::is_directory(dir_status), fn, "output_dir '",
          output_dir.string(), "' is not a folder");
  fs::create_directories(output_dir, ec);
  require(!ec, fn, "cannot create output_dir '", output_dir.string(), "': ", ec.message());
  // First put back a checkpoint-<step> that a killed save left aside, so that it is the one
  // replaced below rather than left behind.
  recover_checkpoints(output_dir, log);

  const std::string tag = detail::unique_tag();
  const fs::path final_path = checkpoint_path(output_dir, step);
  const fs::path temporary = detail::hidden_path(output_dir, step, "tmp", tag);
  fs::create_directory(temporary, ec);
  require(!ec, fn, "cannot create '", temporary.string(), "': ", ec.message());
  fs::path aside;  // the replaced checkpoint-<step>, once moved out of the way
  try {
    for (const auto& [file, tensors] : contents.tensor_files)
      detail::write_tensor_file(temporary / file, tensors);
    detail::write_text_file(temporary / kManifestName, contents.manifest.dump(2) + "\n");
    if (hooks.before_rename) hooks.before_rename(temporary);
    if (fs::exists(fs::symlink_status(final_path, ec))) {
      aside = detail::hidden_path(output_dir, step, "old", tag);
      fs::rename(final_path, aside, ec);
      require(!ec, fn, "cannot move '", final_path.string(), "' aside to '", aside.string(),
              "' to replace it: ", ec.message());
    }
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(temporary, ignored);
    throw;
  }
  // A kill from here to the rename below leaves the old checkpoint complete under `aside`, which
  // recovery puts back. The hook simulates that kill, so nothing is cleaned up when it throws.
  if (!aside.empty() && hooks.after_move_aside) hooks.after_move_aside(aside);
  fs::rename(temporary, final_path, ec);
  if (ec) {
    const std::string why = ec.message();
    std::error_code ignored;
    if (!aside.empty()) fs::rename(aside, final_path, ignored);  // put the old one back
    fs::remove_all(temporary, ignored);
    fail(fn, "cannot move '", temporary.string(), "' into place as '", final_path.string(),
         "': ", why);
  }
  if (!aside.empty()) {  // the new checkpoint is in place: a failure here only leaves garbage
    const std::string problem = detail::delete_folder(aside, output_dir, step, hooks).problem;
    if (!problem.empty() && log) log(problem + " (retried on the next save)");
  }
  return final_path;
}

/// write_checkpoint with only the before_rename hook (the earlier signature).
inline fs::path write_checkpoint(const fs::path& output_dir, std::int64_t step,
                                 const CheckpointContents& contents,
                                 const CheckpointHook& before_rename) {
  CheckpointHooks hooks;
  hooks.before_rename = before_rename;
  return write_checkpoint(output_dir, step, contents, hooks);
}

namespace detail {

/// The newest checkpoint of output_dir for which `problem(folder)` returns nothing. Reports each
/// newer one skipped (with its problem) and the one taken through `log`; Error naming output_dir
/// and every problem if none is usable.
template <class Problem>
fs::path take_latest(const fs::path& output_dir, const CheckpointLog& log,
                     std::string_view function, Problem&& problem) {
  const auto all = list_checkpoints(output_dir, log);
  require(!all.empty(), function, "no checkpoint-<step> folder in '", output_dir.string(),
          "' to resume from");
  std::string skipped;
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    const std::optional<std::string> why = problem(it->second);
    if (!why) {
      if (log)
        log(message("latest checkpoint: '", it->second.string(), "' (step ", it->first, ")",
                    skipped.empty() ? "" : ", the newest complete one"));
      return it->second;
    }
    if (log) log(message("latest checkpoint: skipped '", it->second.string(), "': ", *why));
    skipped += message(skipped.empty() ? "" : "; ", "'", it->second.string(), "': ", *why);
  }
  fail(function, "no complete checkpoint in '", output_dir.string(), "' to resume from (", skipped,
       ")");
}

}  // namespace detail

/// The checkpoint folder for `dir_or_latest`: "latest" is the highest-step checkpoint in
/// output_dir that looks complete (checkpoint_problem), reporting through `log` the ones skipped
/// and the one taken (Error if none); anything else is a path to a checkpoint folder.
inline fs::path resolve_checkpoint(const fs::path& output_dir, const std::string& dir_or_latest,
                                   const CheckpointLog& log = {}) {
  constexpr const char* fn = "resolve_checkpoint";
  if (dir_or_latest == "latest")
    return detail::take_latest(output_dir, log, fn,
                               [](const fs::path& folder) { return checkpoint_problem(folder); });
  std::error_code ec;
  const bool folder = fs::is_directory(dir_or_latest, ec);
  require(!ec || detail::not_found(ec), fn, "cannot read '", dir_or_latest, "': ", ec.message());
  require(folder, fn, "'", dir_or_latest,
          "' is not a checkpoint folder (expected a folder or \"latest\")");
  return dir_or_latest;
}

/// Reads every *.safetensors file and the manifest of a checkpoint folder.
inline CheckpointContents read_checkpoint(const fs::path& folder) {
  constexpr const char* fn = "read_checkpoint";
  const fs::path manifest_path = folder / kManifestName;
  std::error_code ec;
  const fs::file_status manifest_status = fs::status(manifest_path, ec);
  require(!ec || detail::not_found(ec), fn, "cannot read '", manifest_path.string(),
          "': ", ec.message());
  require(fs::is_regular_file(manifest_status), fn, "'", folder.string(), "' has no ",
          kManifestName);
  CheckpointContents contents;
  contents.manifest = io::read_json_file(fn, manifest_path.string());
  require(contents.manifest.is_object(), fn, "'", manifest_path.string(), "' holds no JSON object");
  for (const fs::path& path : detail::list_folder(folder, fn))
    if (path.extension() == ".safetensors" && fs::is_regular_file(path, ec))
      contents.tensor_files.emplace(path.filename().string(), detail::read_tensor_file(path));
  return contents;
}

/// A checkpoint read from disk and the folder it came from.
struct LoadedCheckpoint {
  fs::path folder;
  CheckpointContents contents;
};

/// Resolves and reads `dir_or_latest`. "latest": the newest checkpoint in output_dir that is
/// complete (checkpoint_problem with `required_files`) and reads without error (valid JSON, sound
/// tensor files); newer ones are skipped, and each one skipped (with why) and the one taken are
/// reported through `log`. Error if none qualifies. A folder path must qualify itself.
inline LoadedCheckpoint load_checkpoint(const fs::path& output_dir,
                                        const std::string& dir_or_latest,
                                        const std::vector<std::string>& required_files = {},
                                        const CheckpointLog& log = {}) {
  constexpr const char* fn = "load_checkpoint";
  LoadedCheckpoint loaded;
  auto problem = [&](const fs::path& folder) -> std::optional<std::string> {
    if (auto why = checkpoint_problem(folder, required_files)) return why;
    try {
      loaded.contents = read_checkpoint(folder);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::nullopt;
  };
  if (dir_or_latest == "latest") {
    loaded.folder = detail::take_latest(output_dir, log, fn, problem);
    return loaded;
  }
  loaded.folder = resolve_checkpoint(output_dir, dir_or_latest);
  const auto why = problem(loaded.folder);
  require(!why, fn, "'", loaded.folder.string(),
          "' is not a complete checkpoint: ", why.value_or(""));
  return loaded;
}

}  // namespace difftrain::train
