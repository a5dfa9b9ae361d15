#pragma once
// kohya's aspect-ratio bucketing (kohya-ss/sd-scripts main, 2025) as pure functions, with its flag
// names: library/model_util.py make_bucket_resolutions; library/train_util.py
// BucketManager.round_to_steps and select_bucket (both modes), and the crop of
// trim_and_resize_if_required. Integer steps follow Python's // and int() (truncation of a
// positive float), float steps Python's double arithmetic, so the buckets and sizes are kohya's.
//
//   predefined buckets (default):  every image is resized to cover the bucket of nearest aspect
//                                  ratio (its own size when that is a bucket), then cropped to it
//   --bucket_no_upscale:           images larger than the resolution's area shrink to about that
//                                  area; none grows; the bucket is the size rounded down to steps
//
// Not kohya: a non-multiple --min/max_bucket_reso is rejected (kohya rounds it with a warning),
// and an image so thin that a bucket side would be 0 is an Error (kohya divides by zero or makes
// an empty bucket).

#include <compare>
#include <cstdint>
#include <utility>
#include <vector>

namespace difftrain::tools {

/// A bucket's size in pixels; ordered as Python tuples (width, then height).
struct BucketSize {
  int width = 0, height = 0;
  auto operator<=>(const BucketSize&) const = default;
};

/// The bucketing flags of kohya's train scripts (--resolution="W,H" is width, height).
struct BucketOptions {
  int resolution_width = 0, resolution_height = 0;  // 0: unset, which validate rejects
  int min_bucket_reso = 256, max_bucket_reso = 1024, bucket_reso_steps = 64;
  bool bucket_no_upscale = false;

  /// Throws Error naming the flag: steps > 0, resolution > 0, min and max multiples of steps,
  /// 0 < min <= min(resolution), max(resolution) <= max (kohya's dataset asserts).
  void validate() const;
};

/// Where an image goes: its bucket, the size it is resized to before the crop (each side >= the
/// bucket's), and the aspect error bucket_w / bucket_h − image_w / image_h.
struct BucketChoice {
  BucketSize bucket;
  int resized_width = 0, resized_height = 0;
  double ar_error = 0;
};

/// s = ⌊√(W·H) / d⌋·d gives (s, s); for w = min, min + d, … ≤ max: h = min(max, (W·H // w // d)·d)
/// gives (w, h) and (h, w) when h >= min; deduplicated, sorted (kohya's make_bucket_resolutions).
std::vector<BucketSize> make_bucket_resolutions(int max_width, int max_height, int min_size = 256,
                                                int max_size = 1024, int divisible = 64);

/// kohya's BucketManager.select_bucket for an image_width × image_height image. Without
/// bucket_no_upscale, `predefined` is the bucket list (make_bucket_resolutions of the options);
/// with it, `predefined` is unused (may be empty). Throws Error for invalid options, a
/// non-positive image size, an empty `predefined` when it is needed, or a degenerate bucket.
BucketChoice select_bucket(const BucketOptions& options, const std::vector<BucketSize>& predefined,
                           int image_width, int image_height);

/// (left, top) of the bucket-sized crop of the resized image, as trim_and_resize_if_required:
/// per axis t = resized − bucket, centre t // 2, random uniform in [0, t] (draw 0 for x, 1 for y
/// of RandomStream{crop_seed, 0}). Throws Error when the resized image is smaller than the bucket.
std::pair<int, int> bucket_crop_origin(const BucketChoice& choice, bool random_crop,
                                       std::uint64_t crop_seed);

}  // namespace difftrain::tools
