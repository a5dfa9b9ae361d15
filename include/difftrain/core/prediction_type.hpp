#pragma once
// What the denoiser predicts (diffusers' `prediction_type`).

#include <cstdint>
#include <string>
#include <string_view>

#include "difftrain/core/choice.hpp"
#include "difftrain/core/error.hpp"

namespace difftrain {

enum class PredictionType : std::uint8_t {
  epsilon,       // the noise eps
  v_prediction,  // v = sqrt(abar_t)·eps − sqrt(1−abar_t)·x0
  sample,        // the clean sample x0
};

/// diffusers' names.
inline constexpr std::array<Choice<PredictionType>, 3> kPredictionTypes{{
    {"epsilon", PredictionType::epsilon},
    {"v_prediction", PredictionType::v_prediction},
    {"sample", PredictionType::sample},
}};

inline std::string_view to_string(PredictionType type) {
  return choice_name(type, kPredictionTypes);
}

/// Parses diffusers' names: "epsilon", "v_prediction", "sample".
inline PredictionType parse_prediction_type(std::string_view name) {
  return parse_choice("prediction_type", name, kPredictionTypes);
}

}  // namespace difftrain
