#pragma once
// 8-bit RGB images for the tools: load (WebP via libwebp; PNG, JPEG, BMP, TGA, GIF, PSD, PNM via
// stb_image; a JPEG's or WebP's EXIF orientation applied as PIL's ImageOps.exif_transpose), save
// PNG, convert to and from [3,H,W] tensors in [-1,1], image grids, and diffusers'
// train_text_to_image preprocessing (resize the shorter side with PIL's resampling filters, crop,
// flip).
// The definitions are in image_io.cpp; stb_impl.hpp gives stb's declarations to the users of this
// header that write or read image files with stb directly (e.g. tests making fixtures).

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "difftrain/core/choice.hpp"
#include "difftrain/core/tensor.hpp"
#include "stb_impl.hpp"

namespace difftrain::tools {

/// 8-bit RGB, row-major: pixel (x, y) channel c is rgb[3·(y·width + x) + c].
struct Image {
  int width = 0, height = 0;
  std::vector<std::uint8_t> rgb;

  Image() = default;
  Image(int w, int h, std::uint8_t fill = 0)
      : width(w), height(h), rgb(std::size_t(w) * std::size_t(h) * 3, fill) {}

  std::uint8_t* pixel(int x, int y) { return rgb.data() + 3 * (std::size_t(y) * width + x); }
  const std::uint8_t* pixel(int x, int y) const {
    return rgb.data() + 3 * (std::size_t(y) * width + x);
  }
  bool operator==(const Image&) const = default;
};

/// Images whose header declares more pixels than this are refused before decoding (a bomb, or a
/// scan far beyond any training resolution; PIL refuses twice its 89.5M-pixel warning limit).
inline constexpr double kMaxImagePixels = 178956970;

/// Any channel count (grey, grey+alpha, RGB, RGBA) → RGB; alpha is dropped, not composited. A
/// JPEG or WebP is turned upright by its EXIF orientation (exif_transpose(image,
/// exif_orientation(file))), as diffusers' scripts do with PIL.ImageOps.exif_transpose right after
/// opening an image. A file that cannot be decoded (an animated WebP included), or declares more
/// than kMaxImagePixels, is an Error naming it.
Image load_image(const std::string& path);

/// Why the image at `path` cannot be trained on: unreadable, not an image format we read, more
/// than kMaxImagePixels (found from the header, before decoding), or a body that does not decode
/// (found by decoding it, as load_image would). Empty when the image loads.
std::string image_problem(const std::string& path);

/// The alpha channel of the image at `path` (kohya --alpha_mask), as a grey Image (the alpha
/// value in all three channels), turned upright as load_image does; 255 everywhere when the file
/// has no alpha.
Image load_image_alpha(const std::string& path);

/// The Orientation tag (0x0112) of a JPEG file's first APP1 "Exif" segment, or of a WebP file's
/// (RIFF/WEBP) first "EXIF" chunk (a leading "Exif\0\0" dropped, as PIL does), in either byte
/// order ("II" or "MM" TIFF header), 1 to 8; 1 (upright) for other files, when the file has none,
/// or when the JPEG markers, RIFF chunks, the TIFF header, IFD0 or the tag are malformed or out of
/// range (as PIL, which ignores what it cannot read). Every read is bounds-checked: any bytes are
/// safe to pass.
int exif_orientation(std::span<const std::uint8_t> file);

/// The transpose PIL's ImageOps.exif_transpose applies for an EXIF orientation (others: a copy):
///   2 FLIP_LEFT_RIGHT  3 ROTATE_180  4 FLIP_TOP_BOTTOM  5 TRANSPOSE (out(x,y) = in(y,x))
///   6 ROTATE_270 (90° clockwise)  7 TRANSVERSE (out(x,y) = in(W−1−y, H−1−x))
///   8 ROTATE_90 (90° counter-clockwise); 5 to 8 swap width and height.
Image exif_transpose(const Image& image, int orientation);

/// Written to `path.tmp`, then renamed into place: a failed write never leaves a partial file.
void save_png(const std::string& path, const Image& image);

/// x / 127.5 − 1: [3,H,W] in [-1,1] (diffusers' ToTensor + Normalize([0.5], [0.5])).
Tensor3<float> image_to_tensor(const Image& image);

/// round((clamp(v, −1, 1) + 1) · 127.5). NaN → 0 (black), so that a diverged sample shows in a
/// validation grid instead of aborting the run.
std::uint8_t to_pixel(float v);

/// [3,H,W] in [-1,1] → RGB (values outside [-1,1] are clamped).
Image tensor_to_image(const Tensor3<float>& tensor);

/// torchvision's make_grid layout: min(columns, B) tiles per row, row-major, `padding` black
/// pixels between tiles and around the border; tile (r, c) starts at
/// (padding + c·(W + padding), padding + r·(H + padding)).
Image image_grid(const Tensor4<float>& images, std::size_t columns, int padding = 2);

/// Each pixel repeated as a zoom × zoom block (nearest neighbour: small images stay crisp).
Image zoom_nearest(const Image& image, int zoom);

/// [B,3,H,W] in [-1,1] → one PNG grid (see image_grid), optionally zoomed (zoom_nearest).
void save_png_grid(const std::string& path, const Tensor4<float>& images, std::size_t columns,
                   int padding = 2, int zoom = 1);

/// torchvision's InterpolationMode, by the lower-case names of diffusers'
/// --image_interpolation_mode. torchvision's Resize hands a PIL image to PIL's Image.resize with
/// pil_modes_mapping: nearest and nearest_exact are both PIL's NEAREST there.
enum class Interpolation { nearest, nearest_exact, bilinear, bicubic, box, hamming, lanczos };

inline constexpr std::array<Choice<Interpolation>, 7> kInterpolations{{
    {"nearest", Interpolation::nearest},
    {"nearest_exact", Interpolation::nearest_exact},
    {"bilinear", Interpolation::bilinear},
    {"bicubic", Interpolation::bicubic},
    {"box", Interpolation::box},
    {"hamming", Interpolation::hamming},
    {"lanczos", Interpolation::lanczos},
}};

/// Resampled to width × height as PIL's Image.resize (libImaging/Resample.c), 8-bit values, no
/// gamma conversion. Filters (separable; horizontal pass, rounded to 8 bits, then vertical):
/// out[j] = Σ_i in[i]·k(i), k(i) = f((i + ½ − c)/s) normalized to sum 1 over the window of
/// input pixels within the support around c = (j + ½)·scale (cut at the image's edges), where
/// scale = in/out and s = max(scale, 1) (when shrinking, the filter stretches over s source
/// pixels: antialiasing); weights in 22-bit fixed point, as PIL. f and its support:
///   box 1 on (−½, ½] (½)   bilinear 1 − |x| (1)   hamming sinc(x)·(0.54 + 0.46·cos(πx)) (1)
///   bicubic Keys a = −½ (2)   lanczos sinc(x)·sinc(x/3) (3)
/// nearest (and nearest_exact): in[floor((j + ½)·scale)]. A dimension that keeps its size is
/// not resampled.
Image resize_image(const Image& image, int width, int height,
                   Interpolation interpolation = Interpolation::bilinear);

/// The size torchvision's Resize(resolution) gives: shorter side → resolution, longer side →
/// floor(resolution · long / short).
std::pair<int, int> shorter_side_size(int width, int height, int resolution);

/// The width × height window at (left, top), optionally mirrored left-right.
Image crop_image(const Image& image, int left, int top, int width, int height, bool hflip);
/// The size × size window (crop_image of a square).
inline Image crop_image(const Image& image, int left, int top, int size, bool hflip) {
  return crop_image(image, left, top, size, size, hflip);
}

/// Where a resolution-sized crop of a width × height image starts: the center
/// (round-half-even((extent − resolution) / 2), as torchvision's CenterCrop) or uniform integers
/// drawn from crop_seed (RandomCrop).
std::pair<int, int> crop_origin(int width, int height, int resolution, bool center_crop,
                                std::uint64_t crop_seed);

/// diffusers' train_text_to_image preprocessing: Resize(resolution, interpolation) on the shorter
/// side (resize_image), CenterCrop or RandomCrop(resolution) (deterministic in crop_seed), then
/// the horizontal flip when `hflip`.
Image resize_and_crop(const Image& image, int resolution, bool center_crop, std::uint64_t crop_seed,
                      bool hflip, Interpolation interpolation = Interpolation::bilinear);

}  // namespace difftrain::tools
