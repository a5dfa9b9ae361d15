#pragma once
// What the denoiser predicts (diffusers' `prediction_type`).

#include <cstdint>
#include <string>
#include <string_view>

#include "difftrain/core/error.hpp"

namespace difftrain {

enum class PredictionType : std::uint8_t {
  epsilon,       // the noise eps
  v_prediction,  // v = sqrt(abar_t)·eps − sqrt(1−abar_t)·x0
  sample,        // the clean sample x0
};

inline std::string_view to_string(PredictionType type) {
  switch (type) {
    case PredictionType::epsilon:
      return "epsilon";
    case PredictionType::v_prediction:
      return "v_prediction";
    case PredictionType::sample:
      return "sample";
  }
  return "?";
}

/// Parses diffusers' names: "epsilon", "v_prediction", "sample".
inline PredictionType parse_prediction_type(std::string_view name) {
  if (name == "epsilon") return PredictionType::epsilon;
  if (name == "v_prediction") return PredictionType::v_prediction;
  if (name == "sample") return PredictionType::sample;
  throw Error(message("prediction_type: unknown value '", name,
                      "', expected epsilon, v_prediction or sample"));
}

}  // namespace difftrain
