// Deeply nested JSON through every reader (issue #19): a config.json, a safetensors header, a
// LoRA file's lora_adapter_metadata and the tokenizer files nested ~90,000 levels deep used to
// kill the process (dump() and copies of the value recurse once per level); now each is an Error
// naming the file and the nesting limit. A wrong value that is large but within the limit is
// described in a bounded message.
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <string>

#include "difftrain/io/safetensors.hpp"
#include "difftrain/io/state_dict.hpp"
#include "difftrain/lora/lora_file.hpp"
#include "difftrain/models/clip/clip_config.hpp"
#include "difftrain/models/clip_tokenizer.hpp"
#include "difftrain/models/unet/unet_config.hpp"
#include "difftrain/models/vae/vae_config.hpp"
#include "difftrain/schedule/ddpm_scheduler.hpp"
#include "support/error_of.hpp"
#include "support/temp_dir.hpp"

using namespace difftrain;
using Catch::Matchers::Contains;

namespace json_limits_test {

// Deep enough to overflow the stack in a recursive dump() or copy (a ~180 KB file).
constexpr std::size_t kDeep = 90'000;

// `depth` nested arrays around `inner`: [[[inner]]].
std::string nested(std::size_t depth, const std::string& inner = "") {
  return std::string(depth, '[') + inner + std::string(depth, ']');
}

// 20,000 comma-separated zeros: 40 KB of array entries.
std::string zeros() {
  std::string out = "0";
  for (int i = 1; i < 20'000; ++i) out += ",0";
  return out;
}

using test::error_of;

// The nesting error names the file and the limit.
void check_depth_error(const std::string& message, const std::string& path) {
  CHECK_THAT(message, Contains(path) && Contains("more than 128 levels deep") &&
                          Contains("expected at most 128"));
}

// A safetensors file holding exactly `header` (no tensors, no data).
void write_safetensors(const std::string& path, const std::string& header) {
  const std::uint64_t n = header.size();
  char length[8];
  std::memcpy(length, &n, 8);  // little-endian host (safetensors.hpp asserts it)
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(length, 8);
  out << header;
  REQUIRE(out.good());
}

TEST_CASE("json limits: a deeply nested config.json is an Error naming the file and the limit") {
  test::TempDir dir("json_limits");
  const std::string path = dir.file("config.json");
  dir.write("config.json", "{\"a\":" + nested(kDeep) + "}");
  check_depth_error(error_of([&] { models::UNet2DConditionConfig::from_file(path); }), path);
  check_depth_error(error_of([&] { models::AutoencoderKLConfig::from_file(path); }), path);
  check_depth_error(error_of([&] { models::ClipTextConfig::from_file(path); }), path);
  check_depth_error(error_of([&] { DdpmSchedulerConfig::from_file(path); }), path);

  // The index of a sharded checkpoint goes through the same reader.
  dir.write("diffusion_pytorch_model.safetensors.index.json",
            "{\"weight_map\":{\"w\":" + nested(kDeep) + "}}");
  check_depth_error(error_of([&] { io::diffusers_weight_files(dir.str()); }),
                    dir.file("diffusion_pytorch_model.safetensors.index.json"));
}

TEST_CASE("json limits: nesting up to the limit still loads, one more level does not") {
  test::TempDir dir("json_limits");
  const std::string path = dir.file("scheduler_config.json");
  // 128 levels: the object and 127 arrays under a key the scheduler ignores ('_' prefix).
  dir.write("scheduler_config.json", "{\"_note\":" + nested(127) + "}");
  CHECK(DdpmSchedulerConfig::from_file(path).num_train_timesteps ==
        DdpmSchedulerConfig{}.num_train_timesteps);
  dir.write("scheduler_config.json", "{\"_note\":" + nested(128) + "}");
  const std::string one_more = error_of([&] { DdpmSchedulerConfig::from_file(path); });
  check_depth_error(one_more, path);
  CHECK_THAT(one_more, Contains("opens level 129"));
  // Brackets inside strings are text, not nesting.
  dir.write("scheduler_config.json", "{\"_note\":\"" + nested(kDeep) + "\"}");
  CHECK_NOTHROW(DdpmSchedulerConfig::from_file(path));
}

TEST_CASE("json limits: a deeply nested safetensors header is refused before parsing") {
  test::TempDir dir("json_limits");
  const std::string path = dir.file("deep.safetensors");
  const auto open_error = [&](const std::string& header) {
    write_safetensors(path, header);
    return error_of([&] { io::SafetensorsFile::open(path); });
  };
  // Each of these used to crash: the error message dumped the nested value.
  const std::string metadata = open_error("{\"__metadata__\":{\"a\":" + nested(kDeep) + "}}");
  check_depth_error(metadata, path);
  CHECK_THAT(metadata, Contains("SafetensorsFile::open") && Contains("header"));
  check_depth_error(
      open_error("{\"t\":{\"dtype\":" + nested(kDeep) + ",\"shape\":[],\"data_offsets\":[0,0]}}"),
      path);
  check_depth_error(open_error("{\"a\":" + nested(kDeep) + "}"), path);
  // 20 MB of nesting (10 million levels) took ~750 MB to parse; the scan stops at level 129.
  check_depth_error(open_error("{\"a\":" + nested(10'000'000) + "}"), path);
}

TEST_CASE("json limits: a safetensors header value that is large is described briefly") {
  test::TempDir dir("json_limits");
  const std::string path = dir.file("wide.safetensors");
  // An object of 20,000 keys (arrays that long are refused while parsing: a shape has at most
  // 64 entries).
  std::string wide = "{";
  for (int i = 0; i < 20'000; ++i) wide += (i ? ",\"k" : "\"k") + std::to_string(i) + "\":0";
  wide += "}";
  write_safetensors(path, "{\"t\":{\"dtype\":" + wide + ",\"shape\":[],\"data_offsets\":[0,0]}}");
  const std::string message = error_of([&] { io::SafetensorsFile::open(path); });
  CHECK_THAT(message,
             Contains(path) && Contains("dtype is {\"k0\":0") && Contains("expected a string"));
  CHECK(message.size() < 1000);
  write_safetensors(
      path, "{\"t\":{\"dtype\":" + nested(60, zeros()) + ",\"shape\":[],\"data_offsets\":[0,0]}}");
  CHECK_THAT(error_of([&] { io::SafetensorsFile::open(path); }),
             Contains(path) && Contains("an array of more than 64 elements"));
}

TEST_CASE("json limits: deeply nested lora_adapter_metadata is an Error naming the file") {
  test::TempDir dir("json_limits");
  const auto write = [&](const std::string& name, const std::string& meta) {
    io::save_safetensors(dir.file(name), {}, {{"lora_adapter_metadata", meta}});
    return dir.file(name);
  };
  // The header itself is shallow (the metadata value is a string); the string's JSON is not.
  const std::string array = write("array.safetensors", nested(kDeep));
  const std::string message = error_of([&] { lora::read_lora(array, {}); });
  check_depth_error(message, array);
  CHECK_THAT(message, Contains("read_lora") && Contains("lora_adapter_metadata"));
  const std::string pattern =
      write("pattern.safetensors", "{\"alpha_pattern\":{\"m\":" + nested(kDeep) + "}}");
  check_depth_error(error_of([&] { lora::read_lora(pattern, {}); }), pattern);
}

TEST_CASE("json limits: deeply nested tokenizer files are an Error naming the file") {
  test::TempDir dir("json_limits");
  dir.write("merges.txt", "#version: 0.2\n");
  const std::string vocab = R"({"<|startoftext|>": 0, "<|endoftext|>": 1})";
  const auto load = [&] { return error_of([&] { ClipTokenizer::from_folder(dir.str()); }); };

  dir.write("vocab.json", "{\"a\":" + nested(kDeep) + "}");
  check_depth_error(load(), dir.file("vocab.json"));

  dir.write("vocab.json", vocab);
  REQUIRE(load() == "no error");
  dir.write("tokenizer_config.json", "{\"bos_token\":" + nested(kDeep) + "}");
  check_depth_error(load(), dir.file("tokenizer_config.json"));

  // Within the limit, a wrong token is described briefly.
  dir.write("tokenizer_config.json", "{\"bos_token\":" + nested(60, zeros()) + "}");
  const std::string message = load();
  CHECK_THAT(message, Contains("bos_token must be a string") && Contains("[[[["));
  CHECK(message.size() < 1000);
}

TEST_CASE("json limits: a large wrong config value gives a message of bounded length") {
  test::TempDir dir("json_limits");
  const std::string path = dir.file("config.json");
  // 64 levels (within the limit) around 20,000 entries: a 40 KB message before the fix.
  dir.write("config.json", "{\"block_out_channels\":" + nested(64, zeros()) + "}");
  for (const std::string& message :
       {error_of([&] { models::UNet2DConditionConfig::from_file(path); }),
        error_of([&] { models::AutoencoderKLConfig::from_file(path); })}) {
    CHECK_THAT(message, Contains("block_out_channels") && Contains("[[[[") && Contains("..."));
    CHECK(message.size() < 1000);
  }
  dir.write("config.json", "{\"hidden_act\":" + nested(64, zeros()) + "}");
  const std::string clip = error_of([&] { models::ClipTextConfig::from_file(path); });
  CHECK_THAT(clip, Contains("hidden_act = [[[[") && Contains(path));
  CHECK(clip.size() < 1000);
  dir.write("config.json", "{\"beta_start\":" + nested(64, zeros()) + "}");
  const std::string ddpm = error_of([&] { DdpmSchedulerConfig::from_file(path); });
  CHECK_THAT(ddpm, Contains("beta_start") && Contains("[[[["));
  CHECK(ddpm.size() < 1000);
}

}  // namespace json_limits_test
