#pragma once
// difftrain::Error: the one exception type for bad input (shapes, arguments, configs, files).

#include <sstream>
#include <stdexcept>
#include <string>
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

namespace detail {
template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}
}  // namespace detail

/// Throws Error(function + ": " + parts...) unless `condition` holds.
template <class... Parts>
void require(bool condition, std::string_view function, Parts&&... parts) {
  if (!condition) throw Error(difftrain::detail::concat(function, ": ", std::forward<Parts>(parts)...));
}

}  // namespace difftrain
