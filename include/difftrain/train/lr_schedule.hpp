#pragma once
// Learning-rate schedules with diffusers' names and definitions (diffusers optimization.py,
// get_scheduler): multiplier λ(s) of the base learning rate at scheduler step s, with w warmup
// steps and N training steps. As with PyTorch's LambdaLR, optimizer step k (0-based) uses
// lr·λ(k): a warmup schedule's first update has learning rate 0.
//
//   constant              λ = 1 (ignores warmup)
//   constant_with_warmup  λ = s/w for s < w, else 1
//   linear                λ = s/w for s < w, else max(0, (N − s)/(N − w))
//   cosine                λ = s/w for s < w, else max(0, ½(1 + cos(π·p))), p = (s − w)/(N − w)
//   cosine_with_restarts  λ = s/w for s < w, else 0 if p ≥ 1, else ½(1 + cos(π·((c·p) mod 1)))
//   polynomial            λ = s/w for s < w, else ((lr0 − lr_end)(1 − p)^power + lr_end)/lr0,
//                         and lr_end/lr0 for s > N
// Denominators are max(1, ·) as in diffusers, so w = 0 or N = w never divide by zero.

#include <cmath>
#include <cstdint>
#include <numbers>
#include <string_view>

#include "difftrain/core/error.hpp"

namespace difftrain::train {

enum class LrSchedulerType : std::uint8_t {
  constant,
  constant_with_warmup,
  linear,
  cosine,
  cosine_with_restarts,
  polynomial,
};

inline std::string_view to_string(LrSchedulerType type) {
  switch (type) {
    case LrSchedulerType::constant:
      return "constant";
    case LrSchedulerType::constant_with_warmup:
      return "constant_with_warmup";
    case LrSchedulerType::linear:
      return "linear";
    case LrSchedulerType::cosine:
      return "cosine";
    case LrSchedulerType::cosine_with_restarts:
      return "cosine_with_restarts";
    case LrSchedulerType::polynomial:
      return "polynomial";
  }
  return "?";
}

/// diffusers' --lr_scheduler names; Error for any other name.
inline LrSchedulerType parse_lr_scheduler(std::string_view name) {
  for (LrSchedulerType type :
       {LrSchedulerType::constant, LrSchedulerType::constant_with_warmup, LrSchedulerType::linear,
        LrSchedulerType::cosine, LrSchedulerType::cosine_with_restarts,
        LrSchedulerType::polynomial}) {
    if (to_string(type) == name) return type;
  }
  throw Error(
      message("parse_lr_scheduler: unknown lr_scheduler '", name,
              "', expected constant, constant_with_warmup, linear, cosine, cosine_with_restarts or "
              "polynomial"));
}

struct LrScheduleOptions {
  std::int64_t num_warmup_steps = 0;
  std::int64_t num_training_steps = 0;  // needed by all but constant and constant_with_warmup
  // cosine_with_restarts' cycles (--lr_num_cycles; unset: 1). cosine is always half a cycle, from
  // 1 down to 0: diffusers' get_scheduler and kohya pass num_cycles to cosine_with_restarts only.
  double num_cycles = -1;
  double power = 1.0;     // polynomial (--lr_power)
  double lr_end = 1e-7;   // polynomial final learning rate
  double lr_init = 1e-4;  // polynomial: the base learning rate lr0 (optimizer default lr)
};

/// The schedule: multiplier(s) = λ(s) above.
class LrSchedule {
 public:
  LrSchedule() = default;
  LrSchedule(LrSchedulerType type, LrScheduleOptions options) : type_(type), o_(options) {
    constexpr const char* fn = "LrSchedule";
    require(o_.num_warmup_steps >= 0, fn, "num_warmup_steps is ", o_.num_warmup_steps,
            ", expected >= 0");
    const bool needs_total =
        type_ != LrSchedulerType::constant && type_ != LrSchedulerType::constant_with_warmup;
    require(!needs_total || o_.num_training_steps > 0, fn, to_string(type_),
            " needs num_training_steps > 0, got ", o_.num_training_steps);
    if (o_.num_cycles < 0) o_.num_cycles = 1.0;
    require(std::isfinite(o_.num_cycles), fn, "num_cycles is ", o_.num_cycles,
            ", expected a finite value");
    if (type_ == LrSchedulerType::polynomial) {
      require(std::isfinite(o_.lr_init) && o_.lr_init > 0, fn, "lr_init is ", o_.lr_init,
              ", expected a finite value > 0");
      require(std::isfinite(o_.lr_end) && o_.lr_end >= 0 && o_.lr_end <= o_.lr_init, fn,
              "lr_end is ", o_.lr_end, ", expected in [0, lr_init = ", o_.lr_init, "]");
      require(std::isfinite(o_.power) && o_.power > 0, fn, "power is ", o_.power,
              ", expected a finite value > 0");
    }
  }

  LrSchedulerType type() const { return type_; }
  const LrScheduleOptions& options() const { return o_; }

  /// λ(s) at scheduler step s >= 0 (definitions at the top of the file).
  double multiplier(std::int64_t s) const {
    require(s >= 0, "LrSchedule::multiplier", "step is ", s, ", expected >= 0");
    const std::int64_t w = o_.num_warmup_steps, n = o_.num_training_steps;
    if (type_ == LrSchedulerType::constant) return 1.0;
    if (s < w) return double(s) / double(std::max<std::int64_t>(1, w));
    const double p = double(s - w) / double(std::max<std::int64_t>(1, n - w));
    switch (type_) {
      case LrSchedulerType::constant:
      case LrSchedulerType::constant_with_warmup:
        return 1.0;
      case LrSchedulerType::linear:
        return std::max(0.0, double(n - s) / double(std::max<std::int64_t>(1, n - w)));
      case LrSchedulerType::cosine:
        return std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * p)));
      case LrSchedulerType::cosine_with_restarts:
        if (p >= 1.0) return 0.0;
        return std::max(
            0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * std::fmod(o_.num_cycles * p, 1.0))));
      case LrSchedulerType::polynomial: {
        if (s > n) return o_.lr_end / o_.lr_init;
        const double remaining = 1.0 - p;
        return ((o_.lr_init - o_.lr_end) * std::pow(remaining, o_.power) + o_.lr_end) / o_.lr_init;
      }
    }
    return 1.0;
  }

 private:
  LrSchedulerType type_ = LrSchedulerType::constant;
  LrScheduleOptions o_;
};

/// diffusers get_scheduler(name, ...): Error for unknown names.
inline LrSchedule get_scheduler(std::string_view name, LrScheduleOptions options) {
  return LrSchedule(parse_lr_scheduler(name), options);
}

/// diffusers --scale_lr: lr · gradient_accumulation_steps · train_batch_size · num_processes.
inline double scale_lr(double learning_rate, std::int64_t gradient_accumulation_steps,
                       std::int64_t train_batch_size, std::int64_t num_processes = 1) {
  require(gradient_accumulation_steps > 0 && train_batch_size > 0 && num_processes > 0, "scale_lr",
          "gradient_accumulation_steps, train_batch_size and num_processes are ",
          gradient_accumulation_steps, ", ", train_batch_size, ", ", num_processes,
          ", expected all > 0");
  return learning_rate * double(gradient_accumulation_steps) * double(train_batch_size) *
         double(num_processes);
}

}  // namespace difftrain::train
