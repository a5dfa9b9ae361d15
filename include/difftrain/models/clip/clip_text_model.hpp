#pragma once
// ClipTextModel: the frozen CLIP text encoder (transformers' CLIPTextModel), forward only, with
// transformers' parameter names and its outputs last_hidden_state, pooler_output and every
// layer's hidden states (for "clip skip").
//
// Dims legend: B batch, L tokens (≤ max_position_embeddings), D hidden_size, V vocab_size.
//   h_0 = token_embedding[ids] + position_embedding[0..L−1]                 (hidden_states[0])
//   h_k = h' + mlp(layer_norm2(h')),  h' = h_{k−1} + self_attn(layer_norm1(h_{k−1}))
//                                      (causal self-attention; hidden_states[k], k = 1..layers)
//   last_hidden_state = final_layer_norm(h_layers)
//   pooler_output[b] = last_hidden_state[b, p_b], p_b = argmax_l ids[b, l] when eos_token_id == 2
//                      (legacy configs), else the first l with ids[b, l] == eos_token_id
//   encode(ids, clip_skip) = final_layer_norm(h_{layers − clip_skip})   (diffusers' clip_skip:
//                      0 = last layer, 1 = penultimate; kohya's "clip skip" n is diffusers' n − 1)
//
// Names: text_model.embeddings.{token,position}_embedding.weight,
// text_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2,
// layer_norm2}.{weight,bias}, text_model.final_layer_norm.{weight,bias}. Loading is strict except
// for the buffer text_model.embeddings.position_ids, which many SD checkpoints still hold and which
// is ignored. Every parameter is frozen (no gradient memory).
//
// A row without an eos id has no pooled position under the non-legacy rule (transformers would
// silently take position 0): forward throws Error for it; encode() does not pool and accepts it.

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "difftrain/concepts.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/io/state_dict.hpp"
#include "difftrain/models/clip/clip_attention.hpp"
#include "difftrain/models/clip/clip_config.hpp"
#include "difftrain/models/clip/clip_mlp.hpp"
#include "difftrain/models/ldm_names.hpp"
#include "difftrain/nn/embedding.hpp"
#include "difftrain/nn/layer_norm.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::models {

/// transformers' CLIPTextEmbeddings: token plus position embeddings.
template <class T = float>
class ClipTextEmbeddings {
 public:
  nn::Embedding<T> token_embedding;             // [V, D]
  nn::PositionEmbedding<T> position_embedding;  // [max_position_embeddings, D]

  ClipTextEmbeddings() = default;
  ClipTextEmbeddings(std::size_t vocab_size, std::size_t max_positions, std::size_t hidden_size)
      : token_embedding(nn::EmbeddingConfig{vocab_size, hidden_size}),
        position_embedding(nn::EmbeddingConfig{max_positions, hidden_size}) {}

  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) {
    token_embedding.for_each_parameter(nn::join_name(prefix, "token_embedding"), visit);
    position_embedding.for_each_parameter(nn::join_name(prefix, "position_embedding"), visit);
  }
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) const {
    token_embedding.for_each_parameter(nn::join_name(prefix, "token_embedding"), visit);
    position_embedding.for_each_parameter(nn::join_name(prefix, "position_embedding"), visit);
  }

  // h[b, l, :] = token_embedding[ids[b, l], :] + position_embedding[l, :]
  Tensor3<T> forward(const TokenIds& ids) {
    Tensor3<T> h = token_embedding.forward(ids);
    const Tensor<T, 2> positions = position_embedding.forward(ids.shape()[1]);
    const std::size_t B = ids.shape()[0], LD = positions.size();
    for (std::size_t b = 0; b < B; ++b) {
      T* row = h.data() + b * LD;
      for (std::size_t i = 0; i < LD; ++i) row[i] += positions.data()[i];
    }
    return h;
  }
};

/// transformers' CLIPEncoderLayer: pre-LayerNorm causal self-attention and MLP, each residual.
template <class T = float>
class ClipEncoderLayer {
 public:
  nn::LayerNorm<T> layer_norm1;
  ClipAttention<T> self_attn;
  nn::LayerNorm<T> layer_norm2;
  ClipMlp<T> mlp;

  ClipEncoderLayer() = default;
  explicit ClipEncoderLayer(const ClipTextConfig& c)
      : layer_norm1(c.hidden_size, c.layer_norm_eps),
        self_attn(c.hidden_size, c.num_attention_heads),
        layer_norm2(c.hidden_size, c.layer_norm_eps),
        mlp(c.hidden_size, c.intermediate_size, c.hidden_act) {}

  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) {
    self_attn.for_each_parameter(nn::join_name(prefix, "self_attn"), visit);
    layer_norm1.for_each_parameter(nn::join_name(prefix, "layer_norm1"), visit);
    mlp.for_each_parameter(nn::join_name(prefix, "mlp"), visit);
    layer_norm2.for_each_parameter(nn::join_name(prefix, "layer_norm2"), visit);
  }
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) const {
    self_attn.for_each_parameter(nn::join_name(prefix, "self_attn"), visit);
    layer_norm1.for_each_parameter(nn::join_name(prefix, "layer_norm1"), visit);
    mlp.for_each_parameter(nn::join_name(prefix, "mlp"), visit);
    layer_norm2.for_each_parameter(nn::join_name(prefix, "layer_norm2"), visit);
  }

  // h = x + self_attn(layer_norm1(x));  y = h + mlp(layer_norm2(h))
  Tensor3<T> forward(const Tensor3<T>& x) const {
    Tensor3<T> h = self_attn.forward(layer_norm1.forward_inference(x));
    h += x;
    Tensor3<T> y = mlp.forward(layer_norm2.forward_inference(h));
    y += h;
    return y;
  }
};

/// Outputs of ClipTextModel::forward (transformers' names).
template <class T = float>
struct ClipTextOutput {
  Tensor3<T> last_hidden_state;           // [B, L, D]
  Tensor<T, 2> pooler_output;             // [B, D]
  std::vector<Tensor3<T>> hidden_states;  // layers + 1 of [B, L, D]; [0] = embeddings
};

template <class T = float>
class ClipTextModel {
 public:
  using Scalar = T;
  /// The non-persistent buffer of transformers' CLIPTextEmbeddings, ignored when loading.
  static constexpr const char* kPositionIdsKey = "text_model.embeddings.position_ids";

  ClipTextEmbeddings<T> embeddings;
  std::vector<ClipEncoderLayer<T>> layers;  // "encoder.layers.N"
  nn::LayerNorm<T> final_layer_norm;

  explicit ClipTextModel(const ClipTextConfig& config)
      : embeddings((config.validate(), config.vocab_size), config.max_position_embeddings,
                   config.hidden_size),
        final_layer_norm(config.hidden_size, config.layer_norm_eps),
        config_(config) {
    layers.reserve(config.num_hidden_layers);
    for (std::size_t i = 0; i < config.num_hidden_layers; ++i) layers.emplace_back(config);
    nn::set_trainable<T>(*this, false);
  }

  const ClipTextConfig& config() const { return config_; }

  /// Every parameter under transformers' CLIPTextModel name ("text_model.…").
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) {
    visit_all(*this, nn::join_name(prefix, "text_model"), visit);
  }
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) const {
    visit_all(*this, nn::join_name(prefix, "text_model"), visit);
  }

  /// Strict load of a name → tensor map (anything with shape(), begin(), end()), ignoring
  /// text_model.embeddings.position_ids; one Error lists every missing, unexpected and misshapen
  /// name.
  template <class Source>
  void load_state_dict(std::map<std::string, Source> state,
                       std::string_view what = "ClipTextModel::load_state_dict") {
    state.erase(kPositionIdsKey);
    nn::load_state_dict<T>(*this, state, what);
  }

  /// Strict load from safetensors files (F32, F16, BF16, … converted to T).
  void load_safetensors(const std::vector<std::string>& paths,
                        std::string_view what = "ClipTextModel::load_safetensors") {
    load_state_dict(io::open_safetensors_state<T>(paths), what);
  }

  /// ids [B, L] → last_hidden_state, pooler_output and all hidden states.
  ClipTextOutput<T> forward(const TokenIds& ids);

  // final_layer_norm(hidden_states[layers − clip_skip]) (diffusers' clip_skip; 0: last layer)
  Tensor3<T> encode(const TokenIds& ids, std::size_t clip_skip = 0);

  /// The pooled position of every row (see the header comment for the rule); Error for a row
  /// without eos under the first-eos rule.
  std::vector<std::size_t> pooled_positions(const TokenIds& ids) const {
    const std::size_t B = ids.shape()[0], L = ids.shape()[1];
    std::vector<std::size_t> positions(B, 0);
    for (std::size_t b = 0; b < B; ++b) {
      const std::int64_t* row = ids.data() + b * L;
      if (config_.pools_at_argmax()) {
        for (std::size_t l = 1; l < L; ++l)
          if (row[l] > row[positions[b]]) positions[b] = l;
      } else {
        std::size_t l = 0;
        while (l < L && row[l] != config_.eos_token_id) ++l;
        require(l < L, "ClipTextModel::forward", "input_ids row ", b, " has no eos_token_id ",
                config_.eos_token_id,
                " (pooler_output is taken at the first eos; the config's eos_token_id must be "
                "the tokenizer's)");
        positions[b] = l;
      }
    }
    return positions;
  }

  // pooler_output[b, :] = last_hidden_state[b, p_b, :]
  Tensor<T, 2> pool(const Tensor3<T>& last_hidden_state, const TokenIds& ids) const {
    const std::size_t B = ids.shape()[0], L = ids.shape()[1], D = config_.hidden_size;
    check_shape("ClipTextModel::pool", "last_hidden_state", last_hidden_state.shape(), {B, L, D});
    const auto positions = pooled_positions(ids);
    Tensor<T, 2> pooled(std::array<std::size_t, 2>{B, D});
    for (std::size_t b = 0; b < B; ++b) {
      const T* src = last_hidden_state.data() + (b * L + positions[b]) * D;
      std::copy(src, src + D, pooled.data() + b * D);
    }
    return pooled;
  }

 private:
  template <class Self, class F>
  static void visit_all(Self& self, const std::string& root, F& visit) {
    self.embeddings.for_each_parameter(nn::join_name(root, "embeddings"), visit);
    for (std::size_t i = 0; i < self.layers.size(); ++i)
      self.layers[i].for_each_parameter(nn::join_name(root, "encoder.layers." + std::to_string(i)),
                                        visit);
    self.final_layer_norm.for_each_parameter(nn::join_name(root, "final_layer_norm"), visit);
  }

  Tensor3<T> embed(const TokenIds& ids, std::string_view function) {
    const std::size_t L = ids.shape()[1];
    require(L >= 1 && L <= config_.max_position_embeddings, function, "input_ids has shape ",
            shape_string(ids.shape()),
            ", expected [B, L] with 1 <= L <= max_position_embeddings = ",
            config_.max_position_embeddings);
    return embeddings.forward(ids);
  }

  ClipTextConfig config_;
};

// The heavy members, out of the class so that DIFFTRAIN_EXTERN_TEMPLATES keeps them from being
// compiled in every translation unit of the project (src/models/ holds the
// explicit instantiations).
template <class T>
ClipTextOutput<T> ClipTextModel<T>::forward(const TokenIds& ids) {
  ClipTextOutput<T> out;
  out.hidden_states.reserve(layers.size() + 1);
  out.hidden_states.push_back(embed(ids, "ClipTextModel::forward"));
  for (const auto& layer : layers)
    out.hidden_states.push_back(layer.forward(out.hidden_states.back()));
  out.last_hidden_state = final_layer_norm.forward_inference(out.hidden_states.back());
  out.pooler_output = pool(out.last_hidden_state, ids);
  return out;
}

template <class T>
Tensor3<T> ClipTextModel<T>::encode(const TokenIds& ids, std::size_t clip_skip) {
  require(clip_skip <= layers.size(), "ClipTextModel::encode", "clip_skip is ", clip_skip,
          ", expected at most num_hidden_layers = ", layers.size());
  Tensor3<T> h = embed(ids, "ClipTextModel::encode");
  for (std::size_t i = 0; i + clip_skip < layers.size(); ++i) h = layers[i].forward(h);
  return final_layer_norm.forward_inference(h);
}

#ifdef DIFFTRAIN_EXTERN_TEMPLATES
extern template class ClipTextModel<float>;
extern template class ClipTextModel<double>;
#endif

/// A ClipTextModel from a transformers folder: config.json + model.safetensors (or the shards of
/// model.safetensors.index.json).
template <class T = float>
ClipTextModel<T> load_clip_text_model(const std::string& folder) {
  const auto config =
      ClipTextConfig::from_file((std::filesystem::path(folder) / "config.json").string());
  ClipTextModel<T> model(config);
  model.load_safetensors(io::diffusers_weight_files(folder, "model"),
                         "load_clip_text_model('" + folder + "')");
  return model;
}

/// A ClipTextModel of `config` from an original single-file checkpoint: its
/// cond_stage_model.transformer.* tensors (transformers' names below the prefix; files of older
/// transformers versions lack the "text_model." level and are read alike), strictly, errors in
/// the file's names; position_ids and the file's other tensors are ignored.
template <class T = float>
ClipTextModel<T> load_clip_text_model_single_file(const std::string& path,
                                                  const ClipTextConfig& config) {
  const std::string prefix(kLdmClipPrefix);
  ClipTextModel<T> model(config);
  load_single_file_component<T>(
      model, path, prefix, [&](const std::string& name) { return prefix + name; },
      [&](const std::string& name,
          const std::vector<std::size_t>& shape) -> std::optional<io::StateKey> {
        if (!name.starts_with(prefix)) return std::nullopt;
        std::string rest = name.substr(prefix.size());
        if (!rest.starts_with("text_model.")) rest = "text_model." + rest;
        if (rest == ClipTextModel<T>::kPositionIdsKey) return std::nullopt;
        return io::StateKey{prefix + rest, shape};
      },
      "load_clip_text_model_single_file('" + path + "')");
  return model;
}

#ifdef DIFFTRAIN_EXTERN_TEMPLATES
extern template ClipTextModel<float> load_clip_text_model<float>(const std::string&);
extern template ClipTextModel<double> load_clip_text_model<double>(const std::string&);
extern template ClipTextModel<float> load_clip_text_model_single_file<float>(const std::string&,
                                                                             const ClipTextConfig&);
extern template ClipTextModel<double> load_clip_text_model_single_file<double>(
    const std::string&, const ClipTextConfig&);
#endif

}  // namespace difftrain::models
