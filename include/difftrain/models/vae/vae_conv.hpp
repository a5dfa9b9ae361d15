#pragma once
// Inference convolution in bands of output rows, for the frozen VAE.
//
// Dims legend: B batch, C in channels, H×W input, O out channels, k kernel, s stride,
// Ho×Wo output, K = C·k·k, n output rows per band (n·Wo columns of the band's column matrix).
//
// nn::Conv2d::forward_inference builds the whole [K, Ho·Wo] column matrix of a sample and keeps it
// as a workspace; for a 512×512 image through a 128-channel 3×3 conv that is 1.2 GB per thread and
// per layer. Here a sample's output is computed in bands of n rows, n chosen so that the band's
// column matrix holds at most ConvWorkspace::max_band_elements values (4 Mi floats = 16 MiB by
// default), with one band buffer per thread shared by every conv of a model:
//   col[(c·k + i)·k + j, (oh − r0)·Wo + ow] = x[c, oh·s + i − top, ow·s + j − left] (0 outside)
//   y_b[:, r0·Wo : (r0 + n)·Wo] = W[O, K] · col + bias
// OpenMP runs over the B·bands (sample, band) jobs, with at least one band per thread; a conv of
// fewer than parallel::kBandedConvWork multiply-adds runs on one thread, Eigen included. Unpadded
// 1×1 stride-1 convs need no columns and go to nn::Conv2d::forward_inference directly.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/parallel.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/nn/conv2d.hpp"
#include "difftrain/nn/linear.hpp"

namespace difftrain::models {

/// Per-thread band buffers reused by every banded conv of a model (scratch only).
template <class T>
struct ConvWorkspace {
  std::size_t max_band_elements = std::size_t{1} << 22;  // 16 MiB of float per thread
  std::vector<std::vector<T>> buffers;
};

namespace vae_detail {

// The band's column matrix for output rows [r0, r0 + n) of one sample x [C, H, W].
template <class T>
void im2col_band(const T* x, std::size_t C, std::size_t H, std::size_t W, std::size_t k,
                 std::size_t s, const nn::Padding2d& pad, std::size_t Wo, std::size_t r0,
                 std::size_t n, T* col) {
  const auto Hs = static_cast<std::ptrdiff_t>(H), Ws = static_cast<std::ptrdiff_t>(W);
  const std::size_t P = n * Wo;
  for (std::size_t c = 0; c < C; ++c) {
    const T* xc = x + c * H * W;
    for (std::size_t i = 0; i < k; ++i) {
      for (std::size_t j = 0; j < k; ++j) {
        T* dst = col + ((c * k + i) * k + j) * P;
        for (std::size_t oh = r0; oh < r0 + n; ++oh, dst += Wo) {
          const auto ih =
              static_cast<std::ptrdiff_t>(oh * s + i) - static_cast<std::ptrdiff_t>(pad.top);
          if (ih < 0 || ih >= Hs) {
            std::fill(dst, dst + Wo, T(0));
            continue;
          }
          const T* row = xc + ih * Ws;
          for (std::size_t ow = 0; ow < Wo; ++ow) {
            const auto iw =
                static_cast<std::ptrdiff_t>(ow * s + j) - static_cast<std::ptrdiff_t>(pad.left);
            dst[ow] = (iw >= 0 && iw < Ws) ? row[iw] : T(0);
          }
        }
      }
    }
  }
}

}  // namespace vae_detail

// y = conv(x) (the same as conv.forward_inference), computed band by band: see the header comment
template <class T>
Tensor4<T> conv2d_banded(const nn::Conv2d<T>& conv, const Tensor4<T>& x, ConvWorkspace<T>& ws) {
  const auto& cfg = conv.config();
  if (cfg.kernel_size == 1 && cfg.stride == 1 && cfg.padding == nn::Padding2d{}) {
    if (x.size() * cfg.out_channels >= parallel::kBandedConvWork) return conv.forward_inference(x);
    Tensor4<T> y;
    parallel::without_eigen_threads([&] { y = conv.forward_inference(x); });
    return y;
  }
  constexpr const char* fn = "conv2d_banded";
  const auto out_shape = conv.output_shape(x.shape());  // checks x's channels and size
  const std::size_t B = x.shape()[0], C = cfg.in_channels, H = x.shape()[2], W = x.shape()[3];
  const std::size_t O = cfg.out_channels, k = cfg.kernel_size, Ho = out_shape[2], Wo = out_shape[3],
                    K = C * k * k;
  check_shape(fn, "weight", conv.weight.value.shape(), {O, C, k, k});
  if (cfg.bias) check_shape(fn, "bias", conv.bias.value.shape(), {O});
  require(ws.max_band_elements > 0, fn, "max_band_elements must be positive");
  // Threads: one for a small conv (a parallel region costs more than it saves, far more on a
  // loaded machine); otherwise at least one band per thread, each band's GEMM on its own thread.
  const std::size_t work = B * O * K * Ho * Wo;  // multiply-adds
  const auto threads = static_cast<std::size_t>(
      work < parallel::kBandedConvWork ? 1 : std::max(1, parallel::max_threads()));
  std::size_t rows = std::clamp<std::size_t>(ws.max_band_elements / (K * Wo), 1, Ho);
  if (threads > 1 && B < threads) {
    const std::size_t bands_per_sample = (threads + B - 1) / B;
    rows = std::min(rows, std::max<std::size_t>(1, (Ho + bands_per_sample - 1) / bands_per_sample));
  }
  const std::size_t bands = (Ho + rows - 1) / rows;
  const std::size_t jobs = B * bands;
  if (ws.buffers.size() < threads) ws.buffers.resize(threads);
  for (std::size_t t = 0; t < threads; ++t)
    if (ws.buffers[t].size() < K * rows * Wo) ws.buffers[t].resize(K * rows * Wo);

  Tensor4<T> y(out_shape);
  nn::ConstRowMatrixMap<T> Wm(conv.weight.value.data(), O, K);
  auto run_job = [&](std::size_t job, T* col) {
    const std::size_t b = job / bands, r0 = (job % bands) * rows, n = std::min(rows, Ho - r0);
    vae_detail::im2col_band(x.data() + b * C * H * W, C, H, W, k, cfg.stride, cfg.padding, Wo, r0,
                            n, col);
    nn::RowMatrixMap<T> yb(y.data() + b * O * Ho * Wo, O, Ho * Wo);
    auto band = yb.middleCols(r0 * Wo, n * Wo);
    band.noalias() = Wm * nn::ConstRowMatrixMap<T>(col, K, n * Wo);
    if (cfg.bias) band.colwise() += nn::ConstVectorMap<T>(conv.bias.value.data(), O);
  };
  if (threads == 1) {
    parallel::without_eigen_threads([&] {
      for (std::size_t job = 0; job < jobs; ++job) run_job(job, ws.buffers[0].data());
    });
  } else {
    // inside a parallel region Eigen keeps each GEMM on its calling thread
    const auto job_count = static_cast<std::int64_t>(jobs);
#pragma omp parallel for num_threads(static_cast <int>(threads)) schedule(static)
    for (std::int64_t job = 0; job < job_count; ++job)
      run_job(static_cast<std::size_t>(job), ws.buffers[parallel::thread_id()].data());
  }
  return y;
}

}  // namespace difftrain::models
