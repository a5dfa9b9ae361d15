// tools/dataset.hpp: folder scanning (kohya .txt captions, diffusers metadata.jsonl with caption
// lists, DreamBooth), its errors, and the micro-batches of ImageCaptionDataSource (caption lists
// drawn per epoch, the resize filter, SDXL's size conditioning).

#include <webp/encode.h>

#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "dataset.hpp"
#include "difftrain/models/sdxl_conditioning.hpp"
#include "support/temp_dir.hpp"

namespace tools = difftrain::tools;
namespace fs = std::filesystem;
using difftrain::Error;
using difftrain::TokenIds;
using difftrain::models::SdxlSizeConditioning;
using difftrain::test::TempDir;
using tools::Example;
using tools::Image;

namespace {

// A solid image whose red channel encodes `id` (id·20) and green `group`.
Image id_image(int id, int group = 0, int w = 16, int h = 12) {
  Image im(w, h);
  for (std::size_t i = 0; i < im.rgb.size(); i += 3)
    im.rgb[i] = std::uint8_t(20 * id), im.rgb[i + 1] = std::uint8_t(100 * group), im.rgb[i + 2] = 7;
  return im;
}

void write_solid(const std::string& path, int id, int group = 0, int w = 16, int h = 12) {
  tools::save_png(path, id_image(id, group, w, h));
}

// id_image as a lossless WebP (libwebp's encoder).
void write_solid_webp(const std::string& path, int id) {
  const Image im = id_image(id);
  std::uint8_t* data = nullptr;
  const std::size_t size =
      WebPEncodeLosslessRGB(im.rgb.data(), im.width, im.height, 3 * im.width, &data);
  REQUIRE(size > 0);
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(data), std::streamsize(size));
  WebPFree(data);
}

// Red channel of row j back to the id written by write_solid.
int id_of_row(const difftrain::Tensor4<float>& images, std::size_t j) {
  return int(std::lround((images(j, 0, 0, 0) + 1) * 127.5 / 20));
}

// "caption 7" → token ids {7, 1000}: reversible, so batches can be checked against captions.
TokenIds number_tokenizer(const std::vector<std::string>& captions) {
  TokenIds ids(TokenIds::shape_type{captions.size(), 2});
  for (std::size_t b = 0; b < captions.size(); ++b) {
    const auto space = captions[b].rfind(' ');
    ids(b, 0) = std::stoll(captions[b].substr(space + 1));
    ids(b, 1) = 1000;
  }
  return ids;
}

// Any caption → the token ids {number of characters, 1000}.
TokenIds number_tokenizer_any(const std::vector<std::string>& captions) {
  TokenIds ids(TokenIds::shape_type{captions.size(), 2});
  for (std::size_t b = 0; b < captions.size(); ++b) ids(b, 0) = std::int64_t(captions[b].size());
  for (std::size_t b = 0; b < captions.size(); ++b) ids(b, 1) = 1000;
  return ids;
}

// w × h noise (an LCG from `state`): no crop of it equals another crop, or its mirror image.
Image lcg_image(int w, int h, std::uint32_t state) {
  Image im(w, h);
  for (auto& v : im.rgb) v = std::uint8_t((state = state * 1664525u + 1013904223u) >> 24);
  return im;
}

// Row j of time_ids [B, 6] is `expected`, and example_image's conditioning `size` agrees.
void check_time_ids(const difftrain::Tensor<float, 2>& time_ids, std::size_t j,
                    const std::array<double, 6>& expected, const SdxlSizeConditioning& size) {
  for (std::size_t c = 0; c < 6; ++c) {
    INFO("row " << j << ", column " << c);
    CHECK(double(time_ids(j, c)) == expected[c]);
  }
  CHECK(size.original_size == std::array<double, 2>{expected[0], expected[1]});
  CHECK(size.crop_top_left == std::array<double, 2>{expected[2], expected[3]});
  CHECK(size.target_size == std::array<double, 2>{expected[4], expected[5]});
}

// "img3.png" (concat: GCC 12 warns falsely (-Wrestrict) on "literal" + std::string + ...).
std::string png_name(const char* prefix, int i) { return difftrain::message(prefix, i, ".png"); }

}  // namespace

TEST_CASE("scan_image_folder: same-named .txt captions, sorted", "[dataset]") {
  TempDir dir;
  write_solid(dir / "b.png", 1);
  write_solid(dir / "a.png", 0);
  Image c(4, 4, 9);
  REQUIRE(stbi_write_jpg((dir / "c.JPG").c_str(), 4, 4, 3, c.rgb.data(), 90));
  dir.write("a.txt", "\xEF\xBB\xBF a red circle \r\nsecond line is ignored\n");
  dir.write("b.txt", "blue square");
  dir.write("c.txt", "");
  dir.write("notes.json", "{}");  // not an image: ignored
  const std::vector<Example> ex = tools::scan_image_folder(dir.str());
  REQUIRE(ex.size() == 3);
  CHECK(ex[0] == Example{dir / "a.png", "a red circle"});
  CHECK(ex[1] == Example{dir / "b.png", "blue square"});
  CHECK(ex[2] == Example{dir / "c.JPG", ""});  // an empty caption file is an empty caption

  // Another caption extension (kohya --caption_extension).
  dir.write("a.caption", "alt a");
  dir.write("b.caption", "alt b");
  dir.write("c.caption", "alt c");
  const auto alt = tools::scan_image_folder(dir.str(), {.caption_extension = ".caption"});
  CHECK(alt[1].caption == "alt b");
}

TEST_CASE("scan_image_folder: metadata.jsonl with a configurable caption column", "[dataset]") {
  TempDir dir;
  std::filesystem::create_directories(dir / "sub");
  write_solid(dir / "x.png", 0);
  write_solid(dir / "sub/y.png", 1);
  write_solid(dir / "unlisted.png", 2);  // only the listed files are examples
  dir.write("x.txt", "ignored: metadata.jsonl wins");
  dir.write("metadata.jsonl",
            "{\"file_name\": \"x.png\", \"text\": \"an x\", \"prompt\": \"px\"}\n"
            "\n"
            "{\"file_name\": \"sub/y.png\", \"text\": \"a y\", \"prompt\": \"py\"}\n");
  const auto ex = tools::scan_image_folder(dir.str());
  REQUIRE(ex.size() == 2);
  CHECK(ex[0] == Example{dir / "sub/y.png", "a y"});  // sorted by file_name
  CHECK(ex[1] == Example{dir / "x.png", "an x"});
  const auto prompts = tools::scan_image_folder(dir.str(), {.caption_column = "prompt"});
  CHECK(prompts[1].caption == "px");

  REQUIRE_THROWS_WITH(tools::scan_image_folder(dir.str(), {.caption_column = "label"}),
                      Catch::Contains("\"label\"") && Catch::Contains("line 1"));
  CHECK(tools::scan_image_folder(dir.str(),
                                 {.caption_column = "label", .allow_missing_captions = true})[0]
            .caption.empty());

  dir.write("metadata.jsonl", "{\"file_name\": \"x.png\", \"text\": \"ok\"}\n{oops\n");
  REQUIRE_THROWS_WITH(tools::scan_image_folder(dir.str()), Catch::Contains("line 2"));
  dir.write("metadata.jsonl", "{\"file_name\": \"gone.png\", \"text\": \"?\"}\n");
  REQUIRE_THROWS_WITH(tools::scan_image_folder(dir.str()), Catch::Contains("gone.png"));
  dir.write("metadata.jsonl", "{\"text\": \"no file name\"}\n");
  REQUIRE_THROWS_WITH(tools::scan_image_folder(dir.str()), Catch::Contains("file_name"));
  // file_name is relative to the folder and stays in it.
  for (const char* outside : {"../x.png", "sub/../../x.png", "/etc/x.png"}) {
    dir.write("metadata.jsonl",
              std::string("{\"file_name\": \"") + outside + "\", \"text\": \"?\"}\n");
    REQUIRE_THROWS_WITH(tools::scan_image_folder(dir.str()),
                        Catch::Contains(outside) && Catch::Contains("inside the folder"));
  }
  // A line nested beyond the JSON depth limit is an error naming the line, not a crash.
  dir.write("metadata.jsonl", "{\"file_name\": \"x.png\", \"text\": " + std::string(100000, '[') +
                                  std::string(100000, ']') + "}\n");
  REQUIRE_THROWS_WITH(tools::scan_image_folder(dir.str()), Catch::Contains("line 1"));
}

TEST_CASE("scan_image_folder errors", "[dataset]") {
  TempDir dir;
  REQUIRE_THROWS_WITH(tools::scan_image_folder(dir.str()), Catch::Contains("no PNG"));
  REQUIRE_THROWS_WITH(tools::scan_image_folder(dir / "nope"), Catch::Contains("not a folder"));

  write_solid(dir / "a.png", 0);
  REQUIRE_THROWS_WITH(tools::scan_image_folder(dir.str()),
                      Catch::Contains("a.png") && Catch::Contains("a.txt"));
  const auto lax = tools::scan_image_folder(dir.str(), {.allow_missing_captions = true});
  REQUIRE(lax.size() == 1);
  CHECK(lax[0].caption.empty());

  dir.write("a.txt", "a");
  dir.write("b.gif", "GIF89a");
  dir.write("b.txt", "b");
  REQUIRE_THROWS_WITH(tools::scan_image_folder(dir.str()),
                      Catch::Contains("b.gif") && Catch::Contains("not supported"));
  REQUIRE_THROWS_WITH(tools::scan_dreambooth_folder(dir.str(), "sks dog"),
                      Catch::Contains("b.gif"));
}

TEST_CASE("scan_image_folder lists WebP images; the data source decodes them", "[dataset]") {
  TempDir dir;
  write_solid(dir / "a.png", 1);
  write_solid_webp(dir / "b.WebP", 2);
  dir.write("a.txt", "caption 1");
  dir.write("b.txt", "caption 2");
  const auto ex = tools::scan_image_folder(dir.str());
  REQUIRE(ex.size() == 2);
  CHECK(ex[1] == Example{dir / "b.WebP", "caption 2"});
  CHECK(tools::scan_dreambooth_folder(dir.str(), "x").size() == 2);
  // Both rows of the batch: the pixels of each image (red = 20·id) with its caption's id.
  tools::ImageCaptionDataSource data(ex, number_tokenizer,
                                     {.resolution = 8, .center_crop = true, .train_batch_size = 2});
  const difftrain::train::TrainBatch batch = data(0);
  REQUIRE(batch.images.shape()[0] == 2);
  std::set<int> ids;
  for (std::size_t j = 0; j < 2; ++j) {
    REQUIRE(id_of_row(batch.images, j) == batch.token_ids(j, 0));
    ids.insert(id_of_row(batch.images, j));
  }
  CHECK(ids == std::set<int>{1, 2});
}

TEST_CASE("scan_dreambooth_folder gives every image the prompt", "[dataset]") {
  TempDir dir;
  write_solid(dir / "2.png", 0);
  write_solid(dir / "1.png", 1);
  dir.write("1.txt", "not read");
  const auto ex = tools::scan_dreambooth_folder(dir.str(), "a photo of sks dog");
  REQUIRE(ex.size() == 2);
  CHECK(ex[0] == Example{dir / "1.png", "a photo of sks dog"});
  CHECK(ex[1] == Example{dir / "2.png", "a photo of sks dog"});
  TempDir empty;
  REQUIRE_THROWS_AS(tools::scan_dreambooth_folder(empty.str(), "x"), Error);
}

TEST_CASE("data source: micro-batch m is a function of m; each example once per epoch",
          "[dataset]") {
  TempDir dir;
  std::vector<Example> ex;
  for (int i = 0; i < 5; ++i) {
    write_solid(dir / png_name("img", i), i);
    ex.push_back({dir / png_name("img", i), "caption " + std::to_string(i)});
  }
  tools::DataSourceOptions o{.resolution = 8,
                             .center_crop = false,
                             .random_flip = true,
                             .train_batch_size = 2,
                             .seed = 11};
  tools::ImageCaptionDataSource data(ex, number_tokenizer, o);
  CHECK(data.num_examples() == 5);
  CHECK(data.steps_per_epoch(2) == 3);
  CHECK(data.steps_per_epoch(5) == 1);
  CHECK(data.steps_per_epoch(4) == 2);
  CHECK(data.steps_per_epoch() == 3);

  std::vector<std::vector<int>> epochs;
  for (std::uint64_t e = 0; e < 4; ++e) {
    std::vector<int> seen;
    for (std::uint64_t m = 3 * e; m < 3 * e + 3; ++m) {
      const difftrain::train::TrainBatch batch = data(m);
      const std::size_t rows = m % 3 == 2 ? 1 : 2;  // the last micro-batch of an epoch is short
      REQUIRE(batch.images.shape() == std::array<std::size_t, 4>{rows, 3, 8, 8});
      REQUIRE(batch.token_ids.shape() == std::array<std::size_t, 2>{rows, 2});
      REQUIRE(batch.class_images.size() == 0);
      for (std::size_t j = 0; j < rows; ++j) {
        // The image and the caption of a row belong to the same example.
        REQUIRE(id_of_row(batch.images, j) == batch.token_ids(j, 0));
        const float lowest = xt::amin(batch.images)();
        REQUIRE(lowest >= -1.0f);
        seen.push_back(int(batch.token_ids(j, 0)));
      }
    }
    std::vector<int> sorted = seen;
    std::sort(sorted.begin(), sorted.end());
    REQUIRE(sorted == std::vector<int>{0, 1, 2, 3, 4});
    epochs.push_back(seen);
  }
  // diffusers shuffles every epoch: the orders are not all the same.
  CHECK(std::set<std::vector<int>>(epochs.begin(), epochs.end()).size() > 1);

  // Same m → the same batch, from this source, a fresh one, and one with the image cache.
  tools::ImageCaptionDataSource fresh(ex, number_tokenizer, o);
  auto cached_options = o;
  cached_options.cache_images = true;
  tools::ImageCaptionDataSource cached(ex, number_tokenizer, cached_options);
  for (std::uint64_t m : {7u, 0u, 7u, 4u}) {
    const auto a = data(m), b = fresh(m), c = cached(m), d = cached(m);
    REQUIRE(bool(a.images == b.images));
    REQUIRE(bool(a.images == c.images));
    REQUIRE(bool(a.images == d.images));
    REQUIRE(bool(a.token_ids == c.token_ids));
  }
  // The token ids alone, without images; the permutation the batches follow.
  for (std::uint64_t m : {5u, 1u}) REQUIRE(bool(data.batch_token_ids(m) == data(m).token_ids));
  REQUIRE_THROWS_AS(data.batch_token_ids(0, true), Error);
  const std::vector<std::size_t> perm1 = data.epoch_permutation(1);
  CHECK(data.batch_indices(3) == std::vector<std::size_t>{perm1[0], perm1[1]});
  CHECK(data.batch_indices(5) == std::vector<std::size_t>{perm1[4]});
  CHECK(data(5).token_ids(0, 0) == int(perm1[4]));  // example k's caption is "caption k"

  // A different seed gives another order.
  auto other_seed = o;
  other_seed.seed = 12;
  tools::ImageCaptionDataSource other(ex, number_tokenizer, other_seed);
  bool differs = false;
  for (std::uint64_t m = 0; m < 12; ++m)
    differs = differs || bool(other(m).token_ids != data(m).token_ids);
  CHECK(differs);
}

TEST_CASE("data source: crops and flips are drawn per (seed, epoch, index)", "[dataset]") {
  TempDir dir;
  // A 24×8 horizontal ramp: at resolution 8 each row is a random 8-wide window, maybe mirrored.
  Image ramp(24, 8);
  for (int y = 0; y < 8; ++y)
    for (int x = 0; x < 24; ++x) ramp.pixel(x, y)[0] = std::uint8_t(10 * x);
  tools::save_png(dir / "ramp.png", ramp);
  const std::vector<Example> ex(1, Example{dir / "ramp.png", "caption 0"});
  tools::ImageCaptionDataSource data(ex, number_tokenizer,
                                     {.resolution = 8, .random_flip = true, .train_batch_size = 1});
  std::set<std::pair<int, bool>> windows;  // (left, flipped)
  for (std::uint64_t m = 0; m < 64; ++m) {
    const Image im = tools::tensor_to_image(xt::view(data(m).images, 0));
    const int first = im.pixel(0, 0)[0] / 10, last = im.pixel(7, 0)[0] / 10;
    const bool flipped = first > last;
    REQUIRE(std::abs(first - last) == 7);  // a window of the ramp, exactly
    REQUIRE(std::min(first, last) <= 16);
    REQUIRE(im == data.example_image(0, m, false));  // one example per epoch: epoch m
    windows.insert({std::min(first, last), flipped});
  }
  CHECK(windows.size() > 10);  // crops at many offsets, flipped and not
  CHECK(std::count_if(windows.begin(), windows.end(), [](auto w) { return w.second; }) > 3);

  // Center crop without flip is the same every epoch.
  tools::ImageCaptionDataSource center(ex, number_tokenizer,
                                       {.resolution = 8, .center_crop = true});
  CHECK(tools::tensor_to_image(xt::view(center(0).images, 0)).pixel(0, 0)[0] == 80);
  CHECK(bool(center(5).images == center(0).images));
}

TEST_CASE("data source: DreamBooth pairs instance and class examples", "[dataset]") {
  TempDir dir;
  std::vector<Example> instance, cls;
  for (int i = 0; i < 3; ++i) {
    write_solid(dir / png_name("i", i), i, 0);
    instance.push_back({dir / png_name("i", i), "instance 1"});
  }
  for (int c = 0; c < 5; ++c) {
    write_solid(dir / png_name("c", c), c, 1);
    cls.push_back({dir / png_name("c", c), "class 2"});
  }
  tools::ImageCaptionDataSource data(
      instance, number_tokenizer,
      {.resolution = 8, .center_crop = true, .train_batch_size = 2, .seed = 3}, cls);
  REQUIRE(data.with_prior_preservation());
  CHECK(data.num_examples() == 5);  // max(3, 5), as diffusers' DreamBoothDataset
  CHECK(data.steps_per_epoch(2) == 3);
  std::multiset<int> class_seen, instance_seen;
  for (std::uint64_t m = 0; m < 3; ++m) {
    const auto batch = data(m);
    const std::size_t rows = batch.images.shape()[0];
    REQUIRE(batch.class_images.shape() == batch.images.shape());
    REQUIRE(batch.class_token_ids.shape()[0] == rows);
    for (std::size_t j = 0; j < rows; ++j) {
      CHECK(batch.token_ids(j, 0) == 1);
      CHECK(batch.class_token_ids(j, 0) == 2);
      CHECK(batch.images(j, 1, 0, 0) == Approx(-1.0));  // green 0: an instance image
      CHECK(batch.class_images(j, 1, 0, 0) > -0.5f);    // green 100: a class image
      const int a = id_of_row(batch.images, j), c = id_of_row(batch.class_images, j);
      CHECK(a == c % 3);  // dataset index i = c pairs instance i mod 3 with class i mod 5
      instance_seen.insert(a), class_seen.insert(c);
    }
  }
  CHECK(class_seen == std::multiset<int>{0, 1, 2, 3, 4});
  REQUIRE(bool(data.batch_token_ids(2, true) == data(2).class_token_ids));
  CHECK(instance_seen == std::multiset<int>{0, 0, 1, 1, 2});

  // The batch composes into instance rows then class rows for the trainer.
  const auto composed = difftrain::train::compose_batch(data(0), true, 1.0, 1);
  CHECK(composed.images.shape()[0] == 4);
  CHECK(composed.num_instance == 2);
}

TEST_CASE("data source errors", "[dataset]") {
  TempDir dir;
  dir.write("bad.png", "not an image");
  const std::vector<Example> ex{{dir / "bad.png", "caption 0"}};
  tools::ImageCaptionDataSource data(ex, number_tokenizer, {.resolution = 8});
  REQUIRE_THROWS_WITH(data(0), Catch::Contains("bad.png"));
  REQUIRE_THROWS_AS(tools::ImageCaptionDataSource({}, number_tokenizer, {}), Error);
  REQUIRE_THROWS_AS(tools::ImageCaptionDataSource(ex, nullptr, {}), Error);
  REQUIRE_THROWS_AS(tools::ImageCaptionDataSource(ex, number_tokenizer, {.resolution = 0}), Error);
  REQUIRE_THROWS_AS(tools::ImageCaptionDataSource(ex, number_tokenizer, {.train_batch_size = 0}),
                    Error);
  auto wrong_rows = [](const std::vector<std::string>&) {
    return TokenIds(TokenIds::shape_type{1, 2});
  };
  write_solid(dir / "ok.png", 0);
  tools::ImageCaptionDataSource two({{dir / "ok.png", "a"}, {dir / "ok.png", "b"}}, wrong_rows,
                                    {.resolution = 8, .train_batch_size = 2});
  REQUIRE_THROWS_WITH(two(0), Catch::Contains("tokenizer"));
}

TEST_CASE("scan_image_folder: a metadata.jsonl caption may be a list of strings", "[dataset]") {
  TempDir dir;
  write_solid(dir / "a.png", 0);
  write_solid(dir / "b.png", 1);
  write_solid(dir / "c.png", 2);
  dir.write("metadata.jsonl",
            "{\"file_name\": \"a.png\", \"text\": [\"caption 1\", \"caption 2\", \"caption 3\"]}\n"
            "{\"file_name\": \"b.png\", \"text\": [\"only one\"]}\n"
            "{\"file_name\": \"c.png\", \"text\": \"plain\"}\n");
  const auto ex = tools::scan_image_folder(dir.str());
  REQUIRE(ex.size() == 3);
  CHECK(ex[0].caption == "caption 1");  // the first: diffusers' caption[0] outside training
  CHECK(ex[0].caption_choices == std::vector<std::string>{"caption 1", "caption 2", "caption 3"});
  CHECK(ex[1] == Example{dir / "b.png", "only one"});  // a list of one is that caption
  CHECK(ex[2] == Example{dir / "c.png", "plain"});

  // An empty list or a non-string element: an Error naming the file and the line.
  dir.write("metadata.jsonl",
            "{\"file_name\": \"a.png\", \"text\": \"ok\"}\n"
            "{\"file_name\": \"b.png\", \"text\": []}\n");
  REQUIRE_THROWS_WITH(tools::scan_image_folder(dir.str()), Catch::Contains("metadata.jsonl") &&
                                                               Catch::Contains("line 2") &&
                                                               Catch::Contains("empty list"));
  dir.write("metadata.jsonl", "{\"file_name\": \"a.png\", \"text\": [\"x\", 7]}\n");
  REQUIRE_THROWS_WITH(tools::scan_image_folder(dir.str()),
                      Catch::Contains("metadata.jsonl") && Catch::Contains("line 1") &&
                          Catch::Contains("non-string") && Catch::Contains("7"));
  dir.write("metadata.jsonl", "{\"file_name\": \"a.png\", \"text\": [[\"nested\"]]}\n");
  REQUIRE_THROWS_WITH(tools::scan_image_folder(dir.str()), Catch::Contains("line 1"));
  // allow_missing_captions is about a missing column, not a malformed list.
  REQUIRE_THROWS_AS(tools::scan_image_folder(dir.str(), {.allow_missing_captions = true}), Error);
}

TEST_CASE("data source: a caption list gives one caption per epoch, drawn from (seed, epoch, i)",
          "[dataset]") {
  TempDir dir;
  std::vector<Example> ex;
  for (int i = 0; i < 3; ++i) {
    write_solid(dir / png_name("img", i), i);
    ex.push_back({dir / png_name("img", i), "caption " + std::to_string(10 * i)});
  }
  // Example 1 has the captions "caption 10" .. "caption 14" (token id 10..14).
  ex[1].caption_choices = {"caption 10", "caption 11", "caption 12", "caption 13", "caption 14"};
  const tools::DataSourceOptions o{
      .resolution = 8, .center_crop = true, .train_batch_size = 2, .seed = 5};
  tools::ImageCaptionDataSource data(ex, number_tokenizer, o);
  const std::size_t steps = data.steps_per_epoch();  // 2
  std::map<int, int> drawn;                          // caption id of example 1 → epochs
  for (std::uint64_t e = 0; e < 60; ++e) {
    const std::string& c = data.example_caption(1, e);
    drawn[std::stoi(c.substr(c.rfind(' ') + 1))] += 1;
    CHECK(data.example_caption(0, e) == "caption 0");  // a single caption every epoch
    // The micro-batches of epoch e tokenize example 1 with the caption of (seed, e, 1).
    for (std::uint64_t m = e * steps; m < (e + 1) * steps; ++m) {
      const auto rows = data.batch_indices(m);
      const TokenIds ids = data.batch_token_ids(m);
      for (std::size_t j = 0; j < rows.size(); ++j) {
        const std::string& expected = data.example_caption(rows[j], e);
        CHECK(ids(j, 0) == std::stoll(expected.substr(expected.rfind(' ') + 1)));
      }
      if (e % 20 == 0) REQUIRE(bool(data(m).token_ids == ids));
    }
  }
  CHECK(drawn.size() == 5);  // every caption is drawn in 60 epochs (each with probability 1/5)
  for (const auto& [id, count] : drawn) {
    CHECK(id >= 10);
    CHECK(id <= 14);
  }

  // Deterministic: a fresh source (e.g. a resumed run) draws the same; another seed draws others.
  tools::ImageCaptionDataSource fresh(ex, number_tokenizer, o);
  auto other_options = o;
  other_options.seed = 6;
  tools::ImageCaptionDataSource other(ex, number_tokenizer, other_options);
  bool differs = false;
  for (std::uint64_t m : {9u, 3u, 40u, 3u}) REQUIRE(bool(fresh(m).token_ids == data(m).token_ids));
  for (std::uint64_t e = 0; e < 30; ++e)
    differs = differs || other.example_caption(1, e) != data.example_caption(1, e);
  CHECK(differs);
}

TEST_CASE("data source: the interpolation option picks resize_image's filter", "[dataset]") {
  TempDir dir;
  // 20×12 noise: resolution 6 resizes it to 10×6 before the center crop.
  Image im(20, 12);
  std::uint32_t state = 3;
  for (auto& v : im.rgb) v = std::uint8_t((state = state * 1664525u + 1013904223u) >> 24);
  tools::save_png(dir / "noise.png", im);
  const std::vector<Example> ex{{dir / "noise.png", "caption 0"}};
  std::set<std::vector<std::uint8_t>> distinct;
  for (const auto& choice : tools::kInterpolations) {
    INFO(choice.name);
    tools::ImageCaptionDataSource data(
        ex, number_tokenizer,
        {.resolution = 6, .center_crop = true, .interpolation = choice.value});
    const Image out = data.example_image(0, 0);
    CHECK(out == tools::resize_and_crop(im, 6, true, 0, false, choice.value));
    distinct.insert(out.rgb);
  }
  CHECK(distinct.size() == 6);  // nearest and nearest_exact are the same filter (PIL's NEAREST)
  CHECK(tools::DataSourceOptions{}.interpolation == tools::Interpolation::bilinear);
}

TEST_CASE("kohya folders: \"<repeats>_<name>\" subfolders, class tokens, ignored folders",
          "[dataset][kohya]") {
  CHECK(tools::kohya_folder_repeats("10_sks dog") == 10);
  CHECK(tools::kohya_folder_repeats("1_a_b") == 1);
  CHECK(tools::kohya_folder_repeats("0_x") == 0);
  CHECK(tools::kohya_folder_repeats("x_10") == 0);
  CHECK(tools::kohya_folder_repeats("_x") == 0);
  CHECK(tools::kohya_folder_repeats("12") == 0);
  CHECK(tools::kohya_folder_repeats("1a_x") == 0);

  TempDir dir;
  const fs::path root = dir.path() / "train";
  fs::create_directories(root / "3_sks dog");
  fs::create_directories(root / "1_cat");
  fs::create_directories(root / "logs");
  write_solid((root / "3_sks dog" / "b.png").string(), 1);
  write_solid((root / "3_sks dog" / "a.png").string(), 0);
  dir.write("train/3_sks dog/a.txt", "sks dog, on grass");
  write_solid((root / "1_cat" / "c.png").string(), 2);
  dir.write("train/notes.txt", "not an image: fine");
  CHECK(tools::is_kohya_folder(root.string()));
  CHECK_FALSE(tools::is_kohya_folder((root / "1_cat").string()));

  std::vector<std::string> ignored;
  const std::vector<Example> ex = tools::scan_kohya_folder(root.string(), {}, false, &ignored);
  REQUIRE(ex.size() == 3);
  CHECK(ex[0].image_path == (root / "1_cat" / "c.png").string());  // folders in name order
  CHECK(ex[0].caption == "cat");                                   // class tokens
  CHECK(ex[0].num_repeats == 1);
  CHECK(ex[1].caption == "sks dog, on grass");  // the caption file
  CHECK(ex[2].caption == "sks dog");
  CHECK(ex[1].num_repeats == 3);
  CHECK(ex[2].num_repeats == 3);
  CHECK_FALSE(ex[1].is_reg);
  CHECK(ignored == std::vector<std::string>{(root / "logs").string()});
  CHECK(tools::scan_kohya_folder(root.string(), {}, true)[2].is_reg);

  // Each image is seen num_repeats times per epoch, with its own draws per repeat.
  const tools::DataSourceOptions o{.resolution = 8, .train_batch_size = 2, .seed = 4};
  tools::ImageCaptionDataSource data(ex, number_tokenizer_any, o);
  CHECK(data.num_examples() == 7);
  CHECK(data.steps_per_epoch() == 4);
  for (std::uint64_t e = 0; e < 3; ++e) {
    std::map<int, int> seen;  // image id → rows
    for (std::uint64_t m = 4 * e; m < 4 * e + 4; ++m) {
      const auto batch = data(m);
      CHECK(batch.sample_weights.empty());  // no regularisation images
      for (std::size_t j = 0; j < batch.images.shape()[0]; ++j) seen[id_of_row(batch.images, j)]++;
    }
    CHECK(seen == std::map<int, int>{{0, 3}, {1, 3}, {2, 1}});
  }

  // Errors: an image directly in the folder; no "<N>_" folder; an empty one.
  write_solid((root / "stray.png").string(), 3);
  CHECK_THROWS_WITH(tools::scan_kohya_folder(root.string(), {}, false),
                    Catch::Contains("stray.png") && Catch::Contains("<repeats>_<name>"));
  fs::remove(root / "stray.png");
  fs::create_directories(root / "2_empty");
  CHECK_THROWS_WITH(tools::scan_kohya_folder(root.string(), {}, false), Catch::Contains("2_empty"));
  CHECK_THROWS_WITH(tools::scan_kohya_folder((root / "logs").string(), {}, false),
                    Catch::Contains("no \"<repeats>_<name>\" image folders"));
}

TEST_CASE("kohya regularisation images: balanced to the training count, weighted in the loss",
          "[dataset][kohya]") {
  auto examples = [](std::vector<std::size_t> repeats, bool is_reg) {
    std::vector<Example> out;
    for (std::size_t k = 0; k < repeats.size(); ++k) {
      Example e{"img" + std::to_string(k) + ".png", "caption " + std::to_string(k)};
      e.num_repeats = repeats[k];
      e.is_reg = is_reg;
      out.push_back(e);
    }
    return out;
  };
  auto repeats_of = [](const std::vector<Example>& ex) {
    std::vector<std::size_t> r;
    for (const Example& e : ex) r.push_back(e.num_repeats);
    return r;
  };
  // 7 training views; 3 reg images of 1 repeat: all taken, then one more each in turn.
  const auto train = examples({3, 3, 1}, false);
  CHECK(repeats_of(tools::balance_regularization(train, examples({1, 1, 1}, true))) ==
        std::vector<std::size_t>{3, 2, 2});
  // Reg images with 5 repeats: the first pass stops once 7 is reached (overshooting to 10).
  CHECK(repeats_of(tools::balance_regularization(train, examples({5, 5, 5}, true))) ==
        std::vector<std::size_t>{5, 5});
  // Exactly enough: unchanged.
  CHECK(repeats_of(tools::balance_regularization(train, examples({4, 3}, true))) ==
        std::vector<std::size_t>{4, 3});

  // Through the data source: reg rows get the weight, instance rows 1.
  TempDir dir;
  std::vector<Example> ex;
  for (int i = 0; i < 4; ++i) {
    write_solid(dir / png_name("img", i), i);
    Example e{dir / png_name("img", i), "caption " + std::to_string(i)};
    e.is_reg = i >= 2;
    ex.push_back(e);
  }
  tools::DataSourceOptions o{.resolution = 8, .train_batch_size = 3, .seed = 2};
  o.reg_loss_weight = 0.25f;
  tools::ImageCaptionDataSource data(ex, number_tokenizer_any, o);
  std::size_t reg_rows = 0;
  for (std::uint64_t m = 0; m < 6; ++m) {
    const auto batch = data(m);
    const auto rows = data.batch_indices(m);
    REQUIRE(batch.sample_weights.size() == rows.size());
    REQUIRE(data.batch_sample_weights(m) == batch.sample_weights);
    for (std::size_t j = 0; j < rows.size(); ++j) {
      const bool reg = id_of_row(batch.images, j) >= 2;
      CHECK(batch.sample_weights[j] == (reg ? 0.25f : 1.0f));
      reg_rows += reg;
    }
  }
  CHECK(reg_rows == 6);  // 2 of 4 rows per epoch, 3 epochs
  o.reg_loss_weight = -1;
  CHECK_THROWS_WITH(tools::ImageCaptionDataSource(ex, number_tokenizer_any, o),
                    Catch::Contains("reg_loss_weight is -1"));
}

TEST_CASE("data source with buckets: one bucket per micro-batch, each index once per epoch",
          "[dataset][bucket]") {
  TempDir dir;
  // Sizes of different aspect ratios; resolution 16 with steps 4: buckets of area <= 256.
  const std::vector<std::pair<int, int>> sizes = {{32, 16}, {16, 32}, {24, 24}, {40, 20},
                                                  {20, 40}, {16, 16}, {36, 18}};
  std::vector<Example> ex;
  for (int i = 0; i < int(sizes.size()); ++i) {
    write_solid(dir / png_name("img", i), i, 0, sizes[std::size_t(i)].first,
                sizes[std::size_t(i)].second);
    ex.push_back({dir / png_name("img", i), "caption " + std::to_string(i)});
  }
  ex[0].num_repeats = 2;  // 8 dataset indices
  tools::DataSourceOptions o{
      .resolution = 16, .random_flip = true, .train_batch_size = 2, .seed = 9};
  o.buckets = tools::BucketOptions{.resolution_width = 16,
                                   .resolution_height = 16,
                                   .min_bucket_reso = 4,
                                   .max_bucket_reso = 32,
                                   .bucket_reso_steps = 4};
  tools::ImageCaptionDataSource data(ex, number_tokenizer, o);
  REQUIRE(data.num_examples() == 8);
  // Each image's bucket has the least aspect error among the predefined ones and its resize
  // covers it; wide images go to wide buckets.
  const auto predefined = tools::make_bucket_resolutions(16, 16, 4, 32, 4);
  for (std::size_t k = 0; k < ex.size(); ++k) {
    const auto& c = data.bucket_choice(k);
    const double aspect = double(sizes[k].first) / sizes[k].second;
    for (const auto& b : predefined)
      CHECK(std::abs(c.ar_error) <= std::abs(double(b.width) / b.height - aspect) + 1e-12);
    CHECK(c.resized_width >= c.bucket.width);
    CHECK(c.resized_height >= c.bucket.height);
    CHECK((aspect > 1) == (c.bucket.width > c.bucket.height));
  }
  std::size_t expected_steps = 0;
  for (const auto& rows : data.bucket_rows()) expected_steps += (rows.size() + 1) / 2;
  CHECK(data.steps_per_epoch() == expected_steps);
  CHECK(data.buckets().size() >= 3);

  tools::ImageCaptionDataSource fresh(ex, number_tokenizer, o);
  bool orders_differ = false;
  for (std::uint64_t e = 0; e < 3; ++e) {
    std::multiset<std::size_t> seen;
    for (std::uint64_t m = e * expected_steps; m < (e + 1) * expected_steps; ++m) {
      const auto rows = data.batch_indices(m);
      const auto batch = data(m);
      REQUIRE(batch.images.shape()[0] == rows.size());
      const auto& bucket = data.bucket_choice(data.example_of(rows[0])).bucket;
      CHECK(batch.images.shape()[2] == std::size_t(bucket.height));
      CHECK(batch.images.shape()[3] == std::size_t(bucket.width));
      for (std::size_t j = 0; j < rows.size(); ++j) {
        CHECK(data.bucket_choice(data.example_of(rows[j])).bucket == bucket);  // one bucket
        CHECK(id_of_row(batch.images, j) == int(data.example_of(rows[j])));
        seen.insert(rows[j]);
      }
      REQUIRE(bool(fresh(m).images == batch.images));  // resume: a function of m
    }
    CHECK(seen == std::multiset<std::size_t>{0, 1, 2, 3, 4, 5, 6, 7});
    orders_differ = orders_differ || data.epoch_permutation(e) != data.epoch_permutation(e + 1);
  }
  CHECK(orders_differ);

  // Class images with buckets: an error that names the kohya alternative.
  CHECK_THROWS_WITH(tools::ImageCaptionDataSource(ex, number_tokenizer, o, ex),
                    Catch::Contains("--reg_data_dir"));
}

TEST_CASE(
    "masks (kohya's masked loss): the alpha channel or a mask folder, cropped and flipped "
    "with the image",
    "[dataset][mask]") {
  TempDir dir;
  // 16×12 RGBA: red encodes the column (x·16), alpha is opaque on the left half only.
  const int w = 16, h = 12;
  std::vector<std::uint8_t> rgba(std::size_t(w * h * 4));
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      std::uint8_t* p = rgba.data() + 4 * (y * w + x);
      p[0] = std::uint8_t(16 * x), p[1] = 0, p[2] = 0, p[3] = x < w / 2 ? 255 : 0;
    }
  std::vector<Example> ex;
  for (int i = 0; i < 3; ++i) {
    const std::string path = dir / png_name("rgba", i);
    REQUIRE(stbi_write_png(path.c_str(), w, h, 4, rgba.data(), w * 4));
    ex.push_back({path, "caption " + std::to_string(i)});
  }
  tools::DataSourceOptions o{
      .resolution = 8, .random_flip = true, .train_batch_size = 3, .seed = 3};
  o.alpha_mask = true;
  tools::ImageCaptionDataSource data(ex, number_tokenizer, o);
  REQUIRE(data.has_masks());
  std::size_t flipped = 0;
  for (std::uint64_t m = 0; m < 6; ++m) {
    const auto batch = data(m);
    REQUIRE(batch.mask.has_value());
    REQUIRE(batch.mask->shape() == std::array<std::size_t, 4>{3, 1, 8, 8});
    for (std::size_t j = 0; j < 3; ++j) {
      // Resized to 10×8 and cropped to 8×8: the mask's opaque side is the image's low-red side.
      const bool mirrored = batch.images(j, 0, 0, 0) > batch.images(j, 0, 0, 7);
      flipped += mirrored;
      for (std::size_t y = 0; y < 8; ++y) {
        CHECK(std::abs((*batch.mask)(j, 0, y, mirrored ? 7 : 0) - 1.0f) < 1e-6f);
        CHECK(std::abs((*batch.mask)(j, 0, y, mirrored ? 0 : 7)) < 1e-6f);
      }
      for (float v : xt::view(*batch.mask, j)) REQUIRE((v >= 0 && v <= 1));
    }
  }
  CHECK(flipped > 0);
  CHECK(flipped < 18);

  // A mask folder: the same-named image's red channel; a missing or misshapen mask is an error.
  const fs::path masks = dir.path() / "masks";
  fs::create_directories(masks);
  Image half(w, h);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w / 2; ++x) half.pixel(x, y)[0] = 255;
  for (int i = 0; i < 3; ++i) tools::save_png((masks / png_name("rgba", i)).string(), half);
  o.alpha_mask = false;
  o.mask_dir = masks.string();
  tools::ImageCaptionDataSource from_folder(ex, number_tokenizer, o);
  for (std::uint64_t m = 0; m < 3; ++m) CHECK(bool(*from_folder(m).mask == *data(m).mask));
  fs::remove(masks / png_name("rgba", 1));
  tools::save_png((masks / png_name("rgba", 2)).string(), Image(8, 8));
  tools::ImageCaptionDataSource broken(ex, number_tokenizer, o);
  CHECK_THROWS_WITH(broken.example_mask(1, 0),
                    Catch::Contains("no mask for") && Catch::Contains(png_name("rgba", 1)));
  CHECK_THROWS_WITH(broken.example_mask(2, 0),
                    Catch::Contains("is 8x8, expected the image's 16x12"));
  o.alpha_mask = true;
  CHECK_THROWS_WITH(tools::ImageCaptionDataSource(ex, number_tokenizer, o),
                    Catch::Contains("one mask source"));
}

TEST_CASE(
    "size conditioning (SDXL time ids): the center crop of a non-square image; off by default",
    "[dataset][sdxl]") {
  TempDir dir;
  write_solid(dir / "wide.png", 1, 0, 12, 8);  // 12 wide, 8 high
  const std::vector<Example> ex{{dir / "wide.png", "caption 1"}};
  tools::DataSourceOptions o{.resolution = 4, .center_crop = true};

  // Off by default: no time ids.
  CHECK_FALSE(tools::DataSourceOptions{}.size_conditioning);
  tools::ImageCaptionDataSource plain(ex, number_tokenizer, o);
  const auto off = plain(0);
  CHECK_FALSE(off.time_ids.has_value());
  CHECK_FALSE(off.class_time_ids.has_value());

  // 12×8 → shorter side 8 to 4: resized 6×4; the 4×4 center crop starts at left (6 − 4)/2 = 1,
  // top 0. Row: [orig h 8, orig w 12, crop top 0, crop left 1, target 4, 4].
  const std::array<double, 6> expected = {8, 12, 0, 1, 4, 4};
  o.size_conditioning = true;
  for (const bool cache : {false, true}) {
    INFO("cache_images " << cache);
    o.cache_images = cache;
    tools::ImageCaptionDataSource data(ex, number_tokenizer, o);
    SdxlSizeConditioning size;  // asked first, before any batch decodes the image
    const Image image = data.example_image(0, 0, false, &size);
    const auto batch = data(0);
    REQUIRE(batch.time_ids.has_value());
    REQUIRE(batch.time_ids->shape() == std::array<std::size_t, 2>{1, 6});
    CHECK_FALSE(batch.class_time_ids.has_value());  // no class examples
    check_time_ids(*batch.time_ids, 0, expected, size);
    CHECK(image == tools::tensor_to_image(xt::view(batch.images, 0)));
    CHECK(bool(batch.images == plain(0).images));  // the images are unchanged
  }
}

TEST_CASE("size conditioning: random crops and flips, recorded as the crop is trained",
          "[dataset][sdxl]") {
  TempDir dir;
  // A wide and a tall noise image: resolution 6 resizes them to 10×6 and 6×10, so the random crop
  // moves left in one and top in the other.
  constexpr int R = 6;
  const std::vector<std::pair<int, int>> sizes = {{20, 12}, {12, 20}};  // (width, height)
  const std::vector<std::pair<int, int>> resized_sizes = {{10, 6}, {6, 10}};
  std::vector<Example> ex;
  std::vector<Image> resized;  // the decoded images, resized
  for (std::size_t k = 0; k < sizes.size(); ++k) {
    const std::string path = dir / png_name("noise", int(k));
    tools::save_png(path, lcg_image(sizes[k].first, sizes[k].second, std::uint32_t(k + 1)));
    ex.push_back({path, "caption " + std::to_string(k)});
    resized.push_back(tools::resize_image(tools::load_image(path), resized_sizes[k].first,
                                          resized_sizes[k].second));
  }
  for (const bool cache : {false, true}) {
    INFO("cache_images " << cache);
    tools::DataSourceOptions o{
        .resolution = R, .random_flip = true, .train_batch_size = 2, .seed = 7};
    o.cache_images = cache;
    o.size_conditioning = true;
    tools::ImageCaptionDataSource data(ex, number_tokenizer, o);
    REQUIRE(data.steps_per_epoch() == 1);  // micro-batch m is epoch m
    std::size_t flipped = 0, unflipped = 0;
    std::set<std::pair<int, int>> origins[2];  // (top, left) per image
    for (std::uint64_t m = 0; m < 40; ++m) {
      const auto batch = data(m);
      const auto rows = data.batch_indices(m);
      REQUIRE(batch.time_ids.has_value());
      REQUIRE(batch.time_ids->shape() == std::array<std::size_t, 2>{rows.size(), 6});
      for (std::size_t j = 0; j < rows.size(); ++j) {
        const std::size_t k = data.example_of(rows[j]);
        const difftrain::Tensor<float, 2>& t = *batch.time_ids;
        const int W = resized[k].width, H = resized[k].height;
        const int top = int(t(j, 2)), left = int(t(j, 3));
        REQUIRE(top >= 0);
        REQUIRE(top + R <= H);
        REQUIRE(left >= 0);
        REQUIRE(left + R <= W);
        SdxlSizeConditioning size;
        const Image row = tools::tensor_to_image(xt::view(batch.images, j));
        CHECK(row == data.example_image(rows[j], m, false, &size));
        check_time_ids(
            t, j,
            {double(sizes[k].second), double(sizes[k].first), double(top), double(left), R, R},
            size);
        // The recorded left is in the flipped image when the row is flipped: the window of the
        // unflipped image starts at W − left − R, then mirrored. Exactly one reading matches.
        const bool as_flipped = row == tools::crop_image(resized[k], W - left - R, top, R, true);
        const bool as_unflipped = row == tools::crop_image(resized[k], left, top, R, false);
        REQUIRE(as_flipped != as_unflipped);
        flipped += as_flipped, unflipped += as_unflipped;
        origins[k].insert({top, left});
      }
    }
    CHECK(flipped > 10);  // 80 rows, each flipped with probability 1/2
    CHECK(unflipped > 10);
    CHECK(origins[0].size() >= 4);  // left in [0, 4]: many seen
    CHECK(origins[1].size() >= 4);  // top in [0, 4]
  }
}

TEST_CASE("size conditioning with buckets: the target size is the bucket", "[dataset][sdxl]") {
  TempDir dir;
  const std::vector<std::pair<int, int>> sizes = {{32, 16}, {16, 32}, {24, 24}, {40, 20}, {20, 36}};
  std::vector<Example> ex;
  for (int i = 0; i < int(sizes.size()); ++i) {
    write_solid(dir / png_name("img", i), i, 0, sizes[std::size_t(i)].first,
                sizes[std::size_t(i)].second);
    ex.push_back({dir / png_name("img", i), "caption " + std::to_string(i)});
  }
  for (const bool cache : {false, true}) {  // cached: the sizes come from assign_buckets' decode
    INFO("cache_images " << cache);
    tools::DataSourceOptions o{
        .resolution = 16, .random_flip = true, .train_batch_size = 2, .seed = 9};
    o.cache_images = cache;
    o.size_conditioning = true;
    o.buckets = tools::BucketOptions{.resolution_width = 16,
                                     .resolution_height = 16,
                                     .min_bucket_reso = 4,
                                     .max_bucket_reso = 32,
                                     .bucket_reso_steps = 4};
    tools::ImageCaptionDataSource data(ex, number_tokenizer, o);
    REQUIRE(data.buckets().size() >= 3);
    const std::size_t steps = data.steps_per_epoch();
    for (std::uint64_t m = 0; m < 3 * steps; ++m) {
      const auto batch = data(m);
      const auto rows = data.batch_indices(m);
      REQUIRE(batch.time_ids.has_value());
      REQUIRE(batch.time_ids->shape() == std::array<std::size_t, 2>{rows.size(), 6});
      const double H = double(batch.images.shape()[2]), W = double(batch.images.shape()[3]);
      for (std::size_t j = 0; j < rows.size(); ++j) {
        const std::size_t k = data.example_of(rows[j]);
        const tools::BucketChoice& c = data.bucket_choice(k);
        REQUIRE(H == c.bucket.height);
        REQUIRE(W == c.bucket.width);
        const difftrain::Tensor<float, 2>& t = *batch.time_ids;
        const int top = int(t(j, 2)), left = int(t(j, 3));
        CHECK(top >= 0);
        CHECK(top <= c.resized_height - c.bucket.height);
        CHECK(left >= 0);
        CHECK(left <= c.resized_width - c.bucket.width);
        SdxlSizeConditioning size;
        data.example_image(rows[j], m / steps, false, &size);
        check_time_ids(
            t, j,
            {double(sizes[k].second), double(sizes[k].first), double(top), double(left), H, W},
            size);
      }
    }
  }
}

TEST_CASE("size conditioning with class images: class_time_ids of the class rows",
          "[dataset][sdxl]") {
  TempDir dir;
  std::vector<Example> instance, cls;
  for (int i = 0; i < 3; ++i) {  // 12 wide, 8 high: at resolution 8 the center crop's left is 2
    write_solid(dir / png_name("i", i), i, 0, 12, 8);
    instance.push_back({dir / png_name("i", i), "instance 1"});
  }
  for (int c = 0; c < 5; ++c) {  // 8 wide, 12 high: its top is 2
    write_solid(dir / png_name("c", c), c, 1, 8, 12);
    cls.push_back({dir / png_name("c", c), "class 2"});
  }
  tools::DataSourceOptions o{.resolution = 8, .center_crop = true, .train_batch_size = 2};
  o.size_conditioning = true;
  tools::ImageCaptionDataSource data(instance, number_tokenizer, o, cls);
  for (std::uint64_t m = 0; m < 3; ++m) {
    const auto batch = data(m);
    const auto rows = data.batch_indices(m);
    REQUIRE(batch.time_ids.has_value());
    REQUIRE(batch.class_time_ids.has_value());
    REQUIRE(batch.time_ids->shape() == std::array<std::size_t, 2>{rows.size(), 6});
    REQUIRE(batch.class_time_ids->shape() == std::array<std::size_t, 2>{rows.size(), 6});
    for (std::size_t j = 0; j < rows.size(); ++j) {
      SdxlSizeConditioning size, class_size;
      data.example_image(rows[j], 0, false, &size);
      data.example_image(rows[j], 0, true, &class_size);
      check_time_ids(*batch.time_ids, j, {8, 12, 0, 2, 8, 8}, size);
      check_time_ids(*batch.class_time_ids, j, {12, 8, 2, 0, 8, 8}, class_size);
    }
  }
}
