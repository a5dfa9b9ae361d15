// The image functions of image_io.hpp, on top of stb_image, stb_image_write and stb_image_resize.
#include "image_io.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <system_error>

#include "difftrain/core/error.hpp"
#include "difftrain/core/random.hpp"
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

Image load_image(const std::string& path) {
  int w = 0, h = 0, channels = 0;
  stbi_uc* data = stbi_load(path.c_str(), &w, &h, &channels, 3);
  if (data == nullptr) {
    const char* reason = stbi_failure_reason();
    throw Error(
        message("load_image: cannot read image '", path, "': ", reason ? reason : "unknown error"));
  }
  Image image;
  image.width = w;
  image.height = h;
  image.rgb.assign(data, data + std::size_t(w) * std::size_t(h) * 3);
  stbi_image_free(data);
  return image;
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

Image resize_image(const Image& image, int width, int height) {
  constexpr const char* fn = "resize_image";
  check_image(fn, image);
  require(width > 0 && height > 0, fn, "target size is ", width, "x", height,
          ", expected positive");
  if (width == image.width && height == image.height) return image;
  Image out(width, height);
  const int ok =
      stbir_resize_uint8_generic(image.rgb.data(), image.width, image.height, 0, out.rgb.data(),
                                 width, height, 0, 3, STBIR_ALPHA_CHANNEL_NONE, 0, STBIR_EDGE_CLAMP,
                                 STBIR_FILTER_TRIANGLE, STBIR_COLORSPACE_LINEAR, nullptr);
  require(ok != 0, fn, "stb_image_resize failed for ", image.width, "x", image.height, " → ", width,
          "x", height);
  return out;
}

std::pair<int, int> shorter_side_size(int width, int height, int resolution) {
  if (width <= height) return {resolution, int(std::int64_t(resolution) * height / width)};
  return {int(std::int64_t(resolution) * width / height), resolution};
}

Image crop_image(const Image& image, int left, int top, int size, bool hflip) {
  constexpr const char* fn = "crop_image";
  check_image(fn, image);
  require(
      size > 0 && left >= 0 && top >= 0 && left + size <= image.width && top + size <= image.height,
      fn, "window ", size, "x", size, " at (", left, ",", top, ") does not fit in a ", image.width,
      "x", image.height, " image");
  Image out(size, size);
  for (int y = 0; y < size; ++y)
    for (int x = 0; x < size; ++x) {
      const std::uint8_t* src = image.pixel(left + (hflip ? size - 1 - x : x), top + y);
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
                      bool hflip) {
  constexpr const char* fn = "resize_and_crop";
  check_image(fn, image);
  require(resolution > 0, fn, "resolution is ", resolution, ", expected > 0");
  const auto [w, h] = shorter_side_size(image.width, image.height, resolution);
  const Image resized = resize_image(image, w, h);
  const auto [left, top] = crop_origin(w, h, resolution, center_crop, crop_seed);
  return crop_image(resized, left, top, resolution, hflip);
}

}  // namespace difftrain::tools
