// Small inputs that used to hang or allocate without bound (issue #19 items 4, 5, 8): a named
// pipe or a device where a file is expected, a safetensors header of one long array, a sharded
// index pointing outside its folder, and configs describing models larger than this machine.
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "difftrain/core/memory.hpp"
#include "difftrain/io/json_file.hpp"
#include "difftrain/io/regular_file.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/io/state_dict.hpp"
#include "difftrain/models/clip/clip_config.hpp"
#include "difftrain/models/clip_tokenizer.hpp"
#include "difftrain/models/unet/unet_config.hpp"
#include "difftrain/models/vae/vae_config.hpp"
#include "support/error_of.hpp"
#include "support/temp_dir.hpp"

using namespace difftrain;
using Catch::Matchers::Contains;
using test::error_of;

namespace input_limits_test {

nlohmann::json data_config(const std::string& folder) {
  return io::read_json_file("test",
                            std::string(DIFFTRAIN_TEST_DATA_DIR) + "/" + folder + "/config.json");
}

// A safetensors file whose header is `header` followed by `data`.
void write_raw(const std::string& path, const std::string& header, const std::string& data = "") {
  std::string bytes(8, '\0');
  const std::uint64_t n = header.size();
  std::memcpy(bytes.data(), &n, 8);
  std::ofstream(path, std::ios::binary) << bytes << header << data;
}

}  // namespace input_limits_test

using namespace input_limits_test;

TEST_CASE("input limits: a named pipe or device where a file is expected fails at once") {
  test::TempDir dir("input_limits");
  const std::string fifo = dir.file("weights.safetensors");
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  // Each of these blocked forever in open() waiting for a writer.
  const std::string pipe = "it is a named pipe, not a regular file";
  CHECK_THAT(error_of([&] { io::SafetensorsFile::open(fifo); }),
             Contains("cannot open '" + fifo + "'") && Contains(pipe));
  CHECK_THAT(error_of([&] { io::read_json_file("read_json_file", fifo); }),
             Contains(fifo) && Contains(pipe));
  CHECK_THAT(error_of([&] { models::UNet2DConditionConfig::from_file(fifo); }),
             Contains(fifo) && Contains(pipe));
  CHECK_THAT(error_of([&] { io::read_regular_file(fifo, "reader"); }),
             Contains("reader: cannot open '" + fifo + "'") && Contains(pipe));
  // A tokenizer folder whose vocab.json is a pipe.
  std::filesystem::rename(fifo, dir.file("vocab.json"));
  dir.write("merges.txt", "#version: 0.2\n");
  CHECK_THAT(error_of([&] { ClipTokenizer::from_folder(dir.str()); }),
             Contains(dir.file("vocab.json")) && Contains(pipe));

  // /dev/zero never ends: refused as a device, not read until memory runs out.
  CHECK_THAT(error_of([&] { io::read_regular_file("/dev/zero", "reader"); }),
             Contains("'/dev/zero': it is a character device, not a regular file"));
  CHECK_THAT(error_of([&] { io::SafetensorsFile::open("/dev/zero"); }),
             Contains("character device"));
  CHECK_THAT(error_of([&] { io::read_regular_file(dir.str(), "reader"); }),
             Contains("it is a folder, not a regular file"));
  CHECK_THAT(error_of([&] { io::read_regular_file(dir.file("missing"), "reader"); }),
             Contains("cannot open '" + dir.file("missing") + "': it does not exist"));
}

TEST_CASE("input limits: a file larger than its reader accepts is refused before reading") {
  test::TempDir dir("input_limits");
  dir.write("eleven.txt", "hello world");
  CHECK(io::read_regular_file(dir.file("eleven.txt"), "reader", 11) == "hello world");
  CHECK_THAT(error_of([&] { io::read_regular_file(dir.file("eleven.txt"), "reader", 10); }),
             Contains("has 11 bytes, more than the 10 this reader accepts"));
}

TEST_CASE("input limits: a safetensors header with a long array is refused while parsing") {
  test::TempDir dir("input_limits");
  const std::string path = dir.file("t.safetensors");
  auto ones = [](std::size_t n) {
    std::string s = "1";
    for (std::size_t i = 1; i < n; ++i) s += ",1";
    return s;
  };
  auto header = [&](const std::string& shape) {
    return R"({"t":{"dtype":"F32","shape":[)" + shape + R"(],"data_offsets":[0,4]}})";
  };
  // 64 dimensions of extent 1: one float, a valid file.
  write_raw(path, header(ones(64)), std::string(4, '\0'));
  CHECK(io::SafetensorsFile::open(path).info("t").shape.size() == 64);
  // 65 dimensions, or a 2 MB array (a ~16 MB DOM): refused, naming the file.
  for (const std::size_t n : {65, 1'000'000}) {
    write_raw(path, header(ones(n)), std::string(4, '\0'));
    CHECK_THAT(error_of([&] { io::SafetensorsFile::open(path); }),
               Contains(path) && Contains("an array of more than 64 elements"));
  }
  write_raw(path, R"({"__metadata__":{"a":[)" + ones(100) + "]}}");
  CHECK_THAT(error_of([&] { io::SafetensorsFile::open(path); }),
             Contains("an array of more than 64 elements"));
}

TEST_CASE("input limits: a sharded index naming a file outside the model folder is refused") {
  test::TempDir dir("input_limits");
  for (const std::string shard :
       {"../outside.safetensors", "/etc/passwd", "a/../../x.safetensors", ""}) {
    INFO(shard);
    const nlohmann::json index = {{"weight_map", {{"conv.weight", shard}}}};
    dir.write("diffusion_pytorch_model.safetensors.index.json", index.dump());
    CHECK_THAT(error_of([&] { io::diffusers_weight_files(dir.str()); }),
               Contains("weight_map[conv.weight] = '" + shard + "'") &&
                   Contains("expected a file inside the model folder"));
  }
  dir.write("part-1.safetensors", "");
  const nlohmann::json index = {{"weight_map", {{"conv.weight", "./part-1.safetensors"}}}};
  dir.write("diffusion_pytorch_model.safetensors.index.json", index.dump());
  CHECK(io::diffusers_weight_files(dir.str()).size() == 1);
}

TEST_CASE("input limits: configs of models larger than memory are refused before allocating") {
  const std::string memory = "more than this machine's";
  // UNet: huge channels, or a million resnets per block.
  nlohmann::json unet = data_config("unet_tiny");
  REQUIRE_NOTHROW(models::UNet2DConditionConfig::from_json(unet));
  unet["block_out_channels"] = {1e8, 1e8};
  CHECK_THAT(error_of([&] { models::UNet2DConditionConfig::from_json(unet); }),
             Contains("the config's UNet (block_out_channels, layers_per_block) needs ~") &&
                 Contains(memory));
  unet = data_config("unet_tiny");
  unet["layers_per_block"] = 1e6;
  CHECK_THAT(error_of([&] { models::UNet2DConditionConfig::from_json(unet); }), Contains(memory));
  unet = data_config("unet_tiny");
  unet["block_out_channels"] = {1e30, 64};  // beyond size_t: refused before converting
  CHECK_THAT(error_of([&] { models::UNet2DConditionConfig::from_json(unet); }),
             Contains("block_out_channels[0] = 1e+30, expected at most"));

  nlohmann::json vae = data_config("vae_tiny");
  REQUIRE_NOTHROW(models::AutoencoderKLConfig::from_json(vae));
  vae["block_out_channels"] = {1e8, 1e8, 1e8};
  CHECK_THAT(error_of([&] { models::AutoencoderKLConfig::from_json(vae); }),
             Contains("the config's VAE") && Contains(memory));
  vae = data_config("vae_tiny");
  vae["layers_per_block"] = 1e30;
  CHECK_THAT(error_of([&] { models::AutoencoderKLConfig::from_json(vae); }),
             Contains("layers_per_block = 1e+30, expected a positive integer up to"));

  nlohmann::json clip = data_config("clip_tiny");
  REQUIRE_NOTHROW(models::ClipTextConfig::from_json(clip));
  clip["vocab_size"] = 1e12;
  CHECK_THAT(error_of([&] { models::ClipTextConfig::from_json(clip); }),
             Contains("the config's text encoder") && Contains(memory));
  clip["vocab_size"] = 1e30;
  CHECK_THAT(error_of([&] { models::ClipTextConfig::from_json(clip); }),
             Contains("vocab_size") && Contains("up to 2^40"));

  // A tokenizer whose model_max_length would size every batch.
  test::TempDir dir("input_limits");
  for (const char* name : {"vocab.json", "merges.txt", "tokenizer_config.json"})
    std::filesystem::copy_file(std::string(DIFFTRAIN_TEST_DATA_DIR) + "/tokenizer_tiny/" + name,
                               dir.file(name));
  REQUIRE(ClipTokenizer::from_folder(dir.str()).model_max_length() == 77);
  nlohmann::json config = io::read_json_file("test", dir.file("tokenizer_config.json"));
  config["model_max_length"] = 1'000'000'000;
  dir.write("tokenizer_config.json", config.dump());
  CHECK_THAT(error_of([&] { ClipTokenizer::from_folder(dir.str()); }),
             Contains(dir.file("tokenizer_config.json")) &&
                 Contains("model_max_length = 1000000000, expected at most 65536"));
  config["model_max_length"] = 1e30;  // transformers' "no limit": the default 77
  dir.write("tokenizer_config.json", config.dump());
  CHECK(ClipTokenizer::from_folder(dir.str()).model_max_length() == 77);
}

TEST_CASE("input limits: the memory check passes what fits and names what does not") {
  REQUIRE(physical_memory_bytes() > 0);
  REQUIRE_NOTHROW(require_fits_in_memory("f", "a buffer", 1e6));
  CHECK_THAT(error_of([&] { require_fits_in_memory("f", "a buffer", 1e18); }),
             Contains("f: a buffer needs ~") && Contains("GB, more than this machine's"));
}
