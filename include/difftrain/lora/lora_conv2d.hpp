#pragma once
// LoRA on Conv2d (kohya LoCon): down A is a conv with the base's kernel, stride and padding to r
// channels ([r, C, k, k], `lora_A.weight`), up B a 1×1 conv r → O ([O, r, 1, 1], `lora_B.weight`).
//   y = conv(x) + m·s·B(A(dropout(x)) ⊙ rank_mask[b, j]),  rank mask broadcast over the pixels.
// Merge reshapes: W[O, C·k·k] += m·s·B[O, r]·A[r, C·k·k] (exact: a 1×1 conv after a k×k conv is
// the k×k conv with the product kernel). Everything else (options, inits, names, streams) is the
// shared LoraLayer core of lora_linear.hpp; kaiming-uniform bound = 1/√(C·k·k).

#include <cstddef>

#include "difftrain/lora/lora_linear.hpp"
#include "difftrain/nn/conv2d.hpp"

namespace difftrain::lora {

template <class T>
struct LoraTraits<nn::Conv2d<T>> {
  static constexpr const char* name = "LoraConv2d";
  static constexpr bool rank_axis_last = false;  // A's output [B, r, Ho, Wo]
  static nn::Conv2d<T> make_down(const nn::Conv2d<T>& base, std::size_t r) {
    nn::Conv2dConfig c = base.config();
    c.out_channels = r;
    c.bias = false;
    return nn::Conv2d<T>(c);
  }
  static nn::Conv2d<T> make_up(const nn::Conv2d<T>& base, std::size_t r) {
    return nn::Conv2d<T>(nn::Conv2dConfig{r, base.out_channels(), 1, 1, nn::Padding2d{}, false});
  }
  static std::size_t fan_in(const nn::Conv2d<T>& base) {
    return base.in_channels() * base.kernel_size() * base.kernel_size();
  }
};

template <class T = float>
using LoraConv2d = LoraLayer<nn::Conv2d<T>>;

}  // namespace difftrain::lora
