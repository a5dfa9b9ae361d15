// Token and position embeddings: gather forward by hand, scatter-add backward with repeated ids,
// gradient checks in double, accumulation, frozen weight, parameter names, range errors.
#include <catch2/catch.hpp>
#include <map>
#include <string>

#include "difftrain/nn/embedding.hpp"
#include "difftrain/nn/gradcheck.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::nn;

static_assert(Module<Embedding<float>>);
static_assert(Module<PositionEmbedding<double>>);

TEMPLATE_TEST_CASE("Embedding gathers rows and scatter-adds gradients", "[nn][embedding]", float,
                   double) {
  Embedding<TestType> emb(EmbeddingConfig{4, 3});
  // weight row v = [10v, 10v + 1, 10v + 2]
  for (std::size_t v = 0; v < 4; ++v)
    for (std::size_t d = 0; d < 3; ++d) emb.weight.value(v, d) = TestType(10 * v + d);
  Tensor<std::int64_t, 2> ids = {{2, 0}, {2, 3}};
  auto y = emb.forward(ids);
  REQUIRE(y.shape() == std::array<std::size_t, 3>{2, 2, 3});
  std::vector<double> expected = {20, 21, 22, 0, 1, 2, 20, 21, 22, 30, 31, 32};
  REQUIRE_CLOSE(y, expected, 0, 0);

  Tensor3<TestType> dy(y.shape());
  for (std::size_t i = 0; i < dy.size(); ++i) dy.data()[i] = TestType(i + 1);
  emb.backward(dy);
  // row 2 is read twice: (1,2,3) + (7,8,9); row 0 gets (4,5,6), row 3 (10,11,12), row 1 nothing
  std::vector<double> expected_grad = {4, 5, 6, 0, 0, 0, 8, 10, 12, 10, 11, 12};
  REQUIRE_CLOSE(emb.weight.grad, expected_grad, 0, 0);
  emb.backward(dy);  // accumulates
  for (auto& g : expected_grad) g *= 2;
  REQUIRE_CLOSE(emb.weight.grad, expected_grad, 0, 0);
}

TEST_CASE("Embedding weight gradient passes a central-difference check", "[nn][embedding]") {
  Embedding<double> emb(EmbeddingConfig{7, 5});
  fill_random_normal(emb.weight.value, RandomStream{41, 0});
  Tensor<std::int64_t, 2> ids = {{6, 1, 1, 0}, {3, 6, 2, 1}, {0, 0, 5, 4}};
  Tensor3<double> w({3, 4, 5});
  fill_random_normal(w, RandomStream{41, 1});
  emb.forward(ids);
  emb.backward(w);
  auto r = check_gradient(emb.weight, [&] { return weighted_sum(emb.forward(ids), w); });
  INFO(r.message);
  REQUIRE(r.max_error <= 1e-6);
}

TEST_CASE("Embedding names its weight, loads state, and skips a frozen weight", "[nn][embedding]") {
  Embedding<float> emb(EmbeddingConfig{5, 2});
  auto named = named_parameters<float>(emb);
  REQUIRE(named.size() == 1);
  std::vector<std::string> names;
  emb.for_each_parameter("text_model.embeddings.token_embedding",
                         [&](const std::string& n, Parameter<float>&) { names.push_back(n); });
  REQUIRE(names == std::vector<std::string>{"text_model.embeddings.token_embedding.weight"});

  std::map<std::string, xt::xarray<float>> state;
  state["weight"] = xt::arange<float>(10).reshape({5, 2});
  load_state_dict<float>(emb, state);
  Tensor<std::int64_t, 2> ids = {{4}};
  auto y = emb.forward(ids);
  REQUIRE(y(0, 0, 0) == 8.0f);
  REQUIRE(y(0, 0, 1) == 9.0f);

  emb.weight.set_trainable(false);
  REQUIRE(emb.weight.grad.size() == 0);  // the empty (0-d) gradient of a frozen parameter
  Tensor3<float> dy({1, 1, 2});
  dy.fill(1);
  REQUIRE_NOTHROW(emb.backward(dy));
  REQUIRE(emb.weight.grad.size() == 0);
}

TEST_CASE("Embedding rejects out-of-range ids and misshapen gradients", "[nn][embedding]") {
  Embedding<float> emb(EmbeddingConfig{5, 2});
  Tensor<std::int64_t, 2> too_big = {{0, 1}, {5, 2}};
  Tensor<std::int64_t, 2> negative = {{-1}};
  REQUIRE_THROWS_WITH(emb.forward(too_big),
                      Catch::Contains("Embedding::forward: ids[1,0] is 5, expected in [0, 5)"));
  REQUIRE_THROWS_AS(emb.forward(negative), Error);
  Tensor<std::int64_t, 2> ok = {{1, 2}};
  emb.forward(ok);
  Tensor3<float> wrong({1, 3, 2});
  wrong.fill(0);
  REQUIRE_THROWS_WITH(emb.backward(wrong), Catch::Contains("dy has shape [1,3,2]"));
  REQUIRE_THROWS_AS(Embedding<float>(EmbeddingConfig{0, 4}), Error);
}

TEST_CASE("PositionEmbedding returns the first L rows and sums gradients over the batch",
          "[nn][embedding]") {
  PositionEmbedding<double> pos(EmbeddingConfig{6, 3});
  fill_random_normal(pos.weight.value, RandomStream{42, 0});
  auto y = pos.forward(4);
  REQUIRE(y.shape() == std::array<std::size_t, 2>{4, 3});
  for (std::size_t l = 0; l < 4; ++l)
    for (std::size_t d = 0; d < 3; ++d) REQUIRE(y(l, d) == pos.weight.value(l, d));

  // Broadcast over a batch of 2: L = Σ_b Σ w[b] ⊙ pos(4)
  Tensor3<double> w({2, 4, 3});
  fill_random_normal(w, RandomStream{42, 1});
  pos.backward(w);
  auto loss = [&] {
    auto p = pos.forward(4);
    double sum = 0;
    for (std::size_t b = 0; b < 2; ++b)
      for (std::size_t i = 0; i < p.size(); ++i) sum += p.data()[i] * w.data()[b * p.size() + i];
    return sum;
  };
  auto r = check_gradient(pos.weight, loss);
  INFO(r.message);
  REQUIRE(r.max_error <= 1e-6);
  for (std::size_t d = 0; d < 3; ++d) REQUIRE(pos.weight.grad(5, d) == 0.0);  // unused rows

  // The [L, D] form accumulates on top.
  Tensor<double, 2> w2({4, 3});
  w2.fill(1.0);
  const double before = pos.weight.grad(0, 0);
  pos.backward(w2);
  REQUIRE(pos.weight.grad(0, 0) == Approx(before + 1.0));

  REQUIRE_THROWS_WITH(pos.forward(7), Catch::Contains("PositionEmbedding::forward: length is 7, "
                                                      "expected at most num_embeddings = 6"));
  pos.forward(4);
  REQUIRE_THROWS_AS(pos.backward(Tensor<double, 2>({5, 3})), Error);
}
