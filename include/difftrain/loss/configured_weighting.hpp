#pragma once
// ConfiguredWeighting: the LossWeighting chosen at run time from flags (a CLI or a config file),
// where the compile-time policies of weighting.hpp cannot be template arguments.
//
//   w(S, type) = Π over the enabled policies of policy.weight(S, type)
//
// Policies stack multiplicatively, as kohya's post_process_loss does (Min-SNR, then
// scale-v-like-eps, then v-pred-like loss, then debiased; order does not matter for a product).
// None enabled: w = 1.

#include <cmath>
#include <optional>

#include "difftrain/core/error.hpp"
#include "difftrain/core/prediction_type.hpp"
#include "difftrain/loss/weighting.hpp"

namespace difftrain::loss {

/// The weighting flags, with diffusers' / kohya's names.
struct WeightingOptions {
  std::optional<double> snr_gamma;                 // diffusers --snr_gamma, kohya --min_snr_gamma
  bool debiased_estimation_loss = false;           // kohya --debiased_estimation_loss
  std::optional<double> p2_gamma;                  // OneTrainer loss_weight_fn=P2 (its strength)
  bool scale_v_pred_loss_like_noise_pred = false;  // kohya; only with v_prediction
  std::optional<double> v_pred_like_loss;          // kohya --v_pred_like_loss (its λ)
};

/// A LossWeighting built from WeightingOptions; each enabled flag is one of weighting.hpp's
/// policies (their constructors validate γ).
class ConfiguredWeighting {
 public:
  ConfiguredWeighting() = default;
  explicit ConfiguredWeighting(const WeightingOptions& options) {
    if (options.snr_gamma) min_snr_.emplace(*options.snr_gamma);
    debiased_ = options.debiased_estimation_loss;
    if (options.p2_gamma) p2_.emplace(*options.p2_gamma);
    scale_v_pred_ = options.scale_v_pred_loss_like_noise_pred;
    if (options.v_pred_like_loss) v_like_.emplace(*options.v_pred_like_loss);
  }

  /// Throws unless every enabled policy is defined for `type` (scale-v-like-eps needs v).
  void check_prediction_type(PredictionType type) const {
    require(!scale_v_pred_ || type == PredictionType::v_prediction, "ConfiguredWeighting",
            "scale_v_pred_loss_like_noise_pred needs prediction_type v_prediction, got ",
            to_string(type));
  }

  double weight(double snr, PredictionType type) const {
    double w = 1.0;
    if (min_snr_) w *= min_snr_->weight(snr, type);
    if (scale_v_pred_) w *= ScaleVPredLikeNoisePred{}.weight(snr, type);
    if (v_like_) w *= v_like_->weight(snr, type);
    if (debiased_) w *= DebiasedEstimation{}.weight(snr, type);
    if (p2_) w *= p2_->weight(snr, type);
    return w;
  }

  /// True when no policy is enabled (w = 1 everywhere).
  bool uniform() const { return !min_snr_ && !debiased_ && !p2_ && !scale_v_pred_ && !v_like_; }

 private:
  std::optional<MinSnr> min_snr_;
  bool debiased_ = false;
  std::optional<P2> p2_;
  bool scale_v_pred_ = false;
  std::optional<VPredLikeLoss> v_like_;
};

}  // namespace difftrain::loss
