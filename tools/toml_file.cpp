// parse_toml_file and check_toml_text (toml_file.hpp).
#include "toml_file.hpp"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <sstream>

#include "difftrain/core/error.hpp"
#include "difftrain/io/regular_file.hpp"

namespace difftrain::tools {

namespace {

// The length of the UTF-8 sequence starting at text[i] (1 to 4), or 0 if it is invalid
// (overlong forms, surrogates and code points above U+10FFFF included).
std::size_t utf8_length(std::string_view text, std::size_t i) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(text[k]); };
  const unsigned char c = byte(i);
  std::size_t n = 0;
  std::uint32_t cp = 0;
  if (c < 0x80) return 1;
  if ((c & 0xE0) == 0xC0)
    n = 2, cp = c & 0x1F;
  else if ((c & 0xF0) == 0xE0)
    n = 3, cp = c & 0x0F;
  else if ((c & 0xF8) == 0xF0)
    n = 4, cp = c & 0x07;
  else
    return 0;
  if (i + n > text.size()) return 0;
  for (std::size_t k = 1; k < n; ++k) {
    if ((byte(i + k) & 0xC0) != 0x80) return 0;
    cp = cp << 6 | (byte(i + k) & 0x3F);
  }
  static constexpr std::uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return n;
}

// A character of a bare key, number, boolean or date ('.' excluded: a quoted key part may follow).
bool bare_value_char(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '+' ||
         c == ':';
}

// A backslash followed by spaces or tabs up to the end of its line.
bool line_ending_backslash(std::string_view text, std::size_t i) {
  std::size_t j = i + 1;
  while (j < text.size() && (text[j] == ' ' || text[j] == '\t')) ++j;
  return j == text.size() || text[j] == '\n' || text[j] == '\r';
}

}  // namespace

void check_toml_text(std::string_view text, std::string_view function, const std::string& path) {
  enum class State { code, comment, basic, literal, multi_basic, multi_literal };
  State state = State::code;
  std::size_t line = 1, column = 1;
  const auto invalid = [&](const std::string& what) {
    fail(function, "'", path, "' is not valid TOML (line ", line, ", column ", column, "): ", what);
  };
  const auto at = [&](std::size_t i, std::string_view s) { return text.substr(i, s.size()) == s; };
  // A backslash and the whole character it escapes (so an escaped quote does not end a string).
  const auto escape = [&](std::size_t i) {
    return 1 + std::max<std::size_t>(1, utf8_length(text, i + 1));
  };
  for (std::size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    if ((c < 0x20 && c != '\t' && c != '\n' && c != '\r') || c == 0x7F) {
      std::ostringstream hex;
      hex << std::hex << unsigned(c);
      invalid("control character 0x" + hex.str() + " (only tab and line breaks may appear)");
    }
    const std::size_t n = utf8_length(text, i);
    if (n == 0) invalid("invalid UTF-8");
    if (n > 1 && (state == State::code))
      invalid("a non-ASCII character outside a string or comment");
    std::size_t step = n;
    switch (state) {
      case State::code:
        // A quote right after a bare value's character (`1979_ep-'''`): toml++ goes on reading
        // the value, not a string, so what follows must be checked as code (invalid anyway).
        if ((c == '"' || c == '\'') && i > 0 && bare_value_char(text[i - 1]))
          invalid("a quote inside a bare value");
        if (c == '#')
          state = State::comment;
        else if (at(i, "\"\"\""))
          state = State::multi_basic, step = 3;
        else if (at(i, "'''"))
          state = State::multi_literal, step = 3;
        else if (c == '"')
          state = State::basic;
        else if (c == '\'')
          state = State::literal;
        break;
      case State::comment:
        if (c == '\n') state = State::code;
        break;
      case State::basic:
        if (c == '\\' && i + 1 < text.size() && text[i + 1] != '\n')
          step = escape(i);
        else if (c == '"' || c == '\n')
          state = State::code;  // a newline: the parser's error
        break;
      case State::literal:
        if (c == '\'' || c == '\n') state = State::code;
        break;
      case State::multi_basic:
        // A line-ending backslash: toml++ skips the whitespace after it with a classifier that
        // is undefined for many non-ASCII characters (é among them), so what ends the run must
        // be ASCII.
        if (c == '\\' && line_ending_backslash(text, i)) {
          std::size_t j = i + 1;
          while (j < text.size() &&
                 (text[j] == ' ' || text[j] == '\t' || text[j] == '\r' || text[j] == '\n'))
            ++j;
          if (j < text.size() && static_cast<unsigned char>(text[j]) >= 0x80)
            invalid("a non-ASCII character after a line-ending backslash");
        }
        if (c == '\\' && i + 1 < text.size())
          step = escape(i);
        else if (at(i, "\"\"\""))
          state = State::code, step = 3;
        break;
      case State::multi_literal:
        if (at(i, "'''")) state = State::code, step = 3;
        break;
    }
    for (std::size_t k = 0; k < step && i < text.size(); ++k, ++i) {
      if (text[i] == '\n') {
        ++line;
        column = 1;
      } else if ((static_cast<unsigned char>(text[i]) & 0xC0) != 0x80) {
        ++column;
      }
    }
  }
}

toml::table parse_toml_file(const std::string& path, std::string_view function) {
  const std::string text = io::read_regular_file(path, function);
  check_toml_text(text, function, path);
  try {
    return toml::parse(text, path);
  } catch (const toml::parse_error& e) {
    const auto& where = e.source().begin;
    fail(function, "'", path, "' is not valid TOML (line ", where.line, ", column ", where.column,
         "): ", e.description());
  } catch (const TomlAssertion& e) {
    fail(function, "'", path, "' is not valid TOML (the parser could not read it: ", e.what(), ")");
  }
}

}  // namespace difftrain::tools
