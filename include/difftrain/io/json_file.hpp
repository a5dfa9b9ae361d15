#pragma once
// Parsing JSON text (a diffusers/transformers config, an index, a manifest, a safetensors header)
// with errors that name the caller and the source, refusing nesting deep enough to exhaust the
// stack; describing a JSON value in a message without printing all of it; reading a JSON file
// (one reader for every config type's from_file); and writing one atomically.

#include <cstddef>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>

#include "difftrain/core/error.hpp"
#include "difftrain/io/regular_file.hpp"

namespace difftrain::io {

/// How deep arrays and objects may nest in parsed JSON. nlohmann parses iteratively, but copying,
/// comparing and dump() of a value recurse once per level, so ~100,000 levels (a 200 KB file)
/// overflow the stack; and each level ("[" + "]", 2 bytes of text) costs ~75 bytes of DOM. Real
/// configs, tokenizer files and safetensors headers nest fewer than 10 levels.
inline constexpr std::size_t kMaxJsonDepth = 128;

namespace json_detail {

// At most `max_chars` bytes of `s`, cut back to the start of a UTF-8 sequence.
inline std::string_view utf8_prefix(std::string_view s, std::size_t max_chars) {
  if (s.size() <= max_chars) return s;
  std::size_t n = max_chars;
  while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
  return s.substr(0, n);
}

// Appends `s` as a JSON string literal, escaping at most the part that can still show.
inline void append_string(std::string_view s, std::size_t limit, std::string& out) {
  const std::size_t room = limit >= out.size() ? limit - out.size() + 1 : 1;
  // replace: a string built in code (not parsed) may hold invalid UTF-8; strict dump would throw.
  out += nlohmann::json(std::string(utf8_prefix(s, room)))
             .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// Appends a compact dump of `v` to `out`, stopping once `out` is longer than `limit` or the
// values nest deeper than kMaxJsonDepth (the recursion depth); false when it stopped.
inline bool append_bounded(const nlohmann::json& v, std::size_t limit, std::string& out,
                           std::size_t depth = 0) {
  if (out.size() > limit) return false;
  if (v.is_array() || v.is_object()) {
    if (depth == kMaxJsonDepth) return false;
    out += v.is_array() ? '[' : '{';
    bool first = true;
    for (auto it = v.begin(); it != v.end(); ++it) {
      if (out.size() > limit) return false;
      if (!first) out += ',';
      first = false;
      if (v.is_object()) {
        append_string(it.key(), limit, out);
        out += ':';
      }
      if (!append_bounded(*it, limit, out, depth + 1)) return false;
    }
    out += v.is_array() ? ']' : '}';
  } else if (v.is_string()) {
    append_string(v.get_ref<const std::string&>(), limit, out);
  } else if (v.is_binary()) {
    out += "<binary of ";
    out += std::to_string(v.get_binary().size());
    out += " bytes>";
  } else {
    out += v.dump();  // null, boolean, number: a few characters
  }
  return out.size() <= limit;
}

// nlohmann's message, whose "last read: '...'" quotes the whole current token (an unterminated
// string literal runs to the end of the input).
inline std::string bounded_what(const std::exception& e) {
  constexpr std::size_t kMaxChars = 300;
  const std::string_view what = e.what();
  if (what.size() <= kMaxChars) return std::string(what);
  return std::string(utf8_prefix(what, kMaxChars)) + "... (" + std::to_string(what.size()) +
         " characters)";
}

}  // namespace json_detail

/// A short description of `value` for an error message: its compact dump when that has at most
/// `max_chars` characters, else the first `max_chars` of it followed by "... (a JSON array of
/// 3 items)" (or "object of 2 keys", "string of 5000 bytes"). Unlike dump(), the work and the
/// recursion are bounded by `max_chars` whatever the size or depth of `value`.
inline std::string json_excerpt(const nlohmann::json& value, std::size_t max_chars = 80) {
  std::string out;
  if (json_detail::append_bounded(value, max_chars, out)) return out;
  out = std::string(json_detail::utf8_prefix(out, max_chars)) + "... (a JSON " + value.type_name();
  const auto count = [](std::size_t n, const char* unit) {
    return " of " + std::to_string(n) + " " + unit + (n == 1 ? "" : "s") + ")";
  };
  if (value.is_array()) return out + count(value.size(), "item");
  if (value.is_object()) return out + count(value.size(), "key");
  if (value.is_string()) return out + count(value.get_ref<const std::string&>().size(), "byte");
  return out + ")";
}

/// Throws difftrain::Error "function: source nests arrays and objects more than 128 levels
/// deep ..." when `text` nests deeper than kMaxJsonDepth, or "function: source is not valid
/// JSON: NUL byte at offset n" for a NUL byte (nlohmann takes it for the end of the input, which
/// would accept anything after it). Brackets inside string literals do not count. One pass, no
/// allocation: it runs before the parser builds anything.
inline void check_json_text(std::string_view text, std::string_view function,
                            std::string_view source) {
  std::size_t depth = 0;
  bool in_string = false, escaped = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '\0') fail(function, source, " is not valid JSON: NUL byte at offset ", i);
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) {
        fail(function, source, " nests arrays and objects more than ", kMaxJsonDepth,
             " levels deep (byte ", i, " of ", text.size(), " opens level ", depth,
             "), expected at most ", kMaxJsonDepth, " (the nesting limit)");
      }
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;  // unbalanced brackets are the parser's to report
    }
  }
}

/// The JSON document in `text`, parsed strictly (no comments) after check_json_text. `source`
/// names the text in messages as given, e.g. "'unet/config.json'". Throws difftrain::Error
/// "function: source is not valid JSON: ..." (nlohmann's message, cut to a few hundred
/// characters) or check_json_text's errors. `callback` is nlohmann's parser callback.
inline nlohmann::json parse_json(std::string_view text, std::string_view function,
                                 std::string_view source,
                                 const nlohmann::json::parser_callback_t& callback = nullptr) {
  check_json_text(text, function, source);
  try {
    return nlohmann::json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/true,
                                 /*ignore_comments=*/false);
  } catch (const nlohmann::json::exception& e) {
    fail(function, source, " is not valid JSON: ", json_detail::bounded_what(e));
  }
}

/// The JSON document in the file at `path`. Throws difftrain::Error "function: cannot open
/// 'path': it does not exist" (likewise "it is a named pipe, not a regular file", or unreadable,
/// or larger than kMaxTextFileBytes), or parse_json's errors naming 'path' ("function: 'path' is
/// not valid JSON: ...", nesting too deep).
inline nlohmann::json read_json_file(std::string_view function, const std::string& path) {
  return parse_json(read_regular_file(path, function), function, "'" + path + "'");
}

/// Writes `json` (indented) to path through a temporary file renamed into place.
inline void write_json_file(const std::filesystem::path& path, const nlohmann::json& json) {
  const std::filesystem::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    require(out.good(), "write_json_file", "cannot open '", tmp.string(), "' for writing");
    out << json.dump(2) << "\n";
    require(out.good(), "write_json_file", "writing '", tmp.string(), "' failed");
  }
  std::filesystem::rename(tmp, path);
}

}  // namespace difftrain::io
