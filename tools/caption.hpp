#pragma once
// kohya's caption handling (sd-scripts library/train_util.py, BaseDataset.process_caption, main
// 2025), with its flag names; drawn from the counter-based RNG, so a caption is a function of
// (seed, epoch, dataset index) and a resumed run sees the same captions.
//
//   1. prefix/suffix:  caption_prefix + " " + caption + " " + caption_suffix (each when set)
//   2. dropout:        caption = "" when u₀ < caption_dropout_rate, or when the epoch (counted
//                      from 1, as kohya's current_epoch) is a multiple of
//                      caption_dropout_every_n_epochs
//   3. otherwise, with shuffle_caption or caption_tag_dropout_rate > 0, the caption is split at
//      caption_separator into stripped tags:
//        keep_tokens_separator in the caption: "fixed ‖ flex [‖ fixed suffix]" (empty tags
//        dropped); else the first keep_tokens tags are fixed, the rest flex;
//        flex shuffled (Fisher–Yates, shuffle_caption), then each flex tag kept when u ≥
//        caption_tag_dropout_rate; joined as fixed + flex + suffix with ", "
//   4. secondary_separator (when set) becomes caption_separator
// diffusers' --proportion_empty_prompts is step 2's rate (the same draw per caption).

#include <cstdint>
#include <string>

#include "difftrain/core/random.hpp"

namespace difftrain::tools {

struct CaptionOptions {
  std::string caption_prefix, caption_suffix;
  double caption_dropout_rate = 0;                  // also diffusers --proportion_empty_prompts
  std::int64_t caption_dropout_every_n_epochs = 0;  // 0: off
  bool shuffle_caption = false;
  std::int64_t keep_tokens = 0;
  std::string keep_tokens_separator;  // e.g. "|||"; "": off
  std::string caption_separator = ",";
  std::string secondary_separator;  // "": off
  double caption_tag_dropout_rate = 0;

  /// Throws Error naming the flag of a value out of range.
  void validate() const;
  /// True when every caption is used as it is (nothing to draw or add).
  bool is_identity() const;
};

/// The caption of a training example in epoch `epoch` (0-based), by the rules at the top of the
/// file; rs is the example's own stream (its draws: index 0 the dropout, 1 + k the shuffle's k-th
/// swap, 1 + n + k the tag dropout of flex tag k, n = number of flex tags).
std::string process_caption(const std::string& caption, const CaptionOptions& options,
                            std::uint64_t epoch, RandomStream rs);

}  // namespace difftrain::tools
