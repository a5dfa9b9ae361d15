// bf16 storage of frozen Linear and Conv2d weights (--mixed_precision bf16): the layer computes
// exactly what the fp32 layer computes with its weight rounded to bf16 (nearest even, checked
// against the bit-level rounding of core/half.hpp), forward and input gradient, on odd sizes;
// trainable weights are refused; frozen layers keep no input for backward, and a weight made
// trainable after such a forward is an error, not a wrong gradient.

#include <catch2/catch.hpp>
#include <cmath>
#include <string>

#include "difftrain/core/error.hpp"
#include "difftrain/core/half.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/nn/bf16_weight.hpp"
#include "difftrain/nn/conv2d.hpp"
#include "difftrain/nn/linear.hpp"
#include "difftrain/nn/parameter.hpp"

using namespace difftrain;

namespace {

template <class A, class B>
bool same_values(const A& a, const B& b) {
  if (a.shape() != b.shape()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a.data()[i] != b.data()[i]) return false;
  return true;
}

template <class Layer>
void fill_layer(Layer& layer, std::uint64_t seed) {
  layer.for_each_parameter("", [&](const std::string&, nn::Parameter<float>& p) {
    fill_normal(std::span<float>(p.value.data(), p.value.size()), RandomStream{seed, p.size()});
  });
}

// reference: the same layer with its weight rounded to bf16 and kept in float
template <class Layer>
Layer rounded_copy(const Layer& layer) {
  Layer r = layer;
  for (auto& v : r.weight.value) v = bf16_to_float(float_to_bf16(v));
  return r;
}

}  // namespace

TEST_CASE("bf16 weight storage: Linear computes with the bf16-rounded weight",
          "[nn][linear][bf16]") {
  nn::Linear<float> layer(37, 19);
  fill_layer(layer, 3);
  layer.weight.set_trainable(false);
  nn::Linear<float> reference = rounded_copy(layer);
  // the rounding really changes the weight (else the test would prove nothing)
  CHECK_FALSE(same_values(reference.weight.value, layer.weight.value));
  layer.store_weight_bf16();
  CHECK(layer.weight_in_bf16());
  CHECK(layer.weight.value.size() == 0);  // the float copy is gone

  Tensor3<float> x = xt::zeros<float>(std::array<std::size_t, 3>{2, 5, 37});
  fill_normal(std::span<float>(x.data(), x.size()), RandomStream{4, 0});
  CHECK(same_values(layer.forward(x), reference.forward(x)));
  CHECK(same_values(layer.forward_inference(x), reference.forward_inference(x)));
  Tensor3<float> dy = xt::zeros<float>(std::array<std::size_t, 3>{2, 5, 19});
  fill_normal(std::span<float>(dy.data(), dy.size()), RandomStream{5, 0});
  const Tensor3<float> dx = layer.backward(dy);
  CHECK(same_values(dx, reference.backward(dy)));
  // the bias stays trainable and float, and gets its gradient
  CHECK(xt::amax(xt::abs(layer.bias.grad))() > 0);
  CHECK(same_values(layer.bias.grad, reference.bias.grad));
}

TEST_CASE("bf16 weight storage: Conv2d computes with the bf16-rounded weight",
          "[nn][conv2d][bf16]") {
  for (const std::size_t k : {std::size_t{1}, std::size_t{3}}) {
    nn::Conv2d<float> layer(nn::Conv2dConfig{5, 7, k, 1, nn::Padding2d::same((k - 1) / 2), true});
    fill_layer(layer, 6 + k);
    nn::set_trainable<float>(layer, false);
    nn::Conv2d<float> reference = rounded_copy(layer);
    layer.store_weight_bf16();
    Tensor4<float> x = xt::zeros<float>(std::array<std::size_t, 4>{2, 5, 6, 9});
    fill_normal(std::span<float>(x.data(), x.size()), RandomStream{7, k});
    CHECK(same_values(layer.forward(x), reference.forward(x)));
    Tensor4<float> dy = xt::zeros<float>(std::array<std::size_t, 4>{2, 7, 6, 9});
    fill_normal(std::span<float>(dy.data(), dy.size()), RandomStream{8, k});
    CHECK(same_values(layer.backward(dy), reference.backward(dy)));
  }
}

TEST_CASE("bf16 weight storage: refused for trainable weights; frozen layers keep no input",
          "[nn][bf16]") {
  nn::Linear<float> trainable(4, 3);
  CHECK_THROWS_AS(trainable.store_weight_bf16(), Error);
  CHECK_FALSE(trainable.weight_in_bf16());

  // A frozen Linear/Conv2d keeps no input; unfreezing before backward is a named error.
  nn::Linear<float> linear(4, 3);
  fill_layer(linear, 9);
  linear.weight.set_trainable(false);
  const Tensor<float, 2> x = xt::ones<float>(std::array<std::size_t, 2>{2, 4});
  (void)linear.forward(x);
  linear.weight.set_trainable(true);
  const Tensor<float, 2> dy = xt::ones<float>(std::array<std::size_t, 2>{2, 3});
  CHECK_THROWS_WITH(linear.backward(dy), Catch::Contains("frozen during the forward"));

  nn::Conv2d<float> conv(nn::Conv2dConfig{2, 3, 3, 1, nn::Padding2d::same(1), true});
  conv.weight.set_trainable(false);
  const Tensor4<float> image = xt::ones<float>(std::array<std::size_t, 4>{1, 2, 4, 4});
  (void)conv.forward(image);
  conv.weight.set_trainable(true);
  const Tensor4<float> dimage = xt::ones<float>(std::array<std::size_t, 4>{1, 3, 4, 4});
  CHECK_THROWS_WITH(conv.backward(dimage), Catch::Contains("frozen during the forward"));

  CHECK(nn::parse_mixed_precision("no") == false);
  CHECK(nn::parse_mixed_precision("bf16") == true);
  CHECK_THROWS_WITH(nn::parse_mixed_precision("fp16"), Catch::Contains("use bf16"));
}

TEST_CASE("FrozenConstruction: parameters created in its scope start frozen", "[nn][bf16]") {
  {
    const nn::FrozenConstruction frozen;
    nn::Linear<float> layer(4, 3);
    CHECK_FALSE(layer.weight.trainable);
    CHECK(layer.weight.grad.size() == 0);
  }
  nn::Linear<float> after(4, 3);
  CHECK(after.weight.trainable);
  CHECK(after.weight.grad.size() == 12);
}
