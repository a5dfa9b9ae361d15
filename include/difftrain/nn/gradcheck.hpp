#pragma once
// Gradient checking by central differences, for the tests of every layer and block (in double).
//
// Usage (loss L = Σ w ⊙ y, so dL/dy = w):
//   auto y = layer.forward(x);  auto dx = layer.backward(w);              // analytic gradients
//   auto r = check_gradient(x, dx, [&] { return weighted_sum(layer.forward_inference(x), w); });
//   INFO(r.message); REQUIRE(r.max_error <= 1e-6);
//   auto rw = check_gradient(layer.weight, [&] { ... });                   // value vs grad
// The loss callable re-runs the forward on the current (perturbed) values and returns a double.
//
// Error measure: |numeric − analytic| / max(|numeric|, |analytic|, floor), so large gradients are
// compared relatively and tiny ones absolutely: the default floor 1e-5 sits above the rounding
// noise of the difference quotient (~1.5e-13·|L| for h = 1e-3), so an exactly-zero gradient (a
// dropped unit) passes for |L| up to ~50 while a wrong gradient of 1e-10 or more is still caught.
// The default stencil is the fourth-order central difference (−L(x+2h) + 8L(x+h) − 8L(x−h) +
// L(x−2h)) / 12h: with h = 1e-3 its truncation error (~h⁴) and rounding error (~1e-16·|L| / h) both
// stay far below 1e-6.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::nn {

struct GradCheckOptions {
  double step = 1e-3;          // h
  double floor = 1e-5;         // smallest denominator of the relative error (see above)
  bool fourth_order = true;    // false: the plain (L(x+h) − L(x−h)) / 2h
  std::size_t max_checks = 0;  // 0: every element; else an evenly strided subset of this size
};

struct GradCheckReport {
  double max_error = 0;  // worst relative error
  std::size_t worst_index = 0;
  double numeric = 0, analytic = 0;  // at the worst index
  std::size_t checked = 0;
  std::string message;
};

// |numeric − analytic| / max(|numeric|, |analytic|, floor)
inline double relative_error(double numeric, double analytic, double floor) {
  const double scale = std::max({std::abs(numeric), std::abs(analytic), floor});
  return std::abs(numeric - analytic) / scale;
}

/// Compares analytic[i] with the central difference of loss() in values[i] (restored after).
template <class T, class Loss>
GradCheckReport check_gradient(std::span<T> values, std::span<const T> analytic, Loss&& loss,
                               const GradCheckOptions& options = {}) {
  require(values.size() == analytic.size(), "check_gradient", "analytic gradient has ",
          analytic.size(), " elements, expected ", values.size());
  require(options.step > 0 && options.floor > 0, "check_gradient",
          "step and floor must be positive, got ", options.step, " and ", options.floor);
  GradCheckReport report;
  const std::size_t n = values.size();
  const std::size_t stride =
      (options.max_checks == 0 || options.max_checks >= n) ? 1 : n / options.max_checks;
  const double h = options.step;
  auto at = [&](std::size_t i, double delta) {
    const T saved = values[i];
    values[i] = static_cast<T>(static_cast<double>(saved) + delta);
    const double l = static_cast<double>(loss());
    values[i] = saved;
    return l;
  };
  for (std::size_t i = 0; i < n; i += stride) {
    double numeric;
    if (options.fourth_order) {
      numeric = (-at(i, 2 * h) + 8 * at(i, h) - 8 * at(i, -h) + at(i, -2 * h)) / (12 * h);
    } else {
      numeric = (at(i, h) - at(i, -h)) / (2 * h);
    }
    const double a = static_cast<double>(analytic[i]);
    const double error = relative_error(numeric, a, options.floor);
    if (report.checked == 0 || error > report.max_error || std::isnan(error)) {
      report.max_error = std::isnan(error) ? INFINITY : error;
      report.worst_index = i;
      report.numeric = numeric;
      report.analytic = a;
    }
    ++report.checked;
  }
  std::ostringstream out;
  out.precision(12);
  out << "gradient check over " << report.checked << " of " << n << " elements: worst at index "
      << report.worst_index << ", numeric " << report.numeric << ", analytic " << report.analytic
      << ", relative error " << report.max_error;
  report.message = out.str();
  return report;
}

/// Same, over xtensor containers (values perturbed in place, analytic of the same size).
template <class Values, class Analytic, class Loss>
requires requires(Values& v, const Analytic& a) {
  v.data();
  a.data();
  v.size();
}
GradCheckReport check_gradient(Values& values, const Analytic& analytic, Loss&& loss,
                               const GradCheckOptions& options = {}) {
  using T = typename Values::value_type;
  return check_gradient(std::span<T>(values.data(), values.size()),
                        std::span<const T>(analytic.data(), analytic.size()),
                        std::forward<Loss>(loss), options);
}

/// A parameter's value against its accumulated grad (which must not be empty).
template <class T, class Loss>
GradCheckReport check_gradient(Parameter<T>& p, Loss&& loss, const GradCheckOptions& options = {}) {
  require(p.trainable && p.grad.size() == p.value.size(), "check_gradient",
          "parameter has no gradient (frozen?)");
  return check_gradient(std::span<T>(p.value.data(), p.value.size()),
                        std::span<const T>(p.grad.data(), p.grad.size()), std::forward<Loss>(loss),
                        options);
}

// L = Σ_i w_i y_i  (dL/dy = w): the scalar probe loss of gradient checks
template <class Y, class W>
double weighted_sum(const Y& y, const W& w) {
  require(y.size() == w.size(), "weighted_sum", "w has ", w.size(), " elements, expected ",
          y.size());
  double sum = 0;
  auto wi = w.begin();
  for (auto yi = y.begin(); yi != y.end(); ++yi, ++wi)
    sum += static_cast<double>(*yi) * static_cast<double>(*wi);
  return sum;
}

/// Fills a container with scale · N(0, 1) from a random stream (deterministic test data).
template <class Container>
void fill_random_normal(Container& values, RandomStream rs, double scale = 1.0) {
  std::vector<float> buffer(values.size());
  fill_normal(std::span<float>(buffer), rs);
  auto out = values.begin();
  for (float v : buffer) *out++ = static_cast<typename Container::value_type>(scale * v);
}

/// Fills a container with uniform numbers on [low, high) from a random stream.
template <class Container>
void fill_random_uniform(Container& values, RandomStream rs, double low, double high) {
  std::vector<float> buffer(values.size());
  fill_uniform(std::span<float>(buffer), rs);
  auto out = values.begin();
  for (float v : buffer)
    *out++ = static_cast<typename Container::value_type>(low + (high - low) * v);
}

}  // namespace difftrain::nn
