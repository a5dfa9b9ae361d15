// tools/dataset.hpp: data-parallel shards of ImageCaptionDataSource (DataSourceOptions::
// num_shards, shard_index). For P shards of batch B, the shards' rows of every micro-batch, one
// after the other, are bitwise the micro-batch of one process with batch P·B: images, token ids,
// class rows, sample weights, masks, SDXL time ids; with aspect-ratio buckets, kohya repeats and
// regularisation weights, DreamBooth class images, caption edits and lists, random crops and flips,
// and a short last micro-batch that leaves a shard empty.

#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "dataset.hpp"
#include "support/temp_dir.hpp"

namespace tools = difftrain::tools;
namespace fs = std::filesystem;
using difftrain::Error;
using difftrain::TokenIds;
using difftrain::test::TempDir;
using difftrain::train::TrainBatch;
using tools::Example;
using tools::Image;

namespace {

// w × h noise (an LCG from `state`): crops at different offsets, and mirror images, differ.
Image lcg_image(int w, int h, std::uint32_t state) {
  Image im(w, h);
  for (auto& v : im.rgb) v = std::uint8_t((state = state * 1664525u + 1013904223u) >> 24);
  return im;
}

// Each caption's characters as token ids, padded with 0 to 64: the ids give the caption back.
TokenIds char_tokenizer(const std::vector<std::string>& captions) {
  constexpr std::size_t L = 64;
  TokenIds ids(TokenIds::shape_type{captions.size(), L});
  ids.fill(0);
  for (std::size_t b = 0; b < captions.size(); ++b)
    for (std::size_t c = 0; c < std::min(L, captions[b].size()); ++c)
      ids(b, c) = std::int64_t(static_cast<unsigned char>(captions[b][c]));
  return ids;
}

// `part` is rows [first, last) of `whole`, bitwise, with the same shape past the first dimension
// (also when empty).
template <class T>
void check_rows(const char* what, const T& whole, std::size_t first, std::size_t last,
                const T& part) {
  INFO(what << ": rows [" << first << ", " << last << ")");
  REQUIRE(part.dimension() == whole.dimension());
  REQUIRE(part.shape()[0] == last - first);
  for (std::size_t d = 1; d < whole.dimension(); ++d) REQUIRE(part.shape()[d] == whole.shape()[d]);
  if (part.size() == 0) return;  // an empty shard: memcmp may not be given its null data
  const std::size_t row = whole.size() / whole.shape()[0];
  REQUIRE(std::memcmp(part.data(), whole.data() + first * row,
                      part.size() * sizeof(*part.data())) == 0);
}

// Sample weights [instance rows, then class rows] of the rows [first, last) of `whole` (n rows).
std::vector<float> weight_rows(const std::vector<float>& whole, std::size_t n, std::size_t first,
                               std::size_t last, bool with_class) {
  if (whole.empty()) return {};
  std::vector<float> out(whole.begin() + std::ptrdiff_t(first),
                         whole.begin() + std::ptrdiff_t(last));
  if (with_class)
    out.insert(out.end(), whole.begin() + std::ptrdiff_t(n + first),
               whole.begin() + std::ptrdiff_t(n + last));
  return out;
}

// For P shards of batch B: two epochs of micro-batches against one process with batch P·B.
// Returns the number of empty shards met.
std::size_t check_shards(const std::vector<Example>& ex, tools::DataSourceOptions o,
                         std::size_t shards, std::size_t batch,
                         const std::vector<Example>& class_ex = {}) {
  INFO(shards << " shards of batch " << batch);
  o.train_batch_size = shards * batch;
  tools::ImageCaptionDataSource one(ex, char_tokenizer, o, class_ex);
  std::vector<tools::ImageCaptionDataSource> parts;
  o.train_batch_size = batch;
  o.num_shards = shards;
  for (std::size_t r = 0; r < shards; ++r) {
    o.shard_index = r;
    parts.emplace_back(ex, char_tokenizer, o, class_ex);
  }
  const std::size_t steps = one.steps_per_epoch();
  std::size_t empty = 0;
  for (std::uint64_t m = 0; m < 2 * steps; ++m) {
    INFO("micro-batch " << m);
    const TrainBatch whole = one(m);
    const std::size_t n = whole.images.shape()[0];
    CHECK(whole.global_rows.empty());  // one process: not a shard
    CHECK(whole.global_batch_size == 0);
    std::size_t next = 0;
    std::vector<std::size_t> indices;
    for (std::size_t r = 0; r < shards; ++r) {
      INFO("shard " << r);
      tools::ImageCaptionDataSource& data = parts[r];
      REQUIRE(data.steps_per_epoch() == steps);
      REQUIRE(data.global_train_batch_size() == shards * batch);
      const TrainBatch part = data(m);
      const auto [first, last] = data.shard_rows(m);
      REQUIRE(first == next);
      REQUIRE(first == r * n / shards);
      REQUIRE(last == (r + 1) * n / shards);
      next = last;
      empty += first == last;
      REQUIRE(part.global_batch_size == n);
      REQUIRE(data.global_batch_size(m) == n);
      REQUIRE(data.global_batch_indices(m) == one.batch_indices(m));
      std::vector<std::uint64_t> rows(last - first);
      for (std::size_t j = 0; j < rows.size(); ++j) rows[j] = first + j;
      REQUIRE(part.global_rows == rows);
      const std::vector<std::size_t> mine = data.batch_indices(m);
      indices.insert(indices.end(), mine.begin(), mine.end());

      check_rows("images", whole.images, first, last, part.images);
      check_rows("token ids", whole.token_ids, first, last, part.token_ids);
      check_rows("batch_token_ids", whole.token_ids, first, last, data.batch_token_ids(m));
      if (class_ex.empty()) REQUIRE(part.class_images.size() == 0);
      if (!class_ex.empty()) {
        check_rows("class images", whole.class_images, first, last, part.class_images);
        check_rows("class token ids", whole.class_token_ids, first, last, part.class_token_ids);
        check_rows("batch_token_ids (class)", whole.class_token_ids, first, last,
                   data.batch_token_ids(m, true));
      }
      const std::vector<float> weights =
          weight_rows(whole.sample_weights, n, first, last, !class_ex.empty());
      REQUIRE(part.sample_weights == weights);
      REQUIRE(data.batch_sample_weights(m) == weights);
      REQUIRE(part.mask.has_value() == whole.mask.has_value());
      if (whole.mask) check_rows("mask", *whole.mask, first, last, *part.mask);
      REQUIRE(part.time_ids.has_value() == whole.time_ids.has_value());
      if (whole.time_ids) check_rows("time ids", *whole.time_ids, first, last, *part.time_ids);
      REQUIRE(part.class_time_ids.has_value() == whole.class_time_ids.has_value());
      if (whole.class_time_ids)
        check_rows("class time ids", *whole.class_time_ids, first, last, *part.class_time_ids);
    }
    REQUIRE(next == n);
    REQUIRE(indices == one.batch_indices(m));  // the shards' rows one after the other
  }
  return empty;
}

// The (shards, batch) pairs every scenario runs.
constexpr std::array<std::pair<std::size_t, std::size_t>, 4> kShardings = {
    {{2, 1}, {2, 2}, {3, 1}, {3, 2}}};

}  // namespace

TEST_CASE("shards: random crops, flips, caption edits and lists, size conditioning",
          "[dataset][shards]") {
  TempDir dir;
  const std::vector<std::pair<int, int>> sizes = {{12, 10}, {10, 14}, {16, 9}, {9, 9},
                                                  {11, 13}, {20, 10}, {10, 10}};
  std::vector<Example> ex;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const std::string path = dir / ("img" + std::to_string(i) + ".png");
    tools::save_png(path, lcg_image(sizes[i].first, sizes[i].second, std::uint32_t(7 + i)));
    ex.push_back({path, "tag" + std::to_string(i) + ", red, round, small, bright"});
  }
  ex[2].caption_choices = {"first, a", "second, b", "third, c"};
  tools::DataSourceOptions o{.resolution = 8, .random_flip = true, .seed = 21};
  o.size_conditioning = true;
  o.caption.shuffle_caption = true;
  o.caption.keep_tokens = 1;
  o.caption.caption_dropout_rate = 0.2;
  o.caption.caption_tag_dropout_rate = 0.25;
  std::size_t empty = 0;
  for (const auto& [shards, batch] : kShardings) empty += check_shards(ex, o, shards, batch);
  CHECK(empty > 0);  // 7 rows: e.g. 2 shards of 1 end an epoch with a micro-batch of 1
}

TEST_CASE("shards: buckets, kohya repeats and regularisation weights, masks, subsets",
          "[dataset][shards][bucket]") {
  TempDir dir;
  const fs::path masks = dir.path() / "masks";
  fs::create_directories(masks);
  const std::vector<std::pair<int, int>> sizes = {{32, 16}, {16, 32}, {24, 24}, {40, 20},
                                                  {20, 40}, {16, 16}, {36, 18}};
  std::vector<Example> ex;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const std::string name = "img" + std::to_string(i) + ".png";
    const auto [w, h] = sizes[i];
    tools::save_png(dir / name, lcg_image(w, h, std::uint32_t(3 * i + 1)));
    tools::save_png((masks / name).string(), lcg_image(w, h, std::uint32_t(100 + i)));
    Example e{dir / name, "tok" + std::to_string(i) + ", a, b, c"};
    e.num_repeats = i % 3 + 1;
    e.is_reg = i >= 5;
    e.subset = i % 2;
    ex.push_back(e);
  }
  tools::DataSourceOptions o{.resolution = 16, .random_flip = true, .seed = 5};
  o.buckets = tools::BucketOptions{.resolution_width = 16,
                                   .resolution_height = 16,
                                   .min_bucket_reso = 4,
                                   .max_bucket_reso = 32,
                                   .bucket_reso_steps = 4};
  o.reg_loss_weight = 0.5f;
  o.mask_dir = masks.string();
  o.size_conditioning = true;
  o.subset_captions.resize(2);
  o.subset_captions[0].shuffle_caption = true;
  o.subset_captions[1].caption_prefix = "p, ";
  o.subset_captions[1].caption_tag_dropout_rate = 0.3;
  std::size_t empty = 0;
  for (const auto& [shards, batch] : kShardings) empty += check_shards(ex, o, shards, batch);
  CHECK(empty > 0);  // buckets end with short micro-batches
}

TEST_CASE("shards: DreamBooth class images pair with the shard's instance rows",
          "[dataset][shards]") {
  TempDir dir;
  std::vector<Example> instance, cls;
  for (int i = 0; i < 3; ++i) {
    const std::string path = dir / ("i" + std::to_string(i) + ".png");
    tools::save_png(path, lcg_image(10 + i, 12, std::uint32_t(i)));
    instance.push_back({path, "sks dog, photo, park"});
  }
  for (int c = 0; c < 5; ++c) {
    const std::string path = dir / ("c" + std::to_string(c) + ".png");
    tools::save_png(path, lcg_image(12, 9 + c, std::uint32_t(50 + c)));
    cls.push_back({path, "dog, photo, class " + std::to_string(c)});
  }
  tools::DataSourceOptions o{.resolution = 8, .random_flip = true, .seed = 4};
  o.size_conditioning = true;
  o.caption.shuffle_caption = true;
  std::size_t empty = 0;
  for (const auto& [shards, batch] : kShardings)
    empty += check_shards(instance, o, shards, batch, cls);
  CHECK(empty > 0);  // 5 rows: 3 shards of 1 end an epoch with a micro-batch of 2
}

TEST_CASE("shards: an empty shard has the shapes of its micro-batch; bad options are errors",
          "[dataset][shards]") {
  TempDir dir;
  std::vector<Example> ex;
  for (int i = 0; i < 3; ++i) {
    const std::string path = dir / ("img" + std::to_string(i) + ".png");
    tools::save_png(path, lcg_image(12, 10, std::uint32_t(i)));
    ex.push_back({path, "caption " + std::to_string(i)});
  }
  // 3 rows, 4 shards of batch 1: one micro-batch of 3 per epoch, the shards' rows [0, 0),
  // [0, 1), [1, 2), [2, 3).
  tools::DataSourceOptions o{.resolution = 8, .train_batch_size = 1, .num_shards = 4};
  o.size_conditioning = true;
  o.mask_dir = dir.str();  // the images themselves as masks
  tools::ImageCaptionDataSource data(ex, char_tokenizer, o);
  CHECK(data.steps_per_epoch() == 1);
  CHECK(data.shard_rows(0) == std::pair<std::size_t, std::size_t>{0, 0});
  CHECK(data.batch_indices(0).empty());
  const TrainBatch batch = data(0);
  CHECK(batch.images.shape() == std::array<std::size_t, 4>{0, 3, 8, 8});
  CHECK(batch.token_ids.shape() == std::array<std::size_t, 2>{0, 64});
  REQUIRE(batch.mask.has_value());
  CHECK(batch.mask->shape() == std::array<std::size_t, 4>{0, 1, 8, 8});
  REQUIRE(batch.time_ids.has_value());
  CHECK(batch.time_ids->shape() == std::array<std::size_t, 2>{0, 6});
  CHECK(batch.global_rows.empty());
  CHECK(batch.global_batch_size == 3);
  CHECK(data.batch_token_ids(0).shape() == std::array<std::size_t, 2>{0, 64});
  CHECK(data.masks({}, 0).shape() == std::array<std::size_t, 4>{0, 1, 0, 0});
  o.shard_index = 3;
  tools::ImageCaptionDataSource last(ex, char_tokenizer, o);
  CHECK(last.shard_rows(1) == std::pair<std::size_t, std::size_t>{2, 3});
  CHECK(last(1).global_rows == std::vector<std::uint64_t>{2});

  CHECK_THROWS_AS(tools::ImageCaptionDataSource(ex, char_tokenizer, {.num_shards = 0}), Error);
  CHECK_THROWS_WITH(tools::ImageCaptionDataSource(ex, char_tokenizer, {.num_shards = 0}),
                    Catch::Contains("num_shards is 0"));
  CHECK_THROWS_WITH(
      tools::ImageCaptionDataSource(ex, char_tokenizer, {.num_shards = 2, .shard_index = 2}),
      Catch::Contains("shard_index is 2, expected < num_shards (2)"));
}
