#pragma once
// ClipTokenizer: the byte-level BPE tokenizer of CLIP text encoders, as transformers' slow
// CLIPTokenizer runs it without ftfy (what SD training scripts get from
// `tokenizer(text, max_length=77, padding="max_length", truncation=True)`).
//
// Pipeline for one text (UTF-8):
//   0. split out the special tokens (bos, eos, unk, pad strings) where they occur verbatim, as
//      transformers' added-token trie does before tokenising the rest; each becomes its own id;
//   1. drop U+0000, U+FFFD and category C* except tab/CR/LF; tab/CR/LF and Zs become a space;
//   2. surround CJK ideographs with spaces;
//   3. NFC;
//   4. split at whitespace (Python's str.split), lower-case each word (Python's str.lower);
//   5. pieces, at each position the first alternative that matches:
//      <|startoftext|> | <|endoftext|> | 's 't 're 've 'm 'll 'd (case-insensitive) |
//      letters+ | one number character | (not whitespace, letter or number)+;
//   6. UTF-8 bytes of a piece → byte symbols, `</w>` appended to the last, then repeatedly merge
//      every occurrence (left to right) of the adjacent pair with the lowest merge rank;
//   7. symbols → ids through vocab.json (unknown symbols → unk id).
// encode: bos, the first max_length - 2 ids, eos, then pad up to max_length; attention mask 1 on
// bos..eos.
//
// Choices and limits:
// - Step 0 uses every special token string, as transformers' added tokens do: with SD 2's
//   pad token "!" each "!" in a text becomes the pad id, exactly as upstream.
// - Invalid UTF-8 input throws difftrain::Error (Python strings cannot hold it; no replacement).
// - Unicode data (categories, NFC, lower-casing) comes from unicode_tables.hpp, generated from
//   Python's unicodedata (see there for the version); ftfy's text fixing is not reproduced (with
//   ftfy installed transformers gives different ids, e.g. CJK runs stay one word).
// - The pattern is matched case-insensitively, as transformers does with the `regex` module:
//   `'s` also matches `'ſ` (U+017F, folds to s), and U+0345 matches no alternative and is
//   skipped (see kUnmatched).
// - BPE results are cached per piece (thread-safe; the cache is cleared when it reaches
//   kMaxCacheEntries pieces, so memory stays bounded over millions of captions).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "difftrain/concepts.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/io/json_file.hpp"
#include "difftrain/models/unicode_tables.hpp"

namespace difftrain {

class ClipTokenizer {
 public:
  /// The largest model_max_length accepted from tokenizer_config.json (CLIP's is 77; a longer
  /// one sizes every encoded batch).
  static constexpr std::size_t kMaxModelMaxLength = 65536;

  /// Token ids and attention mask of one text, each max_length long.
  struct Encoding {
    std::vector<std::int64_t> input_ids, attention_mask;
  };

  /// transformers' CLIPTokenizer reads only the first 49152 - 256 - 2 merges of merges.txt.
  static constexpr std::size_t kMaxMerges = 49152 - 256 - 2;
  static constexpr std::size_t kMaxCacheEntries = 1 << 17;

  /// Loads vocab.json and merges.txt (required) and tokenizer_config.json /
  /// special_tokens_map.json (optional; the latter wins, as in transformers) from a tokenizer
  /// folder. Special tokens default to CLIP's: bos <|startoftext|>, eos = unk = pad <|endoftext|>.
  /// `pad_token`, when given, replaces the folder's (SDXL's tokenizer_2 is CLIP's tokenizer
  /// padding with "!").
  static ClipTokenizer from_folder(const std::string& dir,
                                   const std::optional<std::string>& pad_token = std::nullopt) {
    constexpr std::string_view fn = "ClipTokenizer::from_folder";
    const std::filesystem::path folder(dir);
    require(std::filesystem::is_directory(folder), fn, "tokenizer folder ", dir,
            " does not exist or is not a directory");
    ClipTokenizer t;
    t.read_vocab(folder / "vocab.json");
    t.read_merges(folder / "merges.txt");
    for (const char* name : {"tokenizer_config.json", "special_tokens_map.json"}) {
      const auto path = folder / name;
      if (std::filesystem::exists(path)) t.read_special_tokens(path);
    }
    if (pad_token) t.pad_token_ = *pad_token;
    t.bos_token_id_ = t.special_id("bos_token", t.bos_token_);
    t.eos_token_id_ = t.special_id("eos_token", t.eos_token_);
    t.unk_token_id_ = t.special_id("unk_token", t.unk_token_);
    t.pad_token_id_ = t.special_id("pad_token", t.pad_token_);
    return t;
  }

  /// The pieces of steps 0-5 (special tokens as they are, other pieces in UTF-8).
  std::vector<std::string> pre_tokenize(std::string_view text) const {
    std::vector<std::string> pieces;
    for_each_piece(text, [&](const std::string& piece, bool) { pieces.push_back(piece); });
    return pieces;
  }

  /// The BPE symbols of a text (vocab.json keys), without bos/eos/padding.
  std::vector<std::string> bpe_tokens(std::string_view text) const {
    std::vector<std::string> symbols;
    for_each_piece(text, [&](const std::string& piece, bool special) {
      if (special) {
        symbols.push_back(piece);
        return;
      }
      const auto word = bpe(piece);
      symbols.insert(symbols.end(), word->symbols.begin(), word->symbols.end());
    });
    return symbols;
  }

  /// The ids of bpe_tokens(text), without bos/eos/padding or truncation.
  std::vector<std::int64_t> token_ids(std::string_view text) const {
    std::vector<std::int64_t> ids;
    for_each_piece(text, [&](const std::string& piece, bool special) {
      if (special) {
        ids.push_back(id_of(piece));
        return;
      }
      const auto word = bpe(piece);
      ids.insert(ids.end(), word->ids.begin(), word->ids.end());
    });
    return ids;
  }

  /// [bos, first max_length - 2 ids, eos, pad...] and its attention mask, both max_length long.
  Encoding encode(std::string_view text, std::size_t max_length = 77) const {
    require(max_length >= 2, "ClipTokenizer::encode", "max_length is ", max_length,
            ", expected at least 2 (bos and eos)");
    const auto ids = token_ids(text);
    const std::size_t kept = std::min(ids.size(), max_length - 2);
    Encoding e;
    e.input_ids.assign(max_length, pad_token_id_);
    e.attention_mask.assign(max_length, 0);
    e.input_ids[0] = bos_token_id_;
    std::copy_n(ids.begin(), kept, e.input_ids.begin() + 1);
    e.input_ids[kept + 1] = eos_token_id_;
    std::fill_n(e.attention_mask.begin(), kept + 2, 1);
    return e;
  }

  /// input_ids of every text, [B, max_length].
  TokenIds encode_batch(const std::vector<std::string>& texts, std::size_t max_length = 77) const {
    const TokenIds::shape_type shape = {texts.size(), max_length};
    TokenIds out(shape);
    for (std::size_t b = 0; b < texts.size(); ++b) {
      const auto e = encode(texts[b], max_length);
      std::copy(e.input_ids.begin(), e.input_ids.end(), &out(b, 0));
    }
    return out;
  }

  std::int64_t bos_token_id() const { return bos_token_id_; }
  std::int64_t eos_token_id() const { return eos_token_id_; }
  std::int64_t unk_token_id() const { return unk_token_id_; }
  std::int64_t pad_token_id() const { return pad_token_id_; }
  std::size_t vocab_size() const { return vocab_.size(); }
  std::size_t num_merges() const { return merge_ranks_.size(); }
  /// tokenizer_config.json's model_max_length (77 when absent or not an integer).
  std::size_t model_max_length() const { return model_max_length_; }

  /// The printable character GPT-2/CLIP byte-level BPE uses for a byte: printable Latin-1 bytes
  /// ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves, the others map to U+0100 + n in byte
  /// order.
  static char32_t byte_symbol(unsigned char byte) {
    const auto printable = [](unsigned b) {
      return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    };
    if (printable(byte)) return byte;
    unsigned n = 0;
    for (unsigned b = 0; b < byte; ++b) n += printable(b) ? 0 : 1;
    return 0x100 + n;
  }

 private:
  struct Word {
    std::vector<std::string> symbols;
    std::vector<std::int64_t> ids;
  };
  // Copies start with an empty cache, so the tokenizer stays copyable and movable.
  struct Cache {
    std::mutex mutex;
    std::unordered_map<std::string, std::shared_ptr<const Word>> words;
    Cache() = default;
    Cache(const Cache&) {}
    Cache& operator=(const Cache&) { return *this; }
  };

  ClipTokenizer() {
    for (unsigned b = 0; b < 256; ++b) {
      byte_symbols_[b].clear();
      unicode::append_utf8(byte_symbols_[b], byte_symbol(static_cast<unsigned char>(b)));
    }
  }

  static std::string read_file(const std::filesystem::path& path) {
    return io::read_regular_file(path.string(), "ClipTokenizer::from_folder");
  }

  static nlohmann::json read_json(const std::filesystem::path& path) {
    return io::parse_json(read_file(path), "ClipTokenizer::from_folder", path.string());
  }

  void read_vocab(const std::filesystem::path& path) {
    const auto json = read_json(path);
    require(json.is_object(), "ClipTokenizer::from_folder", path.string(),
            " must hold a JSON object {token: id}, got ", json.type_name());
    for (const auto& [token, id] : json.items()) {
      require(id.is_number_integer() && id.get<std::int64_t>() >= 0, "ClipTokenizer::from_folder",
              path.string(), ": the id of token \"", token,
              "\" must be a non-negative integer, got ", io::json_excerpt(id));
      vocab_.emplace(token, id.get<std::int64_t>());
    }
  }

  // Python: merges = text.strip().split("\n")[1:kMaxMerges + 1]; rank = line order; a repeated
  // pair keeps its last rank (dict construction).
  void read_merges(const std::filesystem::path& path) {
    const std::string text = read_file(path);
    const auto is_space = [](char c) { return c == ' ' || (c >= '\t' && c <= '\r'); };
    std::size_t begin = 0, end = text.size();
    while (begin < end && is_space(text[begin])) ++begin;
    while (end > begin && is_space(text[end - 1])) --end;
    std::size_t line_number = 0;
    for (std::size_t pos = begin; pos <= end;) {
      std::size_t eol = text.find('\n', pos);
      if (eol == std::string::npos || eol > end) eol = end;
      const std::string_view line(text.data() + pos, eol - pos);
      pos = eol + 1;
      if (++line_number == 1) continue;  // "#version: 0.2"
      if (line_number - 1 > kMaxMerges) break;
      std::vector<std::string> fields;
      for (std::size_t i = 0; i < line.size();) {
        if (is_space(line[i])) {
          ++i;
          continue;
        }
        std::size_t j = i;
        while (j < line.size() && !is_space(line[j])) ++j;
        fields.emplace_back(line.substr(i, j - i));
        i = j;
      }
      require(fields.size() == 2, "ClipTokenizer::from_folder", path.string(), " line ",
              line_number, ": expected two symbols \"first second\", got \"", line, "\"");
      merge_ranks_.insert_or_assign(fields[0] + ' ' + fields[1],
                                    static_cast<std::int64_t>(line_number - 2));
    }
  }

  void read_special_tokens(const std::filesystem::path& path) {
    const auto json = read_json(path);
    require(json.is_object(), "ClipTokenizer::from_folder", path.string(),
            " must hold a JSON object, got ", json.type_name());
    const auto read = [&](const char* key, std::string& token) {
      const auto it = json.find(key);
      if (it == json.end() || it->is_null()) return;
      // A token is either a string or an AddedToken object {"content": ...}.
      const auto& value = it->is_object() && it->contains("content") ? (*it)["content"] : *it;
      require(value.is_string(), "ClipTokenizer::from_folder", path.string(), ": ", key,
              " must be a string or {\"content\": string}, got ", io::json_excerpt(*it));
      token = value.get<std::string>();
    };
    read("bos_token", bos_token_);
    read("eos_token", eos_token_);
    read("unk_token", unk_token_);
    read("pad_token", pad_token_);
    // transformers writes a huge float (1e30, "no limit") when unset: kept at 77 like a missing
    // value. An integer beyond CLIP-like position counts would size every batch by it.
    const auto max_length = json.find("model_max_length");
    if (max_length != json.end() && max_length->is_number_integer() &&
        max_length->get<std::int64_t>() > 0) {
      require(max_length->get<std::uint64_t>() <= kMaxModelMaxLength, "ClipTokenizer::from_folder",
              path.string(), ": model_max_length = ", max_length->get<std::uint64_t>(),
              ", expected at most ", kMaxModelMaxLength);
      model_max_length_ = max_length->get<std::size_t>();
    }
  }

  std::int64_t special_id(const char* name, const std::string& token) const {
    const auto it = vocab_.find(token);
    require(it != vocab_.end(), "ClipTokenizer::from_folder", name, " \"", token,
            "\" is not in vocab.json");
    return it->second;
  }

  std::int64_t id_of(const std::string& symbol) const {
    const auto it = vocab_.find(symbol);
    return it != vocab_.end() ? it->second : unk_token_id_;
  }

  static bool is_cjk(char32_t c) {
    return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) ||
           (c >= 0x20000 && c <= 0x2A6DF) || (c >= 0x2A700 && c <= 0x2B73F) ||
           (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B820 && c <= 0x2CEAF) ||
           (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
  }

  // Python's str.isspace on text that went through step 1 (C* gone, Zs already spaces).
  static bool is_space(char32_t c) {
    using unicode::CharClass;
    const auto cls = unicode::char_class(c);
    return c == U' ' || (c >= U'\t' && c <= U'\r') || (c >= 0x1C && c <= 0x1F) || c == 0x85 ||
           cls == CharClass::kSpaceSeparator || cls == CharClass::kLineSeparator;
  }

  static bool starts_with(std::u32string_view text, std::size_t pos, std::u32string_view prefix) {
    return text.substr(pos, prefix.size()) == prefix;
  }

  // Length of the contraction ('s 't 're 've 'm 'll 'd, case-insensitive) at text[pos], or 0.
  static std::size_t contraction_length(std::u32string_view w, std::size_t pos) {
    if (w[pos] != U'\'' || pos + 1 >= w.size()) return 0;
    const auto lower = [](char32_t c) { return c >= U'A' && c <= U'Z' ? c + 32 : c; };
    const char32_t a = lower(w[pos + 1]);
    if (a == U's' || a == 0x17F || a == U't' || a == U'm' || a == U'd') return 2;
    const char32_t b = pos + 2 < w.size() ? lower(w[pos + 2]) : 0;
    if ((a == U'r' && b == U'e') || (a == U'v' && b == U'e') || (a == U'l' && b == U'l')) return 3;
    return 0;
  }

  // Calls f(piece, is_special) for every piece of steps 0-5, in order.
  template <class F>
  void for_each_piece(std::string_view text, F&& f) const {
    const std::u32string all = unicode::decode_utf8(text, "ClipTokenizer");
    // Step 0: at each position the longest special token that starts there.
    std::vector<std::u32string> specials;
    for (const auto* token : {&bos_token_, &eos_token_, &unk_token_, &pad_token_})
      if (!token->empty()) specials.push_back(unicode::decode_utf8(*token, "ClipTokenizer"));
    std::size_t segment = 0;
    for (std::size_t i = 0; i <= all.size(); ++i) {
      std::size_t match = 0;
      for (const auto& s : specials)
        if (i < all.size() && s.size() > match && starts_with(all, i, s)) match = s.size();
      if (i < all.size() && match == 0) continue;
      pieces_of_segment(std::u32string_view(all).substr(segment, i - segment), f);
      if (match != 0) f(unicode::encode_utf8(std::u32string_view(all).substr(i, match)), true);
      segment = i + match;
      if (match != 0) i += match - 1;
    }
  }

  template <class F>
  static void pieces_of_segment(std::u32string_view text, F& f) {
    using unicode::CharClass;
    // Steps 1-2: clean-up and CJK spacing.
    std::u32string cleaned;
    cleaned.reserve(text.size());
    for (char32_t c : text) {
      const auto cls = unicode::char_class(c);
      const bool white =
          c == U' ' || c == U'\t' || c == U'\n' || c == U'\r' || cls == CharClass::kSpaceSeparator;
      if (white) {
        cleaned.push_back(U' ');
      } else if (c == 0 || c == 0xFFFD || cls == CharClass::kControl) {
        continue;
      } else if (is_cjk(c)) {
        cleaned.append({U' ', c, U' '});
      } else {
        cleaned.push_back(c);
      }
    }
    // Steps 3-5.
    const std::u32string normalized = unicode::nfc(cleaned);
    const std::u32string_view all(normalized);
    for (std::size_t i = 0; i < all.size();) {
      if (is_space(all[i])) {
        ++i;
        continue;
      }
      std::size_t j = i;
      while (j < all.size() && !is_space(all[j])) ++j;
      const std::u32string word = unicode::to_lower(all.substr(i, j - i));
      i = j;
      split_word(word, f);
    }
  }

  // U+0345 COMBINING GREEK YPOGEGRAMMENI (Mn) case-folds to a letter (iota), so under the
  // pattern's IGNORECASE the `regex` module matches it with neither [\p{L}] nor
  // [^\s\p{L}\p{N}]: no alternative matches there and findall skips it. It is the only such
  // code point (checked over all of Unicode against regex 2026.5.9).
  static constexpr char32_t kUnmatched = 0x345;

  // Step 5 on one lower-cased word (which holds no whitespace).
  template <class F>
  static void split_word(std::u32string_view w, F& f) {
    using unicode::CharClass;
    static constexpr std::u32string_view kStart = U"<|startoftext|>", kEnd = U"<|endoftext|>";
    const auto cls = [&](std::size_t k) { return unicode::char_class(w[k]); };
    const auto other = [&](std::size_t k) {
      return cls(k) != CharClass::kLetter && cls(k) != CharClass::kNumber && w[k] != kUnmatched;
    };
    for (std::size_t i = 0; i < w.size();) {
      std::size_t j = i + 1;
      if (starts_with(w, i, kStart)) {
        j = i + kStart.size();
      } else if (starts_with(w, i, kEnd)) {
        j = i + kEnd.size();
      } else if (const std::size_t n = contraction_length(w, i); n != 0) {
        j = i + n;
      } else if (w[i] == kUnmatched) {
        i = j;
        continue;
      } else if (cls(i) == CharClass::kLetter) {
        while (j < w.size() && cls(j) == CharClass::kLetter) ++j;
      } else if (cls(i) != CharClass::kNumber) {
        while (j < w.size() && other(j)) ++j;
      }
      f(unicode::encode_utf8(w.substr(i, j - i)), false);
      i = j;
    }
  }

  // Step 6-7 for one piece (UTF-8), cached.
  std::shared_ptr<const Word> bpe(const std::string& piece) const {
    {
      std::lock_guard lock(cache_.mutex);
      const auto it = cache_.words.find(piece);
      if (it != cache_.words.end()) return it->second;
    }
    auto word = std::make_shared<Word>();
    if (piece == "<|startoftext|>" || piece == "<|endoftext|>") {
      word->symbols.push_back(piece);  // CLIP's bpe keeps these whole, without </w>
    } else {
      for (unsigned char byte : piece) word->symbols.push_back(byte_symbols_[byte]);
      if (!word->symbols.empty()) word->symbols.back() += "</w>";
      merge(word->symbols);
    }
    for (const auto& s : word->symbols) word->ids.push_back(id_of(s));
    std::lock_guard lock(cache_.mutex);
    if (cache_.words.size() >= kMaxCacheEntries) cache_.words.clear();
    cache_.words.emplace(piece, word);
    return word;
  }

  // Repeatedly merges every occurrence (left to right) of the adjacent pair of lowest rank.
  void merge(std::vector<std::string>& symbols) const {
    while (symbols.size() > 1) {
      std::int64_t best_rank = -1;
      std::string best;
      for (std::size_t i = 0; i + 1 < symbols.size(); ++i) {
        std::string pair = symbols[i] + ' ' + symbols[i + 1];
        const auto it = merge_ranks_.find(pair);
        if (it != merge_ranks_.end() && (best_rank < 0 || it->second < best_rank)) {
          best_rank = it->second;
          best = std::move(pair);
        }
      }
      if (best_rank < 0) return;
      const std::size_t split = best.find(' ');
      const std::string_view first(best.data(), split), second(best.data() + split + 1);
      std::vector<std::string> merged;
      merged.reserve(symbols.size());
      for (std::size_t i = 0; i < symbols.size(); ++i) {
        if (i + 1 < symbols.size() && symbols[i] == first && symbols[i + 1] == second) {
          merged.push_back(symbols[i] + symbols[i + 1]);
          ++i;
        } else {
          merged.push_back(std::move(symbols[i]));
        }
      }
      symbols = std::move(merged);
    }
  }

  std::unordered_map<std::string, std::int64_t> vocab_;
  std::unordered_map<std::string, std::int64_t> merge_ranks_;  // "first second" -> rank
  std::string byte_symbols_[256];
  std::string bos_token_ = "<|startoftext|>", eos_token_ = "<|endoftext|>",
              unk_token_ = "<|endoftext|>", pad_token_ = "<|endoftext|>";
  std::int64_t bos_token_id_ = 0, eos_token_id_ = 0, unk_token_id_ = 0, pad_token_id_ = 0;
  std::size_t model_max_length_ = 77;
  mutable Cache cache_;
};

}  // namespace difftrain
