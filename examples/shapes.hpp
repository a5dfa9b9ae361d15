#pragma once
// The shapes demo's data and its judge: procedurally drawn coloured shapes with captions
// ("a red circle"), and a pixel classifier that reads colour and shape back from an image.
//
// Images are [3, S, S] in [-1, 1] (diffusers' pixel convention): a black background (−1) and one
// shape of a pure colour, anti-aliased by 4×4 supersampling. The shape's bounding box has side
// s ∈ [0.45·S, 0.7·S] (jittered, whole pixels) at a jittered whole-pixel position fully inside
// the image.
//
// Classifier (no learning; it must be right on every drawn image, tests/demo checks it):
//   foreground = the largest 8-connected region of pixels whose brightest channel is > 0 (more
//                than half covered; stray pixels of a sample elsewhere are ignored)
//   colour     = the hue of the mean foreground RGB, nearest of red 0°, yellow 60°, green 120°,
//                blue 240°
//   shape      = ring if the centre of the foreground's bounding box is empty (a hole), else by
//                geometry that survives small discretised shapes (the fill ratio does not: a
//                7-pixel circle can fill 92% of its box): mass low in the box (centroid > 0.08 of
//                the height below the centre) → triangle (apex up), else ≥ 3 of the box's 4
//                corner pixels filled → square, else circle

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <difftrain/core/error.hpp>
#include <difftrain/core/random.hpp>
#include <difftrain/core/tensor.hpp>
#include <numbers>
#include <span>
#include <string>
#include <vector>

namespace shapes {

using difftrain::Tensor4;

enum class Colour : std::uint8_t { red, green, blue, yellow };
enum class Shape : std::uint8_t { circle, square, triangle, ring };

inline constexpr std::array<Colour, 4> kColours = {Colour::red, Colour::green, Colour::blue,
                                                   Colour::yellow};
inline constexpr std::array<Shape, 4> kShapes = {Shape::circle, Shape::square, Shape::triangle,
                                                 Shape::ring};

inline const char* name(Colour c) {
  constexpr std::array<const char*, 4> names = {"red", "green", "blue", "yellow"};
  return names[static_cast<std::size_t>(c)];
}
inline const char* name(Shape s) {
  constexpr std::array<const char*, 4> names = {"circle", "square", "triangle", "ring"};
  return names[static_cast<std::size_t>(s)];
}

/// One drawable concept.
struct ShapeSpec {
  Colour colour = Colour::red;
  Shape shape = Shape::circle;
  bool operator==(const ShapeSpec&) const = default;
};

/// "a red circle".
inline std::string caption(ShapeSpec spec) {
  return std::string("a ") + name(spec.colour) + " " + name(spec.shape);
}

/// The base data: red/green/blue × circle/square/triangle (yellow and ring are held out for the
/// new concept).
inline std::vector<ShapeSpec> base_specs() {
  std::vector<ShapeSpec> specs;
  for (Colour c : {Colour::red, Colour::green, Colour::blue})
    for (Shape s : {Shape::circle, Shape::square, Shape::triangle}) specs.push_back({c, s});
  return specs;
}

/// The colour in [-1, 1] RGB.
inline std::array<float, 3> rgb(Colour c) {
  switch (c) {
    case Colour::red:
      return {1, -1, -1};
    case Colour::green:
      return {-1, 1, -1};
    case Colour::blue:
      return {-1, -1, 1};
    case Colour::yellow:
      return {1, 1, -1};
  }
  return {0, 0, 0};
}

/// Where and how big: centre (cx, cy) and bounding-box side s, in pixels.
struct Placement {
  double cx = 0, cy = 0, side = 0;
};

/// A placement from three uniforms on [0, 1), on the pixel grid: a whole-pixel side in
/// [0.45, 0.7]·S (rounded) and a whole-pixel top-left corner anywhere the box fits with a
/// one-pixel margin. (On the grid a square's edges cover whole pixels; off it, an edge row can be
/// half covered, exactly the classifier's threshold, and samples learn to draw it as a ragged row
/// of stray pixels.)
inline Placement place(std::size_t size, float u_side, float u_x, float u_y) {
  const double S = static_cast<double>(size);
  Placement p;
  p.side = std::max(1.0, std::round(S * (0.45 + 0.25 * static_cast<double>(u_side))));
  const double positions = std::max(1.0, S - 1 - p.side);  // top-left corners 1 … S − 1 − side
  const auto corner = [&](float u) {
    return 1 + std::min(std::floor(static_cast<double>(u) * positions), positions - 1);
  };
  p.cx = corner(u_x) + p.side / 2;
  p.cy = corner(u_y) + p.side / 2;
  return p;
}

/// Is point (x, y) inside the shape? (Pixel (i, j) covers [j, j+1) × [i, i+1).)
inline bool inside(Shape shape, const Placement& p, double x, double y) {
  const double dx = x - p.cx, dy = y - p.cy, r = p.side / 2;
  switch (shape) {
    case Shape::square:
      return std::abs(dx) <= r && std::abs(dy) <= r;
    case Shape::circle:
      return dx * dx + dy * dy <= r * r;
    case Shape::ring: {
      const double d2 = dx * dx + dy * dy;
      return d2 <= r * r && d2 >= 0.25 * r * r;  // inner radius r/2
    }
    case Shape::triangle:  // apex at the top centre, base along the bottom edge
      return dy <= r && std::abs(dx) <= (dy + r) / 2;
  }
  return false;
}

/// Draws one image into chw ([3, S, S], overwritten): coverage c of each pixel by 4×4 samples,
/// value = (1 − c)·background + c·colour.
inline void draw(std::span<float> chw, std::size_t size, ShapeSpec spec, const Placement& p) {
  difftrain::require(chw.size() == 3 * size * size, "shapes::draw", "image has ", chw.size(),
                     " values, expected 3·", size, "·", size);
  constexpr int kSub = 4;
  const auto colour = rgb(spec.colour);
  const std::size_t plane = size * size;
  for (std::size_t i = 0; i < size; ++i)
    for (std::size_t j = 0; j < size; ++j) {
      int hits = 0;
      for (int a = 0; a < kSub; ++a)
        for (int b = 0; b < kSub; ++b)
          hits += inside(spec.shape, p, static_cast<double>(j) + (b + 0.5) / kSub,
                         static_cast<double>(i) + (a + 0.5) / kSub);
      const float c = static_cast<float>(hits) / (kSub * kSub);
      for (std::size_t ch = 0; ch < 3; ++ch)
        chw[ch * plane + i * size + j] = (1 - c) * -1.0f + c * colour[ch];
    }
}

/// A batch [B, 3, S, S] of drawn images; image b shows specs[b] at a placement drawn from
/// stream rs (a function of rs only).
inline Tensor4<float> draw_batch(std::span<const ShapeSpec> specs, std::size_t size,
                                 difftrain::RandomStream rs) {
  const std::size_t B = specs.size(), n = 3 * size * size;
  Tensor4<float> images = Tensor4<float>::from_shape({B, 3, size, size});
  std::vector<float> u(3 * B);
  difftrain::fill_uniform(std::span<float>(u), rs);
  for (std::size_t b = 0; b < B; ++b)
    draw(std::span<float>(images.data() + b * n, n), size, specs[b],
         place(size, u[3 * b], u[3 * b + 1], u[3 * b + 2]));
  return images;
}

/// What the classifier reads from an image.
struct Reading {
  bool found = false;  // enough foreground to judge
  ShapeSpec spec;
  double hue = 0;              // degrees, of the mean foreground colour
  double fill = 0;             // foreground / bounding-box area (informational)
  double centroid_offset = 0;  // (foreground mean row − box centre row) / box height
  double corners = 0;          // fraction of the box's four corner pixels in the foreground
  bool hollow = false;
};

/// Hue in degrees [0, 360) of an RGB colour (channels in any common range).
inline double hue_degrees(double r, double g, double b) {
  const double mx = std::max({r, g, b}), mn = std::min({r, g, b}), d = mx - mn;
  if (d <= 0) return 0;
  double h;
  if (mx == r)
    h = std::fmod((g - b) / d, 6.0);
  else if (mx == g)
    h = (b - r) / d + 2;
  else
    h = (r - g) / d + 4;
  h *= 60;
  return h < 0 ? h + 360 : h;
}

/// Reads colour and shape from chw ([3, S, S] in [-1, 1]); see the top of the file.
inline Reading classify(std::span<const float> chw, std::size_t size) {
  difftrain::require(chw.size() == 3 * size * size, "shapes::classify", "image has ", chw.size(),
                     " values, expected 3·", size, "·", size);
  const std::size_t plane = size * size;
  // The shape is the largest 8-connected foreground region (stray pixels of a sample are not).
  std::vector<int> label(plane, -1);
  std::vector<std::size_t> stack;
  int best_label = -1;
  std::size_t best_size = 0;
  for (std::size_t k0 = 0; k0 < plane; ++k0) {
    if (label[k0] != -1) continue;
    const auto is_fg = [&](std::size_t k) {
      return std::max({chw[k], chw[plane + k], chw[2 * plane + k]}) > 0;
    };
    if (!is_fg(k0)) {
      label[k0] = -2;
      continue;
    }
    const int id = static_cast<int>(k0);
    std::size_t n = 0;
    stack.assign(1, k0);
    label[k0] = id;
    while (!stack.empty()) {
      const std::size_t k = stack.back();
      stack.pop_back();
      ++n;
      const std::size_t i = k / size, j = k % size;
      for (std::size_t ni = i ? i - 1 : 0; ni <= std::min(i + 1, size - 1); ++ni)
        for (std::size_t nj = j ? j - 1 : 0; nj <= std::min(j + 1, size - 1); ++nj) {
          const std::size_t nk = ni * size + nj;
          if (label[nk] == -1 && is_fg(nk)) {
            label[nk] = id;
            stack.push_back(nk);
          }
        }
    }
    if (n > best_size) best_size = n, best_label = id;
  }
  std::vector<unsigned char> fg(plane);
  std::size_t count = 0, i0 = size, i1 = 0, j0 = size, j1 = 0;
  double sum[3] = {0, 0, 0};
  for (std::size_t i = 0; i < size; ++i)
    for (std::size_t j = 0; j < size; ++j) {
      const std::size_t k = i * size + j;
      if (best_label < 0 || label[k] != best_label) continue;
      fg[k] = 1;
      ++count;
      for (std::size_t ch = 0; ch < 3; ++ch) sum[ch] += (chw[ch * plane + k] + 1) / 2;
      i0 = std::min(i0, i), i1 = std::max(i1, i), j0 = std::min(j0, j), j1 = std::max(j1, j);
    }
  Reading r;
  if (count < 4) return r;
  r.found = true;
  r.hue = hue_degrees(sum[0], sum[1], sum[2]);
  constexpr std::array<std::pair<double, Colour>, 4> hues = {
      {{0, Colour::red}, {60, Colour::yellow}, {120, Colour::green}, {240, Colour::blue}}};
  double best = 1e9;
  for (const auto& [h, c] : hues) {
    const double d = std::abs(r.hue - h), dist = std::min(d, 360 - d);
    if (dist < best) best = dist, r.spec.colour = c;
  }
  const std::size_t h = i1 - i0 + 1, w = j1 - j0 + 1;
  r.fill = static_cast<double>(count) / static_cast<double>(h * w);
  // The hole: pixels within 0.15·min(h, w) of the box centre, mostly background.
  const double ci = (i0 + i1) / 2.0, cj = (j0 + j1) / 2.0,
               rad = std::max(0.15 * static_cast<double>(std::min(h, w)), 0.75);
  std::size_t centre = 0, centre_fg = 0;
  for (std::size_t i = i0; i <= i1; ++i)
    for (std::size_t j = j0; j <= j1; ++j) {
      const double di = static_cast<double>(i) - ci, dj = static_cast<double>(j) - cj;
      if (di * di + dj * dj > rad * rad) continue;
      ++centre;
      centre_fg += fg[i * size + j];
    }
  r.hollow = centre > 0 && 2 * centre_fg < centre;
  // A triangle (apex up) has its mass low: centroid 1/6 of the height below the box centre; a
  // circle or square is symmetric. A square fills the box's corner pixels, a circle does not.
  double row_sum = 0;
  for (std::size_t k = 0; k < plane; ++k)
    if (fg[k]) row_sum += static_cast<double>(k / size);
  r.centroid_offset = (row_sum / static_cast<double>(count) - ci) / static_cast<double>(h);
  r.corners =
      (fg[i0 * size + j0] + fg[i0 * size + j1] + fg[i1 * size + j0] + fg[i1 * size + j1]) / 4.0;
  r.spec.shape = r.hollow                   ? Shape::ring
                 : r.centroid_offset > 0.08 ? Shape::triangle
                 : r.corners >= 0.75        ? Shape::square
                                            : Shape::circle;
  return r;
}

/// The readings of every image of a batch [B, 3, S, S].
inline std::vector<Reading> classify_batch(const Tensor4<float>& images) {
  const std::size_t B = images.shape()[0], S = images.shape()[2], n = 3 * S * S;
  difftrain::require(images.shape()[1] == 3 && images.shape()[3] == S, "shapes::classify_batch",
                     "images have shape ", difftrain::shape_string(images.shape()),
                     ", expected [B,3,S,S]");
  std::vector<Reading> out;
  for (std::size_t b = 0; b < B; ++b)
    out.push_back(classify(std::span<const float>(images.data() + b * n, n), S));
  return out;
}

}  // namespace shapes
