#pragma once
// 8-bit RGB images for the tools: load (PNG, JPEG, BMP, TGA, GIF, PSD, PNM via stb_image), save
// PNG, convert to and from [3,H,W] tensors in [-1,1], image grids, and diffusers'
// train_text_to_image preprocessing (resize the shorter side, crop, flip).
// The definitions are in image_io.cpp; stb_impl.hpp gives stb's declarations to the users of this
// header that write or read image files with stb directly (e.g. tests making fixtures).

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

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

/// Any channel count (grey, grey+alpha, RGB, RGBA) → RGB; alpha is dropped, not composited.
Image load_image(const std::string& path);

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

/// Resampled to width × height with a triangle (tent) filter, stretched over the source pixels
/// when shrinking: bilinear upsampling and antialiased (area-like) downsampling, as PIL's
/// BILINEAR that torchvision's Resize uses on images; 8-bit values, no gamma conversion.
Image resize_image(const Image& image, int width, int height);

/// The size torchvision's Resize(resolution) gives: shorter side → resolution, longer side →
/// floor(resolution · long / short).
std::pair<int, int> shorter_side_size(int width, int height, int resolution);

/// The resolution × resolution window at (left, top), optionally mirrored left-right.
Image crop_image(const Image& image, int left, int top, int size, bool hflip);

/// Where a resolution-sized crop of a width × height image starts: the center
/// (round-half-even((extent − resolution) / 2), as torchvision's CenterCrop) or uniform integers
/// drawn from crop_seed (RandomCrop).
std::pair<int, int> crop_origin(int width, int height, int resolution, bool center_crop,
                                std::uint64_t crop_seed);

/// diffusers' train_text_to_image preprocessing: Resize(resolution) on the shorter side
/// (resize_image), CenterCrop or RandomCrop(resolution) (deterministic in crop_seed), then the
/// horizontal flip when `hflip`.
Image resize_and_crop(const Image& image, int resolution, bool center_crop, std::uint64_t crop_seed,
                      bool hflip);

}  // namespace difftrain::tools
