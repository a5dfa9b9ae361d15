#pragma once
// LossWeighting policies: per-sample weights w(SNR(t), prediction type) on the sample's mean loss.
// SNR(t) = ᾱ_t/(1 − ᾱ_t). Every policy is finite for every SNR in [0, ∞]: zero terminal SNR
// (SNR = 0 at t = T−1) is where diffusers returns NaN and kohya uses a stale SNR; each policy
// documents the limit it takes there.
//
// The weights act on the MSE of the model's own target. Since ‖x̂0−x0‖² = ‖ê−e‖²/S and
// ‖v̂−v‖² = ‖ê−e‖²(S+1)/S, a weight defined on one target converts to another by those factors.

#include <algorithm>
#include <cmath>

#include "difftrain/concepts.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/prediction_type.hpp"

namespace difftrain::loss {

/// w = 1: the plain mean (diffusers without --snr_gamma; flow matching's weighting_scheme none).
struct Uniform {
  double weight(double /*snr*/, PredictionType /*type*/) const { return 1.0; }
  double weight(const TrainingCoefficients& /*c*/) const { return 1.0; }
};

/// Min-SNR-γ (Hang et al. 2023; diffusers --snr_gamma, kohya --min_snr_gamma), the current
/// diffusers form (PR #6307): eps min(S,γ)/S, v min(S,γ)/(S+1), x0 min(S,γ).
/// At S = 0 the eps weight is its limit 1 (min(S,γ)/S = 1 for all S < γ), not 0/0.
struct MinSnr {
  double gamma = 5.0;

  explicit MinSnr(double snr_gamma = 5.0) : gamma(snr_gamma) {
    require(std::isfinite(gamma) && gamma > 0, "MinSnr", "gamma is ", gamma,
            ", expected a finite value > 0");
  }
  double weight(double snr, PredictionType type) const {
    switch (type) {
      case PredictionType::epsilon:
        return snr < gamma ? 1.0 : gamma / snr;
      case PredictionType::v_prediction:
        return std::min(snr, gamma) / (snr + 1.0);
      case PredictionType::sample:
        return std::min(snr, gamma);
    }
    return 1.0;
  }
};

/// Debiased estimation (Yu et al. 2023; kohya --debiased_estimation_loss): eps 1/√S', v 1/(S'+1)
/// (kohya's v form), x0 √S' (the eps weight carried to x0-MSE), with S' = clamp(S, 1e-3, 1000).
/// kohya clamps at 1000 above; the floor 1e-3 (our choice) keeps the ZTSNR step finite
/// (w = √1000 ≈ 31.6 instead of ∞) and leaves SD's scaled_linear schedule (S ≥ 0.0047) as kohya.
struct DebiasedEstimation {
  static constexpr double snr_floor = 1e-3;
  static constexpr double snr_ceiling = 1000.0;

  double weight(double snr, PredictionType type) const {
    const double s = std::clamp(snr, snr_floor, snr_ceiling);
    switch (type) {
      case PredictionType::epsilon:
        return 1.0 / std::sqrt(s);
      case PredictionType::v_prediction:
        return 1.0 / (s + 1.0);
      case PredictionType::sample:
        return std::sqrt(s);
    }
    return 1.0;
  }
};

/// P2 weighting (Choi et al. 2022, k = 1; OneTrainer): eps (1+S)^−γ, v (2+S)^−γ (S → S+1 first,
/// as OneTrainer), x0 S·(1+S)^−γ (the eps weight carried to x0-MSE). Finite at S = 0.
struct P2 {
  double gamma = 1.0;

  explicit P2(double p2_gamma = 1.0) : gamma(p2_gamma) {
    require(std::isfinite(gamma) && gamma > 0, "P2", "gamma is ", gamma,
            ", expected a finite value > 0");
  }
  double weight(double snr, PredictionType type) const {
    switch (type) {
      case PredictionType::epsilon:
        return std::pow(1.0 + snr, -gamma);
      case PredictionType::v_prediction:
        return std::pow(2.0 + snr, -gamma);
      case PredictionType::sample:
        return snr * std::pow(1.0 + snr, -gamma);
    }
    return 1.0;
  }
};

/// kohya --scale_v_pred_loss_like_noise_pred: w = S'/(S'+1), S' = min(S, 1000), which turns the
/// v-MSE into the eps-MSE. Only for v_prediction (Error otherwise); 0 at S = 0.
struct ScaleVPredLikeNoisePred {
  double weight(double snr, PredictionType type) const {
    require(type == PredictionType::v_prediction, "ScaleVPredLikeNoisePred", "prediction_type is ",
            to_string(type), ", expected v_prediction");
    const double s = std::min(snr, 1000.0);
    return s / (s + 1.0);
  }
};

/// kohya --v_pred_like_loss λ: adds λ × a v-prediction-like loss to the loss,
/// loss + loss/w·λ with w = S'/(S'+1), S' = min(S, 1000): a factor of 1 + λ(S'+1)/S'.
/// Any prediction type. Undefined at S = 0 (zero terminal SNR; kohya gets inf): an Error.
struct VPredLikeLoss {
  double lambda = 0;
  explicit VPredLikeLoss(double v_pred_like_loss) : lambda(v_pred_like_loss) {
    require(std::isfinite(lambda) && lambda >= 0, "VPredLikeLoss", "v_pred_like_loss is ", lambda,
            ", expected a finite value >= 0");
  }
  double weight(double snr, PredictionType) const {
    const double s = std::min(snr, 1000.0);
    require(s > 0, "VPredLikeLoss",
            "v_pred_like_loss is undefined at SNR 0 (a zero-terminal-SNR schedule's last "
            "timestep); use it without zero terminal SNR or cap max_timestep");
    return 1.0 + lambda * (s + 1.0) / s;
  }
};

/// Two weightings applied together (kohya stacks them multiplicatively).
template <class First, class Second>
struct Product {
  First first;
  Second second;
  double weight(double snr, PredictionType type) const {
    return first.weight(snr, type) * second.weight(snr, type);
  }
};

}  // namespace difftrain::loss
