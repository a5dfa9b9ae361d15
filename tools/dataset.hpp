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
//   i), interpolation), with the caption; a list of captions gives choice(seed, e, i) of them;
//   then kohya's caption options (caption.hpp) with draws from (seed, e, i)
// With class examples (DreamBooth prior preservation, diffusers' DreamBoothDataset):
// N = max(#instance, #class) and row i pairs instance i mod #instance with class i mod #class.
// kohya's repeats: an example with num_repeats n counts as n dataset indices (N = Σ n), each with
// its own crop, flip and caption draws; is_reg rows get sample weight reg_loss_weight.
// kohya's buckets (DataSourceOptions::buckets): the dataset indices of each bucket are shuffled
// (Fisher–Yates on the epoch's permutation stream derive(1 + bucket, 0)) and cut into micro-
// batches of B (the last of a bucket short), and the epoch's micro-batches are shuffled
// (derive(0, 0)); S = Σ ceil(n_bucket / B). Crop: kohya's (center with center_crop, else
// uniform), flip and caption as above.
// SDXL's size conditioning (DataSourceOptions::size_conditioning): TrainBatch::time_ids row =
// [original h, w (as decoded), crop top, left (in the flipped image when flipped), target h, w].
// Data-parallel shards (DataSourceOptions::num_shards P, shard_index r; accelerate's convention:
// train_batch_size is per process): everything above is planned with B = train_batch_size·P,
// as one process with that batch would (the "global micro-batch" m, of n rows); the source
// returns its shard, the global rows [⌊r·n/P⌋, ⌊(r+1)·n/P⌋) (shard_rows(m); maybe none when
// n < P, in a short last micro-batch). All draws are keyed by (seed, epoch, dataset index), so a
// shard's rows are bitwise the one-process rows. The definitions are in dataset.cpp.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>
#include <xtensor/xview.hpp>  // xt::view, to take rows out of the batches

#include "buckets.hpp"
#include "caption.hpp"
#include "difftrain/concepts.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/train/trainer.hpp"
#include "image_io.hpp"

namespace difftrain::models {
struct SdxlSizeConditioning;  // models/sdxl_conditioning.hpp
}  // namespace difftrain::models

namespace difftrain::tools {

/// One training image and its caption.
struct Example {
  std::string image_path;
  std::string caption;  // with caption_choices: the first of them (diffusers' non-train choice)
  /// A metadata.jsonl caption given as a list of two or more strings: training draws one per
  /// epoch (diffusers: random.choice(caption)); empty for a single caption.
  std::vector<std::string> caption_choices = {};
  /// kohya's DreamBooth layout: times the image is seen per epoch (the folder's "N_"; for
  /// regularisation images as balanced by balance_regularization).
  std::size_t num_repeats = 1;
  bool is_reg = false;  // a regularisation image (kohya --reg_data_dir): loss × prior_loss_weight
  std::size_t subset = 0;  // its caption options: DataSourceOptions::subset_captions[subset]
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
/// caption column) the images it lists; otherwise every PNG/JPEG/WebP/BMP directly in the folder
/// (not recursive) with the first line of its same-named caption file (kohya: a.png → a.txt).
/// A metadata.jsonl caption is a string or a non-empty list of strings (Example::caption_choices;
/// anything else in the column is an Error naming the file and line).
/// GIF, TIFF, AVIF, ... → Error (not formats the tools read: convert them); other files are
/// ignored.
std::vector<Example> scan_image_folder(const std::string& folder,
                                       const ImageFolderOptions& options = {});

/// kohya's DreamBooth layout: is `folder` a folder of "<N>_<name>" image folders (and no
/// metadata.jsonl)?
bool is_kohya_folder(const std::string& folder);

/// The repeat count N of a kohya image folder named "<N>_<name>" (N >= 1), or 0 when the name is
/// not of that form.
std::size_t kohya_folder_repeats(const std::string& folder_name);

/// The examples of a kohya DreamBooth-layout folder (sd-scripts' --train_data_dir /
/// --reg_data_dir without a dataset config): each subfolder "<N>_<name>" in name order, its
/// images (sorted) with num_repeats = N and the caption file's first line, or <name> (kohya's
/// class tokens) where there is no caption file. Subfolders without "<N>_" are ignored with
/// their name in `ignored`; images directly in `folder` are an Error (kohya would ignore them).
std::vector<Example> scan_kohya_folder(const std::string& folder, const ImageFolderOptions& options,
                                       bool is_reg, std::vector<std::string>* ignored = nullptr);

/// The images of one kohya image folder (sorted), each with `repeats`, `is_reg`, `subset` and the
/// first line of its caption file, or `class_tokens` without one. No image is an Error.
std::vector<Example> scan_repeat_folder(const std::string& folder,
                                        const ImageFolderOptions& options,
                                        const std::string& class_tokens, std::size_t repeats,
                                        bool is_reg, std::size_t subset = 0);

/// kohya's balancing of regularisation images (DreamBoothDataset): with T = Σ train repeats,
/// the reg images are taken in order, each with its folder's repeats, until T is reached (the
/// rest are left out); while still short of T, one more repeat each in turn. Returns the reg
/// examples used, with their balanced num_repeats (Σ = T, or more when the first pass overshoots).
std::vector<Example> balance_regularization(const std::vector<Example>& train,
                                            std::vector<Example> reg);

/// DreamBooth: every PNG/JPEG/WebP/BMP directly in the folder, sorted, each with the one `prompt`
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
  // kohya's caption prefix/suffix, dropout, shuffle, tag dropout (caption.hpp).
  CaptionOptions caption = {};
  // kohya's dataset config: the caption options of each subset (Example::subset); empty: every
  // example uses `caption`.
  std::vector<CaptionOptions> subset_captions = {};
  // The sample weight of Example::is_reg rows (kohya's prior_loss_weight).
  float reg_loss_weight = 1;
  // kohya --masked_loss: a loss mask per image, resized, cropped and flipped with it (white =
  // trained, black = ignored): its alpha channel (--alpha_mask), or the red channel of the
  // same-named image in mask_dir (kohya's conditioning_data_dir). Off when neither is given.
  bool alpha_mask = false;
  std::string mask_dir = {};
  // kohya --enable_bucket (buckets.hpp): each image to the bucket of nearest aspect ratio,
  // resized to cover it (`interpolation`) and cropped to it; a micro-batch holds one bucket.
  // resolution, and the shorter-side resize, are then unused.
  std::optional<BucketOptions> buckets = std::nullopt;
  // SDXL: fill TrainBatch::time_ids (and class_time_ids) with models::sdxl_time_ids of the rows
  // (diffusers' add_time_ids: original size, crop top-left, target size), as example_image's size.
  bool size_conditioning = false;
  // Data-parallel training: the number of processes sharing each micro-batch and this one's
  // rank (see the top of the file). The micro-batches are planned with train_batch_size ×
  // num_shards rows; this source returns rows [⌊r·n/P⌋, ⌊(r+1)·n/P⌋) of each.
  std::size_t num_shards = 1;
  std::size_t shard_index = 0;
};

/// Micro-batches of examples (see the top of the file); satisfies train::TrainDataSource.
class ImageCaptionDataSource {
 public:
  ImageCaptionDataSource(std::vector<Example> examples, Tokenize tokenize,
                         DataSourceOptions options, std::vector<Example> class_examples = {});

  /// Examples per epoch: Σ num_repeats of the instance examples (#instance when all are 1), or
  /// max(that, #class) with class examples.
  std::size_t num_examples() const { return std::max(entries_.size(), sets_[1].size()); }
  /// Micro-batches per epoch: ceil(num_examples / batch_size); with buckets Σ over the buckets.
  std::size_t steps_per_epoch(std::size_t batch_size) const;
  /// Micro-batches per epoch of this source: those of global_train_batch_size() (the same for
  /// every shard).
  std::size_t steps_per_epoch() const { return steps_per_epoch(global_train_batch_size()); }
  /// The rows of a (not short) global micro-batch: train_batch_size × num_shards.
  std::size_t global_train_batch_size() const {
    return options_.train_batch_size * options_.num_shards;
  }
  bool with_prior_preservation() const { return !sets_[1].empty(); }
  const std::vector<Example>& examples() const { return sets_[0]; }
  const std::vector<Example>& class_examples() const { return sets_[1]; }
  const DataSourceOptions& options() const { return options_; }

  /// The order of epoch e: a permutation of [0, num_examples) (Fisher–Yates on (seed, e)).
  std::vector<std::size_t> epoch_permutation(std::uint64_t epoch) const { return order(epoch); }

  /// Dataset indices (in [0, num_examples)) of micro-batch m's rows: of this shard's rows
  /// (global_batch_indices(m) from shard_rows(m).first to .second); every per-batch accessor
  /// (operator(), batch_token_ids, batch_sample_weights) gives these rows, in this order.
  std::vector<std::size_t> batch_indices(std::uint64_t m) const;
  /// Dataset indices of the rows of global micro-batch m (of all shards; batch_indices(m) without
  /// shards).
  std::vector<std::size_t> global_batch_indices(std::uint64_t m) const;
  /// The rows n of global micro-batch m (TrainBatch::global_batch_size).
  std::size_t global_batch_size(std::uint64_t m) const { return global_batch_indices(m).size(); }
  /// This shard's rows of global micro-batch m, [first, second) = [⌊r·n/P⌋, ⌊(r+1)·n/P⌋)
  /// (empty when first == second): batch row j is global row first + j. [0, n) without shards.
  std::pair<std::size_t, std::size_t> shard_rows(std::uint64_t m) const;
  /// Sets batch.global_rows (first .. second − 1 of shard_rows(m)) and global_batch_size (n), as
  /// operator() does; leaves them unset (empty, 0) with num_shards 1. For sources that build
  /// their own batches from batch_indices (e.g. cached latents).
  void set_global_rows(train::TrainBatch& batch, std::uint64_t m) const;

  /// The preprocessed image of dataset index i in epoch e (class_set: the class example paired
  /// with i): crop and flip drawn from (seed, e, i), separately for the two sets. `size` (if
  /// given) gets its SDXL size conditioning: original_size (height, width) as decoded, before the
  /// resize; crop_top_left (top, left) of the crop in the resized image W wide, as trained: left
  /// is W − left − crop width when flipped (diffusers flips, then crops); target_size the crop's
  /// (height, width). For sources that cache latents (models/sdxl_conditioning.hpp defines it).
  Image example_image(std::size_t i, std::uint64_t epoch, bool class_set = false,
                      models::SdxlSizeConditioning* size = nullptr);

  /// With masks (alpha_mask or mask_dir): the mask of dataset index i in epoch e, with the crop and
  /// flip of example_image(i, e), as a grey image (the mask in every channel).
  Image example_mask(std::size_t i, std::uint64_t epoch);
  bool has_masks() const { return options_.alpha_mask || !options_.mask_dir.empty(); }
  /// The masks [B,1,H,W] in [0, 1] of dataset indices `rows` in epoch e (example_mask's red
  /// channel / 255); TrainBatch::mask of a micro-batch is masks(batch_indices(m), epoch).
  /// No rows: [0,1,0,0] (operator() gives an empty shard the images' H, W).
  Tensor4<float> masks(const std::vector<std::size_t>& rows, std::uint64_t epoch);

  /// The caption of dataset index i in epoch e (class_set: of the class example paired with i):
  /// the example's caption, or one of its caption_choices drawn uniformly from (seed, e, i), then
  /// processed by options().caption (process_caption with the stream of (seed, e, i)).
  std::string example_caption(std::size_t i, std::uint64_t epoch, bool class_set = false) const;

  /// Micro-batch m: images [b,3,R,R] in [-1,1] and token ids, plus the paired class rows; with
  /// shards this shard's b rows (maybe 0: images [0,3,H,W], token ids [0,L], ...), and
  /// global_rows / global_batch_size (set_global_rows). Decodes only the shard's images.
  train::TrainBatch operator()(std::uint64_t m);

  /// The token ids of micro-batch m alone (class_set: of its class rows), without decoding any
  /// image: for sources that replace the images (e.g. cached latents). This shard's rows.
  TokenIds batch_token_ids(std::uint64_t m, bool class_set = false);

  /// The sample weights of micro-batch m (TrainBatch::sample_weights, instance then class rows):
  /// reg_loss_weight for is_reg rows, 1 otherwise; empty when no example is_reg. This shard's
  /// rows (its instance rows, then as many class rows).
  std::vector<float> batch_sample_weights(std::uint64_t m) const;

  /// The example (index into examples() or class_examples()) of dataset index i.
  std::size_t example_of(std::size_t i, bool class_set = false) const {
    return example_index(class_set ? 1 : 0, i);
  }
  /// With buckets: each non-empty bucket (sorted) and its dataset indices (repeats included).
  const std::vector<BucketSize>& buckets() const { return buckets_; }
  const std::vector<std::vector<std::size_t>>& bucket_rows() const { return bucket_rows_; }
  /// With buckets: example k's bucket and resize (of examples()).
  const BucketChoice& bucket_choice(std::size_t k) const { return choices_.at(k); }

  /// The first dataset index of example k (its repeats follow it).
  std::size_t first_index_of(std::size_t k, bool class_set = false) const {
    return class_set ? k : first_entry_.at(k);
  }

 private:
  // epoch_permutation, memoized for the last epoch asked (not thread-safe: a source per thread).
  const std::vector<std::size_t>& order(std::uint64_t epoch) const;
  // With buckets: the micro-batches of an epoch, memoized for the last epoch asked.
  const std::vector<std::vector<std::size_t>>& epoch_batches(std::uint64_t epoch) const;

  static constexpr std::uint64_t kDataStream = 0x64617461;  // "data"

  RandomStream stream() const { return RandomStream{options_.seed, kDataStream}; }

  // Reads each image's size, assigns its bucket, groups the dataset indices by bucket.
  void assign_buckets();

  // Decoded and resized to the shorter side = resolution, or to its bucket's resize (cached when
  // asked).
  const Image& resized_image(int s, std::size_t k, bool mask = false);
  // example_image (mask false) or example_mask (true); `size` as example_image's.
  Image preprocess(std::size_t i, std::uint64_t epoch, int s, bool mask,
                   models::SdxlSizeConditioning* size = nullptr);
  // The mask of example k as decoded (before the resize).
  Image load_mask(std::size_t k) const;

  // The rows' images, and their time_ids (sdxl_time_ids) when `time_ids` is given. With buckets
  // (s = 0) the images are of the bucket of dataset index `bucket_row` (a row of the global
  // micro-batch, so that an empty shard has the shape of the others).
  Tensor4<float> make_images(const std::vector<std::size_t>& rows, std::uint64_t epoch, int s,
                             std::size_t bucket_row,
                             std::optional<Tensor<float, 2>>* time_ids = nullptr);

  TokenIds tokenize(const std::vector<std::size_t>& rows, std::uint64_t epoch, int s) const;

  // The example of dataset index i in a set: entries_[i] (repeats expanded) or i mod #class.
  std::size_t example_index(int s, std::size_t i) const {
    return s == 0 ? entries_[i % entries_.size()] : i % sets_[1].size();
  }

  std::vector<Example> sets_[2];          // instance (or plain) examples, class examples
  std::vector<std::size_t> entries_;      // example k of sets_[0], num_repeats times each, in order
  std::vector<std::size_t> first_entry_;  // example k's first index in entries_
  std::vector<BucketChoice> choices_;     // with buckets: per example of sets_[0]
  std::vector<BucketSize> buckets_;       // with buckets: the non-empty ones, sorted
  std::vector<std::vector<std::size_t>> bucket_rows_;      // dataset indices per bucket
  mutable std::vector<std::vector<std::size_t>> batches_;  // epoch_batches(batches_epoch_)
  mutable std::uint64_t batches_epoch_ = 0;
  bool has_reg_ = false;
  Tokenize tokenize_;
  DataSourceOptions options_;
  std::vector<std::optional<Image>> cache_[2];
  // Each example's (height, width) as decoded, recorded where it is decoded ((0, 0) until then).
  std::vector<std::pair<int, int>> original_size_[2];
  std::vector<std::optional<Image>> mask_cache_;  // resized masks of sets_[0] (cache_images)
  Image scratch_;
  mutable std::vector<std::size_t> perm_;  // epoch_permutation(perm_epoch_)
  mutable std::uint64_t perm_epoch_ = 0;
};

static_assert(train::TrainDataSource<ImageCaptionDataSource>);

}  // namespace difftrain::tools
