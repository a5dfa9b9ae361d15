// tools/dataset_config.hpp: kohya's dataset TOML — values looked up in the subset, its dataset,
// [general], then the command line; run-wide values set in the options; errors naming the key
// and the file.

#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "dataset_config.hpp"
#include "support/temp_dir.hpp"

namespace tools = difftrain::tools;
using difftrain::test::TempDir;
using tools::TrainCommandOptions;

TEST_CASE("dataset config: subset, dataset, [general], then the command line", "[dataset]") {
  TempDir dir;
  dir.write("data.toml", R"(
[general]
shuffle_caption = true
caption_extension = ".caption"
keep_tokens = 1
batch_size = 3

[[datasets]]
resolution = [24, 24]
enable_bucket = true
min_bucket_reso = 8
bucket_reso_steps = 8
caption_tag_dropout_rate = 0.1

  [[datasets.subsets]]
  image_dir = "imgs"
  num_repeats = 10
  class_tokens = "sks dog"
  keep_tokens = 2

  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  shuffle_caption = false
  caption_prefix = "photo of"
)");
  TrainCommandOptions o;
  o.caption.caption_dropout_rate = 0.05;  // a flag: the fallback of every subset
  o.random_flip = true;
  const auto subsets = tools::read_dataset_config(dir / "data.toml", o);
  REQUIRE(subsets.size() == 2);
  CHECK(subsets[0].image_dir == "imgs");
  CHECK(subsets[0].num_repeats == 10);
  CHECK_FALSE(subsets[0].is_reg);
  CHECK(subsets[0].class_tokens == "sks dog");
  CHECK(subsets[0].caption_extension == ".caption");          // [general]
  CHECK(subsets[0].caption.shuffle_caption);                  // [general]
  CHECK(subsets[0].caption.keep_tokens == 2);                 // the subset
  CHECK(subsets[0].caption.caption_tag_dropout_rate == 0.1);  // the dataset
  CHECK(subsets[0].caption.caption_dropout_rate == 0.05);     // the command line
  CHECK(subsets[1].is_reg);
  CHECK(subsets[1].num_repeats == 1);
  CHECK_FALSE(subsets[1].caption.shuffle_caption);
  CHECK(subsets[1].caption.keep_tokens == 1);
  CHECK(subsets[1].caption.caption_prefix == "photo of");
  // Run-wide values.
  CHECK(o.resolution == 24);
  CHECK(o.trainer.train_batch_size == 3);
  CHECK(o.enable_bucket);
  CHECK(o.buckets.min_bucket_reso == 8);
  CHECK(o.buckets.bucket_reso_steps == 8);
  CHECK(o.buckets.max_bucket_reso == 1024);  // not given: the flag's
  CHECK(o.random_flip);                      // flip_aug not given: the flag's
}

TEST_CASE("dataset config errors name the key and the file", "[dataset]") {
  TempDir dir;
  auto error_of = [&](const std::string& text) {
    dir.write("bad.toml", text);
    TrainCommandOptions o;
    try {
      tools::read_dataset_config(dir / "bad.toml", o);
    } catch (const difftrain::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string subset = "[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"a\"\n";
  CHECK_THAT(error_of(subset + "num_repeat = 3\n"),
             Catch::Contains("unknown key 'num_repeat'") && Catch::Contains("bad.toml"));
  CHECK_THAT(error_of("[[datasets]]\nresolution = 512\nbatch_size = 2\n[[datasets.subsets]]\n"
                      "image_dir = \"a\"\nresolution = 256\n"),
             Catch::Contains("unknown key 'resolution' in [[datasets.subsets]]"));
  CHECK_THAT(error_of(subset + "num_repeats = \"ten\"\n"),
             Catch::Contains("'num_repeats' has the wrong type"));
  CHECK_THAT(error_of(subset + "num_repeats = 0\n"), Catch::Contains("num_repeats"));
  CHECK_THAT(error_of(subset + "caption_dropout_rate = 2.0\n"),
             Catch::Contains("--caption_dropout_rate is 2"));
  CHECK_THAT(error_of(subset + "color_aug = true\n"), Catch::Contains("color_aug"));
  CHECK_THAT(error_of(subset + "[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"b\"\n"),
             Catch::Contains("expected one [[datasets]] table, found 2"));
  CHECK_THAT(error_of("[[datasets]]\nresolution = [512, 768]\n[[datasets.subsets]]\n"
                      "image_dir = \"a\"\n"),
             Catch::Contains("non-square"));
  CHECK_THAT(error_of(subset + "flip_aug = true\n[[datasets.subsets]]\nimage_dir = \"b\"\n"
                               "flip_aug = false\n"),
             Catch::Contains("flip_aug and random_crop must be the same"));
  CHECK_THAT(error_of("[[datasets]]\n"), Catch::Contains("no [[datasets.subsets]]"));
  CHECK_THAT(error_of("[general]\nlearning_rate = 1\n" + subset),
             Catch::Contains("unknown key 'learning_rate' in [general]"));
  CHECK_THAT(error_of("[[datasets]\n"), Catch::Contains("is not valid TOML"));
  CHECK_THAT(error_of(subset + "[extra]\n"), Catch::Contains("unknown key 'extra'"));
}
