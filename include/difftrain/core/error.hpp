#pragma once
// difftrain::Error: the one exception type for bad input (shapes, arguments, configs, files).

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace difftrain {

/// Thrown for bad input. The message names the function, the argument, expected and actual,
/// e.g. "add_noise: noise has shape [2,4,8,9], expected [2,4,8,8]".
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

/// Thrown when a training step's loss is NaN or Inf: the model diverged rather than the input
/// being malformed (a trainer may skip such a step instead of stopping).
class NonFiniteLoss : public Error {
 public:
  using Error::Error;
};

/// The parts printed one after another by `std::ostream <<` (no separators), e.g.
/// message("step ", 3, ": ", 0.5) == "step 3: 0.5". For messages that do not start with
/// "function: " (those use fail) and for other exception types, e.g.
/// `throw NonFiniteLoss(message(...))`.
template <class... Parts>
std::string message(Parts&&... parts) {
  std::ostringstream out;
  static_cast<void>((out << ... << std::forward<Parts>(parts)));  // void: message() prints nothing
  return out.str();
}

/// Throws Error(function + ": " + parts...), e.g. fail("add_noise", "noise has shape ", s)
/// throws Error("add_noise: noise has shape ...").
template <class... Parts>
[[noreturn]] void fail(std::string_view function, Parts&&... parts) {
  throw Error(message(function, ": ", std::forward<Parts>(parts)...));
}

/// Throws Error(function + ": " + parts...) unless `condition` holds.
template <class... Parts>
void require(bool condition, std::string_view function, Parts&&... parts) {
  if (!condition) fail(function, std::forward<Parts>(parts)...);
}

}  // namespace difftrain
