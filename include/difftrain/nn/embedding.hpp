#pragma once
// Lookup-table embeddings (torch.nn.Embedding): a token embedding indexed by token ids and a
// position embedding indexed by 0..L−1 (CLIP's `token_embedding` / `position_embedding`).
//
// Dims legend: B batch, L tokens, V num_embeddings (vocabulary or maximum positions),
// D embedding_dim.
// Forward gathers rows of `weight` [V, D]; backward scatter-adds dy into the rows of weight.grad
// that were read (a row read twice receives both gradients). The ids are discrete, so there is
// no input gradient; forward saves the ids for backward.

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::nn {

struct EmbeddingConfig {
  std::size_t num_embeddings = 0;  // V
  std::size_t embedding_dim = 0;   // D
};

template <class T>
class Embedding {
 public:
  EmbeddingConfig config;
  Parameter<T> weight;  // [V, D]

  Embedding() = default;
  explicit Embedding(const EmbeddingConfig& c)
      : config(c), weight({c.num_embeddings, c.embedding_dim}) {
    require(c.num_embeddings > 0 && c.embedding_dim > 0, "Embedding", "num_embeddings ",
            c.num_embeddings, " and embedding_dim ", c.embedding_dim, " must both be positive");
  }

  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) {
    visit(join_name(prefix, "weight"), weight);
  }
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) const {
    visit(join_name(prefix, "weight"), weight);
  }

  // y[b, l, :] = weight[ids[b, l], :]; ids [B, L] → y [B, L, D].
  Tensor3<T> forward(const Tensor<std::int64_t, 2>& ids) {
    const std::size_t V = config.num_embeddings;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const std::int64_t id = ids.data()[i];
      require(id >= 0 && static_cast<std::uint64_t>(id) < V, "Embedding::forward", "ids[",
              i / ids.shape()[1], ",", i % ids.shape()[1], "] is ", id, ", expected in [0, ", V,
              ")");
    }
    saved_ids_ = ids;
    const std::size_t B = ids.shape()[0], L = ids.shape()[1];
    Tensor3<T> y(std::array<std::size_t, 3>{B, L, config.embedding_dim});
    gather(ids.data(), ids.size(), y.data());
    return y;
  }

  // weight.grad[ids[b, l], :] += dy[b, l, :]; nothing when the weight is frozen.
  void backward(const Tensor3<T>& dy) {
    const std::size_t B = saved_ids_.shape()[0], L = saved_ids_.shape()[1];
    check_shape("Embedding::backward", "dy", dy.shape(), {B, L, config.embedding_dim});
    if (weight.trainable) scatter_add(saved_ids_.data(), saved_ids_.size(), dy.data());
  }

 protected:
  // out row i = weight row ids[i].
  void gather(const std::int64_t* ids, std::size_t count, T* out) const {
    const std::size_t D = config.embedding_dim;
    const T* w = weight.value.data();
    for (std::size_t i = 0; i < count; ++i) {
      const T* row = w + static_cast<std::size_t>(ids[i]) * D;
      std::copy(row, row + D, out + i * D);
    }
  }
  // grad row ids[i] += dy row i. Serial: ids may repeat, so rows are not disjoint.
  void scatter_add(const std::int64_t* ids, std::size_t count, const T* dy) {
    const std::size_t D = config.embedding_dim;
    T* g = weight.grad.data();
    for (std::size_t i = 0; i < count; ++i) {
      T* row = g + static_cast<std::size_t>(ids[i]) * D;
      for (std::size_t d = 0; d < D; ++d) row[d] += dy[i * D + d];
    }
  }

 private:
  Tensor<std::int64_t, 2> saved_ids_ = Tensor<std::int64_t, 2>(std::array<std::size_t, 2>{0, 0});
};

/// An embedding of positions 0..L−1 (L ≤ num_embeddings = maximum positions), the same for
/// every sample: CLIP adds it to the token embeddings, broadcast over the batch.
template <class T>
class PositionEmbedding : public Embedding<T> {
 public:
  using Embedding<T>::Embedding;
  using Embedding<T>::config;
  using Embedding<T>::weight;

  // y[l, :] = weight[l, :] for l < L → [L, D].
  Tensor<T, 2> forward(std::size_t length) {
    require(length <= config.num_embeddings, "PositionEmbedding::forward", "length is ", length,
            ", expected at most num_embeddings = ", config.num_embeddings);
    length_ = length;
    Tensor<T, 2> y(std::array<std::size_t, 2>{length, config.embedding_dim});
    std::copy_n(weight.value.data(), length * config.embedding_dim, y.data());
    return y;
  }

  // weight.grad[l, :] += dy[l, :] for l < L.
  void backward(const Tensor<T, 2>& dy) {
    check_shape("PositionEmbedding::backward", "dy", dy.shape(), {length_, config.embedding_dim});
    if (!weight.trainable) return;
    T* g = weight.grad.data();
    for (std::size_t i = 0; i < dy.size(); ++i) g[i] += dy.data()[i];
  }

  // The broadcast form: weight.grad[l, :] += Σ_b dy[b, l, :].
  void backward(const Tensor3<T>& dy) {
    const std::size_t B = dy.shape()[0], LD = length_ * config.embedding_dim;
    check_shape("PositionEmbedding::backward", "dy", dy.shape(),
                {B, length_, config.embedding_dim});
    if (!weight.trainable) return;
    T* g = weight.grad.data();
    for (std::size_t b = 0; b < B; ++b)
      for (std::size_t i = 0; i < LD; ++i) g[i] += dy.data()[b * LD + i];
  }

 private:
  std::size_t length_ = 0;
};

}  // namespace difftrain::nn
