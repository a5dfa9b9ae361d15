#pragma once
// Enum options spelled as strings (diffusers' and kohya's names): one table per enum serves both
// directions, parse_choice (name → value, with the error every option gives) and choice_name.

#include <array>
#include <cstddef>
#include <string>
#include <string_view>

#include "difftrain/core/error.hpp"

namespace difftrain {

/// The name of one value of an option's enum.
template <class E>
struct Choice {
  std::string_view name;
  E value;
};

/// The value named `name`; otherwise throws Error("option: unknown value 'name', expected a, b
/// or c") listing the table's names.
template <class E, std::size_t N>
E parse_choice(std::string_view option, std::string_view name,
               const std::array<Choice<E>, N>& choices) {
  for (const auto& c : choices)
    if (c.name == name) return c.value;
  std::string expected;
  for (std::size_t i = 0; i < N; ++i)
    expected += std::string(i == 0       ? ""
                            : i + 1 == N ? " or "
                                         : ", ") +
                std::string(choices[i].name);
  fail(option, "unknown value '", name, "', expected ", expected);
}

/// The name of `value` in the table, "?" for a value it does not list.
template <class E, std::size_t N>
std::string_view choice_name(E value, const std::array<Choice<E>, N>& choices) {
  for (const auto& c : choices)
    if (c.value == value) return c.name;
  return "?";
}

}  // namespace difftrain
