// Fuzz target: an image file (tools/image_io.hpp: PNG, JPEG, WebP, BMP, GIF, TGA, PSD, ... as
// stb_image and libwebp decode them, with the EXIF orientation of JPEG and WebP). The file name's
// extension comes from the first byte (the decoders go by content); the whole input is the file.
// image_problem, load_image and load_image_alpha each read it. Refusal is a difftrain::Error
// (image_problem: a message); anything else is a finding.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_support.hpp"
#include "image_io.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace difftrain;
  static const char* const kExtensions[] = {".png", ".jpg", ".jpeg", ".webp",
                                            ".bmp", ".gif", ".tga",  ".PNG"};
  const fuzz::Scratch& scratch = fuzz::Scratch::get();
  const std::string path = scratch.write(
      std::string("image") + kExtensions[size == 0 ? 0 : data[0] % 8], fuzz::as_text(data, size));
  (void)tools::image_problem(path);
  fuzz::expect_only_errors([&] {
    const tools::Image image = tools::load_image(path);
    volatile std::uint8_t sink = image.rgb.empty() ? 0 : image.rgb.back();
    (void)sink;
  });
  fuzz::expect_only_errors([&] { (void)tools::load_image_alpha(path); });
  return 0;
}
