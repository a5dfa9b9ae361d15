// tools/plot.hpp: the loss plot's size, where its curves are drawn, and the moving average.

#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "plot.hpp"
#include "support/temp_dir.hpp"
#include "support/tensor_match.hpp"

namespace tools = difftrain::tools;
using tools::Image;

namespace {
bool has_color(const Image& im, int x, int y, const std::array<std::uint8_t, 3>& c) {
  const auto* p = im.pixel(x, y);
  return p[0] == c[0] && p[1] == c[1] && p[2] == c[2];
}

// Rows of column x drawn in colour c.
std::vector<int> rows_with(const Image& im, int x, const std::array<std::uint8_t, 3>& c) {
  std::vector<int> rows;
  for (int y = 0; y < im.height; ++y)
    if (has_color(im, x, y, c)) rows.push_back(y);
  return rows;
}
}  // namespace

TEST_CASE("moving_average is the trailing mean of the finite values", "[plot]") {
  REQUIRE_CLOSE(tools::moving_average({1, 2, 3, 4}, 3), (std::vector<double>{1, 1.5, 2, 3}), 1e-12,
                0);
  REQUIRE_CLOSE(tools::moving_average({1, NAN, 3}, 2), (std::vector<double>{1, 1, 3}), 1e-12, 0);
  REQUIRE_THROWS_AS(tools::moving_average({1}, 0), difftrain::Error);
}

TEST_CASE("save_loss_plot_png writes a PNG of the requested size", "[plot]") {
  difftrain::test::TempDir dir;
  std::vector<double> loss;
  for (int i = 0; i < 120; ++i) loss.push_back(0.5 * std::exp(-i / 30.0) + 0.05 * std::sin(i));
  tools::save_loss_plot_png(dir / "loss.png", loss, "loss", {.width = 640, .height = 360});
  const Image im = tools::load_image(dir / "loss.png");
  CHECK(im.width == 640);
  CHECK(im.height == 360);
  // Title, labels and curves put ink on the white background, but only on a small part of it.
  std::size_t ink = 0;
  for (int y = 0; y < im.height; ++y)
    for (int x = 0; x < im.width; ++x) ink += !has_color(im, x, y, tools::kPlotBackground);
  CHECK(ink > 2000);
  CHECK(ink < std::size_t(im.width * im.height / 3));

  REQUIRE_THROWS_AS(tools::render_loss_plot({}, "empty"), difftrain::Error);
  REQUIRE_THROWS_AS(tools::render_loss_plot({NAN, INFINITY}, "nan"), difftrain::Error);
  REQUIRE_THROWS_AS(tools::render_loss_plot({1.0}, "tiny", {.width = 50, .height = 50}),
                    difftrain::Error);
}

TEST_CASE("the curves are drawn where the values are", "[plot]") {
  const tools::PlotOptions options{.width = 400, .height = 300, .moving_average = 1};
  std::vector<double> rising, falling;
  for (int i = 0; i < 10; ++i) rising.push_back(i), falling.push_back(9 - i);
  const tools::PlotLayout layout = tools::loss_plot_layout(rising, options);
  const int x0 = layout.x_of(0), x9 = layout.x_of(9);
  const int bottom = layout.y_of(0), top = layout.y_of(9);
  REQUIRE(bottom - top > 150);  // the range fills the plot area

  // The moving average (window 1: the values) is 2 pixels thick from y_of(v).
  const Image up = tools::render_loss_plot(rising, "rising", options);
  const Image down = tools::render_loss_plot(falling, "falling", options);
  CHECK(rows_with(up, x0, tools::kPlotAverageColor) == std::vector<int>{bottom, bottom + 1});
  CHECK(rows_with(up, x9, tools::kPlotAverageColor) == std::vector<int>{top, top + 1});
  CHECK(rows_with(down, x0, tools::kPlotAverageColor) == std::vector<int>{top, top + 1});
  CHECK(rows_with(down, x9, tools::kPlotAverageColor) == std::vector<int>{bottom, bottom + 1});

  // A spike in the raw loss moves its pixels; the wide moving average stays lower.
  std::vector<double> flat(41, 1.0), spike = flat;
  flat[0] = 0.0, spike[0] = 0.0;  // a fixed range [0, 3] for both: the spike sets the top
  flat[40] = spike[40] = 3.0;
  spike[20] = 3.0;
  const tools::PlotOptions wide{.width = 400, .height = 300, .moving_average = 9};
  const tools::PlotLayout l2 = tools::loss_plot_layout(spike, wide);
  const int xs = l2.x_of(20);
  const Image a = tools::render_loss_plot(flat, "flat", wide);
  const Image b = tools::render_loss_plot(spike, "spike", wide);
  CHECK_FALSE(has_color(a, xs, l2.y_of(3.0), tools::kPlotLossColor));
  CHECK(has_color(b, xs, l2.y_of(3.0), tools::kPlotLossColor));
  const std::vector<int> avg = rows_with(b, xs, tools::kPlotAverageColor);
  REQUIRE_FALSE(avg.empty());
  const int y_avg = l2.y_of((8 * 1.0 + 3.0) / 9);  // the mean of spike[12..20]
  CHECK(avg.front() >= y_avg - 1);
  CHECK(avg.front() <= y_avg + 1);
}
