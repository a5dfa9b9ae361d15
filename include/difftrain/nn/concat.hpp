#pragma once
// Concatenation of two NCHW tensors along the channels, forward and backward (the UNet's up path:
// torch.cat([hidden_states, res_hidden_states], dim=1)).
//
// Dims legend: B batch, Ca and Cb the channels of a and b, H height, W width.
// Backward splits dy back into the two parts; forward keeps nothing (backward needs only Ca).

#include <algorithm>
#include <cstddef>
#include <utility>

#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"

namespace difftrain::nn {

// y[b] = [a[b]; b[b]] along C: [B, Ca, H, W] ⊕ [B, Cb, H, W] → [B, Ca + Cb, H, W].
template <class T>
Tensor4<T> concat_channels_forward(const Tensor4<T>& a, const Tensor4<T>& b) {
  const std::size_t B = a.shape()[0], Ca = a.shape()[1], H = a.shape()[2], W = a.shape()[3];
  const std::size_t Cb = b.shape()[1];
  check_shape("concat_channels_forward", "b", b.shape(), {B, Cb, H, W});
  Tensor4<T> y(std::array<std::size_t, 4>{B, Ca + Cb, H, W});
  const std::size_t plane = H * W;
  for (std::size_t n = 0; n < B; ++n) {
    T* out = y.data() + n * (Ca + Cb) * plane;
    std::copy_n(a.data() + n * Ca * plane, Ca * plane, out);
    std::copy_n(b.data() + n * Cb * plane, Cb * plane, out + Ca * plane);
  }
  return y;
}

/// The inverse split: dy [B, Ca + Cb, H, W] → (da [B, Ca, H, W], db [B, Cb, H, W]).
template <class T>
std::pair<Tensor4<T>, Tensor4<T>> concat_channels_backward(const Tensor4<T>& dy,
                                                           std::size_t channels_a) {
  const std::size_t B = dy.shape()[0], C = dy.shape()[1], H = dy.shape()[2], W = dy.shape()[3];
  require(channels_a <= C, "concat_channels_backward", "channels_a is ", channels_a,
          ", expected at most dy's ", C, " channels");
  const std::size_t Ca = channels_a, Cb = C - channels_a, plane = H * W;
  std::pair<Tensor4<T>, Tensor4<T>> grads{Tensor4<T>(std::array<std::size_t, 4>{B, Ca, H, W}),
                                          Tensor4<T>(std::array<std::size_t, 4>{B, Cb, H, W})};
  for (std::size_t n = 0; n < B; ++n) {
    const T* in = dy.data() + n * C * plane;
    std::copy_n(in, Ca * plane, grads.first.data() + n * Ca * plane);
    std::copy_n(in + Ca * plane, Cb * plane, grads.second.data() + n * Cb * plane);
  }
  return grads;
}

}  // namespace difftrain::nn
