// Kill safety of `difftrain train` (issue #19): the real command, run as a child process on the
// shapes demo's tiny model with a checkpoint every step and --checkpoints_total_limit 2 (so every
// step also prunes), is SIGKILLed at random moments, then resumed with
// --resume_from_checkpoint latest, again and again. Kill moments (seeded): a random time of the
// run; 0-1 ms after a hidden .checkpoint-* folder of a save (.tmp) or a pruning (.del) appears; a
// Ctrl-C (whose handler saves the current step's checkpoint again, a replacement, then the LoRA)
// followed 0-10 ms later by the kill, or 0-0.5 ms after the replaced checkpoint is moved aside
// (.old). After every stop:
// - every checkpoint-<step> folder is complete: its tensors and trainer_state.json are bit for
//   bit those of an uninterrupted run's checkpoint of that step (the trainer is deterministic);
// - no complete checkpoint was lost: each one seen before still exists (or waits, complete,
//   under the hidden .old name that the next listing renames back), unless pruning removed it,
//   i.e. at least --checkpoints_total_limit newer ones exist;
// - the next run starts from the newest complete checkpoint ("N steps from step S" in its log);
// and a run that finishes writes the LoRA of the uninterrupted run, bit for bit, leaving the last
// two checkpoints and no hidden leftovers.
//
// DIFFTRAIN_CLI: the `difftrain` executable (tests/train_cli/CMakeLists.txt).
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "difftrain/io/safetensors.hpp"
#include "difftrain/pipeline/model_folder.hpp"
#include "image_io.hpp"
#include "shapes_pipeline.hpp"
#include "support/temp_dir.hpp"

extern char** environ;

namespace kill_safety {

namespace fs = std::filesystem;
using namespace difftrain;
using Clock = std::chrono::steady_clock;
using std::chrono::microseconds;

constexpr int kMaxSteps = 10;
constexpr int kTotalLimit = 2;  // --checkpoints_total_limit
constexpr int kTargetKills = 100;
constexpr double kKillBudgetSeconds = 30;  // the kill phase stops at this, if earlier

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// The tiny model folder and 6 captioned 8×8 PNGs (as tests/train_cli/test_cmd_train.cpp).
struct Fixture {
  test::TempDir dir{"kill_safety"};
  std::string model, data;

  Fixture() {
    shapes::ModelSizes sizes;
    sizes.image_size = 8;
    sizes.block_out_channels = {16, 16};
    sizes.text_hidden_size = 16;
    sizes.text_layers = 1;
    auto m = shapes::make_models(sizes, fs::path(dir.str()) / "tok", 7);
    model = dir / "model";
    pipeline::save_model_folder(
        model, pipeline::ModelFolderParts<models::UNet2DConditionModel<float>,
                                          models::ClipTextModel<float>>{
                   m.unet, m.unet_config, m.text.model(), m.text_config, m.tokenizer_dir,
                   shapes::scheduler_config_json(PredictionType::epsilon)});
    const auto specs = shapes::base_specs();
    const Tensor4<float> images = shapes::draw_batch(specs, 8, RandomStream{3, 0});
    data = dir / "data";
    fs::create_directories(data);
    for (std::size_t i = 0; i < 6; ++i) {
      const Tensor3<float> image = xt::view(images, i);
      const std::string stem = "img" + std::to_string(i);
      tools::save_png(data + "/" + stem + ".png", tools::tensor_to_image(image));
      std::ofstream(data + "/" + stem + ".txt") << shapes::caption(specs[i]) << "\n";
    }
  }

  // The command line of a run in `out` (with --checkpoints_total_limit total_limit) that
  // resumes from its newest checkpoint, if any.
  std::vector<std::string> args(const std::string& out, int total_limit) const {
    const std::vector<std::pair<std::string, std::string>> flags = {
        {"--pretrained_model_name_or_path", model},
        {"--train_data_dir", data},
        {"--output_dir", out},
        {"--resolution", "8"},
        {"--train_batch_size", "2"},
        {"--max_train_steps", std::to_string(kMaxSteps)},
        {"--checkpointing_steps", "1"},
        {"--checkpoints_total_limit", std::to_string(total_limit)},
        {"--resume_from_checkpoint", "latest"},
        {"--lr_warmup_steps", "0"},
        {"--learning_rate", "1e-3"},
        {"--seed", "11"},
        {"--threads", "1"}};
    std::vector<std::string> a = {DIFFTRAIN_CLI, "train", "--plain_log"};
    for (const auto& [flag, value] : flags) a.insert(a.end(), {flag, value});
    return a;
  }
};

// --- Child processes ---------------------------------------------------------------------------

// Starts args[0] with stdout and stderr to `log` and stdin from /dev/null.
pid_t spawn(const std::vector<std::string>& args, const fs::path& log) {
  posix_spawn_file_actions_t actions;
  REQUIRE(::posix_spawn_file_actions_init(&actions) == 0);
  ::posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  ::posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
  ::posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = -1;
  const int rc = ::posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  ::posix_spawn_file_actions_destroy(&actions);
  INFO("posix_spawn " << args[0] << ": " << std::strerror(rc));
  REQUIRE(rc == 0);
  return pid;
}

// Whether the child has ended (reaping it into `status`).
bool ended(pid_t pid, int& status) {
  const pid_t r = ::waitpid(pid, &status, WNOHANG);
  REQUIRE(r >= 0);
  return r == pid;
}

// Waits until `deadline` or the child's end; true if it ended.
bool wait_until(pid_t pid, Clock::time_point deadline, int& status) {
  while (Clock::now() < deadline) {
    if (ended(pid, status)) return true;
    std::this_thread::sleep_for(microseconds(200));
  }
  return ended(pid, status);
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// --- Checkpoints on disk -----------------------------------------------------------------------

// Every tensor of a safetensors file (as float; the names of the others, with no values).
using Tensors = std::map<std::string, std::vector<float>>;

Tensors read_tensors(const fs::path& path) {
  Tensors out;
  const auto file = io::SafetensorsFile::open(path.string());
  for (const auto& name : file.names())
    out[name] =
        file.info(name).dtype == io::Dtype::F32 ? file.read<float>(name) : std::vector<float>{};
  return out;
}

// A checkpoint folder's files: tensors of each *.safetensors, the parsed trainer_state.json.
struct Checkpoint {
  std::map<std::string, Tensors> tensor_files;
  nlohmann::json manifest;
  std::set<std::string> files;
  bool operator==(const Checkpoint&) const = default;
};

// The folder read completely, or why it cannot be (a missing or damaged file).
std::optional<Checkpoint> read_checkpoint_folder(const fs::path& folder, std::string& problem) {
  Checkpoint c;
  try {
    for (const auto& e : fs::directory_iterator(folder)) {
      const std::string name = e.path().filename().string();
      c.files.insert(name);
      if (e.path().extension() == ".safetensors") c.tensor_files[name] = read_tensors(e.path());
    }
    const fs::path manifest = folder / "trainer_state.json";
    if (!fs::exists(manifest)) {
      problem = "no trainer_state.json";
      return std::nullopt;
    }
    c.manifest = nlohmann::json::parse(read_text(manifest));
  } catch (const std::exception& e) {
    problem = e.what();
    return std::nullopt;
  }
  return c;
}

struct Folders {
  std::map<std::int64_t, fs::path> visible;  // checkpoint-<step>
  std::map<std::int64_t, fs::path> old;      // .checkpoint-<step>.old-…: put back by recovery
  std::vector<std::string> hidden;           // every .checkpoint-… entry
};

Folders list_folders(const fs::path& out) {
  Folders f;
  if (!fs::exists(out)) return f;
  static const std::regex visible(R"(checkpoint-(\d+))"), old(R"(\.checkpoint-(\d+)\.old-.*)");
  for (const auto& e : fs::directory_iterator(out)) {
    const std::string name = e.path().filename().string();
    std::smatch m;
    if (std::regex_match(name, m, visible)) f.visible[std::stoll(m[1])] = e.path();
    if (name.starts_with(".checkpoint-")) f.hidden.push_back(name);
    if (std::regex_match(name, m, old)) f.old[std::stoll(m[1])] = e.path();
  }
  return f;
}

// Whether output_dir holds a hidden .checkpoint-<step>.<kind>-… folder (kind "tmp": a save
// under way, "del": a deletion, "old": a replacement between its two renames).
bool has_hidden_entry(const fs::path& out, const std::string& kind) {
  std::error_code ec;
  for (fs::directory_iterator it(out, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.starts_with(".checkpoint-") && name.find("." + kind + "-") != std::string::npos)
      return true;
  }
  return false;
}

// The LoRA's tensors.
Tensors read_lora(const fs::path& out) {
  return read_tensors(out / "pytorch_lora_weights.safetensors");
}

// "... N steps from step S": the step the run started from, if it got that far.
std::optional<std::int64_t> started_from(const std::string& log) {
  static const std::regex re(R"(steps from step (\d+))");
  std::smatch m;
  if (!std::regex_search(log, m, re)) return std::nullopt;
  return std::stoll(m[1]);
}

}  // namespace kill_safety

using namespace kill_safety;

TEST_CASE("difftrain train SIGKILLed at random moments loses no checkpoint and resumes exactly") {
  const auto test_start = Clock::now();
  Fixture f;
  const fs::path logs = f.dir / "logs";
  fs::create_directories(logs);

  // The uninterrupted run, every checkpoint kept: the reference of every checkpoint and the LoRA.
  const fs::path reference_out = f.dir / "reference";
  const auto reference_start = Clock::now();
  {
    int status = 0;
    const pid_t pid = spawn(f.args(reference_out.string(), 0), logs / "reference.log");
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    INFO(read_text(logs / "reference.log"));
    REQUIRE(WIFEXITED(status));
    REQUIRE(WEXITSTATUS(status) == 0);
  }
  const double run_seconds = seconds_since(reference_start);
  std::map<std::int64_t, Checkpoint> reference;
  for (std::int64_t step = 1; step <= kMaxSteps; ++step) {
    std::string problem;
    auto c =
        read_checkpoint_folder(reference_out / ("checkpoint-" + std::to_string(step)), problem);
    INFO("reference checkpoint " << step << ": " << problem);
    REQUIRE(c);
    REQUIRE(c->manifest.at("global_step") == step);
    REQUIRE(c->files.count("model.safetensors") == 1);
    REQUIRE(c->files.count("optimizer.safetensors") == 1);
    reference[step] = *c;
  }
  const Tensors reference_lora = read_lora(reference_out);
  REQUIRE(!reference_lora.empty());

  // The kill moments' seed; DIFFTRAIN_KILL_SAFETY_SEED sets another (timings vary anyway).
  const char* seed_text = std::getenv("DIFFTRAIN_KILL_SAFETY_SEED");
  const std::uint64_t seed = seed_text ? std::stoull(seed_text) : 19;
  std::mt19937_64 rng(seed);
  auto uniform = [&](double a, double b) { return std::uniform_real_distribution<>(a, b)(rng); };
  const auto delay = [](double seconds) {
    return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  };

  int kills = 0, interrupts = 0, finished_rounds = 0, trials = 0, over_limit_at_end = 0;
  std::map<std::string, int> kills_by_mode;
  std::map<std::string, int> hidden_seen_after_kill;  // kind of leftover → count
  int round = 0;
  fs::path out;
  std::set<std::int64_t> known;  // complete checkpoints seen so far in this round
  auto new_round = [&] {
    ++round;
    out = f.dir / ("run" + std::to_string(round));
    known.clear();
  };
  new_round();
  const auto kill_phase_start = Clock::now();

  // Checks the output folder after a run stopped; returns the step "latest" must resume from.
  auto check_folder = [&](const std::string& context, bool after_kill) -> std::int64_t {
    INFO(context);
    const Folders now = list_folders(out);
    std::map<std::int64_t, fs::path> complete = now.visible;
    for (const auto& [step, path] : now.visible) {
      std::string problem;
      const auto c = read_checkpoint_folder(path, problem);
      INFO("'" << path.string() << "' is not complete: " << problem);
      REQUIRE(c);
      INFO("'" << path.string() << "' differs from the uninterrupted run's checkpoint");
      REQUIRE(reference.count(step) == 1);
      REQUIRE(*c == reference.at(step));
    }
    // A replaced checkpoint moved aside: complete, and recovery renames it back.
    for (const auto& [step, path] : now.old)
      if (!now.visible.count(step)) {
        std::string problem;
        const auto c = read_checkpoint_folder(path, problem);
        INFO("'" << path.string() << "', the only copy of checkpoint " << step
                 << ", is not complete: " << problem);
        REQUIRE(c);
        REQUIRE(*c == reference.at(step));
        complete[step] = path;
      }
    for (std::int64_t step : known)
      if (!complete.count(step)) {
        std::int64_t newer = 0;
        for (const auto& [s, p] : complete) newer += s > step;
        INFO("checkpoint " << step << " was lost: only " << newer << " newer ones exist");
        REQUIRE(newer >= kTotalLimit);
      }
    known.clear();
    for (const auto& [step, p] : complete) known.insert(step);
    if (after_kill)
      for (const std::string& name : now.hidden)
        hidden_seen_after_kill[name.substr(name.find('.', 1) + 1, 3)]++;
    return complete.empty() ? 0 : complete.rbegin()->first;
  };

  // One run of the trainer in `out`, stopped as `mode` says unless `kill` is false.
  auto trial = [&](bool kill) {
    ++trials;
    const std::int64_t expected_start =
        check_folder("before trial " + std::to_string(trials), false);
    const fs::path log = logs / ("trial" + std::to_string(trials) + ".log");
    const int mode = kill ? int(rng() % 3) : -1;
    const char* mode_name[] = {"random time", "hidden folder seen", "Ctrl-C then kill"};
    const auto start = Clock::now();
    const pid_t pid = spawn(f.args(out.string(), kTotalLimit), log);
    int status = 0;
    bool done = false;
    // Polls the output folder until a hidden folder of `kind` appears, the child ends or a run's
    // time passes; true if the child ended.
    auto wait_for_hidden = [&](const std::string& kind) {
      const auto give_up = Clock::now() + delay(run_seconds);
      while (!has_hidden_entry(out, kind) && Clock::now() < give_up) {
        if (ended(pid, status)) return true;
        std::this_thread::sleep_for(microseconds(20));
      }
      return false;
    };
    if (mode == 0) {
      done = wait_until(pid, start + delay(uniform(0, run_seconds)), status);
    } else if (mode == 1) {  // a save ("tmp") or a pruning ("del") under way
      done = wait_until(pid, start + delay(uniform(0, 0.8 * run_seconds)), status);
      if (!done) done = wait_for_hidden(rng() % 2 ? "tmp" : "del");
      if (!done) done = wait_until(pid, Clock::now() + delay(uniform(0, 0.001)), status);
    } else if (mode == 2) {  // Ctrl-C: the step's checkpoint saved again (a replacement)
      done = wait_until(pid, start + delay(uniform(0.3, 1.0) * run_seconds), status);
      if (!done) {
        ::kill(pid, SIGINT);
        if (rng() % 2) {
          done = wait_for_hidden("old");
          if (!done) done = wait_until(pid, Clock::now() + delay(uniform(0, 0.0005)), status);
        } else {
          done = wait_until(pid, Clock::now() + delay(uniform(0, 0.01)), status);
        }
      }
    }
    if (mode >= 0 && !done) ::kill(pid, SIGKILL);
    if (!done) REQUIRE(::waitpid(pid, &status, 0) == pid);
    const std::string text = read_text(log);
    INFO("trial " << trials << " (" << (mode >= 0 ? mode_name[mode] : "to the end") << ") in '"
                  << out.string() << "', log:\n"
                  << text);
    // The run started from the newest complete checkpoint, if it got as far as saying so.
    if (const auto from = started_from(text)) {
      REQUIRE(*from == expected_start);
      if (expected_start > 0)
        REQUIRE(text.find("latest checkpoint: '" +
                          (out / ("checkpoint-" + std::to_string(expected_start))).string() +
                          "' (step " + std::to_string(expected_start) + ")") != std::string::npos);
    }
    if (WIFSIGNALED(status)) {
      // SIGKILL, or SIGINT before the handler was installed (early in the start-up).
      REQUIRE((WTERMSIG(status) == SIGKILL || (mode == 2 && WTERMSIG(status) == SIGINT)));
      if (WTERMSIG(status) == SIGKILL) {
        ++kills;
        kills_by_mode[mode_name[mode]]++;
      }
      check_folder("after trial " + std::to_string(trials), true);
      return;
    }
    REQUIRE(WIFEXITED(status));
    if (WEXITSTATUS(status) == 130) {  // Ctrl-C: the checkpoint and the LoRA saved
      ++interrupts;
      check_folder("after trial " + std::to_string(trials), false);
      return;
    }
    REQUIRE(WEXITSTATUS(status) == 0);
    // Finished: the uninterrupted run's LoRA, the last two checkpoints, no leftovers.
    check_folder("after trial " + std::to_string(trials), false);
    const Folders now = list_folders(out);
    REQUIRE(now.hidden.empty());
    REQUIRE(now.visible.count(kMaxSteps - 1) == 1);
    REQUIRE(now.visible.count(kMaxSteps) == 1);
    // Pruning follows a save: a kill between the save of the last step and its pruning leaves
    // one checkpoint more than the limit, which a resumed run (no step left, so no save) keeps.
    REQUIRE(now.visible.size() <= std::size_t(kTotalLimit + 1));
    if (now.visible.size() > std::size_t(kTotalLimit)) ++over_limit_at_end;
    REQUIRE(read_lora(out) == reference_lora);
    ++finished_rounds;
    new_round();
  };

  while (kills < kTargetKills && seconds_since(kill_phase_start) < kKillBudgetSeconds) trial(true);
  // The round under way runs to its end; it must finish like the uninterrupted run.
  const int round_before = round;
  trial(false);
  REQUIRE(round == round_before + 1);

  std::ostringstream summary;
  summary << "kill safety (seed " << seed << "): " << kills << " SIGKILLs (";
  for (const auto& [mode, n] : kills_by_mode) summary << mode << ": " << n << ", ";
  summary << interrupts << " runs ended by Ctrl-C) in " << trials << " runs, " << finished_rounds
          << " resumed to the end with the uninterrupted LoRA (" << over_limit_at_end
          << " with a checkpoint over the limit); hidden folders left by kills:";
  for (const auto& [kind, n] : hidden_seen_after_kill) summary << " " << kind << " " << n;
  summary << "; one uninterrupted run " << run_seconds << " s, test " << seconds_since(test_start)
          << " s";
  std::printf("%s\n", summary.str().c_str());
  // A slow machine (or a sanitizer build of the command) gets fewer kills in the time budget.
  CHECK(kills >= 10);
}
