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

/// The coefficients of a training target target_eps·eps + target_x0·x0.
struct TargetCoefficients {
  double eps = 0, x0 = 0;
};

/// DDPM's targets for x_t = a·x0 + s·eps: epsilon (1, 0), v_prediction (a, −s), sample (0, 1).
constexpr TargetCoefficients prediction_target(PredictionType type, double a, double s) {
  switch (type) {
    case PredictionType::v_prediction:
      return {a, -s};
    case PredictionType::sample:
      return {0.0, 1.0};
    case PredictionType::epsilon:
      break;
  }
  return {1.0, 0.0};
}

}  // namespace difftrain
