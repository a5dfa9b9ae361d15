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

  /// Calls visit(name, alias, member, help) for each member: its kohya name (the flag "--name",
  /// the dataset-config key), a second flag name or "", the member, the flag's help. The one
  /// list the command line and the dataset config are bound from.
  template <class Self, class Visitor>
  static void for_each(Self& c, Visitor&& visit) {
    visit("caption_prefix", "", c.caption_prefix, "text put before every caption (kohya)");
    visit("caption_suffix", "", c.caption_suffix, "text put after every caption (kohya)");
    visit("caption_dropout_rate", "proportion_empty_prompts", c.caption_dropout_rate,
          "probability of training a caption as the empty prompt (kohya; diffusers)");
    visit("caption_dropout_every_n_epochs", "", c.caption_dropout_every_n_epochs,
          "every n-th epoch (counted from 1) trains with empty prompts (kohya; 0: off)");
    visit("shuffle_caption", "", c.shuffle_caption,
          "shuffle the caption's tags (split at --caption_separator) every epoch (kohya)");
    visit("keep_tokens", "", c.keep_tokens,
          "the first N tags stay in front, unshuffled and never dropped (kohya)");
    visit("keep_tokens_separator", "", c.keep_tokens_separator,
          "\"fixed SEP flex [SEP fixed]\": only the flex tags are shuffled and dropped (kohya, "
          "e.g. |||)");
    visit("caption_separator", "", c.caption_separator, "tag separator (kohya; default ,)");
    visit("secondary_separator", "", c.secondary_separator,
          "a separator inside tags that becomes --caption_separator after shuffling (kohya)");
    visit("caption_tag_dropout_rate", "", c.caption_tag_dropout_rate,
          "probability of dropping each unfixed tag (kohya)");
  }

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
