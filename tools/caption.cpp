// process_caption of caption.hpp.
#include "caption.hpp"

#include <cmath>
#include <utility>
#include <vector>

#include "difftrain/core/error.hpp"

namespace difftrain::tools {

namespace {

std::string strip(const std::string& s) {
  const auto first = s.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) return "";
  return s.substr(first, s.find_last_not_of(" \t\r\n") - first + 1);
}

// Python's s.split(sep) (sep non-empty), each part stripped; `drop_empty` drops empty parts.
std::vector<std::string> split_tags(const std::string& s, const std::string& sep, bool drop_empty) {
  std::vector<std::string> out;
  std::size_t start = 0;
  while (true) {
    const std::size_t end = s.find(sep, start);
    std::string tag = strip(s.substr(start, end == std::string::npos ? end : end - start));
    if (!drop_empty || !tag.empty()) out.push_back(std::move(tag));
    if (end == std::string::npos) break;
    start = end + sep.size();
  }
  return out;
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  for (std::size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size()))
    s.replace(at, from.size(), to);
}

}  // namespace

void CaptionOptions::validate() const {
  constexpr const char* fn = "caption options";
  require(
      std::isfinite(caption_dropout_rate) && caption_dropout_rate >= 0 && caption_dropout_rate <= 1,
      fn, "--caption_dropout_rate is ", caption_dropout_rate, ", expected in [0, 1]");
  require(std::isfinite(caption_tag_dropout_rate) && caption_tag_dropout_rate >= 0 &&
              caption_tag_dropout_rate <= 1,
          fn, "--caption_tag_dropout_rate is ", caption_tag_dropout_rate, ", expected in [0, 1]");
  require(caption_dropout_every_n_epochs >= 0, fn, "--caption_dropout_every_n_epochs is ",
          caption_dropout_every_n_epochs, ", expected >= 0");
  require(keep_tokens >= 0, fn, "--keep_tokens is ", keep_tokens, ", expected >= 0");
  require(!caption_separator.empty(), fn, "--caption_separator is empty");
}

bool CaptionOptions::is_identity() const {
  return caption_prefix.empty() && caption_suffix.empty() && caption_dropout_rate == 0 &&
         caption_dropout_every_n_epochs == 0 && !shuffle_caption && caption_tag_dropout_rate == 0 &&
         secondary_separator.empty();
}

std::string process_caption(const std::string& caption_in, const CaptionOptions& o,
                            std::uint64_t epoch, RandomStream rs) {
  std::string caption = caption_in;
  if (!o.caption_prefix.empty()) caption = o.caption_prefix + " " + caption;
  if (!o.caption_suffix.empty()) caption = caption + " " + o.caption_suffix;

  const bool dropped =
      (o.caption_dropout_rate > 0 && uniform_double(rs, 0) < o.caption_dropout_rate) ||
      (o.caption_dropout_every_n_epochs > 0 &&
       (epoch + 1) % std::uint64_t(o.caption_dropout_every_n_epochs) == 0);
  if (dropped) return "";

  if (o.shuffle_caption || o.caption_tag_dropout_rate > 0) {
    std::vector<std::string> fixed, flex, fixed_suffix;
    const std::string& keep = o.keep_tokens_separator;
    if (!keep.empty() && caption.find(keep) != std::string::npos) {
      const std::size_t at = caption.find(keep);
      std::string flex_part = caption.substr(at + keep.size());
      const std::size_t at2 = flex_part.find(keep);
      if (at2 != std::string::npos) {
        fixed_suffix = split_tags(flex_part.substr(at2 + keep.size()), o.caption_separator, true);
        flex_part.resize(at2);
      }
      fixed = split_tags(caption.substr(0, at), o.caption_separator, true);
      flex = split_tags(flex_part, o.caption_separator, true);
    } else {
      flex = split_tags(strip(caption), o.caption_separator, false);
      const std::size_t k = std::min(flex.size(), std::size_t(o.keep_tokens));
      fixed.assign(flex.begin(), flex.begin() + std::ptrdiff_t(k));
      flex.erase(flex.begin(), flex.begin() + std::ptrdiff_t(k));
    }
    const std::size_t n = flex.size();
    if (o.shuffle_caption)
      for (std::size_t i = n; i-- > 1;)
        std::swap(flex[i],
                  flex[std::size_t(uniform_int(rs, 1 + (n - 1 - i), 0, std::int64_t(i) + 1))]);
    std::vector<std::string> tags = std::move(fixed);
    for (std::size_t k = 0; k < n; ++k)
      if (o.caption_tag_dropout_rate <= 0 ||
          uniform_double(rs, 1 + n + k) >= o.caption_tag_dropout_rate)
        tags.push_back(std::move(flex[k]));
    for (auto& t : fixed_suffix) tags.push_back(std::move(t));
    caption.clear();
    for (std::size_t k = 0; k < tags.size(); ++k) caption += (k ? ", " : "") + tags[k];
  }
  if (!o.secondary_separator.empty())
    replace_all(caption, o.secondary_separator, o.caption_separator);
  return caption;
}

}  // namespace difftrain::tools
