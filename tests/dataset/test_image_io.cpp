// tools/image_io.hpp: PNG round trips, tensor conversion, grid layout, resize/crop/flip.

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "image_io.hpp"
#include "support/temp_dir.hpp"
#include "support/tensor_match.hpp"

using difftrain::Error;
using difftrain::tools::Image;
namespace tools = difftrain::tools;

namespace {

// Pseudo-random pixels (a fixed LCG: any content works, it only has to be varied).
Image noise_image(int w, int h, std::uint32_t seed) {
  Image im(w, h);
  for (auto& v : im.rgb) v = std::uint8_t((seed = seed * 1664525u + 1013904223u) >> 24);
  return im;
}

Image solid(int w, int h, std::uint8_t r, std::uint8_t g, std::uint8_t b) {
  Image im(w, h);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      im.pixel(x, y)[0] = r, im.pixel(x, y)[1] = g, im.pixel(x, y)[2] = b;
    }
  return im;
}

std::vector<int> px(const Image& im, int x, int y) {
  const auto* p = im.pixel(x, y);
  return {p[0], p[1], p[2]};
}

}  // namespace

TEST_CASE("save_png then load_image gives the same pixels", "[image_io]") {
  difftrain::test::TempDir dir;
  const Image image = noise_image(37, 23, 7);
  tools::save_png(dir / "a.png", image);
  CHECK_FALSE(std::filesystem::exists(dir / "a.png.tmp"));  // renamed into place
  const Image back = tools::load_image(dir / "a.png");
  REQUIRE(back.width == 37);
  REQUIRE(back.height == 23);
  REQUIRE(back.rgb == image.rgb);

  // Overwriting replaces the file.
  const Image other = noise_image(5, 4, 9);
  tools::save_png(dir / "a.png", other);
  REQUIRE(tools::load_image(dir / "a.png") == other);
}

TEST_CASE("load_image converts grey and RGBA files to RGB", "[image_io]") {
  difftrain::test::TempDir dir;
  const std::uint8_t grey[6] = {0, 10, 100, 200, 250, 255};  // 3×2
  REQUIRE(stbi_write_png((dir / "grey.png").c_str(), 3, 2, 1, grey, 3));
  const Image g = tools::load_image(dir / "grey.png");
  REQUIRE(g.width == 3);
  REQUIRE(g.height == 2);
  for (int i = 0; i < 6; ++i) CHECK(px(g, i % 3, i / 3) == std::vector<int>(3, grey[i]));

  const std::uint8_t rgba[8] = {10, 20, 30, 0, 40, 50, 60, 255};  // 2×1, alpha dropped
  REQUIRE(stbi_write_png((dir / "rgba.png").c_str(), 2, 1, 4, rgba, 8));
  const Image c = tools::load_image(dir / "rgba.png");
  CHECK(px(c, 0, 0) == std::vector<int>{10, 20, 30});
  CHECK(px(c, 1, 0) == std::vector<int>{40, 50, 60});

  // JPEG is lossy: a solid colour comes back close.
  const Image teal = solid(16, 16, 0, 128, 128);
  REQUIRE(stbi_write_jpg((dir / "teal.jpg").c_str(), 16, 16, 3, teal.rgb.data(), 95));
  const Image j = tools::load_image(dir / "teal.jpg");
  REQUIRE(j.width == 16);
  REQUIRE_CLOSE(j.rgb, teal.rgb, 0, 3);
}

TEST_CASE("load_image and save_png errors name the file", "[image_io]") {
  difftrain::test::TempDir dir;
  REQUIRE_THROWS_WITH(tools::load_image(dir / "missing.png"),
                      Catch::Contains("missing.png") && Catch::Contains("load_image"));
  dir.write("text.png", "this is not a PNG file");
  REQUIRE_THROWS_WITH(tools::load_image(dir / "text.png"), Catch::Contains("text.png"));

  const std::string target = dir / "no_such_folder/out.png";
  REQUIRE_THROWS_WITH(tools::save_png(target, solid(2, 2, 1, 2, 3)), Catch::Contains("out.png"));
  CHECK_FALSE(std::filesystem::exists(target));
  REQUIRE_THROWS_AS(tools::save_png(dir / "empty.png", Image{}), Error);
  CHECK_FALSE(std::filesystem::exists(dir / "empty.png"));
}

TEST_CASE("image_to_tensor and tensor_to_image", "[image_io]") {
  Image all(256, 1);  // every 8-bit value once, in each channel
  for (int x = 0; x < 256; ++x)
    for (int c = 0; c < 3; ++c) all.pixel(x, 0)[c] = std::uint8_t((x + 85 * c) % 256);
  const auto t = tools::image_to_tensor(all);
  REQUIRE(t.shape()[0] == 3);
  REQUIRE(t.shape()[1] == 1);
  REQUIRE(t.shape()[2] == 256);
  for (int x = 0; x < 256; ++x)
    for (int c = 0; c < 3; ++c)
      REQUIRE(t(c, 0, x) == Approx(((x + 85 * c) % 256) / 127.5 - 1.0).margin(1e-6));
  CHECK(t(0, 0, 0) == -1.0f);
  CHECK(t(0, 0, 255) == 1.0f);
  REQUIRE(tools::tensor_to_image(t) == all);  // exact round trip of every value

  // Out of range clamps, the midpoint rounds half up, NaN is black.
  difftrain::Tensor3<float> v(difftrain::Tensor3<float>::shape_type{3, 1, 4});
  const float row[4] = {-3.0f, 2.0f, 0.0f, NAN};
  for (int c = 0; c < 3; ++c)
    for (int x = 0; x < 4; ++x) v(c, 0, x) = row[x];
  const Image im = tools::tensor_to_image(v);
  CHECK(px(im, 0, 0) == std::vector<int>(3, 0));
  CHECK(px(im, 1, 0) == std::vector<int>(3, 255));
  CHECK(px(im, 2, 0) == std::vector<int>(3, 128));
  CHECK(px(im, 3, 0) == std::vector<int>(3, 0));

  REQUIRE_THROWS_AS(tools::tensor_to_image(
                        difftrain::Tensor3<float>(difftrain::Tensor3<float>::shape_type{4, 2, 2})),
                    Error);
}

TEST_CASE("save_png_grid places tile b at row b / columns, column b % columns", "[image_io]") {
  difftrain::test::TempDir dir;
  // 5 tiles of 4×3, each a solid colour; 2 columns, padding 2 → 3 rows, 14×17 pixels.
  const std::size_t b = 5, h = 3, w = 4;
  difftrain::Tensor4<float> images(difftrain::Tensor4<float>::shape_type{b, 3, h, w});
  // Tile i, channel c holds the 8-bit value 15·(3i + c) + 10, stored as byte / 127.5 − 1.
  auto byte = [](std::size_t i, std::size_t c) { return int(15 * (3 * i + c) + 10); };
  auto value = [&](std::size_t i, std::size_t c) { return float(byte(i, c)) / 127.5f - 1.0f; };
  for (std::size_t i = 0; i < b; ++i)
    for (std::size_t c = 0; c < 3; ++c)
      for (std::size_t y = 0; y < h; ++y)
        for (std::size_t x = 0; x < w; ++x) images(i, c, y, x) = value(i, c);
  tools::save_png_grid(dir / "grid.png", images, 2, 2);
  const Image grid = tools::load_image(dir / "grid.png");
  REQUIRE(grid.width == 14);
  REQUIRE(grid.height == 17);

  // Tile origins, written out by hand: columns at x = 2, 8; rows at y = 2, 7, 12.
  const int origin[5][2] = {{2, 2}, {8, 2}, {2, 7}, {8, 7}, {2, 12}};
  std::vector<int> owner(14 * 17, -1);
  for (int i = 0; i < 5; ++i)
    for (int y = 0; y < 3; ++y)
      for (int x = 0; x < 4; ++x) owner[(origin[i][1] + y) * 14 + origin[i][0] + x] = i;
  for (int y = 0; y < 17; ++y)
    for (int x = 0; x < 14; ++x) {
      const int i = owner[y * 14 + x];
      std::vector<int> expected(3, 0);  // padding and the empty sixth slot are black
      if (i >= 0)
        for (int c = 0; c < 3; ++c) expected[c] = byte(std::size_t(i), std::size_t(c));
      INFO("pixel (" << x << "," << y << ") of tile " << i);
      REQUIRE(px(grid, x, y) == expected);
    }

  // More columns than images: one row of B tiles; no padding.
  const Image row = tools::image_grid(images, 10, 0);
  CHECK(row.width == 20);
  CHECK(row.height == 3);
  REQUIRE_THROWS_AS(tools::image_grid(images, 0), Error);
}

TEST_CASE("resize_and_crop: sizes follow torchvision's Resize(shorter side)", "[image_io]") {
  CHECK(tools::shorter_side_size(200, 100, 50) == std::pair{100, 50});
  CHECK(tools::shorter_side_size(7, 10, 4) == std::pair{4, 5});  // floor(4·10/7) = 5
  CHECK(tools::shorter_side_size(10, 10, 3) == std::pair{3, 3});
  const Image out = tools::resize_and_crop(noise_image(30, 17, 3), 8, true, 0, false);
  CHECK(out.width == 8);
  CHECK(out.height == 8);
  // Upsampling a solid colour keeps it.
  const Image up = tools::resize_and_crop(solid(3, 5, 10, 200, 30), 12, false, 5, false);
  for (int y = 0; y < 12; ++y)
    for (int x = 0; x < 12; ++x) REQUIRE(px(up, x, y) == std::vector<int>{10, 200, 30});
  REQUIRE_THROWS_AS(tools::resize_and_crop(out, 0, true, 0, false), Error);
}

TEST_CASE("resize_image reproduces a linear ramp (bilinear / triangle filter)", "[image_io]") {
  // value(x) = 2x + 1 for x < 64: halving the width puts output pixel j over input 2j + 0.5,
  // where a symmetric filter of a linear function gives 4j + 2 (away from the clamped edges).
  Image ramp(64, 4);
  for (int y = 0; y < 4; ++y)
    for (int x = 0; x < 64; ++x)
      for (int c = 0; c < 3; ++c) ramp.pixel(x, y)[c] = std::uint8_t(2 * x + 1);
  const Image half = tools::resize_image(ramp, 32, 2);
  for (int j = 2; j < 30; ++j) REQUIRE(std::abs(int(half.pixel(j, 1)[0]) - (4 * j + 2)) <= 1);
}

TEST_CASE("center crop of a half-red half-blue image keeps the split in the middle; flip mirrors",
          "[image_io]") {
  // 200×100: x < 100 red, x ≥ 100 blue. Resize to 100×50, center crop 50 (x from 25): the
  // split falls between crop columns 24 and 25; the filter blurs only those two.
  Image image = solid(200, 100, 255, 0, 0);
  for (int y = 0; y < 100; ++y)
    for (int x = 100; x < 200; ++x) image.pixel(x, y)[0] = 0, image.pixel(x, y)[2] = 255;
  const Image crop = tools::resize_and_crop(image, 50, true, 0, false);
  const Image flip = tools::resize_and_crop(image, 50, true, 0, true);
  REQUIRE(crop.width == 50);
  REQUIRE(crop.height == 50);
  for (int y = 0; y < 50; ++y) {
    for (int x = 0; x < 24; ++x) REQUIRE(px(crop, x, y) == std::vector<int>{255, 0, 0});
    for (int x = 26; x < 50; ++x) REQUIRE(px(crop, x, y) == std::vector<int>{0, 0, 255});
    CHECK(crop.pixel(24, y)[0] > 127);  // more red left of the split, symmetrically
    CHECK(crop.pixel(24, y)[0] == crop.pixel(25, y)[2]);
    for (int x = 0; x < 50; ++x) REQUIRE(px(flip, x, y) == px(crop, 49 - x, y));
  }
}

TEST_CASE("random crop: a window of the image, deterministic in crop_seed", "[image_io]") {
  // 64×200 with the row number encoded in G (low byte) and B (high byte): resolution 64 needs no
  // resize, so the crop's top-left pixel tells where the window is.
  Image tall(64, 200);
  for (int y = 0; y < 200; ++y)
    for (int x = 0; x < 64; ++x) {
      auto* p = tall.pixel(x, y);
      p[0] = std::uint8_t(x), p[1] = std::uint8_t(y % 256), p[2] = std::uint8_t(y / 256);
    }
  auto top_of = [](const Image& c) { return int(c.pixel(0, 0)[1]) + 256 * c.pixel(0, 0)[2]; };
  int lo = 1000, hi = -1;
  for (std::uint64_t seed = 0; seed < 200; ++seed) {
    const Image c = tools::resize_and_crop(tall, 64, false, seed, false);
    const int top = top_of(c);
    REQUIRE(c == tools::crop_image(tall, 0, top, 64, false));            // an exact window
    REQUIRE(c == tools::resize_and_crop(tall, 64, false, seed, false));  // same seed, same crop
    lo = std::min(lo, top), hi = std::max(hi, top);
  }
  CHECK(lo >= 0);
  CHECK(hi <= 136);
  CHECK(lo < 15);  // the 200 draws spread over [0, 136]
  CHECK(hi > 121);
  CHECK(top_of(tools::resize_and_crop(tall, 64, true, 0, false)) == 68);  // center: 136 / 2
}

TEST_CASE("zoom_nearest repeats each pixel as a block", "[image_io]") {
  Image image(2, 1);
  image.pixel(0, 0)[0] = 10;
  image.pixel(1, 0)[1] = 200;
  const Image z = difftrain::tools::zoom_nearest(image, 3);
  REQUIRE(z.width == 6);
  REQUIRE(z.height == 3);
  for (int y = 0; y < 3; ++y)
    for (int x = 0; x < 6; ++x) {
      const std::uint8_t* src = image.pixel(x / 3, 0);
      const std::uint8_t* dst = z.pixel(x, y);
      CHECK(std::vector<int>(dst, dst + 3) == std::vector<int>(src, src + 3));
    }
  CHECK(difftrain::tools::zoom_nearest(image, 1).rgb == image.rgb);
  CHECK_THROWS_AS(difftrain::tools::zoom_nearest(image, 0), Error);
}
