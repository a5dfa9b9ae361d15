#pragma once
// The golden scheduler cases (tests/data/scheduler/scheduler_cases.json) shared by the schedule
// tests.

#include <catch2/catch.hpp>
#include <cstdint>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "support/tensor_match.hpp"

namespace difftrain::test {

/// num_train_timesteps of the golden cases.
inline constexpr std::int64_t T = 1000;

/// A golden number is the shortest decimal of a float32: read it back as that float32.
inline double float32_value(const nlohmann::json& value) {
  if (value.is_null()) return std::numeric_limits<double>::quiet_NaN();
  return static_cast<double>(static_cast<float>(value.get<double>()));
}

/// scheduler_cases.json, read once.
inline const nlohmann::json& golden() {
  static const nlohmann::json json = [] {
    std::ifstream in(data_path("scheduler/scheduler_cases.json"));
    REQUIRE(in.good());
    return nlohmann::json::parse(in);
  }();
  return json;
}

}  // namespace difftrain::test
