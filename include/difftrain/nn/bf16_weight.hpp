#pragma once
// bfloat16 storage of a frozen weight (--mixed_precision bf16, diffusers' flag: the frozen
// weights are cast to bf16, the trainable LoRA weights, their gradients and optimizer states stay
// fp32).
//
// store() rounds the weight to bf16 (nearest even) and empties weight.value: the layer holds half
// the bytes. data() gives the weight as T for one product: the widened copy (exact; a shift per
// element) in a buffer of the calling thread, reused by every layer, so at most the largest weight
// exists in T at a time. A layer calls data() once per forward or backward, outside its parallel
// regions, and passes the pointer on. The products themselves stay in T with T accumulation: the
// result is that of the fp32 model with bf16-rounded weights (bf16 kernels: issue #17).

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/core/half.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::nn {

template <class T>
class Bf16Weight {
 public:
  bool stored() const { return !bits_.empty(); }
  /// Elements of the stored weight (0 when not stored).
  std::size_t size() const { return bits_.size(); }

  /// Rounds the frozen `weight` to bf16 and frees its T values.
  void store(Parameter<T>& weight, std::string_view layer) {
    require(!weight.trainable, layer,
            ": bf16 storage is for frozen weights, and this weight is trainable");
    if (stored()) return;
    require(weight.value.size() > 0, layer, ": the weight has no values to store");
    bits_.resize(weight.value.size());
    const T* v = weight.value.data();
    for (std::size_t i = 0; i < bits_.size(); ++i)
      bits_[i] = float_to_bf16(static_cast<float>(v[i]));
    weight.value = xt::xarray<T>::from_shape({0});
  }

  /// The weight as T: weight.value's data, or the widened bf16 copy (valid until this thread's
  /// next call on any stored weight).
  const T* data(const Parameter<T>& weight) const {
    if (!stored()) return weight.value.data();
    std::vector<T>& buffer = widened();
    if (buffer.size() < bits_.size()) buffer.resize(bits_.size());
    T* out = buffer.data();
    const std::uint16_t* in = bits_.data();
    const std::size_t n = bits_.size();
    for (std::size_t i = 0; i < n; ++i)
      out[i] = static_cast<T>(std::bit_cast<float>(static_cast<std::uint32_t>(in[i]) << 16));
    return out;
  }

 private:
  static std::vector<T>& widened() {
    thread_local std::vector<T> buffer;
    return buffer;
  }
  std::vector<std::uint16_t> bits_;
};

/// diffusers' --mixed_precision on the CPU: "no" (fp32, the default) or "bf16" (true: frozen
/// weights stored in bf16); fp16 is refused.
inline bool parse_mixed_precision(const std::string& value,
                                  std::string_view option = "--mixed_precision") {
  require(value == "no" || value == "bf16", option, " is '", value, "', expected no or bf16",
          value == "fp16" ? " (fp16 is not supported on the CPU; use bf16)" : "");
  return value == "bf16";
}

/// Stores every frozen Linear and Conv2d weight of `model` (visited by for_each_linear and
/// for_each_conv2d) in bf16; returns how many. Trainable weights (and LoRA adapters) stay T.
template <class M>
std::size_t store_frozen_weights_bf16(M& model) {
  std::size_t stored = 0;
  auto store = [&](const std::string&, auto& layer) {
    if (layer.weight.trainable || layer.weight_in_bf16()) return;
    layer.store_weight_bf16();
    ++stored;
  };
  model.for_each_linear("", store);
  model.for_each_conv2d("", store);
  return stored;
}

}  // namespace difftrain::nn
