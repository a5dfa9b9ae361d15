#pragma once
// The message of the difftrain::Error a callable throws, for CHECK_THAT with several matchers.

#include <string>

#include "difftrain/core/error.hpp"

namespace difftrain::test {

/// The message of the Error `f` throws ("no error" when it returns; other exceptions propagate).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace difftrain::test
