// The image functions of image_io.hpp, on top of stb_image, libjpeg, libwebp and stb_image_write;
// the EXIF orientation parser and PIL's resampling (libImaging/Resample.c) are written here.
#include "image_io.hpp"

// clang-format off
#include <cstdio>  // jpeglib.h uses FILE and size_t without including their headers
#include <jpeglib.h>
#include <jerror.h>
// clang-format on
#include <webp/decode.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numbers>
#include <system_error>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/io/regular_file.hpp"
#include "stb_impl.hpp"

namespace difftrain::tools {

namespace {

void check_image(const char* fn, const Image& image) {
  require(image.width > 0 && image.height > 0 &&
              image.rgb.size() == std::size_t(image.width) * std::size_t(image.height) * 3,
          fn, "image is ", image.width, "x", image.height, " with ", image.rgb.size(),
          " bytes, expected a non-empty image with width·height·3 bytes");
}

}  // namespace

namespace {

// "RIFF", a 4-byte size, "WEBP": the container of every WebP file.
bool is_webp(std::span<const std::uint8_t> file) {
  return file.size() >= 12 && std::memcmp(file.data(), "RIFF", 4) == 0 &&
         std::memcmp(file.data() + 8, "WEBP", 4) == 0;
}

const char* webp_status_name(VP8StatusCode status) {
  switch (status) {
    case VP8_STATUS_OUT_OF_MEMORY:
      return "out of memory";
    case VP8_STATUS_BITSTREAM_ERROR:
      return "bitstream error";
    case VP8_STATUS_UNSUPPORTED_FEATURE:
      return "unsupported feature";
    case VP8_STATUS_NOT_ENOUGH_DATA:
      return "not enough data: truncated";
    default:
      return "error";
  }
}

// Decoded pixels, `channels` bytes each, row-major, freed by the decoding library's deallocator.
struct Pixels {
  std::unique_ptr<std::uint8_t, void (*)(void*)> data;
  int width = 0, height = 0;
};

// A WebP file decoded by libwebp to `channels` (3: RGB; 4: RGBA, alpha 255 when it has none).
Pixels decode_webp(const std::string& path, std::span<const std::uint8_t> bytes, int channels) {
  constexpr const char* fn = "load_image";
  WebPBitstreamFeatures features;
  const VP8StatusCode status = WebPGetFeatures(bytes.data(), bytes.size(), &features);
  require(status == VP8_STATUS_OK, fn, "cannot read image '", path,
          "': not a valid WebP file (libwebp: ", webp_status_name(status), ")");
  const int w = features.width, h = features.height;
  require(double(w) * double(h) <= kMaxImagePixels, fn, "image '", path, "' declares ", w, "x", h,
          " pixels, more than the limit of ", kMaxImagePixels, ": refused before decoding");
  // WebPDecode decodes still images only (PIL would read the first frame).
  require(!features.has_animation, fn, "cannot read image '", path,
          "': an animated WebP, which is not supported: save one frame as a still image");
  Pixels p{{nullptr, WebPFree}};
  p.data.reset(channels == 3 ? WebPDecodeRGB(bytes.data(), bytes.size(), &p.width, &p.height)
                             : WebPDecodeRGBA(bytes.data(), bytes.size(), &p.width, &p.height));
  require(p.data != nullptr, fn, "cannot read image '", path,
          "': not a valid WebP file (its image data does not decode)");
  return p;
}

// A little-endian integer of `n` bytes at `at` (0 past the end).
std::uint32_t le(std::span<const std::uint8_t> b, std::size_t at, int n) {
  std::uint32_t v = 0;
  for (int k = n - 1; k >= 0; --k) v = v << 8 | (at + k < b.size() ? b[at + k] : 0);
  return v;
}

bool is_jpeg(std::span<const std::uint8_t> b) {
  return b.size() >= 3 && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF;
}

// PNG or BMP by their signatures (whatever the file is named), or "": what stb_image decodes
// here. It also reads PSD, GIF, HDR, PIC, PNM and TGA: formats training images do not come in,
// and more decoder surface for a file from the internet (a 23-byte PNM declared 10^8 pixels).
const char* stb_format(std::span<const std::uint8_t> b) {
  if (b.size() >= 8 && std::memcmp(b.data(), "\x89PNG\r\n\x1a\n", 8) == 0) return "PNG";
  if (b.size() >= 2 && b[0] == 'B' && b[1] == 'M') return "BMP";
  return "";
}

// ---- JPEG: libjpeg, the decoder PIL uses (same IDCT and upsampling, so the same pixels). stb
// 2.27's JPEG decoder read and wrote past its Huffman tables on fuzzed files. ----

// The most scans a progressive JPEG may have (TurboJPEG's limit): thousands of tiny scans make
// decoding take minutes.
constexpr int kMaxJpegScans = 500;

// libjpeg reports errors through error_exit, which must not return: a longjmp back to
// run_jpeg (libjpeg is C; no exception may cross its frames). Warnings are ignored as PIL ignores
// them, except a premature end of the data, which PIL reports as a truncated image.
struct JpegErrors {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char text[JMSG_LENGTH_MAX] = "";
  bool truncated = false;
};

void jpeg_error_exit(j_common_ptr c) {
  auto* e = reinterpret_cast<JpegErrors*>(c->err);
  c->err->format_message(c, e->text);
  std::longjmp(e->jump, 1);
}

void jpeg_emit_message(j_common_ptr c, int level) {
  if (level < 0 && c->err->msg_code == JWRN_JPEG_EOF)
    reinterpret_cast<JpegErrors*>(c->err)->truncated = true;
}

void jpeg_scan_limit(j_common_ptr c) {
  const auto* d = reinterpret_cast<j_decompress_ptr>(c);
  if (d->input_scan_number <= kMaxJpegScans) return;
  auto* e = reinterpret_cast<JpegErrors*>(c->err);
  std::snprintf(e->text, sizeof e->text, "more than %d progressive scans", kMaxJpegScans);
  std::longjmp(e->jump, 1);
}

// One decode; its buffers live in the caller's frame, so a longjmp leaves them intact.
struct JpegDecode {
  jpeg_decompress_struct info{};
  JpegErrors errors;
  jpeg_progress_mgr progress{};
  std::vector<std::uint8_t> pixels;  // RGB or CMYK rows
  int width = 0, height = 0, components = 0;
  double declared = 0;  // width · height from the header
};

enum class JpegResult { ok, error, too_large };

// Decodes `bytes` into d.pixels (RGB, or CMYK as stored for CMYK/YCCK files); the header's size
// is checked against `max_pixels` before anything is allocated.
JpegResult run_jpeg(JpegDecode& d, double max_pixels) {
  if (setjmp(d.errors.jump)) return JpegResult::error;
  jpeg_read_header(&d.info, TRUE);
  d.declared = double(d.info.image_width) * double(d.info.image_height);
  if (d.declared > max_pixels) return JpegResult::too_large;
  const bool cmyk = d.info.jpeg_color_space == JCS_CMYK || d.info.jpeg_color_space == JCS_YCCK;
  d.info.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
  jpeg_start_decompress(&d.info);
  d.width = int(d.info.output_width);
  d.height = int(d.info.output_height);
  d.components = d.info.output_components;
  const std::size_t stride = std::size_t(d.width) * std::size_t(d.components);
  d.pixels.resize(stride * std::size_t(d.height));
  while (d.info.output_scanline < d.info.output_height) {
    JSAMPROW row = d.pixels.data() + stride * d.info.output_scanline;
    jpeg_read_scanlines(&d.info, &row, 1);
  }
  jpeg_finish_decompress(&d.info);
  return JpegResult::ok;
}

// PIL's CMYK → RGB (Convert.c cmyk2rgb) on un-inverted ink, after its "CMYK;I" read of Adobe's
// inverted values: channel = 255 − clip(c + (255 − c)·k/255), with PIL's rounding of a·b/255.
std::uint8_t cmyk_channel(std::uint8_t stored_c, std::uint8_t stored_k) {
  const int c = 255 - stored_c, k = 255 - stored_k;
  const int t = (255 - c) * k + 128;
  return std::uint8_t(255 - std::min(255, c + (((t >> 8) + t) >> 8)));
}

Pixels decode_jpeg(const std::string& path, std::span<const std::uint8_t> bytes, int channels) {
  constexpr const char* fn = "load_image";
  JpegDecode d;
  d.info.err = jpeg_std_error(&d.errors.mgr);
  d.errors.mgr.error_exit = jpeg_error_exit;
  d.errors.mgr.emit_message = jpeg_emit_message;
  jpeg_create_decompress(&d.info);
  d.progress.progress_monitor = jpeg_scan_limit;
  d.info.progress = &d.progress;
  jpeg_mem_src(&d.info, bytes.data(), static_cast<unsigned long>(bytes.size()));
  // Every scan with DC codes spends at least one bit per 8×8 block: more pixels than 512 per
  // byte cannot be coded, so a truncated header is not decoded into a huge image of padding.
  const double max_pixels = std::min(kMaxImagePixels, 512.0 * double(bytes.size()));
  const JpegResult result = run_jpeg(d, max_pixels);
  jpeg_destroy_decompress(&d.info);
  if (result == JpegResult::too_large) {
    require(d.declared <= kMaxImagePixels, fn, "image '", path, "' declares ", d.info.image_width,
            "x", d.info.image_height, " pixels, more than the limit of ", kMaxImagePixels,
            ": refused before decoding");
    fail(fn, "cannot read image '", path, "': it declares ", d.info.image_width, "x",
         d.info.image_height, " pixels, more than its ", bytes.size(),
         " bytes can code (truncated)");
  }
  require(result == JpegResult::ok, fn, "cannot read image '", path,
          "': not a valid JPEG file (libjpeg: ", d.errors.text, ")");
  require(!d.errors.truncated, fn, "cannot read image '", path,
          "': the JPEG data ends early (truncated)");
  const std::size_t n = std::size_t(d.width) * std::size_t(d.height);
  Pixels p{{static_cast<std::uint8_t*>(std::malloc(n * std::size_t(channels))), std::free},
           d.width,
           d.height};
  if (!p.data) throw std::bad_alloc();
  for (std::size_t i = 0; i < n; ++i) {
    std::uint8_t* out = p.data.get() + i * std::size_t(channels);
    const std::uint8_t* in = d.pixels.data() + i * std::size_t(d.components);
    for (int k = 0; k < 3; ++k) out[k] = d.components == 4 ? cmyk_channel(in[k], in[3]) : in[k];
    if (channels == 4) out[3] = 255;
  }
  return p;
}

// The first PNG chunk whose declared length runs past the end of the file, as "chunk IDAT at
// byte i declares n bytes, past the end", or "". stb_image 2.27 grows its buffer to a chunk's
// declared length before reading it: a 215-byte file asked for 1.6 GB (found by fuzzing).
std::string png_chunk_problem(std::span<const std::uint8_t> b) {
  const std::size_t n = b.size();
  for (std::size_t i = 8; i + 8 <= n;) {
    const std::size_t length = std::size_t(b[i]) << 24 | std::size_t(b[i + 1]) << 16 |
                               std::size_t(b[i + 2]) << 8 | b[i + 3];
    const std::string type(reinterpret_cast<const char*>(b.data() + i + 4), 4);
    if (length > n - i - 8)
      return message("its chunk at byte ", i, " declares ", length, " bytes, past the end of the ",
                     n, "-byte file (truncated)");
    if (type == "IEND") break;
    i += 12 + length;  // length, type, data, CRC
  }
  return "";
}

// Any other format stb_image reads, decoded to `channels`.
Pixels decode_stb(const std::string& path, std::span<const std::uint8_t> bytes, int channels) {
  constexpr const char* fn = "load_image";
  const std::string format = stb_format(bytes);
  require(!format.empty(), fn, "cannot read image '", path,
          "': it is not a PNG, JPEG, WebP or BMP file (by its contents)");
  if (const std::string problem = format == "PNG" ? png_chunk_problem(bytes) : ""; !problem.empty())
    fail(fn, "cannot read image '", path, "': not a valid PNG file (", problem, ")");
  int w = 0, h = 0, file_channels = 0;
  // A header stb cannot read is refused here: decoding it anyway bypasses the size checks (a
  // BMP of 70000 × −4464 pixels took minutes).
  if (!stbi_info_from_memory(bytes.data(), int(bytes.size()), &w, &h, &file_channels)) {
    const char* reason = stbi_failure_reason();
    fail(fn, "cannot read image '", path, "': ", reason ? reason : "unreadable header");
  }
  {
    // stb's BMP header reader gives a top-down BMP's height as stored: negative.
    h = std::abs(h);
    require(w > 0 && h > 0, fn, "cannot read image '", path, "': it declares ", w, "x", h,
            " pixels");
    const double pixels = double(w) * double(h), size = double(bytes.size());
    require(pixels <= kMaxImagePixels, fn, "image '", path, "' declares ", w, "x", h,
            " pixels, more than the limit of ", kMaxImagePixels, ": refused before decoding");
    // What the file's bytes can hold, so that a truncated header is not decoded into a huge
    // image of padding: an uncompressed BMP (stb reads no RLE) stores every row.
    if (format == "BMP") {
      const double bits = le(bytes, 28, 2), row = std::ceil(bits * w / 32) * 4;
      require(le(bytes, 10, 4) + row * h <= size, fn, "cannot read image '", path,
              "': it declares ", w, "x", h, " pixels of ", bits, " bits, more than its ",
              bytes.size(), " bytes hold (truncated)");
    }
  }
  stbi_uc* data =
      stbi_load_from_memory(bytes.data(), int(bytes.size()), &w, &h, &file_channels, channels);
  if (data == nullptr) {
    const char* reason = stbi_failure_reason();
    throw Error(
        message(fn, ": cannot read image '", path, "': ", reason ? reason : "unknown error"));
  }
  return {{data, stbi_image_free}, w, h};
}

// The file decoded to `channels` (3: RGB; 4: RGBA) and its EXIF orientation.
std::pair<Image, int> decode_image(const std::string& path, int channels) {
  constexpr const char* fn = "load_image";
  // The decoders take an int size: larger files are refused before reading.
  const std::string file = io::read_regular_file(path, fn, INT_MAX);
  const std::span<const std::uint8_t> bytes(reinterpret_cast<const std::uint8_t*>(file.data()),
                                            file.size());
  const Pixels p = is_webp(bytes)   ? decode_webp(path, bytes, channels)
                   : is_jpeg(bytes) ? decode_jpeg(path, bytes, channels)
                                    : decode_stb(path, bytes, channels);
  Image image(p.width, p.height);
  const std::size_t n = std::size_t(p.width) * std::size_t(p.height);
  if (channels == 3) {
    image.rgb.assign(p.data.get(), p.data.get() + n * 3);
  } else {  // alpha into every channel
    for (std::size_t k = 0; k < n; ++k)
      image.rgb[3 * k] = image.rgb[3 * k + 1] = image.rgb[3 * k + 2] = p.data.get()[4 * k + 3];
  }
  return {std::move(image), exif_orientation(bytes)};
}

}  // namespace

std::string image_problem(const std::string& path) {
  try {
    (void)decode_image(path, 3);  // refuses an oversized header before decoding
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

Image load_image(const std::string& path) {
  auto [image, orientation] = decode_image(path, 3);
  return exif_transpose(image, orientation);
}

Image load_image_alpha(const std::string& path) {
  auto [image, orientation] = decode_image(path, 4);
  return exif_transpose(image, orientation);
}

namespace {

// The orientation in a TIFF structure (an Exif segment's payload after "Exif\0\0"): IFD0's
// entries in order, as PIL reads them (a later 0x0112 entry replaces an earlier one, an entry of
// an unsupported type is skipped, a truncated IFD keeps what was read before the cut).
int tiff_orientation(std::span<const std::uint8_t> tiff) {
  if (tiff.size() < 8) return 1;
  bool big_endian;
  if (tiff[0] == 'I' && tiff[1] == 'I')
    big_endian = false;
  else if (tiff[0] == 'M' && tiff[1] == 'M')
    big_endian = true;
  else
    return 1;
  // Callers check that [at, at + n) lies in `tiff`.
  auto read = [&](std::size_t at, int n) {
    std::uint32_t v = 0;
    for (int i = 0; i < n; ++i)
      v |= std::uint32_t(tiff[at + std::size_t(i)]) << (8 * (big_endian ? n - 1 - i : i));
    return v;
  };
  if (read(2, 2) != 42) return 1;
  const std::size_t ifd = read(4, 4);
  if (ifd > tiff.size() || tiff.size() - ifd < 2) return 1;
  const std::size_t entries = read(ifd, 2);
  int orientation = 1;
  for (std::size_t e = 0; e < entries; ++e) {
    const std::size_t at = ifd + 2 + 12 * e;
    if (tiff.size() - at < 12) break;  // truncated IFD (at ≤ size: the previous entry fit)
    if (read(at, 2) != 0x0112) continue;
    const std::uint32_t type = read(at + 2, 2), count = read(at + 4, 4);
    std::uint32_t value;
    if (type == 1 || type == 6)  // BYTE, SBYTE: the first byte of the value field
      value = tiff[at + 8];
    else if (type == 3 || type == 8)  // SHORT, SSHORT
      value = read(at + 8, 2);
    else if (type == 4 || type == 9)  // LONG, SLONG
      value = read(at + 8, 4);
    else
      continue;
    orientation = count == 1 && value >= 1 && value <= 8 ? int(value) : 1;
  }
  return orientation;
}

// The orientation in a RIFF/WebP file's first "EXIF" chunk. Chunks: a fourcc, a 4-byte
// little-endian payload size, the payload padded to an even length; the walk stops at the end of
// the RIFF (its size field, + 8) or of the file, whichever comes first.
int webp_exif_orientation(std::span<const std::uint8_t> file) {
  const auto le32 = [&](std::size_t at) {
    return std::uint32_t(file[at]) | std::uint32_t(file[at + 1]) << 8 |
           std::uint32_t(file[at + 2]) << 16 | std::uint32_t(file[at + 3]) << 24;
  };
  const std::size_t end = std::min<std::size_t>(file.size(), std::size_t(le32(4)) + 8);
  std::size_t at = 12;  // after "RIFF", the size, "WEBP"
  while (at <= end && end - at >= 8) {
    const std::size_t size = le32(at + 4);
    const std::size_t payload = at + 8;
    if (size > end - payload) return 1;  // a chunk past the end: truncated or corrupt
    if (std::memcmp(&file[at], "EXIF", 4) == 0) {
      std::span<const std::uint8_t> exif = file.subspan(payload, size);
      // Some writers keep JPEG's "Exif\0\0" prefix; PIL's Exif.load drops it.
      if (exif.size() >= 6 && std::memcmp(exif.data(), "Exif\0\0", 6) == 0) exif = exif.subspan(6);
      return tiff_orientation(exif);
    }
    at = payload + size + (size & 1);
  }
  return 1;
}

}  // namespace

int exif_orientation(std::span<const std::uint8_t> file) {
  if (is_webp(file)) return webp_exif_orientation(file);
  if (file.size() < 4 || file[0] != 0xFF || file[1] != 0xD8) return 1;  // not a JPEG (SOI)
  std::size_t at = 2;
  while (file.size() - at >= 4) {  // a marker and a segment length
    if (file[at] != 0xFF) return 1;
    const std::uint8_t marker = file[at + 1];
    if (marker == 0xFF) {  // fill byte
      ++at;
      continue;
    }
    at += 2;
    if (marker == 0x01 || marker == 0xD8 || (marker >= 0xD0 && marker <= 0xD7)) continue;
    if (marker == 0xD9 || marker == 0xDA) return 1;  // end of image, start of scan
    const std::size_t length = std::size_t(file[at]) << 8 | file[at + 1];  // with its 2 bytes
    if (length < 2 || length > file.size() - at) return 1;
    if (marker == 0xE1 && length >= 8 && std::memcmp(&file[at + 2], "Exif\0\0", 6) == 0)
      return tiff_orientation(file.subspan(at + 8, length - 8));  // the first Exif segment
    at += length;
  }
  return 1;
}

Image exif_transpose(const Image& image, int orientation) {
  if (orientation < 2 || orientation > 8) return image;
  check_image("exif_transpose", image);
  const int w = image.width, h = image.height;
  const bool swap = orientation >= 5;
  Image out(swap ? h : w, swap ? w : h);
  for (int y = 0; y < out.height; ++y)
    for (int x = 0; x < out.width; ++x) {
      int sx, sy;  // out(x, y) = in(sx, sy)
      switch (orientation) {
        case 2:
          sx = w - 1 - x, sy = y;
          break;  // FLIP_LEFT_RIGHT
        case 3:
          sx = w - 1 - x, sy = h - 1 - y;
          break;  // ROTATE_180
        case 4:
          sx = x, sy = h - 1 - y;
          break;  // FLIP_TOP_BOTTOM
        case 5:
          sx = y, sy = x;
          break;  // TRANSPOSE
        case 6:
          sx = y, sy = h - 1 - x;
          break;  // ROTATE_270
        case 7:
          sx = w - 1 - y, sy = h - 1 - x;
          break;  // TRANSVERSE
        default:
          sx = w - 1 - y, sy = x;
          break;  // 8: ROTATE_90
      }
      std::copy_n(image.pixel(sx, sy), 3, out.pixel(x, y));
    }
  return out;
}

void save_png(const std::string& path, const Image& image) {
  check_image("save_png", image);
  const std::string tmp = path + ".tmp";
  if (!stbi_write_png(tmp.c_str(), image.width, image.height, 3, image.rgb.data(),
                      image.width * 3)) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    throw Error(message("save_png: cannot write '", tmp, "'"));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    throw Error(message("save_png: cannot rename '", tmp, "' to '", path, "': ", ec.message()));
  }
}

Tensor3<float> image_to_tensor(const Image& image) {
  check_image("image_to_tensor", image);
  const std::size_t h = std::size_t(image.height), w = std::size_t(image.width);
  Tensor3<float> out(Tensor3<float>::shape_type{3, h, w});
  for (std::size_t y = 0; y < h; ++y)
    for (std::size_t x = 0; x < w; ++x)
      for (std::size_t c = 0; c < 3; ++c)
        out(c, y, x) = float(image.rgb[3 * (y * w + x) + c]) / 127.5f - 1.0f;
  return out;
}

std::uint8_t to_pixel(float v) {
  if (std::isnan(v)) return 0;
  const float u = (std::clamp(v, -1.0f, 1.0f) + 1.0f) * 127.5f;
  return static_cast<std::uint8_t>(std::lround(u));
}

Image tensor_to_image(const Tensor3<float>& tensor) {
  constexpr const char* fn = "tensor_to_image";
  require(tensor.shape()[0] == 3 && tensor.shape()[1] > 0 && tensor.shape()[2] > 0, fn,
          "tensor has shape ", shape_string(tensor.shape()), ", expected [3,H,W]");
  const std::size_t h = tensor.shape()[1], w = tensor.shape()[2];
  Image image(static_cast<int>(w), static_cast<int>(h));
  for (std::size_t y = 0; y < h; ++y)
    for (std::size_t x = 0; x < w; ++x)
      for (std::size_t c = 0; c < 3; ++c)
        image.rgb[3 * (y * w + x) + c] = to_pixel(tensor(c, y, x));
  return image;
}

Image image_grid(const Tensor4<float>& images, std::size_t columns, int padding) {
  constexpr const char* fn = "image_grid";
  const auto& s = images.shape();
  require(s[0] > 0 && s[1] == 3 && s[2] > 0 && s[3] > 0, fn, "images have shape ", shape_string(s),
          ", expected [B,3,H,W] with B > 0");
  require(columns > 0, fn, "columns is 0, expected at least 1");
  require(padding >= 0, fn, "padding is ", padding, ", expected >= 0");
  const std::size_t b = s[0], h = s[2], w = s[3], p = std::size_t(padding);
  const std::size_t cols = std::min(columns, b), rows = (b + cols - 1) / cols;
  Image grid(static_cast<int>(cols * (w + p) + p), static_cast<int>(rows * (h + p) + p));
  for (std::size_t i = 0; i < b; ++i) {
    const std::size_t x0 = p + (i % cols) * (w + p), y0 = p + (i / cols) * (h + p);
    for (std::size_t y = 0; y < h; ++y)
      for (std::size_t x = 0; x < w; ++x) {
        std::uint8_t* px = grid.pixel(int(x0 + x), int(y0 + y));
        for (std::size_t c = 0; c < 3; ++c) px[c] = to_pixel(images(i, c, y, x));
      }
  }
  return grid;
}

Image zoom_nearest(const Image& image, int zoom) {
  require(zoom >= 1, "zoom_nearest", "zoom is ", zoom, ", expected >= 1");
  if (zoom == 1) return image;
  Image out(image.width * zoom, image.height * zoom);
  for (int y = 0; y < out.height; ++y)
    for (int x = 0; x < out.width; ++x)
      std::copy_n(image.pixel(x / zoom, y / zoom), 3, out.pixel(x, y));
  return out;
}

void save_png_grid(const std::string& path, const Tensor4<float>& images, std::size_t columns,
                   int padding, int zoom) {
  save_png(path, zoom_nearest(image_grid(images, columns, padding), zoom));
}

namespace {

// PIL's resampling (libImaging/Resample.c): the filters, their supports, the weights.

double sinc(double x) {
  if (x == 0.0) return 1.0;
  x *= std::numbers::pi;
  return std::sin(x) / x;
}

struct ResampleFilter {
  double (*f)(double);
  double support;
};

ResampleFilter resample_filter(Interpolation interpolation) {
  switch (interpolation) {
    case Interpolation::box:
      return {[](double x) { return x > -0.5 && x <= 0.5 ? 1.0 : 0.0; }, 0.5};
    case Interpolation::hamming:
      return {[](double x) {
                x = std::abs(x);
                if (x == 0.0) return 1.0;
                if (x >= 1.0) return 0.0;
                x *= std::numbers::pi;
                // PIL writes the constants as floats: 0.54f, 0.46f.
                return std::sin(x) / x * (double(0.54f) + double(0.46f) * std::cos(x));
              },
              1.0};
    case Interpolation::bicubic:
      return {[](double x) {
                constexpr double a = -0.5;
                x = std::abs(x);
                if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
                if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
                return 0.0;
              },
              2.0};
    case Interpolation::lanczos:
      return {[](double x) { return -3.0 <= x && x < 3.0 ? sinc(x) * sinc(x / 3) : 0.0; }, 3.0};
    default:  // bilinear (nearest does not filter)
      return {[](double x) {
                x = std::abs(x);
                return x < 1.0 ? 1.0 - x : 0.0;
              },
              1.0};
  }
}

constexpr int kPrecisionBits = 32 - 8 - 2;  // PIL's fixed-point weights

// Output pixel j of an axis reads `count[j]` input pixels from `first[j]` with weights
// weight[j·ksize + t] (fixed point, kPrecisionBits fraction bits): PIL's precompute_coeffs and
// normalize_coeffs_8bpc.
struct ResampleWeights {
  int ksize = 0;
  std::vector<int> first, count;
  std::vector<std::int32_t> weight;
};

ResampleWeights resample_weights(int in_size, int out_size, const ResampleFilter& filter) {
  const double scale = double(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = filter.support * filterscale;
  ResampleWeights r;
  r.ksize = int(std::ceil(support)) * 2 + 1;
  r.first.resize(std::size_t(out_size));
  r.count.resize(std::size_t(out_size));
  r.weight.assign(std::size_t(out_size) * std::size_t(r.ksize), 0);
  std::vector<double> k(std::size_t(r.ksize));
  for (int j = 0; j < out_size; ++j) {
    const double center = (j + 0.5) * scale, ss = 1.0 / filterscale;
    const int xmin = std::max(int(center - support + 0.5), 0);
    const int xmax = std::min(int(center + support + 0.5), in_size);
    const int n = std::clamp(xmax - xmin, 0, r.ksize);
    double ww = 0.0;
    for (int x = 0; x < n; ++x) {
      k[std::size_t(x)] = filter.f((double(x + xmin) - center + 0.5) * ss);
      ww += k[std::size_t(x)];
    }
    std::int32_t* w = &r.weight[std::size_t(j) * std::size_t(r.ksize)];
    for (int x = 0; x < n; ++x) {
      const double v = ww != 0.0 ? k[std::size_t(x)] / ww : k[std::size_t(x)];
      w[x] =
          std::int32_t(v < 0 ? -0.5 + v * (1 << kPrecisionBits) : 0.5 + v * (1 << kPrecisionBits));
    }
    r.first[std::size_t(j)] = xmin;
    r.count[std::size_t(j)] = n;
  }
  return r;
}

// PIL's clip8: the fixed-point sum (with its rounding half added) to 0..255.
std::uint8_t clip8(std::int32_t sum) {
  return std::uint8_t(std::clamp(sum >> kPrecisionBits, 0, 255));
}

// The horizontal pass: every row resampled to `width` pixels.
Image resample_horizontal(const Image& in, int width, const ResampleWeights& r) {
  Image out(width, in.height);
  for (int y = 0; y < in.height; ++y)
    for (int x = 0; x < width; ++x) {
      const std::int32_t* w = &r.weight[std::size_t(x) * std::size_t(r.ksize)];
      const std::uint8_t* src = in.pixel(r.first[std::size_t(x)], y);
      std::int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
      for (int t = 0; t < r.count[std::size_t(x)]; ++t) {
        s0 += src[3 * t] * w[t];
        s1 += src[3 * t + 1] * w[t];
        s2 += src[3 * t + 2] * w[t];
      }
      std::uint8_t* dst = out.pixel(x, y);
      dst[0] = clip8(s0), dst[1] = clip8(s1), dst[2] = clip8(s2);
    }
  return out;
}

// The vertical pass: every column resampled to `height` pixels.
Image resample_vertical(const Image& in, int height, const ResampleWeights& r) {
  Image out(in.width, height);
  const std::size_t row = 3 * std::size_t(in.width);
  std::vector<std::int32_t> sum(row);
  for (int y = 0; y < height; ++y) {
    const std::int32_t* w = &r.weight[std::size_t(y) * std::size_t(r.ksize)];
    std::fill(sum.begin(), sum.end(), std::int32_t{1} << (kPrecisionBits - 1));
    for (int t = 0; t < r.count[std::size_t(y)]; ++t) {
      const std::uint8_t* src = in.pixel(0, r.first[std::size_t(y)] + t);
      for (std::size_t i = 0; i < row; ++i) sum[i] += src[i] * w[t];
    }
    std::uint8_t* dst = out.pixel(0, y);
    for (std::size_t i = 0; i < row; ++i) dst[i] = clip8(sum[i]);
  }
  return out;
}

// PIL's NEAREST (ImagingScaleAffine): source index floor(x·scale + scale/2), accumulated in
// double as PIL does.
std::vector<int> nearest_indices(int in_size, int out_size) {
  const double scale = double(in_size) / out_size;
  std::vector<int> index(static_cast<std::size_t>(out_size));
  double pos = scale * 0.5;
  for (auto& i : index) {
    i = std::min(int(pos), in_size - 1);
    pos += scale;
  }
  return index;
}

}  // namespace

Image resize_image(const Image& image, int width, int height, Interpolation interpolation) {
  constexpr const char* fn = "resize_image";
  check_image(fn, image);
  require(width > 0 && height > 0, fn, "target size is ", width, "x", height,
          ", expected positive");
  if (width == image.width && height == image.height) return image;
  if (interpolation == Interpolation::nearest || interpolation == Interpolation::nearest_exact) {
    const std::vector<int> xs = nearest_indices(image.width, width);
    const std::vector<int> ys = nearest_indices(image.height, height);
    Image out(width, height);
    for (int y = 0; y < height; ++y)
      for (int x = 0; x < width; ++x)
        std::copy_n(image.pixel(xs[std::size_t(x)], ys[std::size_t(y)]), 3, out.pixel(x, y));
    return out;
  }
  const ResampleFilter filter = resample_filter(interpolation);
  Image out = width == image.width
                  ? image
                  : resample_horizontal(image, width, resample_weights(image.width, width, filter));
  if (height != image.height)
    out = resample_vertical(out, height, resample_weights(image.height, height, filter));
  return out;
}

std::pair<int, int> shorter_side_size(int width, int height, int resolution) {
  if (width <= height) return {resolution, int(std::int64_t(resolution) * height / width)};
  return {int(std::int64_t(resolution) * width / height), resolution};
}

Image crop_image(const Image& image, int left, int top, int width, int height, bool hflip) {
  constexpr const char* fn = "crop_image";
  check_image(fn, image);
  require(width > 0 && height > 0 && left >= 0 && top >= 0 && left + width <= image.width &&
              top + height <= image.height,
          fn, "window ", width, "x", height, " at (", left, ",", top, ") does not fit in a ",
          image.width, "x", image.height, " image");
  Image out(width, height);
  for (int y = 0; y < height; ++y)
    for (int x = 0; x < width; ++x) {
      const std::uint8_t* src = image.pixel(left + (hflip ? width - 1 - x : x), top + y);
      std::copy(src, src + 3, out.pixel(x, y));
    }
  return out;
}

std::pair<int, int> crop_origin(int width, int height, int resolution, bool center_crop,
                                std::uint64_t crop_seed) {
  if (center_crop)
    return {int(std::nearbyint((width - resolution) / 2.0)),
            int(std::nearbyint((height - resolution) / 2.0))};
  const RandomStream rs{crop_seed, 0};
  return {int(uniform_int(rs, 0, 0, width - resolution + 1)),
          int(uniform_int(rs, 1, 0, height - resolution + 1))};
}

Image resize_and_crop(const Image& image, int resolution, bool center_crop, std::uint64_t crop_seed,
                      bool hflip, Interpolation interpolation) {
  constexpr const char* fn = "resize_and_crop";
  check_image(fn, image);
  require(resolution > 0, fn, "resolution is ", resolution, ", expected > 0");
  const auto [w, h] = shorter_side_size(image.width, image.height, resolution);
  const Image resized = resize_image(image, w, h, interpolation);
  const auto [left, top] = crop_origin(w, h, resolution, center_crop, crop_seed);
  return crop_image(resized, left, top, resolution, hflip);
}

}  // namespace difftrain::tools
