// The bucketing of buckets.hpp.
#include "buckets.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <set>

#include "difftrain/core/error.hpp"
#include "difftrain/core/random.hpp"

namespace difftrain::tools {

namespace {

// q = (x − fmod(x, d)) / d, then ⌊q⌋ (+1 when q − ⌊q⌋ > 0.5): CPython's x // d for x >= 0, d > 0,
// exact where std::floor(x / d) can be off by one when x / d rounds to an integer.
double python_floordiv(double x, double d) {
  const double div = (x - std::fmod(x, d)) / d;
  double floor_div = std::floor(div);
  if (div - floor_div > 0.5) floor_div += 1;
  return floor_div;
}

// trunc(x): Python's int() of a finite x >= 0, checked to fit an int.
int python_int(double x, const char* what) {
  require(std::isfinite(x) && x >= 0 && x < 2147483648.0, "select_bucket", what, " is ", x,
          ", expected in [0, 2^31)");
  return static_cast<int>(x);
}

// x' = int(x + 0.5); x' − x' mod steps (kohya's BucketManager.round_to_steps).
int round_to_steps(double x, int steps) {
  const int rounded = python_int(x + 0.5, "a side before rounding to --bucket_reso_steps");
  return rounded - rounded % steps;
}

}  // namespace

// steps > 0, resolution > 0, 0 < min <= max, min ≡ max ≡ 0 mod steps, min <= res sides <= max.
void BucketOptions::validate() const {
  constexpr const char* fn = "bucket options";
  const int steps = bucket_reso_steps;
  require(steps > 0, fn, "--bucket_reso_steps is ", steps, ", expected > 0");
  require(resolution_width > 0 && resolution_height > 0, fn, "--resolution is ", resolution_width,
          ",", resolution_height, ", expected both sides > 0");
  require(min_bucket_reso > 0, fn, "--min_bucket_reso is ", min_bucket_reso, ", expected > 0");
  require(min_bucket_reso <= max_bucket_reso, fn, "--min_bucket_reso is ", min_bucket_reso,
          ", expected <= --max_bucket_reso ", max_bucket_reso);
  // kohya rounds these to multiples with a warning; here the user picks the value.
  require(min_bucket_reso % steps == 0, fn, "--min_bucket_reso is ", min_bucket_reso,
          ", expected a multiple of --bucket_reso_steps ", steps, " (kohya rounds it down to ",
          min_bucket_reso - min_bucket_reso % steps, ")");
  require(max_bucket_reso % steps == 0, fn, "--max_bucket_reso is ", max_bucket_reso,
          ", expected a multiple of --bucket_reso_steps ", steps, " (kohya rounds it up to ",
          std::int64_t{max_bucket_reso} + steps - max_bucket_reso % steps, ")");
  require(std::min(resolution_width, resolution_height) >= min_bucket_reso, fn,
          "--min_bucket_reso is ", min_bucket_reso,
          ", expected <= the smaller side of --resolution ", resolution_width, ",",
          resolution_height);
  require(std::max(resolution_width, resolution_height) <= max_bucket_reso, fn,
          "--max_bucket_reso is ", max_bucket_reso,
          ", expected >= the larger side of --resolution ", resolution_width, ",",
          resolution_height);
}

// {(s, s)} ∪ {(w, h), (h, w) : h >= min}, s = ⌊√(W·H) / d⌋·d, h = min(max, (W·H // w // d)·d).
std::vector<BucketSize> make_bucket_resolutions(int max_width, int max_height, int min_size,
                                                int max_size, int divisible) {
  constexpr const char* fn = "make_bucket_resolutions";
  require(max_width > 0 && max_height > 0, fn, "max resolution is ", max_width, "x", max_height,
          ", expected both sides > 0");
  require(divisible > 0, fn, "divisible is ", divisible, ", expected > 0");
  require(min_size > 0, fn, "min_size is ", min_size, ", expected > 0");
  const std::int64_t max_area = std::int64_t{max_width} * max_height;

  const int square =
      static_cast<int>(python_floordiv(std::sqrt(double(max_area)), divisible)) * divisible;
  require(square > 0, fn, "max resolution ", max_width, "x", max_height, " is below one step of ",
          divisible, " pixels: the square bucket would be 0x0");
  std::set<BucketSize> resos{{square, square}};
  // 64-bit so that width += divisible cannot overflow near INT_MAX.
  for (std::int64_t width = min_size; width <= max_size; width += divisible) {
    const std::int64_t height =
        std::min<std::int64_t>(max_size, max_area / width / divisible * divisible);
    if (height >= min_size) {
      resos.insert({int(width), int(height)});
      resos.insert({int(height), int(width)});
    }
  }
  return {resos.begin(), resos.end()};
}

// default: (w, h) if a bucket, else argmin |b_w/b_h − w/h|, covered; no_upscale: shrunk − mod
// steps.
BucketChoice select_bucket(const BucketOptions& options, const std::vector<BucketSize>& predefined,
                           int image_width, int image_height) {
  constexpr const char* fn = "select_bucket";
  options.validate();
  require(image_width > 0 && image_height > 0, fn, "image size is ", image_width, "x", image_height,
          ", expected both sides > 0");
  const int steps = options.bucket_reso_steps;
  const double aspect = double(image_width) / double(image_height);
  BucketChoice choice;

  if (!options.bucket_no_upscale) {
    require(!predefined.empty(), fn,
            "no predefined buckets (expected make_bucket_resolutions of the options)");
    for (std::size_t i = 0; i < predefined.size(); ++i)
      require(predefined[i].width > 0 && predefined[i].height > 0, fn, "predefined bucket ", i,
              " is ", predefined[i].width, "x", predefined[i].height, ", expected both sides > 0");

    // The image's own size first: an image kohya preprocessed with no_upscale keeps its bucket
    // even when another bucket has the same aspect ratio.
    const BucketSize own{image_width, image_height};
    if (std::find(predefined.begin(), predefined.end(), own) != predefined.end()) {
      choice.bucket = own;
    } else {
      // numpy's argmin: the first of the least |aspect error|.
      std::size_t best = 0;
      double best_error = 0;
      for (std::size_t i = 0; i < predefined.size(); ++i) {
        const double error =
            std::abs(double(predefined[i].width) / double(predefined[i].height) - aspect);
        if (i == 0 || error < best_error) best = i, best_error = error;
      }
      choice.bucket = predefined[best];
    }

    // Cover the bucket: an image wider than the bucket matches its height, else its width.
    const double bucket_aspect = double(choice.bucket.width) / double(choice.bucket.height);
    const double scale = aspect > bucket_aspect ? double(choice.bucket.height) / image_height
                                                : double(choice.bucket.width) / image_width;
    choice.resized_width = python_int(image_width * scale + 0.5, "the resized width");
    choice.resized_height = python_int(image_height * scale + 0.5, "the resized height");
  } else {
    const std::int64_t max_area =
        std::int64_t{options.resolution_width} * options.resolution_height;
    if (std::int64_t{image_width} * image_height > max_area) {
      // Shrink to max_area at the image's aspect, round one side to steps and derive the other
      // from the aspect: whichever pair keeps the aspect closer (ties: the height-rounded one).
      const double resized_width = std::sqrt(double(max_area) * aspect);
      const double resized_height = double(max_area) / resized_width;
      const int width_rounded = round_to_steps(resized_width, steps);
      const int height_in_wr = round_to_steps(width_rounded / aspect, steps);
      const int height_rounded = round_to_steps(resized_height, steps);
      const int width_in_hr = round_to_steps(height_rounded * aspect, steps);
      // kohya divides by both heights (ZeroDivisionError there).
      require(height_in_wr > 0 && height_rounded > 0, fn, "image ", image_width, "x", image_height,
              " is too wide for --bucket_reso_steps ", steps, " at --resolution ",
              options.resolution_width, ",", options.resolution_height,
              ": its bucket height rounds to 0");
      const double ar_width_rounded = double(width_rounded) / height_in_wr;
      const double ar_height_rounded = double(width_in_hr) / height_rounded;
      if (std::abs(ar_width_rounded - aspect) < std::abs(ar_height_rounded - aspect)) {
        choice.resized_width = width_rounded;
        choice.resized_height = python_int(width_rounded / aspect + 0.5, "the resized height");
      } else {
        choice.resized_width = python_int(height_rounded * aspect + 0.5, "the resized width");
        choice.resized_height = height_rounded;
      }
    } else {
      choice.resized_width = image_width;
      choice.resized_height = image_height;
    }
    // Rounded down, so the image is cropped to the bucket, never padded.
    choice.bucket = {choice.resized_width - choice.resized_width % steps,
                     choice.resized_height - choice.resized_height % steps};
    require(choice.bucket.width > 0 && choice.bucket.height > 0, fn, "image ", image_width, "x",
            image_height, " resized to ", choice.resized_width, "x", choice.resized_height,
            " gives bucket ", choice.bucket.width, "x", choice.bucket.height,
            ", expected both sides >= --bucket_reso_steps ", steps);
  }

  choice.ar_error = double(choice.bucket.width) / double(choice.bucket.height) - aspect;
  return choice;
}

// t = resized − bucket per axis; centre: t // 2; random: uniform in [0, t] (kohya's randint).
std::pair<int, int> bucket_crop_origin(const BucketChoice& choice, bool random_crop,
                                       std::uint64_t crop_seed) {
  const int trim_x = choice.resized_width - choice.bucket.width;
  const int trim_y = choice.resized_height - choice.bucket.height;
  require(trim_x >= 0 && trim_y >= 0, "bucket_crop_origin", "resized image ", choice.resized_width,
          "x", choice.resized_height, " is smaller than its bucket ", choice.bucket.width, "x",
          choice.bucket.height);
  if (!random_crop) return {trim_x / 2, trim_y / 2};
  const RandomStream rs{crop_seed, 0};
  // uniform_int's range is half-open: [0, t + 1).
  return {static_cast<int>(uniform_int(rs, 0, 0, std::int64_t{trim_x} + 1)),
          static_cast<int>(uniform_int(rs, 1, 0, std::int64_t{trim_y} + 1))};
}

}  // namespace difftrain::tools
