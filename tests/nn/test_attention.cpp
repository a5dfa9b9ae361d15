// Attention (diffusers' Attention): forward against a naive per-element reference, one key gives
// to_out(v) exactly, gradient checks in double for x, context and every projection parameter
// (self and cross, odd shapes, more query rows than one score block), frozen projections,
// accumulation, parameter and module names, float vs double, errors.
#include <catch2/catch.hpp>
#include <cmath>
#include <string>
#include <vector>

#include "difftrain/nn/attention.hpp"
#include "difftrain/nn/gradcheck.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::nn;

static_assert(Module<Attention<float>>);
static_assert(Module<Attention<double>>);
// What lora::HasLoraSlots asks of a model (restated: nn tests do not include lora).
template <class M>
concept HasSlots = requires(M& m) {
  m.for_each_slot(std::string{}, [](const std::string&, auto&) {});
};
// Plain Linear projections are not LoRA slots.
static_assert(!HasSlots<Attention<float>>);

namespace {

template <class T>
void randomize(Attention<T>& attn, std::uint64_t seed) {
  std::uint64_t stream = 0;
  attn.for_each_parameter("", [&](const std::string&, Parameter<T>& p) {
    fill_random_normal(p.value, RandomStream{seed, stream++}, 0.5);
  });
}

// y = x Wᵀ + b, element by element
std::vector<double> naive_linear(const std::vector<double>& x, std::size_t rows,
                                 const Linear<double>& lin) {
  const std::size_t I = lin.in_features(), O = lin.out_features();
  std::vector<double> y(rows * O);
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t o = 0; o < O; ++o) {
      double sum = lin.has_bias() ? lin.bias.value(o) : 0.0;
      for (std::size_t i = 0; i < I; ++i) sum += x[r * I + i] * lin.weight.value(o, i);
      y[r * O + o] = sum;
    }
  return y;
}

// diffusers' Attention, written out per element with exp/sum (no shared softmax code).
Tensor3<double> naive_attention(const Attention<double>& attn, const Tensor3<double>& x,
                                const Tensor3<double>& c) {
  const std::size_t B = x.shape()[0], L = x.shape()[1], Lc = c.shape()[1];
  const std::size_t Hn = attn.config.heads, Hd = attn.config.dim_head, I = Hn * Hd;
  std::vector<double> xs(x.begin(), x.end()), cs(c.begin(), c.end());
  auto q = naive_linear(xs, B * L, attn.to_q);
  auto k = naive_linear(cs, B * Lc, attn.to_k);
  auto v = naive_linear(cs, B * Lc, attn.to_v);
  std::vector<double> o(B * L * I, 0.0);
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t h = 0; h < Hn; ++h)
      for (std::size_t i = 0; i < L; ++i) {
        std::vector<double> s(Lc);
        double sum = 0;
        for (std::size_t j = 0; j < Lc; ++j) {
          double dot = 0;
          for (std::size_t d = 0; d < Hd; ++d)
            dot += q[(b * L + i) * I + h * Hd + d] * k[(b * Lc + j) * I + h * Hd + d];
          s[j] = std::exp(dot / std::sqrt(double(Hd)));
          sum += s[j];
        }
        for (std::size_t j = 0; j < Lc; ++j)
          for (std::size_t d = 0; d < Hd; ++d)
            o[(b * L + i) * I + h * Hd + d] += s[j] / sum * v[(b * Lc + j) * I + h * Hd + d];
      }
  auto y = naive_linear(o, B * L, attn.to_out);
  Tensor3<double> out({B, L, attn.config.query_dim});
  std::copy(y.begin(), y.end(), out.begin());
  return out;
}

// A projection wrapper with the tensor API of a LoRA slot: holds a Linear (base()), counts its
// forwards, and reports itself as a slot.
template <class T>
class WrappedLinear {
 public:
  WrappedLinear() = default;
  explicit WrappedLinear(Linear<T> layer) : layer_(std::move(layer)) {}
  Linear<T>& base() { return layer_; }
  const Linear<T>& base() const { return layer_; }
  int forwards = 0;

  template <class X>
  X forward(const X& x) {
    ++forwards;
    return layer_.forward(x);
  }
  template <class X>
  X forward_inference(const X& x) const {
    return layer_.forward_inference(x);
  }
  template <class X>
  X backward(const X& dy, bool input_grad = true) {
    return layer_.backward(dy, input_grad);
  }
  template <class V>
  void for_each_parameter(const std::string& prefix, V&& visit) {
    layer_.for_each_parameter(prefix, visit);
  }
  template <class V>
  void for_each_parameter(const std::string& prefix, V&& visit) const {
    layer_.for_each_parameter(prefix, visit);
  }
  template <class V>
  void for_each_slot(const std::string& prefix, V&& visit) {
    visit(prefix, *this);
  }

 private:
  Linear<T> layer_;
};

// Slot-like projections make the attention expose its slots.
static_assert(HasSlots<Attention<float, WrappedLinear<float>>>);

struct Sizes {
  std::size_t B, L, Lc, Dq, Dc, heads, dim_head;
};

void check_all_gradients(Attention<double>& attn, const Tensor3<double>& x0,
                         const Tensor3<double>& c0, bool self, std::uint64_t seed,
                         std::size_t max_checks = 0) {
  Tensor3<double> x = x0, c = c0;
  auto y = self ? attn.forward(x) : attn.forward(x, c);
  Tensor3<double> w(y.shape());
  fill_random_normal(w, RandomStream{seed, 99});
  zero_grad<double>(attn);
  auto grads = attn.backward(w);
  auto loss = [&] {
    return weighted_sum(self ? attn.forward_inference(x) : attn.forward_inference(x, c), w);
  };
  GradCheckOptions options;
  options.max_checks = max_checks;
  auto rx = check_gradient(x, grads.x, loss, options);
  INFO("x: " << rx.message);
  REQUIRE(rx.max_error <= 1e-6);
  if (!self) {
    REQUIRE(grads.context.shape() == c.shape());
    auto rc = check_gradient(c, grads.context, loss, options);
    INFO("context: " << rc.message);
    REQUIRE(rc.max_error <= 1e-6);
  } else {
    REQUIRE(grads.context.size() == 0);
  }
  attn.for_each_parameter("", [&](const std::string& name, Parameter<double>& p) {
    auto r = check_gradient(p, loss, options);
    INFO(name << ": " << r.message);
    REQUIRE(r.max_error <= 1e-6);
  });
}

}  // namespace

TEST_CASE("Attention forward matches a naive per-element reference", "[nn][attention]") {
  for (const Sizes s : {Sizes{2, 7, 4, 6, 4, 3, 5}, Sizes{1, 5, 5, 8, 0, 2, 4},
                        Sizes{2, 131, 33, 4, 5, 2, 3}, Sizes{1, 1, 1, 3, 2, 1, 1}}) {
    INFO("B " << s.B << " L " << s.L << " Lc " << s.Lc << " heads " << s.heads << "x"
              << s.dim_head);
    Attention<double> attn(AttentionConfig{s.Dq, s.Dc, s.heads, s.dim_head});
    randomize(attn, 51 + s.L);
    Tensor3<double> x({s.B, s.L, s.Dq});
    fill_random_normal(x, RandomStream{52, s.L});
    if (s.Dc == 0) {
      REQUIRE_CLOSE(attn.forward(x), naive_attention(attn, x, x), 1e-12, 1e-13);
      REQUIRE_CLOSE(attn.forward_inference(x), naive_attention(attn, x, x), 1e-12, 1e-13);
    } else {
      Tensor3<double> c({s.B, s.Lc, s.Dc});
      fill_random_normal(c, RandomStream{53, s.L});
      REQUIRE_CLOSE(attn.forward(x, c), naive_attention(attn, x, c), 1e-12, 1e-13);
    }
  }
}

TEST_CASE("Attention with one key returns to_out(v)", "[nn][attention]") {
  // softmax over a single key is exactly 1, so every query reads v = to_v(context).
  Attention<double> attn(AttentionConfig{6, 5, 3, 2});
  randomize(attn, 54);
  Tensor3<double> x({2, 4, 6}), c({2, 1, 5});
  fill_random_normal(x, RandomStream{55, 0}, 10.0);  // large logits change nothing
  fill_random_normal(c, RandomStream{55, 1});
  auto y = attn.forward(x, c);
  auto v = attn.to_v.forward_inference(c);  // [2, 1, 6]
  Tensor3<double> o({2, 4, 6});
  for (std::size_t b = 0; b < 2; ++b)
    for (std::size_t i = 0; i < 4; ++i)
      for (std::size_t d = 0; d < 6; ++d) o(b, i, d) = v(b, 0, d);
  REQUIRE_CLOSE(y, attn.to_out.forward_inference(o), 0, 1e-15);
}

TEST_CASE("Attention gradients pass central-difference checks (cross, odd shapes)",
          "[nn][attention]") {
  // 3 heads of size 5, L = 7, L_ctx = 4, query_dim 6, cross_attention_dim 4
  Attention<double> attn(AttentionConfig{6, 4, 3, 5});
  randomize(attn, 61);
  Tensor3<double> x({2, 7, 6}), c({2, 4, 4});
  fill_random_normal(x, RandomStream{62, 0});
  fill_random_normal(c, RandomStream{62, 1});
  check_all_gradients(attn, x, c, false, 63);
}

TEST_CASE("Attention gradients pass central-difference checks (self)", "[nn][attention]") {
  Attention<double> attn(AttentionConfig{5, 0, 2, 3});
  randomize(attn, 64);
  Tensor3<double> x({3, 5, 5});
  fill_random_normal(x, RandomStream{65, 0});
  check_all_gradients(attn, x, x, true, 66);
}

TEST_CASE("Attention gradients span several query blocks and threads", "[nn][attention]") {
  // L = 131 > kQueryBlock: dK and dV accumulate over two blocks; the work is above the OpenMP
  // threshold, so (b, h) jobs run on several threads. A strided subset is checked.
  static_assert(kQueryBlock < 131);
  const AttentionShape shape{2, 131, 33, 2, 4};
  REQUIRE(shape.work() >= parallel::kAttentionWork);
  Attention<double> attn(AttentionConfig{8, 6, 2, 4});
  randomize(attn, 67);
  Tensor3<double> x({2, 131, 8}), c({2, 33, 6});
  fill_random_normal(x, RandomStream{68, 0});
  fill_random_normal(c, RandomStream{68, 1});
  check_all_gradients(attn, x, c, false, 69, 6);
}

TEST_CASE("Attention skips frozen projections and accumulates into trainable ones",
          "[nn][attention]") {
  Attention<double> attn(AttentionConfig{6, 4, 3, 5});
  randomize(attn, 71);
  attn.to_k.weight.set_trainable(false);
  attn.to_out.bias.set_trainable(false);
  Tensor3<double> x({2, 7, 6}), c({2, 4, 4});
  fill_random_normal(x, RandomStream{72, 0});
  fill_random_normal(c, RandomStream{72, 1});
  auto y = attn.forward(x, c);
  Tensor3<double> w(y.shape());
  fill_random_normal(w, RandomStream{72, 2});
  auto grads = attn.backward(w);
  // A frozen parameter's grad stays the empty (0-d) array: nothing was computed into it.
  REQUIRE(attn.to_k.weight.grad.size() == 0);
  REQUIRE(attn.to_out.bias.grad.size() == 0);
  // The gradients that flow through the frozen projections are still right.
  auto loss = [&] { return weighted_sum(attn.forward_inference(x, c), w); };
  auto rc = check_gradient(c, grads.context, loss);
  INFO(rc.message);
  REQUIRE(rc.max_error <= 1e-6);
  auto rq = check_gradient(attn.to_q.weight, loss);
  INFO(rq.message);
  REQUIRE(rq.max_error <= 1e-6);

  // A second backward of the same forward adds the same gradient again.
  const xt::xarray<double> once = attn.to_v.weight.grad;
  attn.backward(w, false);
  REQUIRE_CLOSE(attn.to_v.weight.grad, xt::xarray<double>(2.0 * once), 1e-14, 1e-15);

  // Freezing everything: backward still returns input gradients.
  set_trainable<double>(attn, false);
  auto frozen = attn.backward(w);
  REQUIRE_CLOSE(frozen.x, grads.x, 1e-14, 1e-15);
  REQUIRE(frozen.context.shape() == c.shape());
  // ... and the context gradient can be skipped (e.g. for a frozen text encoder)
  REQUIRE(attn.backward(w, false).context.size() == 0);
}

TEST_CASE("Attention names its parameters and projections as diffusers does", "[nn][attention]") {
  Attention<float> attn(AttentionConfig{8, 12, 2, 4});
  std::vector<std::string> names;
  std::vector<std::vector<std::size_t>> shapes;
  attn.for_each_parameter("attn2", [&](const std::string& n, Parameter<float>& p) {
    names.push_back(n);
    shapes.emplace_back(p.value.shape().begin(), p.value.shape().end());
  });
  REQUIRE(names == std::vector<std::string>{"attn2.to_q.weight", "attn2.to_k.weight",
                                            "attn2.to_v.weight", "attn2.to_out.0.weight",
                                            "attn2.to_out.0.bias"});
  using S = std::vector<std::size_t>;
  REQUIRE(shapes == std::vector<S>{S{8, 8}, S{8, 12}, S{8, 12}, S{8, 8}, S{8}});
  std::vector<std::string> modules;
  std::vector<const Linear<float>*> linears;
  attn.for_each_linear("attn2", [&](const std::string& n, Linear<float>& lin) {
    modules.push_back(n);
    linears.push_back(&lin);
  });
  REQUIRE(modules ==
          std::vector<std::string>{"attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"});
  REQUIRE(linears ==
          std::vector<const Linear<float>*>{&attn.to_q, &attn.to_k, &attn.to_v, &attn.to_out});
  REQUIRE(attn.scale() == Approx(0.5f));
}

TEST_CASE("Attention over wrapped projections (the LoRA-slot shape) behaves the same",
          "[nn][attention]") {
  Attention<double> plain(AttentionConfig{6, 4, 3, 5});
  randomize(plain, 75);
  Attention<double, WrappedLinear<double>> wrapped(AttentionConfig{6, 4, 3, 5});
  load_state_dict<double>(wrapped, state_dict<double>(plain));
  Tensor3<double> x({2, 7, 6}), c({2, 4, 4}), w({2, 7, 6});
  fill_random_normal(x, RandomStream{76, 0});
  fill_random_normal(c, RandomStream{76, 1});
  fill_random_normal(w, RandomStream{76, 2});
  REQUIRE_CLOSE(wrapped.forward(x, c), plain.forward(x, c), 0, 0);
  auto gw = wrapped.backward(w);
  auto gp = plain.backward(w);
  REQUIRE_CLOSE(gw.x, gp.x, 0, 0);
  REQUIRE_CLOSE(gw.context, gp.context, 0, 0);
  REQUIRE_CLOSE(wrapped.to_v.base().weight.grad, plain.to_v.weight.grad, 0, 0);

  std::vector<std::string> slots;
  wrapped.for_each_slot("attn2", [&](const std::string& name, WrappedLinear<double>& slot) {
    slots.push_back(name);
    REQUIRE(slot.forwards == 1);
  });
  REQUIRE(slots ==
          std::vector<std::string>{"attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"});
  std::vector<const Linear<double>*> bases;
  wrapped.for_each_linear("",
                          [&](const std::string&, Linear<double>& lin) { bases.push_back(&lin); });
  REQUIRE(bases == std::vector<const Linear<double>*>{&wrapped.to_q.base(), &wrapped.to_k.base(),
                                                      &wrapped.to_v.base(),
                                                      &wrapped.to_out.base()});
  wrapped.clear_saved();
  REQUIRE_THROWS_AS(wrapped.backward(w), Error);
}

TEST_CASE("Attention in float agrees with double", "[nn][attention]") {
  Attention<double> ad(AttentionConfig{16, 12, 4, 4});
  randomize(ad, 81);
  Attention<float> af(AttentionConfig{16, 12, 4, 4});
  auto state = state_dict<double>(ad);
  std::map<std::string, xt::xarray<float>> state_f;
  for (auto& [name, value] : state) state_f[name] = xt::cast<float>(value);
  load_state_dict<float>(af, state_f);
  Tensor3<double> xd({2, 9, 16}), cd({2, 5, 12}), wd({2, 9, 16});
  fill_random_normal(xd, RandomStream{82, 0});
  fill_random_normal(cd, RandomStream{82, 1});
  fill_random_normal(wd, RandomStream{82, 2});
  Tensor3<float> xf = xt::cast<float>(xd), cf = xt::cast<float>(cd), wf = xt::cast<float>(wd);
  // Sums of ~16-64 products of O(1) terms in float: relative error a few 1e-7, so 2e-5 on
  // values and gradients (relative to the largest magnitude, via atol) leaves a wide margin.
  auto yd = ad.forward(xd, cd);
  auto yf = af.forward(xf, cf);
  const double ymax = xt::amax(xt::abs(yd))();
  REQUIRE_CLOSE(yf, yd, 1e-5, 2e-5 * ymax);
  auto gd = ad.backward(wd);
  auto gf = af.backward(wf);
  REQUIRE_CLOSE(gf.x, gd.x, 1e-5, 2e-5 * xt::amax(xt::abs(gd.x))());
  REQUIRE_CLOSE(gf.context, gd.context, 1e-5, 2e-5 * xt::amax(xt::abs(gd.context))());
  REQUIRE_CLOSE(af.to_k.weight.grad, ad.to_k.weight.grad, 1e-5,
                2e-5 * xt::amax(xt::abs(ad.to_k.weight.grad))());
}

TEST_CASE("Attention rejects bad shapes and a backward without forward", "[nn][attention]") {
  Attention<float> cross(AttentionConfig{6, 4, 3, 2});
  Tensor3<float> x({2, 3, 6}), c({2, 5, 4}), wrong_c({2, 5, 6}), wrong_b({1, 5, 4});
  x.fill(0.1f);
  c.fill(0.2f);
  wrong_c.fill(0);
  wrong_b.fill(0);
  REQUIRE_THROWS_WITH(cross.backward(x), Catch::Contains("Attention::backward: no saved forward"));
  REQUIRE_THROWS_WITH(cross.forward(x), Catch::Contains("cross_attention_dim 4 differs from "
                                                        "query_dim 6"));
  REQUIRE_THROWS_WITH(cross.forward(x, wrong_c),
                      Catch::Contains("context has shape [2,5,6], expected [2,5,4]"));
  REQUIRE_THROWS_AS(cross.forward(x, wrong_b), Error);
  Tensor3<float> bad_x({2, 3, 5});
  REQUIRE_THROWS_WITH(cross.forward(bad_x, c),
                      Catch::Contains("Attention::forward: x has shape [2,3,5], expected [2,3,6]"));
  Tensor3<float> no_keys({2, 0, 4});
  REQUIRE_THROWS_WITH(cross.forward(x, no_keys), Catch::Contains("at least one token"));
  cross.forward(x, c);
  REQUIRE_THROWS_WITH(cross.backward(c), Catch::Contains("dy has shape [2,5,4], expected [2,3,6]"));
  REQUIRE_THROWS_AS(Attention<float>(AttentionConfig{6, 0, 0, 2}), Error);
}
