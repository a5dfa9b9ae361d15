// The loss plot of plot.hpp: lines, rectangles and stb_easy_font's text on an Image.
#include "plot.hpp"

#include <stb/stb_easy_font.h>  // header-only, static (see stb_impl.hpp)

#include <algorithm>
#include <cstdio>

#include "difftrain/core/error.hpp"

namespace difftrain::tools {

namespace {

using Color = std::array<std::uint8_t, 3>;

void put(Image& im, int x, int y, const Color& c) {
  if (x < 0 || y < 0 || x >= im.width || y >= im.height) return;
  std::copy(c.begin(), c.end(), im.pixel(x, y));
}

void fill_rect(Image& im, int x0, int y0, int x1, int y1, const Color& c) {  // inclusive
  for (int y = y0; y <= y1; ++y)
    for (int x = x0; x <= x1; ++x) put(im, x, y, c);
}

// Bresenham's line, `thickness` pixels tall.
void line(Image& im, int x0, int y0, int x1, int y1, const Color& c, int thickness = 1) {
  const int dx = std::abs(x1 - x0), sx = x0 < x1 ? 1 : -1;
  const int dy = -std::abs(y1 - y0), sy = y0 < y1 ? 1 : -1;
  int err = dx + dy;
  for (;;) {
    for (int t = 0; t < thickness; ++t) put(im, x0, y0 + t, c);
    if (x0 == x1 && y0 == y1) break;
    const int e2 = 2 * err;
    if (e2 >= dy) err += dy, x0 += sx;
    if (e2 <= dx) err += dx, y0 += sy;
  }
}

std::string printable(const std::string& text) {
  std::string s = text;
  for (char& ch : s)
    if (ch < 32 || ch > 126) ch = '?';
  return s;
}

int text_width(const std::string& text) {
  std::string s = printable(text);
  return stb_easy_font_width(s.data());
}

// stb_easy_font's quads (16-byte vertices, 4 per quad) filled as axis-aligned rectangles.
void text(Image& im, int x, int y, const std::string& str, const Color& c) {
  std::string s = printable(str);
  std::vector<float> buffer(s.size() * 300 + 64);  // ~270 bytes per character (stb's estimate)
  const int quads = stb_easy_font_print(float(x), float(y), s.data(), nullptr, buffer.data(),
                                        int(buffer.size() * sizeof(float)));
  for (int q = 0; q < quads; ++q) {
    const float* v = buffer.data() + 16 * q;  // 4 vertices × (x, y, z, rgba) = 16 floats
    const float x0 = std::min(v[0], v[8]), x1 = std::max(v[0], v[8]);
    const float y0 = std::min(v[1], v[9]), y1 = std::max(v[1], v[9]);
    fill_rect(im, int(std::floor(x0)), int(std::floor(y0)), int(std::ceil(x1)) - 1,
              int(std::ceil(y1)) - 1, c);
  }
}

// 1, 2 or 5 × 10^k: the smallest such step giving at most `max_ticks` intervals over `range`.
double nice_step(double range, int max_ticks) {
  const double raw = range / max_ticks;
  const double p = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * p >= raw) return m * p;
  return 10 * p;
}

std::string format_tick(double v, double step) {
  char buf[32];
  if (std::abs(v) < step * 1e-6) v = 0;  // no "-1.4e-17"
  std::snprintf(buf, sizeof buf, "%.4g", v);
  return buf;
}

}  // namespace

std::vector<double> moving_average(const std::vector<double>& values, std::size_t window) {
  require(window > 0, "moving_average", "window is 0, expected at least 1");
  std::vector<double> out(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) {
    double sum = 0;
    std::size_t count = 0;
    for (std::size_t j = i + 1 > window ? i + 1 - window : 0; j <= i; ++j)
      if (std::isfinite(values[j])) sum += values[j], ++count;
    out[i] = count ? sum / double(count) : NAN;
  }
  return out;
}

PlotLayout loss_plot_layout(const std::vector<double>& values, const PlotOptions& options) {
  constexpr const char* fn = "render_loss_plot";
  require(!values.empty(), fn, "values is empty, expected at least one loss value");
  require(options.width >= 200 && options.height >= 150, fn, "size is ", options.width, "x",
          options.height, ", expected at least 200x150");
  double lo = INFINITY, hi = -INFINITY;
  for (double v : values)
    if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
  require(lo <= hi, fn, "all ", values.size(), " values are NaN or Inf");
  const double pad = hi > lo ? 0.05 * (hi - lo) : std::max(std::abs(lo) * 0.1, 1e-3);
  PlotLayout layout;
  layout.right = options.width - 20;
  layout.bottom = options.height - 50;
  layout.y_min = lo - pad;
  layout.y_max = hi + pad;
  layout.n = values.size();
  return layout;
}

Image render_loss_plot(const std::vector<double>& values, const std::string& title,
                       const PlotOptions& options) {
  const PlotLayout L = loss_plot_layout(values, options);
  Image im(options.width, options.height, 255);

  // Grid lines and tick labels: y at multiples of a nice step, x at nice step numbers (1-based).
  const double ystep = nice_step(L.y_max - L.y_min, 8);
  for (double v = std::ceil(L.y_min / ystep) * ystep; v <= L.y_max; v += ystep) {
    const int y = L.y_of(v);
    line(im, L.left, y, L.right, y, kPlotGrid);
    line(im, L.left - 4, y, L.left, y, kPlotInk);
    const std::string label = format_tick(v, ystep);
    text(im, L.left - 8 - text_width(label), y - 3, label, kPlotInk);
  }
  const std::size_t n = values.size();
  const double xstep = n > 1 ? std::max(1.0, nice_step(double(n - 1), 8)) : 1.0;
  for (double s = xstep; s <= double(n); s += xstep) {  // step s is value index s − 1
    const int x = L.x_of(std::size_t(s) - 1);
    line(im, x, L.top, x, L.bottom, kPlotGrid);
    line(im, x, L.bottom, x, L.bottom + 4, kPlotInk);
    const std::string label = format_tick(s, xstep);
    text(im, x - text_width(label) / 2, L.bottom + 8, label, kPlotInk);
  }
  line(im, L.left, L.top, L.left, L.bottom, kPlotInk);
  line(im, L.left, L.bottom, L.right, L.bottom, kPlotInk);

  // The curves: raw loss thin, moving average thick, each broken at non-finite values.
  const std::size_t window =
      options.moving_average ? options.moving_average : std::max<std::size_t>(1, n / 20);
  const std::vector<double> avg = moving_average(values, window);
  auto curve = [&](const std::vector<double>& v, const Color& c, int thickness) {
    bool have_prev = false;  // false at the start and after a non-finite value
    int px = 0, py = 0;
    for (std::size_t i = 0; i < n; ++i) {
      if (!std::isfinite(v[i])) {
        have_prev = false;
        continue;
      }
      const int x = L.x_of(i), y = L.y_of(v[i]);
      if (have_prev)
        line(im, px, py, x, y, c, thickness);
      else
        line(im, x, y, x, y, c, thickness);
      px = x, py = y, have_prev = true;
    }
  };
  curve(values, kPlotLossColor, 1);
  curve(avg, kPlotAverageColor, 2);

  text(im, (options.width - text_width(title)) / 2, 14, title, kPlotInk);
  text(im, (L.left + L.right - text_width("step")) / 2, L.bottom + 26, "step", kPlotInk);
  text(im, 8, L.top - 16, "loss", kPlotInk);
  const std::string legend =
      "loss (thin), moving average of " + std::to_string(window) + " (thick)";
  text(im, L.right - text_width(legend), L.top - 16, legend, kPlotInk);
  return im;
}

void save_loss_plot_png(const std::string& path, const std::vector<double>& values,
                        const std::string& title, const PlotOptions& options) {
  save_png(path, render_loss_plot(values, title, options));
}

}  // namespace difftrain::tools
