#pragma once
// kohya's dataset config (sd-scripts --dataset_config, library/config_util.py, main 2025): a TOML
// file of [general], [[datasets]] and [[datasets.subsets]] tables, for the DreamBooth method
// (subsets with image_dir). A value is looked up in the subset, then its dataset, then
// [general], then the command line (kohya's order of fallbacks).
//
//   subset keys:   image_dir (required), num_repeats (1), is_reg, class_tokens,
//                  caption_extension, shuffle_caption, keep_tokens, keep_tokens_separator,
//                  caption_separator, secondary_separator, caption_prefix, caption_suffix,
//                  caption_dropout_rate, caption_dropout_every_n_epochs,
//                  caption_tag_dropout_rate, flip_aug, random_crop, color_aug (false only)
//   dataset keys:  resolution (an integer or [w, h] with w = h), batch_size, enable_bucket,
//                  min_bucket_reso, max_bucket_reso, bucket_reso_steps, bucket_no_upscale
// One [[datasets]] table (kohya allows several, each with its own resolution and batch size);
// flip_aug and random_crop must agree across subsets (they are run-wide here). An unknown key,
// a key in the wrong table or a value of the wrong type is an Error naming the key and the file.
// The definitions are in dataset_config.cpp.

#include <string>
#include <vector>

#include "cmd_train.hpp"

namespace difftrain::tools {

/// Reads the dataset config at `path`; sets the run-wide values it gives in `o` (resolution,
/// train_batch_size, buckets, random_flip, center_crop) and returns its subsets, each resolved
/// over its dataset, [general] and `o`'s flags.
std::vector<DatasetSubset> read_dataset_config(const std::string& path, TrainCommandOptions& o);

}  // namespace difftrain::tools
