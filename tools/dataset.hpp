#pragma once
// Training data for `difftrain train`: captioned image folders (kohya's same-named .txt captions
// or diffusers imagefolder's metadata.jsonl), DreamBooth instance/class folders, and the data
// source that turns them into train::TrainBatch micro-batches for train::Trainer.
//
// Micro-batch m of batch size B (a function of m only, so that a resumed run repeats):
//   N = num_examples(), S = steps_per_epoch(B) = ceil(N / B), epoch e = m / S, slot s = m mod S
//   rows = perm_e[s·B .. min(s·B + B, N))   (perm_e: Fisher–Yates seeded by (seed, e); the last
//                                             micro-batch of an epoch is short, as a DataLoader
//                                             without drop_last: each example once per epoch)
//   row i → resize_and_crop(image, resolution, center_crop, crop_seed(seed, e, i), flip(seed, e,
//   i), interpolation), with the caption; a list of captions gives choice(seed, e, i) of them
// With class examples (DreamBooth prior preservation, diffusers' DreamBoothDataset):
// N = max(#instance, #class) and row i pairs instance i mod #instance with class i mod #class.
// The definitions are in dataset.cpp.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>
#include <xtensor/xview.hpp>  // xt::view, to take rows out of the batches

#include "difftrain/concepts.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/train/trainer.hpp"
#include "image_io.hpp"

namespace difftrain::tools {

/// One training image and its caption.
struct Example {
  std::string image_path;
  std::string caption;  // with caption_choices: the first of them (diffusers' non-train choice)
  /// A metadata.jsonl caption given as a list of two or more strings: training draws one per
  /// epoch (diffusers: random.choice(caption)); empty for a single caption.
  std::vector<std::string> caption_choices = {};
  bool operator==(const Example&) const = default;
};

/// How a captioned folder is read (flags named as in kohya's and diffusers' scripts).
struct ImageFolderOptions {
  std::string caption_extension = ".txt";  // kohya --caption_extension
  std::string caption_column = "text";     // diffusers --caption_column, in metadata.jsonl
  bool allow_missing_captions = false;     // a missing caption is "" instead of an Error
};

/// The examples of a captioned folder, sorted by file name. With a `metadata.jsonl` (diffusers'
/// imagefolder: one JSON object per line with "file_name", relative to the folder, and the
/// caption column) the images it lists; otherwise every PNG/JPEG/BMP directly in the folder
/// (not recursive) with the first line of its same-named caption file (kohya: a.png → a.txt).
/// A metadata.jsonl caption is a string or a non-empty list of strings (Example::caption_choices;
/// anything else in the column is an Error naming the file and line).
/// WEBP, GIF, TIFF, ... → Error (stb_image cannot read them); other files are ignored.
std::vector<Example> scan_image_folder(const std::string& folder,
                                       const ImageFolderOptions& options = {});

/// DreamBooth: every PNG/JPEG/BMP directly in the folder, sorted, each with the one `prompt`
/// (diffusers' --instance_prompt / --class_prompt); caption files are not read.
std::vector<Example> scan_dreambooth_folder(const std::string& folder, const std::string& prompt);

/// Captions → token ids [B, L] (the CLI passes models::ClipTokenizer::encode_batch).
using Tokenize = std::function<TokenIds(const std::vector<std::string>&)>;

/// Settings of the data source (diffusers' flag names).
struct DataSourceOptions {
  int resolution = 512;
  bool center_crop = false;  // else a random crop
  bool random_flip = false;  // mirror each row with probability 1/2
  std::size_t train_batch_size = 1;
  std::uint64_t seed = 0;
  bool cache_images = false;  // keep decoded, resized (not yet cropped) images in memory
  // diffusers' --image_interpolation_mode, the filter of the Resize (resize_image). Bilinear is
  // torchvision's default and diffusers v0.26's behaviour; newer diffusers scripts default to
  // lanczos.
  Interpolation interpolation = Interpolation::bilinear;
};

/// Micro-batches of examples (see the top of the file); satisfies train::TrainDataSource.
class ImageCaptionDataSource {
 public:
  ImageCaptionDataSource(std::vector<Example> examples, Tokenize tokenize,
                         DataSourceOptions options, std::vector<Example> class_examples = {});

  /// Examples per epoch: #instance, or max(#instance, #class) with class examples.
  std::size_t num_examples() const { return std::max(sets_[0].size(), sets_[1].size()); }
  /// Micro-batches per epoch: ceil(num_examples / batch_size).
  std::size_t steps_per_epoch(std::size_t batch_size) const {
    require(batch_size > 0, "steps_per_epoch", "batch_size is 0, expected >= 1");
    return (num_examples() + batch_size - 1) / batch_size;
  }
  std::size_t steps_per_epoch() const { return steps_per_epoch(options_.train_batch_size); }
  bool with_prior_preservation() const { return !sets_[1].empty(); }
  const std::vector<Example>& examples() const { return sets_[0]; }
  const std::vector<Example>& class_examples() const { return sets_[1]; }
  const DataSourceOptions& options() const { return options_; }

  /// The order of epoch e: a permutation of [0, num_examples) (Fisher–Yates on (seed, e)).
  std::vector<std::size_t> epoch_permutation(std::uint64_t epoch) const { return order(epoch); }

  /// Dataset indices (in [0, num_examples)) of micro-batch m's rows.
  std::vector<std::size_t> batch_indices(std::uint64_t m) const;

  /// The preprocessed image of dataset index i in epoch e (class_set: the class example paired
  /// with i): crop and flip drawn from (seed, e, i), separately for the two sets.
  Image example_image(std::size_t i, std::uint64_t epoch, bool class_set = false);

  /// The caption of dataset index i in epoch e (class_set: of the class example paired with i):
  /// the example's caption, or one of its caption_choices drawn uniformly from (seed, e, i).
  const std::string& example_caption(std::size_t i, std::uint64_t epoch,
                                     bool class_set = false) const;

  /// Micro-batch m: images [b,3,R,R] in [-1,1] and token ids, plus the paired class rows.
  train::TrainBatch operator()(std::uint64_t m);

  /// The token ids of micro-batch m alone (class_set: of its class rows), without decoding any
  /// image: for sources that replace the images (e.g. cached latents).
  TokenIds batch_token_ids(std::uint64_t m, bool class_set = false);

 private:
  // epoch_permutation, memoized for the last epoch asked (not thread-safe: a source per thread).
  const std::vector<std::size_t>& order(std::uint64_t epoch) const;

  static constexpr std::uint64_t kDataStream = 0x64617461;  // "data"

  RandomStream stream() const { return RandomStream{options_.seed, kDataStream}; }

  // Decoded and resized to the shorter side = resolution (cached when asked).
  const Image& resized_image(int s, std::size_t k);

  Tensor4<float> make_images(const std::vector<std::size_t>& rows, std::uint64_t epoch, int s);

  TokenIds tokenize(const std::vector<std::size_t>& rows, std::uint64_t epoch, int s) const;

  std::vector<Example> sets_[2];  // instance (or plain) examples, class examples
  Tokenize tokenize_;
  DataSourceOptions options_;
  std::vector<std::optional<Image>> cache_[2];
  Image scratch_;
  mutable std::vector<std::size_t> perm_;  // epoch_permutation(perm_epoch_)
  mutable std::uint64_t perm_epoch_ = 0;
};

static_assert(train::TrainDataSource<ImageCaptionDataSource>);

}  // namespace difftrain::tools
