#pragma once
// Warnings: input that is accepted with a documented fallback (e.g. a PEFT LoRA file without
// alpha metadata) is reported through one handler, stderr unless a program or test sets its own.

#include <cstdio>
#include <functional>
#include <string>
#include <utility>

#include "difftrain/core/error.hpp"

namespace difftrain {

using WarningHandler = std::function<void(const std::string&)>;

namespace warning_detail {
inline WarningHandler& handler() {
  static WarningHandler h = [](const std::string& text) {
    std::fprintf(stderr, "difftrain: warning: %s\n", text.c_str());
  };
  return h;
}
}  // namespace warning_detail

/// Replaces the warning handler and returns the previous one (an empty handler drops warnings).
inline WarningHandler set_warning_handler(WarningHandler handler) {
  return std::exchange(warning_detail::handler(), std::move(handler));
}

/// Reports function + ": " + parts... to the warning handler.
template <class... Parts>
void warn(std::string_view function, Parts&&... parts) {
  if (const WarningHandler& h = warning_detail::handler())
    h(message(function, ": ", std::forward<Parts>(parts)...));
}

}  // namespace difftrain
