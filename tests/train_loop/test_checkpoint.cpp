// Checkpoint folders: naming, round trip, atomic replacement, interrupted writes, pruning.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <string>

#include "difftrain/train/checkpoint.hpp"
#include "support/temp_dir.hpp"

using namespace difftrain;
using namespace difftrain::train;
namespace fs = std::filesystem;

namespace {
CheckpointContents contents(float value, std::int64_t step) {
  CheckpointContents c;
  c.tensor_files["model.safetensors"]["layer.weight"] = xt::xarray<float>({{value, 2.0f}});
  c.tensor_files["optimizer.safetensors"]["layer.weight.exp_avg"] = xt::xarray<float>({value});
  c.manifest = {{"global_step", step}};
  return c;
}

std::size_t count_entries(const fs::path& dir) {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir)) ++n;
  return n;
}
}  // namespace

TEST_CASE("checkpoint_step parses exactly checkpoint-<digits>") {
  REQUIRE(checkpoint_step("checkpoint-0") == 0);
  REQUIRE(checkpoint_step("checkpoint-1500") == 1500);
  REQUIRE(!checkpoint_step("checkpoint-"));
  REQUIRE(!checkpoint_step("checkpoint-12a"));
  REQUIRE(!checkpoint_step("checkpoint--1"));
  REQUIRE(!checkpoint_step(".checkpoint-3.tmp-1.0"));
  REQUIRE(!checkpoint_step("ckpt-3"));
}

TEST_CASE("write_checkpoint / read_checkpoint round trip, listing in step order, latest") {
  test::TempDir dir("ckpt_roundtrip");
  write_checkpoint(dir.path(), 20, contents(1.5f, 20));
  write_checkpoint(dir.path(), 3, contents(0.5f, 3));
  const auto all = list_checkpoints(dir.path());
  REQUIRE(all.size() == 2);
  REQUIRE(all[0].first == 3);
  REQUIRE(all[1].first == 20);
  const fs::path latest = resolve_checkpoint(dir.path(), "latest");
  REQUIRE(latest == checkpoint_path(dir.path(), 20));
  const CheckpointContents c = read_checkpoint(latest);
  REQUIRE(c.manifest.at("global_step") == 20);
  REQUIRE(c.tensor_files.size() == 2);
  const auto& w = c.tensor_files.at("model.safetensors").at("layer.weight");
  REQUIRE(w.shape() == std::vector<std::size_t>{1, 2});
  REQUIRE(w(0, 1) == 2.0f);
  REQUIRE(c.tensor_files.at("optimizer.safetensors").at("layer.weight.exp_avg")(0) == 1.5f);
  // Rewriting the same step replaces it completely.
  write_checkpoint(dir.path(), 20, contents(7.0f, 20));
  REQUIRE(read_checkpoint(latest).tensor_files.at("optimizer.safetensors").begin()->second(0) ==
          7.0f);
  REQUIRE(count_entries(dir.path()) == 2);  // no leftover temporary or replaced folder
}

TEST_CASE("an interrupted write leaves the previous checkpoint intact and no temporary folder") {
  test::TempDir dir("ckpt_interrupted");
  write_checkpoint(dir.path(), 5, contents(1.0f, 5));
  fs::path seen;
  const CheckpointHook crash = [&](const fs::path& temporary) {
    seen = temporary;
    REQUIRE(fs::exists(temporary / "model.safetensors"));
    REQUIRE(fs::exists(temporary / std::string(kManifestName)));
    throw Error("simulated crash");
  };
  REQUIRE_THROWS_WITH(write_checkpoint(dir.path(), 10, contents(2.0f, 10), crash),
                      Catch::Contains("simulated crash"));
  REQUIRE(!seen.empty());
  REQUIRE(!fs::exists(seen));
  REQUIRE(!fs::exists(checkpoint_path(dir.path(), 10)));
  // Replacing an existing step and crashing keeps the old one too.
  REQUIRE_THROWS(write_checkpoint(dir.path(), 5, contents(3.0f, 5), crash));
  REQUIRE(count_entries(dir.path()) == 1);
  const CheckpointContents c = read_checkpoint(resolve_checkpoint(dir.path(), "latest"));
  REQUIRE(c.manifest.at("global_step") == 5);
  REQUIRE(c.tensor_files.at("model.safetensors").at("layer.weight")(0, 0) == 1.0f);
  // A stale temporary folder (a crash without cleanup) is never taken for a checkpoint.
  fs::create_directories(dir.path() / ".checkpoint-99.tmp-1.0");
  REQUIRE(resolve_checkpoint(dir.path(), "latest") == checkpoint_path(dir.path(), 5));
}

TEST_CASE("prune_checkpoints keeps the newest N") {
  test::TempDir dir("ckpt_prune");
  for (std::int64_t s : {2, 4, 6, 8, 10}) write_checkpoint(dir.path(), s, contents(float(s), s));
  prune_checkpoints(dir.path(), 2);
  const auto all = list_checkpoints(dir.path());
  REQUIRE(all.size() == 2);
  REQUIRE(all[0].first == 8);
  REQUIRE(all[1].first == 10);
  REQUIRE_THROWS_WITH(prune_checkpoints(dir.path(), 0), Catch::Contains("expected >= 1"));
}

TEST_CASE("checkpoint errors name the folder and the problem") {
  test::TempDir dir("ckpt_errors");
  REQUIRE_THROWS_WITH(resolve_checkpoint(dir.path(), "latest"),
                      Catch::Contains("no checkpoint-<step> folder"));
  REQUIRE_THROWS_WITH(resolve_checkpoint(dir.path(), (dir.path() / "nope").string()),
                      Catch::Contains("is not a checkpoint folder"));
  fs::create_directories(dir.path() / "checkpoint-1");
  REQUIRE_THROWS_WITH(read_checkpoint(dir.path() / "checkpoint-1"),
                      Catch::Contains("has no trainer_state.json"));
  CheckpointContents bad = contents(1.0f, 1);
  bad.tensor_files["../escape.safetensors"] = {};
  REQUIRE_THROWS_WITH(write_checkpoint(dir.path(), 2, bad),
                      Catch::Contains("is not a plain file name"));
}
