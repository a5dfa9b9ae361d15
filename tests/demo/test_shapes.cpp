// shapes.hpp: the drawn images and the pixel classifier that judges the demo. The classifier must
// read every drawn image right (colour and shape), at the demo's size and others, over many
// random placements; it must not "see" a shape in an empty image.

#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "shapes.hpp"

using difftrain::RandomStream;
using difftrain::Tensor4;

TEST_CASE("the classifier reads colour and shape of every drawn image", "[demo]") {
  for (const std::size_t size : {std::size_t(16), std::size_t(24), std::size_t(32)}) {
    std::vector<shapes::ShapeSpec> specs;
    for (int repeat = 0; repeat < 40; ++repeat)
      for (auto c : shapes::kColours)
        for (auto s : shapes::kShapes) specs.push_back({c, s});
    const Tensor4<float> images = shapes::draw_batch(specs, size, RandomStream{size, 3});
    const auto readings = shapes::classify_batch(images);
    std::size_t wrong = 0;
    for (std::size_t b = 0; b < specs.size(); ++b) {
      const auto& r = readings[b];
      if (r.found && r.spec == specs[b]) continue;
      ++wrong;
      UNSCOPED_INFO("size " << size << " image " << b << ": drew " << shapes::caption(specs[b])
                            << ", read " << shapes::name(r.spec.colour) << " "
                            << shapes::name(r.spec.shape) << " (hue " << r.hue << ", fill "
                            << r.fill << ", hollow " << r.hollow << ")");
    }
    CHECK(wrong == 0);
  }
}

TEST_CASE("drawn images are in [-1, 1] with a black background and the pure colour inside",
          "[demo]") {
  const std::size_t S = 16;
  const shapes::ShapeSpec spec{shapes::Colour::yellow, shapes::Shape::square};
  const shapes::Placement p{8, 8, 8};  // covers pixels 4..11 exactly
  std::vector<float> chw(3 * S * S);
  shapes::draw(chw, S, spec, p);
  for (float v : chw) REQUIRE((v >= -1 && v <= 1));
  const auto at = [&](std::size_t c, std::size_t i, std::size_t j) {
    return chw[c * S * S + i * S + j];
  };
  CHECK(at(0, 8, 8) == 1.0f);  // yellow = (1, 1, -1)
  CHECK(at(1, 8, 8) == 1.0f);
  CHECK(at(2, 8, 8) == -1.0f);
  CHECK(at(0, 2, 2) == -1.0f);  // background
  CHECK(at(0, 4, 4) == 1.0f);   // the box's corners are inside
  CHECK(at(0, 3, 4) == -1.0f);
  const auto r = shapes::classify(chw, S);
  CHECK(r.fill == 1.0);
  CHECK(r.spec == spec);
}

TEST_CASE("the classifier finds nothing in an empty image and reads hues by the nearest colour",
          "[demo]") {
  const std::size_t S = 16;
  std::vector<float> chw(3 * S * S, -1.0f);
  CHECK_FALSE(shapes::classify(chw, S).found);
  CHECK(shapes::hue_degrees(1, 0, 0) == Approx(0));
  CHECK(shapes::hue_degrees(1, 1, 0) == Approx(60));
  CHECK(shapes::hue_degrees(0, 1, 0) == Approx(120));
  CHECK(shapes::hue_degrees(0, 0, 1) == Approx(240));
  CHECK(shapes::hue_degrees(1, 0, 1) == Approx(300));
  CHECK_THROWS_AS(shapes::classify(std::vector<float>(10), S), difftrain::Error);
}
