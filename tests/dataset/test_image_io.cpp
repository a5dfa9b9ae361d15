// tools/image_io.hpp: PNG round trips, WebP decoding, tensor conversion, grid layout,
// resize/crop/flip, EXIF orientation (JPEG and WebP), PIL's resampling filters.

#include <sys/stat.h>
#include <webp/encode.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <utility>
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
  // load_image_alpha: the alpha in every channel; 255 for a file without alpha.
  const Image alpha = tools::load_image_alpha(dir / "rgba.png");
  CHECK(px(alpha, 0, 0) == std::vector<int>{0, 0, 0});
  CHECK(px(alpha, 1, 0) == std::vector<int>{255, 255, 255});
  CHECK(px(tools::load_image_alpha(dir / "grey.png"), 2, 1) == std::vector<int>{255, 255, 255});

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
  // A header declaring 15000×12000 pixels (PNG signature + IHDR, no image data; below
  // stb_image's own limit of 2^30 bytes) is refused before decoding.
  const std::string huge_png =
      std::string("\x89PNG\r\n\x1a\n", 8) + std::string("\0\0\0\x0dIHDR", 8) +
      std::string("\0\0\x3a\x98\0\0\x2e\xe0\x08\x02\0\0\0", 13) + std::string(4, '\0');
  dir.write("huge.png", huge_png);
  REQUIRE_THROWS_WITH(tools::load_image(dir / "huge.png"),
                      Catch::Contains("huge.png") && Catch::Contains("15000x12000") &&
                          Catch::Contains("refused before decoding"));

  // A named pipe blocked forever in open(); /dev/zero would be read until memory ran out.
  REQUIRE(::mkfifo((dir / "pipe.png").c_str(), 0600) == 0);
  REQUIRE_THROWS_WITH(tools::load_image(dir / "pipe.png"),
                      Catch::Contains("pipe.png") && Catch::Contains("a named pipe"));
  CHECK_THAT(tools::image_problem(dir / "pipe.png"), Catch::Contains("not a regular file"));
  REQUIRE_THROWS_WITH(tools::load_image("/dev/zero"), Catch::Contains("a character device"));

  // Decoded by their contents: stb_image's other formats are refused, whatever the name (a
  // 23-byte PNM declaring 10^8 pixels took minutes under the fuzzer).
  dir.write("pnm.png", "P6\n100000 1000\n255\n");
  REQUIRE_THROWS_WITH(tools::load_image(dir / "pnm.png"),
                      Catch::Contains("pnm.png") &&
                          Catch::Contains("not a PNG, JPEG, WebP or BMP file (by its contents)"));
  // A BMP header declaring 1000×1000 24-bit pixels with no pixel data: truncated, not decoded.
  std::string bmp(54, '\0');
  const auto put = [&](std::size_t at, std::uint32_t v, int n) {
    for (int k = 0; k < n; ++k) bmp[at + k] = char((v >> (8 * k)) & 0xFF);
  };
  bmp[0] = 'B', bmp[1] = 'M';
  put(2, 54, 4), put(10, 54, 4), put(14, 40, 4), put(18, 1000, 4), put(22, 1000, 4);
  put(26, 1, 2), put(28, 24, 2);
  dir.write("short.bmp", bmp);
  REQUIRE_THROWS_WITH(tools::load_image(dir / "short.bmp"),
                      Catch::Contains("short.bmp") &&
                          Catch::Contains("1000x1000 pixels of 24 bits") &&
                          Catch::Contains("(truncated)"));

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

// ---- EXIF orientation (PIL.ImageOps.exif_transpose) ----

namespace {

// The bytes of `im` as a JPEG (stb_image_write, quality 100: no chroma subsampling).
std::vector<std::uint8_t> jpeg_bytes(const Image& im) {
  std::vector<std::uint8_t> out;
  const auto append = [](void* context, void* data, int size) {
    auto* bytes = static_cast<std::vector<std::uint8_t>*>(context);
    const auto* p = static_cast<const std::uint8_t*>(data);
    bytes->insert(bytes->end(), p, p + size);
  };
  REQUIRE(stbi_write_jpg_to_func(append, &out, im.width, im.height, 3, im.rgb.data(), 100));
  REQUIRE(out.size() > 4);
  REQUIRE(out[0] == 0xFF);
  REQUIRE(out[1] == 0xD8);
  return out;
}

// A TIFF structure whose IFD0 holds an unrelated entry (Model, ASCII, at a bogus offset) and then
// Orientation = `orientation` of TIFF type `type` (3 SHORT, 4 LONG, 1 BYTE, 2 ASCII, ...).
std::vector<std::uint8_t> tiff_bytes(int orientation, bool big_endian, int type = 3) {
  std::vector<std::uint8_t> t;
  const auto put = [&](std::uint32_t v, int n) {
    for (int i = 0; i < n; ++i) t.push_back(std::uint8_t(v >> (8 * (big_endian ? n - 1 - i : i))));
  };
  t.push_back(big_endian ? 'M' : 'I');
  t.push_back(big_endian ? 'M' : 'I');
  put(42, 2);
  put(8, 4);  // IFD0 right after the header
  put(2, 2);  // two entries
  put(0x0110, 2), put(2, 2), put(20, 4), put(0xFFFFFF, 4);
  put(0x0112, 2), put(std::uint32_t(type), 2), put(1, 4);
  if (type == 3)
    put(std::uint32_t(orientation), 2), put(0, 2);  // a SHORT fills the field's first 2 bytes
  else if (type == 4)
    put(std::uint32_t(orientation), 4);
  else
    t.push_back(std::uint8_t(orientation)), put(0, 2), t.push_back(0);
  put(0, 4);  // no next IFD
  return t;
}

// An APP1 segment: FF E1, its length (with the 2 length bytes), "Exif\0\0", then `tiff`.
std::vector<std::uint8_t> exif_segment(const std::vector<std::uint8_t>& tiff) {
  const std::size_t length = 2 + 6 + tiff.size();
  std::vector<std::uint8_t> s{
      0xFF, 0xE1, std::uint8_t(length >> 8), std::uint8_t(length & 255), 'E', 'x', 'i', 'f', 0, 0};
  s.insert(s.end(), tiff.begin(), tiff.end());
  return s;
}

// The JPEG with `segment` spliced in right after its SOI marker.
std::vector<std::uint8_t> splice(std::vector<std::uint8_t> jpeg,
                                 const std::vector<std::uint8_t>& segment) {
  jpeg.insert(jpeg.begin() + 2, segment.begin(), segment.end());
  return jpeg;
}

void write_bytes(const std::string& path, const std::vector<std::uint8_t>& bytes) {
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
}

// Which of the six labelled pixels of `labels` each pixel of `im` is, row by row: its position in
// `labels` (the original's row-major order), by the pixel values of `decoded` (exact equality:
// both come from the same JPEG data).
std::vector<std::string> layout(const Image& im, const Image& decoded, const char* labels) {
  std::vector<std::string> rows;
  for (int y = 0; y < im.height; ++y) {
    std::string row;
    for (int x = 0; x < im.width; ++x) {
      char label = '?';
      for (int i = 0; i < decoded.width * decoded.height; ++i)
        if (px(decoded, i % decoded.width, i / decoded.width) == px(im, x, y)) label = labels[i];
      row += label;
    }
    rows.push_back(row);
  }
  return rows;
}

}  // namespace

TEST_CASE("load_image applies a JPEG's EXIF orientation as PIL's exif_transpose", "[image_io]") {
  difftrain::test::TempDir dir;
  // 3×2, six distinct colours:  a b c
  //                             d e f
  Image im(3, 2);
  const std::uint8_t colours[6][3] = {{250, 10, 10},  {10, 250, 10},  {10, 10, 250},
                                      {250, 250, 10}, {10, 250, 250}, {250, 10, 250}};
  for (int i = 0; i < 6; ++i) std::copy_n(colours[i], 3, im.pixel(i % 3, i / 3));
  const std::vector<std::uint8_t> jpeg = jpeg_bytes(im);
  write_bytes(dir / "plain.jpg", jpeg);
  const Image decoded = tools::load_image(dir / "plain.jpg");
  REQUIRE(decoded.width == 3);
  REQUIRE(decoded.height == 2);
  REQUIRE_CLOSE(decoded.rgb, im.rgb, 0, 40);  // lossy, but the six colours stay apart
  REQUIRE(layout(decoded, decoded, "abcdef") == std::vector<std::string>{"abc", "def"});

  // Where each pixel lands (EXIF 2.3, Orientation; PIL's Image.Transpose for each).
  const std::vector<std::string> expected[9] = {
      {},
      {},
      {"cba", "fed"},      // 2 mirrored left-right
      {"fed", "cba"},      // 3 rotated 180°
      {"def", "abc"},      // 4 mirrored top-bottom
      {"ad", "be", "cf"},  // 5 transposed
      {"da", "eb", "fc"},  // 6 rotated 90° clockwise
      {"fc", "eb", "da"},  // 7 transversed
      {"cf", "be", "ad"},  // 8 rotated 90° counter-clockwise
  };
  for (const bool big_endian : {false, true})
    for (int orientation = 1; orientation <= 8; ++orientation) {
      INFO("orientation " << orientation << (big_endian ? " MM" : " II"));
      const auto file = splice(jpeg, exif_segment(tiff_bytes(orientation, big_endian)));
      CHECK(tools::exif_orientation(file) == orientation);
      const std::string path = dir / "o.jpg";
      write_bytes(path, file);
      const Image upright = tools::load_image(path);
      if (orientation == 1) {
        REQUIRE(upright == decoded);
        continue;
      }
      CHECK(upright.width == (orientation >= 5 ? 2 : 3));
      CHECK(layout(upright, decoded, "abcdef") == expected[orientation]);
    }

  // A LONG or a BYTE holding the value counts too (PIL reads the tag whatever its integer type).
  CHECK(tools::exif_orientation(splice(jpeg, exif_segment(tiff_bytes(6, true, 4)))) == 6);
  CHECK(tools::exif_orientation(splice(jpeg, exif_segment(tiff_bytes(3, false, 1)))) == 3);
  // PNG files are not read for EXIF; a JPEG without an Exif segment is upright.
  CHECK(tools::exif_orientation(jpeg) == 1);
}

TEST_CASE("malformed EXIF is ignored: the image is unchanged, never an error", "[image_io]") {
  difftrain::test::TempDir dir;
  const Image im = noise_image(5, 3, 11);
  const std::vector<std::uint8_t> jpeg = jpeg_bytes(im);
  write_bytes(dir / "plain.jpg", jpeg);
  const Image decoded = tools::load_image(dir / "plain.jpg");

  std::vector<std::vector<std::uint8_t>> bad_tiffs;
  bad_tiffs.push_back({});                                   // empty
  bad_tiffs.push_back({'I', 'I', 42});                       // truncated header
  bad_tiffs.push_back({'X', 'Y', 42, 0, 8, 0, 0, 0});        // no byte order
  bad_tiffs.push_back({'I', 'I', 43, 0, 8, 0, 0, 0});        // not 42
  bad_tiffs.push_back({'I', 'I', 42, 0, 0xFF, 0xFF, 0, 0});  // IFD0 past the end
  bad_tiffs.push_back({'M', 'M', 0, 42, 0xFF, 0xFF, 0xFF, 0xFF});
  bad_tiffs.push_back({'I', 'I', 42, 0, 8, 0, 0, 0, 0xFF, 0xFF});  // 65535 entries, none there
  for (const int value : {0, 9, 0xFFFF}) bad_tiffs.push_back(tiff_bytes(value, false));
  bad_tiffs.push_back(tiff_bytes(6, false, 2));  // ASCII: not an orientation
  bad_tiffs.push_back(tiff_bytes(6, true, 5));   // RATIONAL
  auto cut = tiff_bytes(6, false);
  cut.resize(8 + 2 + 12 + 11);  // the orientation entry cut short
  bad_tiffs.push_back(cut);
  for (std::size_t b = 0; b < bad_tiffs.size(); ++b) {
    INFO("bad TIFF " << b);
    const auto file = splice(jpeg, exif_segment(bad_tiffs[b]));
    CHECK(tools::exif_orientation(file) == 1);
    write_bytes(dir / "bad.jpg", file);
    REQUIRE(tools::load_image(dir / "bad.jpg") == decoded);
  }

  // A segment length past the end of the file, or below 2.
  auto segment = exif_segment(tiff_bytes(6, false));
  auto too_long = segment;
  too_long[2] = 0xFF;
  CHECK(tools::exif_orientation(
            splice(std::vector<std::uint8_t>(jpeg.begin(), jpeg.begin() + 2), too_long)) == 1);
  auto too_short = segment;
  too_short[2] = 0, too_short[3] = 1;
  CHECK(tools::exif_orientation(splice(jpeg, too_short)) == 1);

  // Every truncation and every single-byte change of a valid file's first segments: a value in
  // 1..8 and no read out of bounds (the sanitizer build checks that).
  const auto good = splice(jpeg, segment);
  const std::size_t head = 2 + segment.size() + 24;
  for (std::size_t n = 0; n <= head; ++n) {
    const int o = tools::exif_orientation(std::span(good.data(), n));
    REQUIRE((o >= 1 && o <= 8));
  }
  for (std::size_t i = 0; i < head; ++i)
    for (const std::uint8_t v : {0x00, 0x01, 0x7F, 0xFF}) {
      auto bytes = std::vector<std::uint8_t>(good.begin(), good.begin() + std::ptrdiff_t(head));
      bytes[i] = v;
      const int o = tools::exif_orientation(bytes);
      REQUIRE((o >= 1 && o <= 8));
    }
  // Not a JPEG at all.
  const std::uint8_t png_magic[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  CHECK(tools::exif_orientation(png_magic) == 1);
  CHECK(tools::exif_orientation({}) == 1);
  // exif_transpose ignores values outside 2..8.
  CHECK(tools::exif_transpose(im, 0) == im);
  CHECK(tools::exif_transpose(im, 9) == im);
}

// ---- WebP (libwebp; fixtures made with its encoder, extended files assembled by hand) ----

namespace {

using Bytes = std::vector<std::uint8_t>;

// A libwebp encoder's output (released with WebPFree), as a simple-format file.
Bytes webp_from_encoder(std::uint8_t* data, std::size_t size) {
  Bytes out(data, data + size);
  WebPFree(data);
  REQUIRE(out.size() > 20);
  REQUIRE(std::string(out.begin(), out.begin() + 4) == "RIFF");
  return out;
}

Bytes webp_lossless(const Image& im) {
  std::uint8_t* data = nullptr;
  const std::size_t size =
      WebPEncodeLosslessRGB(im.rgb.data(), im.width, im.height, 3 * im.width, &data);
  return webp_from_encoder(data, size);
}

void put_le(Bytes& b, std::uint32_t v, int n) {
  for (int i = 0; i < n; ++i) b.push_back(std::uint8_t(v >> (8 * i)));
}

struct Chunk {
  std::string fourcc;
  Bytes payload;
};

// The first chunk of a simple-format file ("VP8 " or "VP8L" and its bitstream).
Chunk image_chunk(const Bytes& file) {
  const std::uint32_t size = std::uint32_t(file[16]) | std::uint32_t(file[17]) << 8 |
                             std::uint32_t(file[18]) << 16 | std::uint32_t(file[19]) << 24;
  REQUIRE(file.size() >= 20 + std::size_t(size));
  return {std::string(file.begin() + 12, file.begin() + 16),
          Bytes(file.begin() + 20, file.begin() + 20 + std::ptrdiff_t(size))};
}

// "RIFF", the size of the rest, "WEBP", then each chunk: fourcc, 4-byte little-endian payload
// size, payload, a zero byte after an odd-sized payload.
Bytes riff_webp(const std::vector<Chunk>& chunks) {
  Bytes b{'R', 'I', 'F', 'F', 0, 0, 0, 0, 'W', 'E', 'B', 'P'};
  for (const Chunk& c : chunks) {
    b.insert(b.end(), c.fourcc.begin(), c.fourcc.end());
    put_le(b, std::uint32_t(c.payload.size()), 4);
    b.insert(b.end(), c.payload.begin(), c.payload.end());
    if (c.payload.size() % 2) b.push_back(0);
  }
  const std::uint32_t riff_size = std::uint32_t(b.size() - 8);
  for (int i = 0; i < 4; ++i) b[4 + std::size_t(i)] = std::uint8_t(riff_size >> (8 * i));
  return b;
}

// The VP8X chunk: flags (0x08 EXIF, 0x02 animation), 3 reserved bytes, canvas width − 1 and
// height − 1 in 3 bytes each.
Chunk vp8x(std::uint8_t flags, std::uint32_t width, std::uint32_t height) {
  Chunk c{"VP8X", {flags, 0, 0, 0}};
  put_le(c.payload, width - 1, 3);
  put_le(c.payload, height - 1, 3);
  return c;
}

// The extended file PIL reads with an Exif: VP8X (EXIF flag), the image, an odd-sized "XMP "
// chunk (so that the walk must skip a padding byte), then "EXIF" holding `exif`.
Bytes webp_with_exif(const Image& im, const Bytes& exif) {
  return riff_webp({vp8x(0x08, std::uint32_t(im.width), std::uint32_t(im.height)),
                    image_chunk(webp_lossless(im)),
                    {"XMP ", {'<', 'x', '>'}},
                    {"EXIF", exif}});
}

std::size_t mean_abs_error_x100(const Image& a, const Image& b) {
  std::size_t sum = 0;
  for (std::size_t i = 0; i < a.rgb.size(); ++i) sum += std::size_t(std::abs(a.rgb[i] - b.rgb[i]));
  return 100 * sum / a.rgb.size();
}

}  // namespace

TEST_CASE("load_image reads a lossless WebP exactly; load_image_alpha its alpha", "[image_io]") {
  difftrain::test::TempDir dir;
  const Image im = noise_image(7, 5, 21);
  const Bytes file = webp_lossless(im);
  CHECK(image_chunk(file).fourcc == "VP8L");
  write_bytes(dir / "a.webp", file);
  const Image back = tools::load_image(dir / "a.webp");
  REQUIRE(back.width == 7);
  REQUIRE(back.height == 5);
  REQUIRE(back.rgb == im.rgb);
  CHECK(tools::image_problem(dir / "a.webp").empty());
  CHECK(tools::exif_orientation(file) == 1);
  CHECK(tools::load_image_alpha(dir / "a.webp") == Image(7, 5, 255));  // no alpha: opaque

  // RGBA: alpha k·255/34 over the 35 pixels (0 and 255 included).
  std::vector<std::uint8_t> rgba(7 * 5 * 4);
  for (std::size_t k = 0; k < 35; ++k) {
    std::copy_n(&im.rgb[3 * k], 3, &rgba[4 * k]);
    rgba[4 * k + 3] = std::uint8_t(k * 255 / 34);
  }
  std::uint8_t* data = nullptr;
  const std::size_t size = WebPEncodeLosslessRGBA(rgba.data(), 7, 5, 7 * 4, &data);
  write_bytes(dir / "alpha.webp", webp_from_encoder(data, size));
  const Image alpha = tools::load_image_alpha(dir / "alpha.webp");
  REQUIRE(alpha.width == 7);
  REQUIRE(alpha.height == 5);
  for (std::size_t k = 0; k < 35; ++k) {
    INFO("pixel " << k);
    REQUIRE(px(alpha, int(k % 7), int(k / 7)) == std::vector<int>(3, rgba[4 * k + 3]));
  }
  // load_image drops the alpha; the colour of every visible pixel is kept exactly (libwebp's
  // lossless encoder may change the colour under alpha 0, which nothing shows).
  const Image colour = tools::load_image(dir / "alpha.webp");
  REQUIRE(colour.width == 7);
  for (std::size_t k = 1; k < 35; ++k)
    REQUIRE(px(colour, int(k % 7), int(k / 7)) == px(im, int(k % 7), int(k / 7)));
}

TEST_CASE("load_image reads a lossy WebP: its size, pixels close", "[image_io]") {
  difftrain::test::TempDir dir;
  Image im(40, 24);  // smooth ramps, which lossy VP8 keeps close
  for (int y = 0; y < 24; ++y)
    for (int x = 0; x < 40; ++x) {
      auto* p = im.pixel(x, y);
      p[0] = std::uint8_t(20 + 5 * x), p[1] = std::uint8_t(30 + 8 * y), p[2] = 128;
    }
  std::uint8_t* data = nullptr;
  const std::size_t size = WebPEncodeRGB(im.rgb.data(), 40, 24, 40 * 3, 90.0f, &data);
  const Bytes file = webp_from_encoder(data, size);
  CHECK(image_chunk(file).fourcc == "VP8 ");
  write_bytes(dir / "lossy.webp", file);
  const Image back = tools::load_image(dir / "lossy.webp");
  REQUIRE(back.width == 40);
  REQUIRE(back.height == 24);
  CHECK(back != im);  // lossy indeed: the check below is not trivially true
  CHECK(mean_abs_error_x100(back, im) < 300);  // mean error under 3 levels
  REQUIRE_CLOSE(back.rgb, im.rgb, 0, 24);
}

TEST_CASE("load_image applies a WebP's EXIF chunk orientation as PIL's exif_transpose",
          "[image_io]") {
  difftrain::test::TempDir dir;
  const Image im = noise_image(7, 5, 33);
  const Bytes file = webp_with_exif(im, tiff_bytes(6, false));
  CHECK(tools::exif_orientation(file) == 6);
  write_bytes(dir / "o6.webp", file);
  const Image upright = tools::load_image(dir / "o6.webp");
  // 6 = ROTATE_270, 90° clockwise: 5×7, the bottom-left pixel at the top-left, the top-left at
  // the top-right.
  REQUIRE(upright.width == 5);
  REQUIRE(upright.height == 7);
  CHECK(px(upright, 0, 0) == px(im, 0, 4));
  CHECK(px(upright, 4, 0) == px(im, 0, 0));
  CHECK(px(upright, 4, 6) == px(im, 6, 0));
  REQUIRE(upright == tools::exif_transpose(im, 6));
  const Image alpha = tools::load_image_alpha(dir / "o6.webp");
  CHECK(alpha.width == 5);
  CHECK(alpha.height == 7);

  // Every orientation, either byte order, with or without a JPEG-style "Exif\0\0" prefix.
  const Bytes prefix{'E', 'x', 'i', 'f', 0, 0};
  for (const bool big_endian : {false, true})
    for (const bool prefixed : {false, true})
      for (int orientation = 1; orientation <= 8; ++orientation) {
        INFO("orientation " << orientation << (big_endian ? " MM" : " II")
                            << (prefixed ? " with Exif prefix" : ""));
        Bytes exif = prefixed ? prefix : Bytes{};
        const Bytes tiff = tiff_bytes(orientation, big_endian);
        exif.insert(exif.end(), tiff.begin(), tiff.end());
        const Bytes f = webp_with_exif(im, exif);
        CHECK(tools::exif_orientation(f) == orientation);
        write_bytes(dir / "o.webp", f);
        REQUIRE(tools::load_image(dir / "o.webp") == tools::exif_transpose(im, orientation));
      }

  // Only the first EXIF chunk counts; one past the end of the RIFF (trailing bytes) does not.
  Bytes two = riff_webp({vp8x(0x08, 7, 5),
                         image_chunk(webp_lossless(im)),
                         {"EXIF", tiff_bytes(3, false)},
                         {"EXIF", tiff_bytes(6, false)}});
  CHECK(tools::exif_orientation(two) == 3);
  Bytes trailing = riff_webp({vp8x(0x08, 7, 5), image_chunk(webp_lossless(im))});
  const Bytes after = riff_webp({{"EXIF", tiff_bytes(6, false)}});
  trailing.insert(trailing.end(), after.begin() + 12, after.end());
  CHECK(tools::exif_orientation(trailing) == 1);
  write_bytes(dir / "trailing.webp", trailing);
  CHECK(tools::load_image(dir / "trailing.webp") == im);
}

TEST_CASE("malformed RIFF chunks: exif_orientation is 1, never a read out of bounds",
          "[image_io]") {
  const Image im = noise_image(3, 2, 5);
  const Bytes good = webp_with_exif(im, tiff_bytes(8, true));
  REQUIRE(tools::exif_orientation(good) == 8);
  // The EXIF chunk is last, unpadded (its TIFF bytes are even): any truncation cuts it.
  for (std::size_t n = 0; n < good.size(); ++n) {
    INFO("first " << n << " bytes");
    REQUIRE(tools::exif_orientation(std::span(good.data(), n)) == 1);
  }
  // Chunk sizes past the end of the file: the VP8X chunk's, or the EXIF chunk's (by 1 or by
  // 2^32 − 1, which must not wrap around); the RIFF's own size too small to hold the EXIF chunk.
  const std::size_t exif_at = good.size() - 8 - tiff_bytes(8, true).size();
  REQUIRE(std::string(good.begin() + std::ptrdiff_t(exif_at),
                      good.begin() + std::ptrdiff_t(exif_at) + 4) == "EXIF");
  const auto with_le32 = [&](std::size_t at, std::uint32_t v) {
    Bytes b = good;
    for (int i = 0; i < 4; ++i) b[at + std::size_t(i)] = std::uint8_t(v >> (8 * i));
    return b;
  };
  for (const std::uint32_t v : {0xFFFFFFFFu, 0xFFFFFFF8u, 0x7FFFFFFFu})
    CHECK(tools::exif_orientation(with_le32(16, v)) == 1);
  CHECK(tools::exif_orientation(with_le32(exif_at + 4, std::uint32_t(good.size() - exif_at - 7))) ==
        1);
  for (const std::uint32_t v : {0xFFFFFFFFu, 0xFFFFFFF8u})
    CHECK(tools::exif_orientation(with_le32(exif_at + 4, v)) == 1);
  CHECK(tools::exif_orientation(with_le32(4, std::uint32_t(exif_at))) == 1);
  CHECK(tools::exif_orientation(with_le32(4, 0)) == 1);
  CHECK(tools::exif_orientation(with_le32(4, 0xFFFFFFFFu)) == 8);  // the file's end bounds it
  // Every single-byte change of the headers and chunk sizes: a value in 1..8.
  for (std::size_t i = 0; i < exif_at + 8 + 24; ++i)
    for (const std::uint8_t v : {0x00, 0x01, 0x7F, 0xFF}) {
      Bytes b = good;
      b[i] = v;
      const int o = tools::exif_orientation(b);
      REQUIRE((o >= 1 && o <= 8));
    }
  CHECK(tools::exif_orientation(riff_webp({})) == 1);
  const std::uint8_t riff_only[8] = {'R', 'I', 'F', 'F', 0xFF, 0xFF, 0xFF, 0xFF};
  CHECK(tools::exif_orientation(riff_only) == 1);
}

TEST_CASE("WebP errors name the file: truncated, garbage, animated, too many pixels",
          "[image_io]") {
  difftrain::test::TempDir dir;
  // load_image, load_image_alpha and image_problem all say why, naming the file.
  const auto refused = [&](const std::string& name, const auto& why) {
    const std::string path = dir / name;
    REQUIRE_THROWS_WITH(tools::load_image(path),
                        Catch::Contains("load_image") && Catch::Contains(name) && why);
    REQUIRE_THROWS_WITH(tools::load_image_alpha(path), Catch::Contains(name) && why);
    const std::string problem = tools::image_problem(path);
    CHECK_THAT(problem, Catch::Contains(name) && why);
  };
  const Bytes file = webp_lossless(noise_image(7, 5, 2));
  for (const std::size_t n :
       {std::size_t(12), std::size_t(20), std::size_t(26), file.size() / 2, file.size() - 1}) {
    INFO("first " << n << " of " << file.size() << " bytes");
    write_bytes(dir / "cut.webp", Bytes(file.begin(), file.begin() + std::ptrdiff_t(n)));
    refused("cut.webp", Catch::Contains("not a valid WebP file"));
  }
  dir.write("garbage.webp", "RIFF....WEBP");
  refused("garbage.webp", Catch::Contains("not a valid WebP file"));
  dir.write("garbage2.webp", "RIFF....WEBPVP8L....not a bitstream at all");
  refused("garbage2.webp", Catch::Contains("not a valid WebP file"));

  // Animated (VP8X animation flag, ANIM, one ANMF frame): WebPDecode reads still images only.
  Chunk anmf{"ANMF", {}};
  for (const std::uint32_t v : {0u, 0u, 6u, 4u, 100u}) put_le(anmf.payload, v, 3);  // 7×5, 100 ms
  anmf.payload.push_back(0);
  const Bytes frame = riff_webp({image_chunk(file)});
  anmf.payload.insert(anmf.payload.end(), frame.begin() + 12, frame.end());
  write_bytes(dir / "anim.webp", riff_webp({vp8x(0x02, 7, 5), {"ANIM", {0, 0, 0, 0, 0, 0}}, anmf}));
  refused("anim.webp", Catch::Contains("animated"));

  // Headers declaring 16384×16384 (a VP8L bitstream header: signature 0x2F, then 14 bits each of
  // width − 1 and height − 1) and 20000×15000 (a VP8X canvas, nothing after it) pixels.
  write_bytes(dir / "huge.webp", riff_webp({{"VP8L", {0x2F, 0xFF, 0xFF, 0xFF, 0x0F}}}));
  refused("huge.webp",
          Catch::Contains("16384x16384") && Catch::Contains("refused before decoding"));
  write_bytes(dir / "canvas.webp", riff_webp({vp8x(0, 20000, 15000)}));
  refused("canvas.webp",
          Catch::Contains("20000x15000") && Catch::Contains("refused before decoding"));
}

// ---- resampling filters (PIL's Image.resize, which torchvision's Resize calls on PIL images) ----

namespace {

using tools::Interpolation;

double sinc_pi(double x) {
  const double pi = 3.14159265358979323846;
  return x == 0.0 ? 1.0 : std::sin(pi * x) / (pi * x);
}

// The filters as Pillow's libImaging/Resample.c defines them.
double filter_value(Interpolation f, double x) {
  const double ax = std::abs(x);
  switch (f) {
    case Interpolation::box:
      return x > -0.5 && x <= 0.5 ? 1.0 : 0.0;
    case Interpolation::bilinear:
      return ax < 1.0 ? 1.0 - ax : 0.0;
    case Interpolation::hamming:
      return ax >= 1.0 ? 0.0
                       : sinc_pi(ax) * (double(0.54f) +
                                        double(0.46f) * std::cos(3.14159265358979323846 * ax));
    case Interpolation::bicubic:  // Keys, a = −0.5
      return ax < 1.0   ? 1.5 * ax * ax * ax - 2.5 * ax * ax + 1.0
             : ax < 2.0 ? -0.5 * ax * ax * ax + 2.5 * ax * ax - 4.0 * ax + 2.0
                        : 0.0;
    default:  // lanczos, a = 3
      return -3.0 <= x && x < 3.0 ? sinc_pi(x) * sinc_pi(x / 3.0) : 0.0;
  }
}

// One line resampled in double: output j centred on c = (j + ½)·in/out, weights
// f((i + ½ − c)/s) over the input pixels (s = max(in/out, 1)), normalized,
// rounded half up and clamped to 8 bits. Nearest: in[floor((j + ½)·in/out)].
std::vector<int> resample_line(const std::vector<int>& in, int out, Interpolation f) {
  const int n = int(in.size());
  const double scale = double(n) / out, s = std::max(scale, 1.0);
  std::vector<int> result;
  for (int j = 0; j < out; ++j) {
    const double c = (j + 0.5) * scale;
    if (f == Interpolation::nearest || f == Interpolation::nearest_exact) {
      result.push_back(in[std::size_t(std::min(int(std::floor(c)), n - 1))]);
      continue;
    }
    double sum = 0, weights = 0;  // the filters vanish outside their support
    for (int i = 0; i < n; ++i) {
      const double w = filter_value(f, (i + 0.5 - c) / s);
      sum += w * in[std::size_t(i)], weights += w;
    }
    result.push_back(std::clamp(int(std::floor(sum / weights + 0.5)), 0, 255));
  }
  return result;
}

// Rows then columns, each through resample_line (8-bit between the passes, as PIL).
Image resample_reference(const Image& im, int w, int h, Interpolation f) {
  Image mid(w, im.height), out(w, h);
  for (int c = 0; c < 3; ++c) {
    for (int y = 0; y < im.height; ++y) {
      std::vector<int> line;
      for (int x = 0; x < im.width; ++x) line.push_back(im.pixel(x, y)[c]);
      if (w != im.width) line = resample_line(line, w, f);
      for (int x = 0; x < w; ++x) mid.pixel(x, y)[c] = std::uint8_t(line[std::size_t(x)]);
    }
    for (int x = 0; x < w; ++x) {
      std::vector<int> line;
      for (int y = 0; y < im.height; ++y) line.push_back(mid.pixel(x, y)[c]);
      if (h != im.height) line = resample_line(line, h, f);
      for (int y = 0; y < h; ++y) out.pixel(x, y)[c] = std::uint8_t(line[std::size_t(y)]);
    }
  }
  return out;
}

Image row_image(const std::vector<int>& values) {
  Image im(int(values.size()), 1);
  for (std::size_t x = 0; x < values.size(); ++x)
    for (int c = 0; c < 3; ++c) im.pixel(int(x), 0)[c] = std::uint8_t(values[x]);
  return im;
}

std::vector<int> red_row(const Image& im) {
  std::vector<int> v;
  for (int x = 0; x < im.width; ++x) v.push_back(im.pixel(x, 0)[0]);
  return v;
}

}  // namespace

TEST_CASE("resize_image: each filter on a 1-D row, by hand and against PIL's formulas",
          "[image_io]") {
  // Shrinking 4 → 2 with bilinear, by hand: scale 2 stretches the triangle to support 2; output 0
  // is centred at 1, so pixels 0, 1, 2 (centres ½, 1½, 2½) get 1 − |x − 1|/2 = ¾, ¾, ¼ → 3/7, 3/7,
  // 1/7: (3·10 + 3·50 + 90)/7 = 38.6 → 39; output 1 at 3: (50 + 3·90 + 3·250)/7 = 152.9 → 153.
  const std::vector<int> four{10, 50, 90, 250}, two{10, 250};
  CHECK(red_row(tools::resize_image(row_image(four), 2, 1)) == std::vector<int>{39, 153});
  // Growing 2 → 5 with bilinear: centres 0.2, 0.6, 1.0, 1.4, 1.8; output 1 (at 0.6) weighs pixel
  // 0 (at ½) by 0.9 and pixel 1 by 0.1: 9 + 25 = 34; the ends clamp to the edge pixels.
  CHECK(red_row(tools::resize_image(row_image(two), 5, 1)) ==
        std::vector<int>{10, 34, 130, 226, 250});

  // Every filter: the values Pillow 9.4 gives (Image.resize on a 1-row RGB image) and the
  // double-precision reference above agree with resize_image.
  const std::vector<int> nine{0, 255, 0, 255, 255, 0, 40, 200, 100}, three{30, 200, 90};
  struct Case {
    Interpolation f;
    std::vector<int> down4to2, up2to5, down9to4, up3to7;
  };
  const Case cases[] = {
      {Interpolation::nearest,
       {50, 250},
       {10, 10, 250, 250, 250},
       {255, 255, 0, 200},
       {30, 30, 200, 200, 200, 90, 90}},
      {Interpolation::nearest_exact,
       {50, 250},
       {10, 10, 250, 250, 250},
       {255, 255, 0, 200},
       {30, 30, 200, 200, 200, 90, 90}},
      {Interpolation::bilinear,
       {39, 153},
       {10, 34, 130, 226, 250},
       {109, 180, 88, 131},
       {30, 54, 127, 200, 153, 106, 90}},
      {Interpolation::bicubic,
       {29, 162},
       {0, 26, 130, 234, 255},
       {103, 187, 86, 129},
       {14, 47, 132, 200, 163, 102, 79}},
      {Interpolation::box,
       {30, 170},
       {10, 10, 250, 250, 250},
       {128, 170, 20, 150},
       {30, 30, 200, 200, 200, 90, 90}},
      {Interpolation::hamming,
       {32, 165},
       {10, 13, 130, 247, 250},
       {126, 182, 61, 143},
       {30, 34, 143, 200, 163, 92, 90}},
      {Interpolation::lanczos,
       {23, 164},
       {0, 31, 130, 229, 255},
       {94, 194, 91, 122},
       {1, 50, 133, 200, 170, 106, 67}},
  };
  for (const Case& c : cases) {
    INFO("filter " << difftrain::choice_name(c.f, tools::kInterpolations));
    CHECK(red_row(tools::resize_image(row_image(four), 2, 1, c.f)) == c.down4to2);
    CHECK(red_row(tools::resize_image(row_image(two), 5, 1, c.f)) == c.up2to5);
    CHECK(red_row(tools::resize_image(row_image(nine), 4, 1, c.f)) == c.down9to4);
    CHECK(red_row(tools::resize_image(row_image(three), 7, 1, c.f)) == c.up3to7);
    CHECK(resample_line(four, 2, c.f) == c.down4to2);
    CHECK(resample_line(two, 5, c.f) == c.up2to5);
    CHECK(resample_line(nine, 4, c.f) == c.down9to4);
    CHECK(resample_line(three, 7, c.f) == c.up3to7);
    // A column is resampled as a row is.
    Image column(1, 9);
    for (int y = 0; y < 9; ++y)
      for (int ch = 0; ch < 3; ++ch) column.pixel(0, y)[ch] = std::uint8_t(nine[std::size_t(y)]);
    const Image col = tools::resize_image(column, 1, 4, c.f);
    for (int y = 0; y < 4; ++y) CHECK(int(col.pixel(0, y)[0]) == c.down9to4[std::size_t(y)]);
  }
}

TEST_CASE("resize_image: 2-D, rows then columns with 8-bit rounding between", "[image_io]") {
  const Image im = noise_image(23, 17, 5);
  for (const auto& choice : tools::kInterpolations)
    for (const auto& [w, h] : {std::pair{7, 31}, std::pair{40, 6}, std::pair{23, 5},
                               std::pair{11, 17}, std::pair{9, 9}}) {
      INFO(choice.name << " " << w << "x" << h);
      const Image out = tools::resize_image(im, w, h, choice.value);
      REQUIRE(out.width == w);
      REQUIRE(out.height == h);
      // Fixed-point weights (PIL's 22 bits) may differ from the double reference by one level.
      REQUIRE_CLOSE(out.rgb, resample_reference(im, w, h, choice.value).rgb, 0, 1);
    }
  // The same size is a copy; a solid colour stays solid under every filter.
  CHECK(tools::resize_image(im, 23, 17, Interpolation::lanczos) == im);
  const Image teal = solid(13, 7, 0, 128, 128);
  for (const auto& choice : tools::kInterpolations) {
    CHECK(tools::resize_image(teal, 5, 19, choice.value) == solid(5, 19, 0, 128, 128));
    CHECK(tools::resize_and_crop(teal, 4, true, 0, false, choice.value) ==
          solid(4, 4, 0, 128, 128));
  }
}

TEST_CASE("Interpolation names are diffusers' --image_interpolation_mode choices", "[image_io]") {
  using difftrain::parse_choice;
  CHECK(parse_choice("--image_interpolation_mode", "lanczos", tools::kInterpolations) ==
        Interpolation::lanczos);
  CHECK(parse_choice("--image_interpolation_mode", "nearest_exact", tools::kInterpolations) ==
        Interpolation::nearest_exact);
  CHECK(difftrain::choice_name(Interpolation::bicubic, tools::kInterpolations) == "bicubic");
  for (const char* name :
       {"nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos"})
    CHECK(difftrain::choice_name(parse_choice("x", name, tools::kInterpolations),
                                 tools::kInterpolations) == name);
  REQUIRE_THROWS_WITH(parse_choice("--image_interpolation_mode", "area", tools::kInterpolations),
                      Catch::Contains("'area'") && Catch::Contains("lanczos"));
  // The default of the data options and of resize_image: bilinear.
  const Image im = noise_image(9, 6, 3);
  CHECK(tools::resize_image(im, 4, 3) == tools::resize_image(im, 4, 3, Interpolation::bilinear));
}
