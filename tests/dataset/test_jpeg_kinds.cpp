// JPEG kinds users' photos come in, written here with libjpeg (the reference encoder) and read
// with load_image: progressive, CMYK (Adobe, as Photoshop writes it) and YCCK.

#include <jpeglib.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "image_io.hpp"
#include "support/temp_dir.hpp"

using namespace difftrain;

namespace {

// Writes a w×h JPEG of `components` bytes per pixel given in `in_space`, stored as `jpeg_space`.
void write_jpeg(const std::string& path, int w, int h, const std::vector<std::uint8_t>& pixels,
                int components, J_COLOR_SPACE in_space, J_COLOR_SPACE jpeg_space,
                bool progressive) {
  jpeg_compress_struct c{};
  jpeg_error_mgr err{};
  c.err = jpeg_std_error(&err);
  jpeg_create_compress(&c);
  std::FILE* f = std::fopen(path.c_str(), "wb");
  REQUIRE(f != nullptr);
  jpeg_stdio_dest(&c, f);
  c.image_width = JDIMENSION(w);
  c.image_height = JDIMENSION(h);
  c.input_components = components;
  c.in_color_space = in_space;
  jpeg_set_defaults(&c);
  jpeg_set_colorspace(&c, jpeg_space);
  jpeg_set_quality(&c, 100, TRUE);
  // No chroma subsampling: the pixels then differ from the source by rounding only.
  for (int k = 0; k < c.num_components; ++k)
    c.comp_info[k].h_samp_factor = c.comp_info[k].v_samp_factor = 1;
  if (progressive) jpeg_simple_progression(&c);
  jpeg_start_compress(&c, TRUE);
  while (c.next_scanline < c.image_height) {
    JSAMPROW row =
        const_cast<JSAMPROW>(pixels.data() + std::size_t(c.next_scanline) * w * components);
    jpeg_write_scanlines(&c, &row, 1);
  }
  jpeg_finish_compress(&c);
  jpeg_destroy_compress(&c);
  std::fclose(f);
}

// A 32×16 image of four flat 8-pixel-wide blocks of colour (whole JPEG blocks: no ringing).
constexpr int kW = 32, kH = 16;
template <class Colour>
std::vector<std::uint8_t> blocks(int components, Colour colour) {
  std::vector<std::uint8_t> out(std::size_t(kW) * kH * components);
  for (int y = 0; y < kH; ++y)
    for (int x = 0; x < kW; ++x)
      for (int k = 0; k < components; ++k)
        out[(std::size_t(y) * kW + x) * components + k] = colour(x / 8, k);
  return out;
}

// The largest difference between two equal-size images' values.
int max_difference(const tools::Image& a, const tools::Image& b) {
  REQUIRE(a.width == b.width);
  REQUIRE(a.height == b.height);
  int worst = 0;
  for (std::size_t i = 0; i < a.rgb.size(); ++i)
    worst = std::max(worst, std::abs(int(a.rgb[i]) - int(b.rgb[i])));
  return worst;
}

}  // namespace

TEST_CASE("load_image: a progressive JPEG decodes as its baseline twin") {
  test::TempDir dir("jpeg_kinds");
  // A smooth gradient and an edge: every coefficient band is used.
  std::vector<std::uint8_t> rgb(std::size_t(kW) * kH * 3);
  for (int y = 0; y < kH; ++y)
    for (int x = 0; x < kW; ++x) {
      std::uint8_t* p = &rgb[(std::size_t(y) * kW + x) * 3];
      p[0] = std::uint8_t(x * 8);
      p[1] = std::uint8_t(y * 16);
      p[2] = x < 13 ? 30 : 220;
    }
  write_jpeg(dir / "baseline.jpg", kW, kH, rgb, 3, JCS_RGB, JCS_YCbCr, false);
  write_jpeg(dir / "progressive.jpg", kW, kH, rgb, 3, JCS_RGB, JCS_YCbCr, true);
  const tools::Image baseline = tools::load_image(dir / "baseline.jpg");
  const tools::Image progressive = tools::load_image(dir / "progressive.jpg");
  // The same quantised coefficients, sent in several scans: the same pixels.
  CHECK(max_difference(baseline, progressive) == 0);
  tools::Image source(kW, kH);
  source.rgb = rgb;
  CHECK(max_difference(baseline, source) <= 3);
}

TEST_CASE("load_image: CMYK and YCCK JPEGs (Adobe, inverted ink) convert to RGB as PIL does") {
  test::TempDir dir("jpeg_cmyk");
  // Inverted CMYK as Adobe stores it (255 = no ink), per block: white, cyan ink, black ink at
  // half, a mix.
  const int ink[4][4] = {
      {255, 255, 255, 255}, {0, 255, 255, 255}, {255, 255, 255, 128}, {60, 200, 140, 220}};
  const auto cmyk = blocks(4, [&](int block, int k) { return std::uint8_t(ink[block][k]); });
  // PIL's CMYK;I → RGB: channel = (255 − k)·(255 − c)/255 on un-inverted ink, i.e. c'·k'/255.
  tools::Image expected(kW, kH);
  for (int y = 0; y < kH; ++y)
    for (int x = 0; x < kW; ++x)
      for (int k = 0; k < 3; ++k)
        expected.pixel(x, y)[k] = std::uint8_t((ink[x / 8][k] * ink[x / 8][3] + 127) / 255);
  for (const J_COLOR_SPACE stored : {JCS_CMYK, JCS_YCCK}) {
    INFO((stored == JCS_CMYK ? "CMYK" : "YCCK"));
    const std::string path = dir / (stored == JCS_CMYK ? "cmyk.jpg" : "ycck.jpg");
    write_jpeg(path, kW, kH, cmyk, 4, JCS_CMYK, stored, false);
    const tools::Image image = tools::load_image(path);
    CHECK(max_difference(image, expected) <= 3);
  }
}
