// Checkpoints that survive kills (issue #19 items 2 and 9): replacing a checkpoint of the same
// step, leftovers of interrupted saves and deletions, "latest" skipping incomplete checkpoints,
// errors naming the file, real SIGKILLs, and a second Ctrl-C during a save.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "../../tools/progress.hpp"
#include "difftrain/train/checkpoint.hpp"
#include "support/temp_dir.hpp"

using namespace difftrain;
using namespace difftrain::train;
namespace fs = std::filesystem;

namespace checkpoint_recovery {

// Every file holds `value`, so a mix of two saves is detectable.
CheckpointContents filled(float value, std::int64_t step) {
  CheckpointContents c;
  c.tensor_files["model.safetensors"]["layer.weight"] = xt::xarray<float>({{value, 2.0f}});
  c.tensor_files["optimizer.safetensors"]["layer.weight.exp_avg"] = xt::xarray<float>({value});
  c.manifest = {{"global_step", step}, {"value", value}};
  return c;
}

// The value of a checkpoint whose files all come from one save (else a failed REQUIRE).
float value_of(const fs::path& folder, std::int64_t step) {
  const CheckpointContents c = read_checkpoint(folder);
  REQUIRE(c.manifest.at("global_step") == step);
  const float value = c.manifest.at("value").get<float>();
  REQUIRE(c.tensor_files.at("model.safetensors").at("layer.weight")(0, 0) == value);
  REQUIRE(c.tensor_files.at("optimizer.safetensors").at("layer.weight.exp_avg")(0) == value);
  return value;
}

std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

struct Lines {
  std::vector<std::string> lines;
  CheckpointLog log() {
    return [this](const std::string& line) { lines.push_back(line); };
  }
  bool has(const std::string& a, const std::string& b = "") const {
    return std::any_of(lines.begin(), lines.end(), [&](const std::string& l) {
      return l.find(a) != std::string::npos && l.find(b) != std::string::npos;
    });
  }
};

// A pid no process has: a child that has exited and been reaped.
long dead_pid() {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  int status = 0;
  ::waitpid(child, &status, 0);
  return long(child);
}

}  // namespace checkpoint_recovery

using namespace checkpoint_recovery;

TEST_CASE("a kill between the two renames of a replacement loses no checkpoint") {
  test::TempDir dir("ckpt_recovery_swap");
  const fs::path five = checkpoint_path(dir.path(), 5);
  write_checkpoint(dir.path(), 5, filled(1.0f, 5));
  CheckpointHooks kill_between;
  fs::path aside;
  kill_between.after_move_aside = [&](const fs::path& old) {
    aside = old;
    REQUIRE(!fs::exists(five));  // the window: the old one is moved away, the new one not in
    throw Error("killed");
  };

  SECTION("listing puts the old one back and removes the temporary folder") {
    REQUIRE_THROWS_WITH(write_checkpoint(dir.path(), 5, filled(2.0f, 5), kill_between),
                        Catch::Contains("killed"));
    REQUIRE(fs::exists(aside));
    Lines out;
    const auto all = list_checkpoints(dir.path(), out.log());
    REQUIRE(all.size() == 1);
    REQUIRE(all[0].second == five);
    REQUIRE(value_of(five, 5) == 1.0f);  // the old contents (complete), never nothing
    REQUIRE(entries(dir.path()) == std::vector<std::string>{"checkpoint-5"});
    REQUIRE(out.has("recovered '" + five.string() + "'", aside.string()));
    REQUIRE(out.has("removed '", ".checkpoint-5.tmp-"));
  }
  SECTION("\"latest\" recovers it too") {
    REQUIRE_THROWS(write_checkpoint(dir.path(), 5, filled(2.0f, 5), kill_between));
    Lines out;
    REQUIRE(resolve_checkpoint(dir.path(), "latest", out.log()) == five);
    REQUIRE(out.has("latest checkpoint: '" + five.string() + "' (step 5)"));
    REQUIRE(value_of(five, 5) == 1.0f);
  }
  SECTION("the next save of the same step recovers it, then replaces it") {
    REQUIRE_THROWS(write_checkpoint(dir.path(), 5, filled(2.0f, 5), kill_between));
    write_checkpoint(dir.path(), 5, filled(3.0f, 5));
    REQUIRE(value_of(five, 5) == 3.0f);
    REQUIRE(entries(dir.path()) == std::vector<std::string>{"checkpoint-5"});
  }
  SECTION("a kill while the replaced copy is deleted leaves the new one") {
    CheckpointHooks kill_deleting;
    kill_deleting.before_remove = [&](const fs::path& doomed) {
      REQUIRE(doomed.filename().string().starts_with(".checkpoint-5.del-"));
      fs::remove(doomed / "model.safetensors");  // half-deleted
      throw Error("killed");
    };
    REQUIRE_THROWS(write_checkpoint(dir.path(), 5, filled(2.0f, 5), kill_deleting));
    REQUIRE(list_checkpoints(dir.path()).size() == 1);
    REQUIRE(value_of(five, 5) == 2.0f);
    REQUIRE(entries(dir.path()) == std::vector<std::string>{"checkpoint-5"});
  }
  SECTION("an .old copy next to an existing checkpoint is the replaced one: deleted") {
    fs::copy(five, dir.path() / ".checkpoint-5.old-1.7");
    Lines out;
    REQUIRE(list_checkpoints(dir.path(), out.log()).size() == 1);
    REQUIRE(entries(dir.path()) == std::vector<std::string>{"checkpoint-5"});
    REQUIRE(out.has("the replaced copy of '" + five.string() + "'"));
  }
}

TEST_CASE("leftover temporary and deletion folders are removed unless their process runs") {
  test::TempDir dir("ckpt_recovery_leftovers");
  const long dead = dead_pid();
  const std::string ours = std::to_string(::getpid());
  for (const std::string& name : std::vector<std::string>{
           ".checkpoint-7.tmp-" + std::to_string(dead) + ".0", ".checkpoint-3.tmp-" + ours + ".99",
           ".checkpoint-2.del-" + std::to_string(dead) + ".4", ".checkpoint-9.tmp-garbled"}) {
    fs::create_directories(dir.path() / name);
    std::ofstream(dir.path() / name / "model.safetensors") << "partial";
  }
  // pid 1 always runs: a save in progress in another process is left alone, and reported.
  fs::create_directories(dir.path() / ".checkpoint-8.tmp-1.0");
  Lines out;
  write_checkpoint(dir.path(), 10, filled(1.0f, 10), CheckpointHooks{}, out.log());
  REQUIRE(entries(dir.path()) ==
          std::vector<std::string>{".checkpoint-8.tmp-1.0", "checkpoint-10"});
  REQUIRE(out.has("removed '", ".checkpoint-7.tmp-"));
  REQUIRE(out.has("removed '", ".checkpoint-2.del-"));
  REQUIRE(out.has("left '", ".checkpoint-8.tmp-1.0' alone: process 1 is still running"));
  REQUIRE(list_checkpoints(dir.path()).size() == 1);
}

TEST_CASE("a pruned checkpoint is never listed half-deleted") {
  test::TempDir dir("ckpt_recovery_prune");
  for (std::int64_t s : {2, 4, 6}) write_checkpoint(dir.path(), s, filled(float(s), s));
  CheckpointHooks kill_deleting;
  kill_deleting.before_remove = [&](const fs::path& doomed) {
    REQUIRE(!fs::exists(checkpoint_path(dir.path(), 2)));  // renamed away before any removal
    fs::remove(doomed / std::string(kManifestName));       // half-deleted
    throw Error("killed");
  };
  REQUIRE_THROWS_WITH(prune_checkpoints(dir.path(), 1, {}, kill_deleting),
                      Catch::Contains("killed"));
  auto all = list_checkpoints(dir.path());
  REQUIRE(all.size() == 2);
  REQUIRE(all[0].first == 4);
  REQUIRE(all[1].first == 6);
  REQUIRE(entries(dir.path()) == std::vector<std::string>{"checkpoint-4", "checkpoint-6"});
  prune_checkpoints(dir.path(), 1);
  REQUIRE(entries(dir.path()) == std::vector<std::string>{"checkpoint-6"});
}

TEST_CASE("\"latest\" skips incomplete or damaged newer checkpoints and says so") {
  test::TempDir dir("ckpt_recovery_latest");
  for (std::int64_t s : {3, 6, 9, 12}) write_checkpoint(dir.path(), s, filled(float(s), s));
  auto ckpt = [&](std::int64_t s) { return checkpoint_path(dir.path(), s); };
  fs::remove(ckpt(12) / std::string(kManifestName));  // e.g. half-deleted by an older version
  fs::resize_file(ckpt(9) / "model.safetensors", fs::file_size(ckpt(9) / "model.safetensors") - 4);
  std::ofstream(ckpt(6) / std::string(kManifestName), std::ios::trunc) << "{\"global_step\": 6,";

  Lines out;
  REQUIRE(resolve_checkpoint(dir.path(), "latest", out.log()) == ckpt(6));  // no JSON parsed
  REQUIRE(out.has("skipped '" + ckpt(12).string() + "': it has no trainer_state.json"));
  REQUIRE(out.has("skipped '" + ckpt(9).string() + "'", "model.safetensors"));

  Lines loaded_out;
  const LoadedCheckpoint loaded = load_checkpoint(dir.path(), "latest", {}, loaded_out.log());
  REQUIRE(loaded.folder == ckpt(3));
  REQUIRE(loaded.contents.manifest.at("value") == 3.0f);
  REQUIRE(loaded_out.has("skipped '" + ckpt(6).string() + "'", "is not valid JSON"));
  REQUIRE(loaded_out.has("latest checkpoint: '" + ckpt(3).string() +
                         "' (step 3), the newest complete one"));
  // None complete: the error lists why each was skipped.
  REQUIRE_THROWS_WITH(load_checkpoint(dir.path(), "latest", {"ema.safetensors"}),
                      Catch::Contains("no complete checkpoint in '" + dir.path().string()) &&
                          Catch::Contains("'" + ckpt(3).string() + "': it has no ema.safetensors"));
  // A folder named explicitly must be complete itself.
  REQUIRE_THROWS_WITH(load_checkpoint(dir.path(), ckpt(12).string()),
                      Catch::Contains("'" + ckpt(12).string() + "' is not a complete checkpoint"));
}

TEST_CASE("checkpoint errors are difftrain::Error naming the file") {
  test::TempDir dir("ckpt_recovery_errors");
  const fs::path file = dir.path() / "not_a_folder";
  std::ofstream(file) << "x";
  REQUIRE_THROWS_WITH(write_checkpoint(file, 1, filled(1.0f, 1)),
                      Catch::Contains("output_dir '" + file.string() + "' is not a folder"));
  // Errors std::filesystem would throw as filesystem_error.
  const std::string long_name = (dir.path() / std::string(300, 'n')).string();
  REQUIRE_THROWS_AS(resolve_checkpoint(dir.path(), long_name), Error);
  REQUIRE_THROWS_WITH(resolve_checkpoint(dir.path(), long_name),
                      Catch::Contains("cannot read '" + long_name + "'"));
  fs::create_directories(dir.path() / "checkpoint-1");
  const fs::path loop = dir.path() / "checkpoint-1" / std::string(kManifestName);
  fs::create_symlink(loop, loop);
  REQUIRE_THROWS_AS(read_checkpoint(dir.path() / "checkpoint-1"), Error);
  REQUIRE_THROWS_WITH(read_checkpoint(dir.path() / "checkpoint-1"),
                      Catch::Contains("cannot read '" + loop.string() + "'"));
  REQUIRE(checkpoint_problem(dir.path() / "checkpoint-1")->find(loop.string()) !=
          std::string::npos);
  fs::create_symlink(dir.path() / "checkpoint-7", dir.path() / "checkpoint-7");
  const auto all = list_checkpoints(dir.path());  // a symlink loop is not a checkpoint folder
  REQUIRE(all.size() == 1);
  REQUIRE(all[0].first == 1);
}

TEST_CASE("SIGKILL at random moments of repeated saves never loses checkpoint-5") {
  // A child saves step 5 over and over (each save a replacement) and a step 4 that it prunes;
  // it is killed after 0-20 ms. Afterwards listing must find a complete checkpoint-5 (the old or
  // the new one, every file from the same save) and nothing else left over.
  test::TempDir dir("ckpt_recovery_kill");
  write_checkpoint(dir.path(), 5, filled(0.0f, 5));
  std::mt19937 rng(19);
  std::uniform_int_distribution<int> delay_us(0, 20000);
  for (int trial = 0; trial < 20; ++trial) {
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      try {
        for (int i = 1;; ++i) {
          write_checkpoint(dir.path(), 5, filled(float(trial * 100000 + i), 5));
          write_checkpoint(dir.path(), 4, filled(float(i), 4));
          prune_checkpoints(dir.path(), 1);
        }
      } catch (...) {
        ::_exit(3);
      }
    }
    ::usleep(useconds_t(delay_us(rng)));
    ::kill(child, SIGKILL);
    int status = 0;
    REQUIRE(::waitpid(child, &status, 0) == child);
    REQUIRE(WIFSIGNALED(status));  // killed while saving, not failed
    const auto all = list_checkpoints(dir.path());
    REQUIRE(!all.empty());
    REQUIRE(all.back().first == 5);
    for (const auto& [step, path] : all) value_of(path, step);
    for (const std::string& name : entries(dir.path())) REQUIRE(name[0] != '.');
  }
}

TEST_CASE("InterruptGuard ignores a second Ctrl-C while a checkpoint is saved, else kills") {
  int pipe_fds[2];
  REQUIRE(::pipe(pipe_fds) == 0);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::close(pipe_fds[0]);
    ::dup2(pipe_fds[1], STDERR_FILENO);
    tools::InterruptGuard guard;
    std::raise(SIGINT);  // the first: only the flag
    if (!guard.interrupted()) ::_exit(10);
    {
      const CheckpointSaveScope saving;
      std::raise(SIGINT);  // ignored, with a message
      std::raise(SIGINT);
      constexpr char survived[] = "survived\n";
      [[maybe_unused]] const ssize_t n = ::write(STDERR_FILENO, survived, sizeof survived - 1);
    }
    std::raise(SIGINT);  // no save running: the default action
    ::_exit(11);
  }
  ::close(pipe_fds[1]);
  std::string text;
  char buffer[256];
  for (ssize_t n; (n = ::read(pipe_fds[0], buffer, sizeof buffer)) > 0;)
    text.append(buffer, std::size_t(n));
  ::close(pipe_fds[0]);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  INFO(text);
  REQUIRE(text.find("second interrupt ignored while a checkpoint is being saved") !=
          std::string::npos);
  REQUIRE(text.find("survived") != std::string::npos);
  REQUIRE(WIFSIGNALED(status));
  REQUIRE(WTERMSIG(status) == SIGINT);
}
