// tools/buckets.hpp: kohya's aspect-ratio buckets against values worked out by hand from kohya's
// formulas (make_bucket_resolutions, select_bucket in both modes, the crop of
// trim_and_resize_if_required), plus the properties every bucket must have (sides multiples of the
// step, area within the resolution's, the resized image covering its bucket), and the options'
// errors naming the kohya flag.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "buckets.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/random.hpp"

namespace tools = difftrain::tools;
using Catch::Contains;
using difftrain::Error;
using tools::BucketChoice;
using tools::BucketOptions;
using tools::BucketSize;
using tools::make_bucket_resolutions;
using tools::select_bucket;

namespace Catch {
template <>
struct StringMaker<BucketSize> {
  static std::string convert(const BucketSize& b) {
    return "(" + std::to_string(b.width) + ", " + std::to_string(b.height) + ")";
  }
};
}  // namespace Catch

namespace {

BucketOptions options_512(bool no_upscale = false) {
  BucketOptions o;
  o.resolution_width = o.resolution_height = 512;
  o.bucket_no_upscale = no_upscale;
  return o;
}

bool contains(const std::vector<BucketSize>& list, BucketSize b) {
  return std::find(list.begin(), list.end(), b) != list.end();
}

}  // namespace

TEST_CASE("make_bucket_resolutions(512, 512) is kohya's list", "[buckets]") {
  // max_area = 512·512 = 262144; square: √262144 = 512, 512 // 64 = 8 → (512, 512).
  // Each width w gives h = min(1024, (262144 // w // 64)·64):
  //   256: 1024 → 16 → 1024     320: 819 → 12 → 768     384: 682 → 10 → 640
  //   448: 585 → 9 → 576        512: 512 → 8 → 512      576: 455 → 7 → 448
  //   640: 409 → 6 → 384        704: 372 → 5 → 320      768: 341 → 5 → 320
  //   832: 315 → 4 → 256        896: 292 → 4 → 256      960: 273 → 4 → 256
  //   1024: 256 → 4 → 256
  // all h >= 256, so each (w, h) and (h, w) is added; 17 distinct, sorted by width then height.
  const std::vector<BucketSize> expected = {
      {256, 832}, {256, 896}, {256, 960}, {256, 1024}, {320, 704}, {320, 768},
      {384, 640}, {448, 576}, {512, 512}, {576, 448},  {640, 384}, {704, 320},
      {768, 320}, {832, 256}, {896, 256}, {960, 256},  {1024, 256}};
  const auto resos = make_bucket_resolutions(512, 512);
  CHECK(resos == expected);
  CHECK(resos.size() == 17);
  CHECK(contains(resos, {512, 512}));
  CHECK(contains(resos, {256, 1024}));
  CHECK_FALSE(contains(resos, {320, 832}));  // 320·832 = 266240 > 262144

  CHECK(std::is_sorted(resos.begin(), resos.end()));
  CHECK(std::adjacent_find(resos.begin(), resos.end()) == resos.end());
  for (const auto& b : resos) {
    INFO(b.width << "x" << b.height);
    CHECK(b.width % 64 == 0);
    CHECK(b.height % 64 == 0);
    CHECK(b.width * b.height <= 512 * 512);
    CHECK(std::min(b.width, b.height) >= 256);
    CHECK(std::max(b.width, b.height) <= 1024);
    CHECK(contains(resos, {b.height, b.width}));  // every bucket has its transpose
  }
}

TEST_CASE("make_bucket_resolutions of a non-square resolution", "[buckets]") {
  // 768·512 = 393216; √393216 = 627.06, 627.06 // 64 = 9 → the square bucket is (576, 576), and
  // (512, 512) is not on the list (no width gives height 512 except 704 and 768: 393216 // 704 =
  // 558 → 8·64, 393216 // 768 = 512 → 8·64). Widths 256, 320, 384 give h capped at 1024
  // (1536, 1228, 1024 before the cap); 19 buckets in all.
  const auto resos = make_bucket_resolutions(768, 512);
  CHECK(resos.size() == 19);
  CHECK(contains(resos, {576, 576}));
  CHECK_FALSE(contains(resos, {512, 512}));
  CHECK(contains(resos, {704, 512}));
  CHECK(contains(resos, {768, 512}));
  CHECK(resos.front() == BucketSize{256, 1024});
  CHECK(resos.back() == BucketSize{1024, 384});

  CHECK_THROWS_AS(make_bucket_resolutions(512, 512, 256, 1024, 0), Error);
  CHECK_THROWS_AS(make_bucket_resolutions(0, 512), Error);
  CHECK_THROWS_WITH(make_bucket_resolutions(32, 32), Contains("0x0"));  // √1024 = 32 < 64
}

TEST_CASE("select_bucket picks the nearest aspect ratio and covers it", "[buckets]") {
  const auto o = options_512();
  const auto resos = make_bucket_resolutions(512, 512);

  SECTION("a wider bucket: match widths") {
    // 768×512: aspect 3/2. Near buckets: 640/384 = 5/3 (error 1/6), 576/448 = 9/7 (3/14 ≈ 0.214),
    // 704/320 = 2.2 (0.7) → (640, 384). 3/2 < 5/3, so scale = 640/768: 768 → 640,
    // 512·5/6 = 426.67 → int(427.17) = 427.
    const BucketChoice c = select_bucket(o, resos, 768, 512);
    CHECK(c.bucket == BucketSize{640, 384});
    CHECK(c.resized_width == 640);
    CHECK(c.resized_height == 427);
    CHECK(c.ar_error == Approx(1.0 / 6.0));
  }
  SECTION("a taller bucket: match heights") {
    // 512×768: aspect 2/3; 384/640 = 0.6 (error 1/15), 448/576 = 7/9 (1/9) → (384, 640).
    // 2/3 > 0.6, so scale = 640/768: 768 → 640, 512 → 427.
    const BucketChoice c = select_bucket(o, resos, 512, 768);
    CHECK(c.bucket == BucketSize{384, 640});
    CHECK(c.resized_width == 427);
    CHECK(c.resized_height == 640);
    CHECK(c.ar_error == Approx(-1.0 / 15.0));
  }
  SECTION("an image the size of a bucket keeps it") {
    const BucketChoice c = select_bucket(o, resos, 448, 576);
    CHECK(c.bucket == BucketSize{448, 576});
    CHECK(c.resized_width == 448);
    CHECK(c.resized_height == 576);
    CHECK(c.ar_error == 0);
  }
  SECTION("own size before nearest aspect; ties go to the first bucket") {
    const std::vector<BucketSize> two = {{512, 512}, {256, 256}};
    // 256×256 is on the list: kept, though (512, 512) comes first with the same aspect.
    CHECK(select_bucket(o, two, 256, 256).bucket == BucketSize{256, 256});
    // 300×300 is not: both errors are 0, argmin takes the first; scaled 512/300 → 512×512.
    const BucketChoice c = select_bucket(o, two, 300, 300);
    CHECK(c.bucket == BucketSize{512, 512});
    CHECK(c.resized_width == 512);
    CHECK(c.resized_height == 512);
  }
  SECTION("every image: a listed bucket of least aspect error, covered with one side exact") {
    for (int w = 64; w <= 4096; w += 93) {
      for (int h = 64; h <= 4096; h += 117) {
        const BucketChoice c = select_bucket(o, resos, w, h);
        INFO(w << "x" << h << " -> " << c.bucket.width << "x" << c.bucket.height << ", resized "
               << c.resized_width << "x" << c.resized_height);
        REQUIRE(contains(resos, c.bucket));
        double least = 1e300;
        for (const auto& b : resos)
          least = std::min(least, std::abs(double(b.width) / b.height - double(w) / h));
        CHECK(std::abs(c.ar_error) == least);
        CHECK(c.ar_error == double(c.bucket.width) / c.bucket.height - double(w) / h);
        CHECK(c.resized_width >= c.bucket.width);
        CHECK(c.resized_height >= c.bucket.height);
        CHECK((c.resized_width == c.bucket.width || c.resized_height == c.bucket.height));
      }
    }
  }
  SECTION("errors") {
    CHECK_THROWS_WITH(select_bucket(o, {}, 768, 512), Contains("no predefined buckets"));
    CHECK_THROWS_WITH(select_bucket(o, resos, 0, 512), Contains("image size is 0x512"));
    BucketOptions bad = o;
    bad.bucket_reso_steps = 0;
    CHECK_THROWS_WITH(select_bucket(bad, resos, 768, 512), Contains("--bucket_reso_steps"));
  }
}

TEST_CASE("select_bucket with --bucket_no_upscale only shrinks", "[buckets]") {
  const auto o = options_512(true);
  const std::int64_t max_area = 512 * 512;

  SECTION("a small image is not resized; the bucket is its size rounded down to steps") {
    // 300×200 = 60000 <= 262144: resized = 300×200; 300 − 300 mod 64 (44) = 256,
    // 200 − 200 mod 64 (8) = 192; ar_error = 256/192 − 3/2 = −1/6.
    const BucketChoice c = select_bucket(o, {}, 300, 200);
    CHECK(c.bucket == BucketSize{256, 192});
    CHECK(c.resized_width == 300);
    CHECK(c.resized_height == 200);
    CHECK(c.ar_error == Approx(-1.0 / 6.0));
    // Centre crop of 300×200 to 256×192: (44 // 2, 8 // 2).
    CHECK(tools::bucket_crop_origin(c, false, 0) == std::pair{22, 4});
  }
  SECTION("a small image on the step grid is its own bucket") {
    const BucketChoice c = select_bucket(o, {}, 512, 384);
    CHECK(c.bucket == BucketSize{512, 384});
    CHECK(c.resized_width == 512);
    CHECK(c.resized_height == 384);
    CHECK(c.ar_error == 0);
  }
  SECTION("a large image: the height-rounded pair keeps the aspect") {
    // 2000×1000, aspect 2: √(262144·2) = 724.08, 262144 / 724.08 = 362.04.
    // width-rounded: int(724.58) = 724 → 704 (724 mod 64 = 20); height int(352.5) = 352 → 320;
    //   704/320 = 2.2 (error 0.2).
    // height-rounded: 362 → 320 (mod 42); width int(640.5) = 640 → 640; 640/320 = 2 (error 0).
    // → resized (int(320·2 + 0.5), 320) = (640, 320), bucket (640, 320).
    const BucketChoice c = select_bucket(o, {}, 2000, 1000);
    CHECK(c.bucket == BucketSize{640, 320});
    CHECK(c.resized_width == 640);
    CHECK(c.resized_height == 320);
    CHECK(c.ar_error == 0);
    CHECK(std::int64_t{c.resized_width} * c.resized_height <= max_area);
  }
  SECTION("a large image: the width-rounded pair keeps the aspect") {
    // 1000×3000, aspect 1/3: √(262144/3) = 295.60, 262144 / 295.60 = 886.81.
    // width-rounded: int(296.10) = 296 → 256; height int(768.5) = 768 → 768; 256/768 = 1/3 (0).
    // height-rounded: 886 → 832 (mod 54); width int(277.83) = 277 → 256; 256/832 (error 0.026).
    // → resized (256, int(768.5)) = (256, 768); the other pair would give bucket (256, 832).
    const BucketChoice c = select_bucket(o, {}, 1000, 3000);
    CHECK(c.bucket == BucketSize{256, 768});
    CHECK(c.resized_width == 256);
    CHECK(c.resized_height == 768);
    CHECK(std::int64_t{c.resized_width} * c.resized_height <= max_area);
  }
  SECTION("every image: never upscaled, bucket on the step grid inside the resized image") {
    for (int w = 70; w <= 4096; w += 131) {
      for (int h = 70; h <= 4096; h += 149) {
        const BucketChoice c = select_bucket(o, {}, w, h);
        INFO(w << "x" << h << " -> " << c.bucket.width << "x" << c.bucket.height << ", resized "
               << c.resized_width << "x" << c.resized_height);
        CHECK(c.resized_width <= w);
        CHECK(c.resized_height <= h);
        if (std::int64_t{w} * h <= max_area) CHECK((c.resized_width == w && c.resized_height == h));
        CHECK(c.bucket.width % 64 == 0);
        CHECK(c.bucket.height % 64 == 0);
        CHECK(c.bucket.width > c.resized_width - 64);
        CHECK(c.bucket.height > c.resized_height - 64);
        CHECK(c.bucket.width <= c.resized_width);
        CHECK(c.bucket.height <= c.resized_height);
      }
    }
  }
  SECTION("too thin for the steps: an Error, not a 0-pixel bucket") {
    // 20000×20 (400000 > 262144) shrinks to about 16191×16.2: its height rounds to 0 steps.
    CHECK_THROWS_WITH(select_bucket(o, {}, 20000, 20),
                      Contains("too wide for --bucket_reso_steps 64"));
    // 300×50 stays as it is, and 50 − 50 mod 64 = 0.
    CHECK_THROWS_WITH(select_bucket(o, {}, 300, 50), Contains("gives bucket 256x0"));
  }
}

TEST_CASE("bucket_crop_origin: centre, and random within range by the seed", "[buckets]") {
  BucketChoice c;
  c.bucket = {256, 256};
  c.resized_width = 357;   // trim 101
  c.resized_height = 299;  // trim 43

  // Centre: (101 // 2, 43 // 2), rounded down on both axes.
  CHECK(tools::bucket_crop_origin(c, false, 7) == std::pair{50, 21});

  // The 768×512 image in its (640, 384) bucket: resized 640×427 → (0, 43 // 2).
  const auto o = options_512();
  const auto chosen = select_bucket(o, make_bucket_resolutions(512, 512), 768, 512);
  CHECK(tools::bucket_crop_origin(chosen, false, 0) == std::pair{0, 21});
  for (std::uint64_t seed = 0; seed < 20; ++seed)
    CHECK(tools::bucket_crop_origin(chosen, true, seed).first == 0);  // no trim in x

  std::set<int> xs, ys;
  for (std::uint64_t seed = 0; seed < 2000; ++seed) {
    const auto [x, y] = tools::bucket_crop_origin(c, true, seed);
    REQUIRE(x >= 0);
    REQUIRE(x <= 101);
    REQUIRE(y >= 0);
    REQUIRE(y <= 43);
    xs.insert(x);
    ys.insert(y);
    CHECK(tools::bucket_crop_origin(c, true, seed) == std::pair{x, y});  // a function of the seed
  }
  // Both ends of [0, t] are drawn (randint is inclusive), and most values in between.
  CHECK(*xs.begin() == 0);
  CHECK(*xs.rbegin() == 101);
  CHECK(*ys.begin() == 0);
  CHECK(*ys.rbegin() == 43);
  CHECK(xs.size() > 90);  // of 102
  CHECK(ys.size() == 44);

  // Draw 0 of the seed's stream for x, draw 1 for y.
  const difftrain::RandomStream rs{12345, 0};
  CHECK(tools::bucket_crop_origin(c, true, 12345) ==
        std::pair{int(difftrain::uniform_int(rs, 0, 0, 102)),
                  int(difftrain::uniform_int(rs, 1, 0, 44))});

  c.resized_height = 200;
  CHECK_THROWS_WITH(tools::bucket_crop_origin(c, false, 0), Contains("smaller than its bucket"));
}

TEST_CASE("BucketOptions::validate names the kohya flag", "[buckets]") {
  CHECK_NOTHROW(options_512().validate());
  auto with = [](auto change) {
    BucketOptions o = options_512();
    change(o);
    return o;
  };
  CHECK_THROWS_WITH(with([](auto& o) { o.bucket_reso_steps = 0; }).validate(),
                    Contains("--bucket_reso_steps is 0, expected > 0"));
  CHECK_THROWS_WITH(with([](auto& o) { o.resolution_width = 0; }).validate(),
                    Contains("--resolution is 0,512"));
  CHECK_THROWS_WITH(BucketOptions{}.validate(), Contains("--resolution"));  // unset
  CHECK_THROWS_WITH(with([](auto& o) { o.min_bucket_reso = 0; }).validate(),
                    Contains("--min_bucket_reso is 0, expected > 0"));
  CHECK_THROWS_WITH(with([](auto& o) { o.min_bucket_reso = 2048; }).validate(),
                    Contains("--min_bucket_reso is 2048, expected <= --max_bucket_reso 1024"));
  CHECK_THROWS_WITH(with([](auto& o) { o.min_bucket_reso = 300; }).validate(),
                    Contains("--min_bucket_reso is 300, expected a multiple of "
                             "--bucket_reso_steps 64") &&
                        Contains("rounds it down to 256"));
  CHECK_THROWS_WITH(with([](auto& o) { o.max_bucket_reso = 1000; }).validate(),
                    Contains("--max_bucket_reso is 1000") && Contains("rounds it up to 1024"));
  CHECK_THROWS_WITH(with([](auto& o) { o.min_bucket_reso = 576; }).validate(),
                    Contains("--min_bucket_reso is 576, expected <= the smaller side of "
                             "--resolution 512,512"));
  CHECK_THROWS_WITH(with([](auto& o) { o.resolution_width = 1088; }).validate(),
                    Contains("--max_bucket_reso is 1024, expected >= the larger side of "
                             "--resolution 1088,512"));
  CHECK_THROWS_AS(with([](auto& o) { o.bucket_reso_steps = -8; }).validate(), Error);
}
