#pragma once
// Reading a TOML file (kohya's --config_file and --dataset_config) through toml++, safely.
//
// Debian's toml++ 3.3.0 turns its internal assertions into optimiser assumptions (undefined
// behaviour) in release builds, and fuzzing found inputs that break three of them (NUL bytes in a
// table header, "[[[[[", a "}" inside nested arrays, a non-ASCII letter where whitespace is
// expected; fixed upstream after 3.3.0). So every difftrain source includes toml++ through this
// header, which compiles it from its headers with the assertions turned into exceptions, and
// parse_toml_file refuses text TOML 1.0 forbids anyway (control characters, invalid UTF-8,
// non-ASCII outside strings and comments) before the parser sees it.

#include <stdexcept>
#include <string>
#include <string_view>

namespace difftrain::tools {
/// A broken toml++ assertion: the parser met input its 3.3.0 release does not handle.
struct TomlAssertion : std::logic_error {
  using std::logic_error::logic_error;
};
}  // namespace difftrain::tools

#define TOML_HEADER_ONLY 1
#define TOML_EXCEPTIONS 1
#define TOML_ASSERT(expr) \
  ((expr) ? static_cast<void>(0) : throw ::difftrain::tools::TomlAssertion(#expr))
#pragma push_macro("NDEBUG")
#undef NDEBUG  // toml++ replaces TOML_ASSERT by an assumption under NDEBUG
#pragma GCC diagnostic push
// A few assertions sit in noexcept functions: there a broken one ends the program (as assert()
// would), which is still better than the undefined behaviour of an assumption.
#ifndef __clang__
#pragma GCC diagnostic ignored "-Wterminate"
#endif
#include <toml++/toml.h>
#pragma GCC diagnostic pop
#pragma pop_macro("NDEBUG")

namespace difftrain::tools {

/// Throws difftrain::Error "function: 'path' is not valid TOML (line L, column C): ..." for a
/// control character other than tab and line breaks, invalid UTF-8, or a non-ASCII character
/// outside strings and comments (all invalid TOML 1.0).
void check_toml_text(std::string_view text, std::string_view function, const std::string& path);

/// The TOML document in the regular file at `path`: check_toml_text, then toml++; any parse
/// error is a difftrain::Error naming `function`, the file, line and column.
toml::table parse_toml_file(const std::string& path, std::string_view function);

}  // namespace difftrain::tools
