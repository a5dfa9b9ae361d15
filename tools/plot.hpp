#pragma once
// A PNG line plot of a loss curve: the raw values, their trailing moving average, axes with
// "nice" tick labels (stb_easy_font's bitmap font, rasterized) and a title.
// The definitions are in plot.cpp.

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "image_io.hpp"

namespace difftrain::tools {

struct PlotOptions {
  int width = 800, height = 480;
  std::size_t moving_average = 0;  // window of the trailing mean; 0: max(1, n / 20)
};

/// Colours, public so that tests can find the curves.
inline constexpr std::array<std::uint8_t, 3> kPlotBackground = {255, 255, 255};
inline constexpr std::array<std::uint8_t, 3> kPlotGrid = {228, 228, 228};
inline constexpr std::array<std::uint8_t, 3> kPlotInk = {0, 0, 0};
inline constexpr std::array<std::uint8_t, 3> kPlotLossColor = {140, 170, 225};
inline constexpr std::array<std::uint8_t, 3> kPlotAverageColor = {200, 40, 40};

/// The plot area inside the image (pixels; y grows downwards) and the value range it shows.
struct PlotLayout {
  int left = 80, top = 40, right = 0, bottom = 0;  // right/bottom inclusive
  double y_min = 0, y_max = 1;
  std::size_t n = 0;

  int x_of(std::size_t i) const {
    if (n <= 1) return (left + right) / 2;
    return left + int(std::lround(double(i) * (right - left) / double(n - 1)));
  }
  int y_of(double v) const {
    return bottom - int(std::lround((v - y_min) / (y_max - y_min) * (bottom - top)));
  }
};

/// Trailing mean over the last `window` finite values (NaN while none yet).
std::vector<double> moving_average(const std::vector<double>& values, std::size_t window);

/// The layout render_loss_plot uses: value range = finite min..max padded by 5% (±max(|v|/10,
/// 1e-3) when flat); non-finite values are left out (gaps in the curve).
PlotLayout loss_plot_layout(const std::vector<double>& values, const PlotOptions& options);

/// The plot as an image of options.width × options.height.
Image render_loss_plot(const std::vector<double>& values, const std::string& title,
                       const PlotOptions& options = {});

/// render_loss_plot written as a PNG (atomically, see save_png).
void save_loss_plot_png(const std::string& path, const std::vector<double>& values,
                        const std::string& title, const PlotOptions& options = {});

}  // namespace difftrain::tools
