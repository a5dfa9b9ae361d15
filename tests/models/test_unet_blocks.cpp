// Gradient checks (double, fourth-order central differences) of every UNet block on its own:
// ResnetBlock2D, Transformer2DModel (1×1-conv and Linear projections, heads that do not divide
// the channels), Downsample2D (padding 1 and 0), Upsample2D (2× and to an odd size), and the
// down / mid / up blocks with their temb, context and skip-connection gradients.

#include <catch2/catch.hpp>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "difftrain/models/models.hpp"
#include "difftrain/nn/gradcheck.hpp"
#include "single_threaded.hpp"

using namespace difftrain;
using namespace difftrain::models;

namespace {

std::mt19937_64& rng() {
  static std::mt19937_64 generator(99);
  return generator;
}

template <class Tensor>
Tensor random_tensor(const typename Tensor::shape_type& shape, double stddev = 1.0) {
  Tensor t(shape);
  std::normal_distribution<double> normal(0.0, stddev);
  for (auto& v : t) v = normal(rng());
  return t;
}

// weights ~ N(0, 1/fan_in); 1-D parameters ~ N(0, 0.1²), norm gains around 1
template <class M>
void randomize(M& module) {
  module.for_each_parameter("", [](const std::string& name, nn::Parameter<double>& p) {
    const double stddev =
        p.value.dimension() == 1
            ? 0.1
            : 1.0 / std::sqrt(static_cast<double>(p.value.size() / p.value.shape()[0]));
    std::normal_distribution<double> normal(0.0, stddev);
    for (auto& v : p.value) v = normal(rng());
    if (p.value.dimension() == 1 && name.find("norm") != std::string::npos &&
        name.ends_with("weight"))
      p.value += 1.0;
  });
}

template <class A, class B>
double dot(const A& a, const B& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a.data()[i] * b.data()[i];
  return s;
}

nn::GradCheckOptions options() {
  nn::GradCheckOptions o;
  o.step = 1e-4;
  o.floor = 1e-4;
  o.max_checks = 6;
  return o;
}

// Checks an input's analytic gradient and every parameter of the module against loss().
template <class Values, class Grad, class Loss>
void check_input(const char* what, Values& values, const Grad& grad, Loss&& loss) {
  const auto r = nn::check_gradient(values, grad, loss, options());
  INFO(what << ": " << r.message);
  CHECK(r.max_error <= 1e-6);
}
template <class M, class Loss>
void check_parameters(M& module, Loss&& loss) {
  std::size_t count = 0;
  module.for_each_parameter("", [&](const std::string& name, nn::Parameter<double>& p) {
    const auto r = nn::check_gradient(p, loss, options());
    INFO(name << ": " << r.message);
    CHECK(r.max_error <= 1e-6);
    ++count;
  });
  CHECK(count > 0);
}

using Shape4 = std::array<std::size_t, 4>;
using Shape3 = std::array<std::size_t, 3>;
using Shape2 = std::array<std::size_t, 2>;

}  // namespace

TEST_CASE("ResnetBlock2D gradients (conv shortcut, output scale factor)", "[models][blocks]") {
  const test::SingleThreaded single_threaded;
  for (std::size_t out : {6, 4}) {  // 4 → 6 has a conv_shortcut, 4 → 4 the identity
    ResnetBlock2DConfig c{4, out, 5, 2, 1e-5, out == 4 ? 2.0 : 1.0};
    ResnetBlock2D<double> block(c);
    randomize(block);
    auto x = random_tensor<Tensor4<double>>(Shape4{2, 4, 5, 3});
    auto temb = random_tensor<Tensor<double, 2>>(Shape2{2, 5});
    const auto w = random_tensor<Tensor4<double>>(Shape4{2, out, 5, 3});
    block.forward(x, temb);
    Tensor<double, 2> dtemb = xt::zeros<double>(Shape2{2, 5});
    const Tensor4<double> dx = block.backward(w, dtemb);
    auto loss = [&] { return dot(block.forward(x, temb), w); };
    check_input("x", x, dx, loss);
    check_input("temb", temb, dtemb, loss);
    check_parameters(block, loss);
  }
}

TEST_CASE("Transformer2DModel gradients (conv and linear projections)", "[models][blocks]") {
  const test::SingleThreaded single_threaded;
  struct Case {
    std::size_t heads;
    bool linear;
  };
  // 6 channels: 3 heads of 2; 4 heads of 1 (inner dim 4 ≠ 6, diffusers' integer division)
  for (Case k : {Case{3, false}, Case{3, true}, Case{4, false}}) {
    INFO("heads " << k.heads << ", linear " << k.linear);
    Transformer2DModelConfig c{6, k.heads, 6 / k.heads, 2, 4, 3, k.linear};
    Transformer2DModel<double> block(c);
    randomize(block);
    auto x = random_tensor<Tensor4<double>>(Shape4{2, 6, 3, 2});
    auto context = random_tensor<Tensor3<double>>(Shape3{2, 5, 4});
    const auto w = random_tensor<Tensor4<double>>(Shape4{2, 6, 3, 2});
    block.forward(x, context);
    Tensor3<double> dcontext = xt::zeros<double>(Shape3{2, 5, 4});
    const Tensor4<double> dx = block.backward(w, dcontext);
    auto loss = [&] { return dot(block.forward(x, context), w); };
    check_input("x", x, dx, loss);
    check_input("context", context, dcontext, loss);
    check_parameters(block, loss);
  }
}

TEST_CASE("Downsample2D and Upsample2D gradients", "[models][blocks]") {
  const test::SingleThreaded single_threaded;
  for (std::size_t padding : {1, 0}) {
    Downsample2D<double> down(Downsample2DConfig{3, padding});
    randomize(down);
    auto x = random_tensor<Tensor4<double>>(Shape4{2, 3, 5, 4});
    const Tensor4<double> y = down.forward(x);
    // padding 1: ⌈H/2⌉; padding 0 (pad right/bottom by 1): ⌊(H − 2)/2⌋ + 1
    CHECK(y.shape() == (padding == 1 ? Shape4{2, 3, 3, 2} : Shape4{2, 3, 2, 2}));
    const auto w = random_tensor<Tensor4<double>>(y.shape());
    const Tensor4<double> dx = down.backward(w);
    auto loss = [&] { return dot(down.forward(x), w); };
    check_input("x", x, dx, loss);
    check_parameters(down, loss);
  }
  Upsample2D<double> up(Upsample2DConfig{3});
  randomize(up);
  auto x = random_tensor<Tensor4<double>>(Shape4{2, 3, 3, 2});
  for (auto [h, w_] : {std::pair<std::size_t, std::size_t>{6, 4}, {5, 3}}) {
    nn::zero_grad<double>(up);  // backward accumulates: start each size from zero
    const auto w = random_tensor<Tensor4<double>>(Shape4{2, 3, h, w_});
    up.forward(x, h, w_);
    const Tensor4<double> dx = up.backward(w);
    auto loss = [&] { return dot(up.forward(x, h, w_), w); };
    check_input("x", x, dx, loss);
    check_parameters(up, loss);
  }
}

TEST_CASE("UNetDownBlock2D, UNetMidBlock2DCrossAttn, UNetUpBlock2D gradients", "[models][blocks]") {
  const test::SingleThreaded single_threaded;
  const BlockAttentionConfig attention{2, 1, 3, false};
  Tensor<double, 2> temb = random_tensor<Tensor<double, 2>>(Shape2{2, 5});
  Tensor3<double> context = random_tensor<Tensor3<double>>(Shape3{2, 2, 3});

  SECTION("down block: the loss sees every output state") {
    UNetDownBlock2DConfig c;
    c.type = DownBlockType::CrossAttnDownBlock2D;
    c.in_channels = 2;
    c.out_channels = 4;
    c.temb_channels = 5;
    c.num_layers = 2;
    c.groups = 2;
    c.attention = attention;
    UNetDownBlock2D<double> block(c);
    randomize(block);
    auto x = random_tensor<Tensor4<double>>(Shape4{2, 2, 4, 3});
    const auto states = block.forward(x, temb, context);
    REQUIRE(states.size() == 3);
    std::vector<Tensor4<double>> w;
    for (const auto& s : states) w.push_back(random_tensor<Tensor4<double>>(s.shape()));
    Tensor<double, 2> dtemb = xt::zeros<double>(temb.shape());
    Tensor3<double> dcontext = xt::zeros<double>(context.shape());
    const Tensor4<double> dx = block.backward(w, dtemb, dcontext);
    auto loss = [&] {
      const auto s = block.forward(x, temb, context);
      double total = 0;
      for (std::size_t k = 0; k < s.size(); ++k) total += dot(s[k], w[k]);
      return total;
    };
    check_input("x", x, dx, loss);
    check_input("temb", temb, dtemb, loss);
    check_input("context", context, dcontext, loss);
    check_parameters(block, loss);
  }
  SECTION("mid block with output scale factor") {
    UNetMidBlock2DCrossAttnConfig c{4, 5, 1, 2, 1e-5, 1.5, attention};
    UNetMidBlock2DCrossAttn<double> block(c);
    randomize(block);
    auto x = random_tensor<Tensor4<double>>(Shape4{2, 4, 3, 3});
    const auto w = random_tensor<Tensor4<double>>(Shape4{2, 4, 3, 3});
    block.forward(x, temb, context);
    Tensor<double, 2> dtemb = xt::zeros<double>(temb.shape());
    Tensor3<double> dcontext = xt::zeros<double>(context.shape());
    const Tensor4<double> dx = block.backward(w, dtemb, dcontext);
    auto loss = [&] { return dot(block.forward(x, temb, context), w); };
    check_input("x", x, dx, loss);
    check_input("temb", temb, dtemb, loss);
    check_input("context", context, dcontext, loss);
    check_parameters(block, loss);
  }
  SECTION("up block: skips consumed last-in first-out, upsampling to the skip's size") {
    UNetUpBlock2DConfig c;
    c.type = UpBlockType::CrossAttnUpBlock2D;
    c.in_channels = 2;           // skip of the last stage
    c.prev_output_channels = 6;  // input width
    c.out_channels = 4;
    c.temb_channels = 5;
    c.num_layers = 3;
    c.groups = 2;
    c.attention = attention;
    UNetUpBlock2D<double> block(c);
    randomize(block);
    auto x = random_tensor<Tensor4<double>>(Shape4{2, 6, 2, 2});
    // skips in down-path order: the last one (4 channels) meets the first resnet
    std::vector<Tensor4<double>> skips = {random_tensor<Tensor4<double>>(Shape4{2, 2, 2, 2}),
                                          random_tensor<Tensor4<double>>(Shape4{2, 4, 2, 2}),
                                          random_tensor<Tensor4<double>>(Shape4{2, 4, 2, 2})};
    const std::pair<std::size_t, std::size_t> size{3, 4};
    const auto w = random_tensor<Tensor4<double>>(Shape4{2, 4, 3, 4});
    block.forward(x, skips, temb, context, size);
    Tensor<double, 2> dtemb = xt::zeros<double>(temb.shape());
    Tensor3<double> dcontext = xt::zeros<double>(context.shape());
    const UpBlockGrads<double> g = block.backward(w, dtemb, dcontext);
    auto loss = [&] { return dot(block.forward(x, skips, temb, context, size), w); };
    check_input("x", x, g.x, loss);
    REQUIRE(g.skips.size() == 3);
    for (std::size_t k = 0; k < 3; ++k) {
      INFO("skip " << k);
      check_input("skip", skips[k], g.skips[k], loss);
    }
    check_input("temb", temb, dtemb, loss);
    check_input("context", context, dcontext, loss);
    check_parameters(block, loss);
  }
}
