#pragma once
// ClipTextModel: the CLIP text encoder (transformers' CLIPTextModel, or CLIPTextModelWithProjection
// when the config's architecture says so: SDXL's second text encoder), forward and backward, with
// transformers' parameter names and its outputs last_hidden_state, pooler_output (CLIPTextModel)
// or text_embeds (CLIPTextModelWithProjection) and every layer's hidden states (for "clip skip").
// The encoder layers' Linear layers sit in LoRA slots (text-encoder LoRA, module names
// "text_model.encoder.layers.N.self_attn.q_proj", "….mlp.fc1", …); text_projection does not (kohya
// and PEFT do not adapt it).
//
// Dims legend: B batch, L tokens (≤ max_position_embeddings), D hidden_size, V vocab_size,
// P projection_dim.
//   h_0 = token_embedding[ids] + position_embedding[0..L−1]                 (hidden_states[0])
//   h_k = h' + mlp(layer_norm2(h')),  h' = h_{k−1} + self_attn(layer_norm1(h_{k−1}))
//                                      (causal self-attention; hidden_states[k], k = 1..layers)
//   last_hidden_state = final_layer_norm(h_layers)
//   pooler_output[b] = last_hidden_state[b, p_b], p_b = argmax_l ids[b, l] when eos_token_id == 2
//                      (legacy configs), else the first l with ids[b, l] == eos_token_id
//   text_embeds[b] = text_projection(pooled[b]) = W_proj · pooled[b],  W_proj [P, D], no bias
//                      (CLIPTextModelWithProjection, whose outputs have no pooler_output)
//   encode(ids, clip_skip) = final_layer_norm(h_{layers − clip_skip})   (diffusers' clip_skip:
//                      0 = last layer, 1 = penultimate; kohya's "clip skip" n is diffusers' n − 1)
//
// Names: text_model.embeddings.{token,position}_embedding.weight,
// text_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2,
// layer_norm2}.{weight,bias}, text_model.final_layer_norm.{weight,bias}, and for the projection
// model text_projection.weight (outside text_model). Loading is strict except
// for the buffer text_model.embeddings.position_ids, which many SD checkpoints still hold and which
// is ignored. Every parameter starts frozen (no gradient memory); nn::set_trainable or
// lora::inject_lora makes some trainable.
//
// Training: forward_train / encode_train run the same math saving each layer's state (one batch
// of activations, overwritten by the next call); backward / encode_backward take dL/d of the
// outputs and accumulate (+=) the gradients of the trainable parameters:
//   d pooled = d pooler_output, or W_projᵀ · d text_embeds (text_projection.grad += d text_embedsᵀ
//              · pooled if trainable)
//   d last_hidden_state += scatter of d pooled to the pooled positions
//   d h_layers = final_layer_norm'(d last_hidden_state) (+ d hidden_states[layers])
//   d h_{k−1} = layer_k'(d h_k) (+ d hidden_states[k−1]),  k = layers..1
//   token_embedding.grad[ids] += d h_0 (if trainable), position_embedding.grad += Σ_b d h_0
// grad_input_embeddings() is d h_0 (what textual inversion needs).
//
// A row without an eos id has no pooled position under the non-legacy rule (transformers would
// silently take position 0): forward throws Error for it; encode() does not pool and accepts it.

#include <algorithm>
#include <array>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "difftrain/concepts.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/io/state_dict.hpp"
#include "difftrain/models/clip/clip_attention.hpp"
#include "difftrain/models/clip/clip_config.hpp"
#include "difftrain/models/clip/clip_mlp.hpp"
#include "difftrain/models/clip/open_clip_names.hpp"
#include "difftrain/models/ldm_names.hpp"
#include "difftrain/nn/embedding.hpp"
#include "difftrain/nn/layer_norm.hpp"
#include "difftrain/nn/linear.hpp"
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

  template <class F>
  void for_each_slot(const std::string& prefix, F&& visit) {
    self_attn.for_each_slot(nn::join_name(prefix, "self_attn"), visit);
    mlp.for_each_slot(nn::join_name(prefix, "mlp"), visit);
  }

  // h = x + self_attn(layer_norm1(x));  y = h + mlp(layer_norm2(h)), saving for backward
  Tensor3<T> forward(const Tensor3<T>& x) {
    Tensor3<T> h = self_attn.forward(layer_norm1.forward(x));
    h += x;
    Tensor3<T> y = mlp.forward(layer_norm2.forward(h));
    y += h;
    return y;
  }
  // the same without saving anything
  Tensor3<T> forward_inference(const Tensor3<T>& x) const {
    Tensor3<T> h = self_attn.forward_inference(layer_norm1.forward_inference(x));
    h += x;
    Tensor3<T> y = mlp.forward_inference(layer_norm2.forward_inference(h));
    y += h;
    return y;
  }
  // dh = dy + layer_norm2'(mlp'(dy));  dx = dh + layer_norm1'(self_attn'(dh))
  Tensor3<T> backward(const Tensor3<T>& dy) {
    Tensor3<T> dh = layer_norm2.backward(mlp.backward(dy));
    dh += dy;
    Tensor3<T> dx = layer_norm1.backward(self_attn.backward(dh));
    dx += dh;
    return dx;
  }
  void clear_saved() {
    self_attn.clear_saved();
    mlp.clear_saved();
  }
};

/// Outputs of ClipTextModel::forward (transformers' names).
template <class T = float>
struct ClipTextOutput {
  Tensor3<T> last_hidden_state;           // [B, L, D]
  Tensor<T, 2> pooler_output;             // [B, D] (CLIPTextModel; empty for the projection model)
  Tensor<T, 2> text_embeds;               // [B, P] (CLIPTextModelWithProjection; else empty)
  std::vector<Tensor3<T>> hidden_states;  // layers + 1 of [B, L, D]; [0] = embeddings
};

/// dL/d of the outputs given to ClipTextModel::backward; an empty tensor (size 0) or a missing
/// hidden-state index means no gradient for that output.
template <class T = float>
struct ClipTextOutputGrads {
  Tensor3<T> last_hidden_state;                     // [B, L, D]
  Tensor<T, 2> pooler_output;                       // [B, D] (CLIPTextModel only)
  Tensor<T, 2> text_embeds;                         // [B, P] (CLIPTextModelWithProjection only)
  std::map<std::size_t, Tensor3<T>> hidden_states;  // index (0..layers) → [B, L, D]
};

template <class T = float>
class ClipTextModel {
 public:
  using Scalar = T;
  /// The non-persistent buffer of transformers' CLIPTextEmbeddings, ignored when loading.
  static constexpr const char* kPositionIdsKey = "text_model.embeddings.position_ids";
  /// The projection model's extra parameter (its presence in the weights makes a config without
  /// `architectures` a CLIPTextModelWithProjection).
  static constexpr const char* kTextProjectionKey = "text_projection.weight";

  ClipTextEmbeddings<T> embeddings;
  std::vector<ClipEncoderLayer<T>> layers;  // "encoder.layers.N"
  nn::LayerNorm<T> final_layer_norm;
  // CLIPTextModelWithProjection's text_projection [P, D], no bias (outside "text_model"); empty
  // for a CLIPTextModel
  std::optional<nn::Linear<T>> text_projection;

  explicit ClipTextModel(const ClipTextConfig& config)
      : embeddings((config.validate(), config.vocab_size), config.max_position_embeddings,
                   config.hidden_size),
        final_layer_norm(config.hidden_size, config.layer_norm_eps),
        config_(config) {
    layers.reserve(config.num_hidden_layers);
    for (std::size_t i = 0; i < config.num_hidden_layers; ++i) layers.emplace_back(config);
    if (config.with_projection())
      text_projection.emplace(config.hidden_size, config.projection_dim, false);
    nn::set_trainable<T>(*this, false);
  }

  const ClipTextConfig& config() const { return config_; }
  /// Whether this is a CLIPTextModelWithProjection (text_embeds instead of pooler_output).
  bool has_projection() const { return text_projection.has_value(); }

  /// Every parameter under its transformers name ("text_model.…", then "text_projection.weight"
  /// for the projection model).
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) {
    visit_all(*this, prefix, visit);
  }
  template <class F>
  void for_each_parameter(const std::string& prefix, F&& visit) const {
    visit_all(*this, prefix, visit);
  }

  /// LoRA slots of every encoder layer ("text_model.encoder.layers.N.self_attn.q_proj", …).
  template <class F>
  void for_each_slot(const std::string& prefix, F&& visit) {
    const std::string root = nn::join_name(prefix, "text_model.encoder.layers.");
    for (std::size_t i = 0; i < layers.size(); ++i)
      layers[i].for_each_slot(root + std::to_string(i), visit);
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

  /// ids [B, L] → last_hidden_state, pooler_output or text_embeds, and all hidden states.
  ClipTextOutput<T> forward(const TokenIds& ids);

  // final_layer_norm(hidden_states[layers − clip_skip]) (diffusers' clip_skip; 0: last layer)
  Tensor3<T> encode(const TokenIds& ids, std::size_t clip_skip = 0);

  /// forward, saving what backward needs.
  ClipTextOutput<T> forward_train(const TokenIds& ids);
  /// After forward_train: accumulates the gradients of the trainable parameters for the loss
  /// Σ_X ⟨grads.X, X⟩ (see the header comment).
  void backward(const ClipTextOutputGrads<T>& grads);

  /// encode, saving what encode_backward needs.
  Tensor3<T> encode_train(const TokenIds& ids, std::size_t clip_skip = 0);
  /// After encode_train: dL/d context [B, L, D] → parameter gradients (+=).
  void encode_backward(const Tensor3<T>& grad_context);

  /// d h_0 (the summed embeddings) of the last backward.
  const Tensor3<T>& grad_input_embeddings() const { return grad_embeddings_; }

  /// Frees the saved forward state.
  void clear_saved() {
    for (auto& layer : layers) layer.clear_saved();
    if (text_projection) text_projection->clear_saved();
    saved_depth_ = kNotSaved;
  }

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
                " (the pooled output is taken at the first eos; the config's eos_token_id must "
                "be the tokenizer's)");
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
  static void visit_all(Self& self, const std::string& prefix, F& visit) {
    const std::string root = nn::join_name(prefix, "text_model");
    self.embeddings.for_each_parameter(nn::join_name(root, "embeddings"), visit);
    for (std::size_t i = 0; i < self.layers.size(); ++i)
      self.layers[i].for_each_parameter(nn::join_name(root, "encoder.layers." + std::to_string(i)),
                                        visit);
    self.final_layer_norm.for_each_parameter(nn::join_name(root, "final_layer_norm"), visit);
    if (self.text_projection)
      self.text_projection->for_each_parameter(nn::join_name(prefix, "text_projection"), visit);
  }

  static constexpr std::size_t kNotSaved = static_cast<std::size_t>(-1);

  // h_depth = layers[0..depth)(embeddings(ids)), saving (train) or not
  Tensor3<T> run_layers(const TokenIds& ids, std::size_t depth, bool train,
                        std::string_view function, std::vector<Tensor3<T>>* hidden = nullptr);
  // From dL/d h_top down to the embeddings, adding hidden-state gradients on the way.
  void backward_layers(Tensor3<T> d, std::size_t top,
                       const std::map<std::size_t, Tensor3<T>>& hidden_grads);

  Tensor3<T> embed(const TokenIds& ids, std::string_view function) {
    const std::size_t L = ids.shape()[1];
    require(L >= 1 && L <= config_.max_position_embeddings, function, "input_ids has shape ",
            shape_string(ids.shape()),
            ", expected [B, L] with 1 <= L <= max_position_embeddings = ",
            config_.max_position_embeddings);
    return embeddings.forward(ids);
  }

  ClipTextConfig config_;
  std::size_t saved_depth_ = kNotSaved;  // layers run by the last training forward
  bool saved_full_ = false;              // forward_train (true) or encode_train (false)
  std::array<std::size_t, 3> saved_shape_{};
  std::vector<std::size_t> saved_positions_;  // pooled positions of forward_train
  Tensor3<T> grad_embeddings_;
};

// The heavy members, out of the class so that DIFFTRAIN_EXTERN_TEMPLATES keeps them from being
// compiled in every translation unit of the project (src/models/ holds the
// explicit instantiations).
template <class T>
Tensor3<T> ClipTextModel<T>::run_layers(const TokenIds& ids, std::size_t depth, bool train,
                                        std::string_view function,
                                        std::vector<Tensor3<T>>* hidden) {
  if (train) saved_depth_ = kNotSaved;  // until the whole forward has succeeded
  Tensor3<T> h = embed(ids, function);
  for (std::size_t i = 0; i < depth; ++i) {
    if (hidden) hidden->push_back(h);
    h = train ? layers[i].forward(h) : layers[i].forward_inference(h);
  }
  return h;
}

template <class T>
ClipTextOutput<T> ClipTextModel<T>::forward(const TokenIds& ids) {
  ClipTextOutput<T> out;
  out.hidden_states.reserve(layers.size() + 1);
  out.hidden_states.push_back(
      run_layers(ids, layers.size(), false, "ClipTextModel::forward", &out.hidden_states));
  out.last_hidden_state = final_layer_norm.forward_inference(out.hidden_states.back());
  if (text_projection) {  // text_embeds = text_projection(pooled)
    out.text_embeds = text_projection->forward_inference(pool(out.last_hidden_state, ids));
  } else {
    out.pooler_output = pool(out.last_hidden_state, ids);
  }
  return out;
}

template <class T>
ClipTextOutput<T> ClipTextModel<T>::forward_train(const TokenIds& ids) {
  ClipTextOutput<T> out;
  out.hidden_states.reserve(layers.size() + 1);
  out.hidden_states.push_back(
      run_layers(ids, layers.size(), true, "ClipTextModel::forward_train", &out.hidden_states));
  out.last_hidden_state = final_layer_norm.forward(out.hidden_states.back());
  saved_positions_ = pooled_positions(ids);
  if (text_projection) {  // saves pooled for backward
    out.text_embeds = text_projection->forward(pool(out.last_hidden_state, ids));
  } else {
    out.pooler_output = pool(out.last_hidden_state, ids);
  }
  saved_shape_ = out.last_hidden_state.shape();
  saved_full_ = true;
  saved_depth_ = layers.size();
  return out;
}

template <class T>
Tensor3<T> ClipTextModel<T>::encode(const TokenIds& ids, std::size_t clip_skip) {
  require(clip_skip <= layers.size(), "ClipTextModel::encode", "clip_skip is ", clip_skip,
          ", expected at most num_hidden_layers = ", layers.size());
  return final_layer_norm.forward_inference(
      run_layers(ids, layers.size() - clip_skip, false, "ClipTextModel::encode"));
}

template <class T>
Tensor3<T> ClipTextModel<T>::encode_train(const TokenIds& ids, std::size_t clip_skip) {
  require(clip_skip <= layers.size(), "ClipTextModel::encode_train", "clip_skip is ", clip_skip,
          ", expected at most num_hidden_layers = ", layers.size());
  const std::size_t depth = layers.size() - clip_skip;
  Tensor3<T> context =
      final_layer_norm.forward(run_layers(ids, depth, true, "ClipTextModel::encode_train"));
  saved_shape_ = context.shape();
  saved_full_ = false;
  saved_depth_ = depth;
  return context;
}

template <class T>
void ClipTextModel<T>::encode_backward(const Tensor3<T>& grad_context) {
  constexpr const char* fn = "ClipTextModel::encode_backward";
  require(saved_depth_ != kNotSaved && !saved_full_, fn,
          "no saved encode_train (call encode_train first)");
  check_shape(fn, "grad_context", grad_context.shape(),
              {saved_shape_[0], saved_shape_[1], saved_shape_[2]});
  backward_layers(final_layer_norm.backward(grad_context), saved_depth_, {});
}

template <class T>
void ClipTextModel<T>::backward(const ClipTextOutputGrads<T>& grads) {
  constexpr const char* fn = "ClipTextModel::backward";
  require(saved_depth_ != kNotSaved && saved_full_, fn,
          "no saved forward_train (call forward_train first)");
  const std::size_t B = saved_shape_[0], L = saved_shape_[1], D = saved_shape_[2];
  const std::size_t N = layers.size();
  const bool has_last = grads.last_hidden_state.size() > 0;
  const bool has_pooled = grads.pooler_output.size() > 0;
  const bool has_embeds = grads.text_embeds.size() > 0;
  if (has_last)
    check_shape(fn, "grad last_hidden_state", grads.last_hidden_state.shape(), {B, L, D});
  if (has_pooled) {
    require(!text_projection, fn,
            "gradient for pooler_output, but the model is a CLIPTextModelWithProjection (its "
            "pooled output is text_embeds)");
    check_shape(fn, "grad pooler_output", grads.pooler_output.shape(), {B, D});
  }
  if (has_embeds) {
    require(text_projection.has_value(), fn,
            "gradient for text_embeds, but the model is a CLIPTextModel (no text_projection)");
    check_shape(fn, "grad text_embeds", grads.text_embeds.shape(),
                {B, text_projection->out_features()});
  }
  std::size_t top = 0;
  bool any = has_last || has_pooled || has_embeds;
  for (const auto& [i, g] : grads.hidden_states) {
    require(i <= N, fn, "gradient for hidden_states.", i, ", expected an index in [0, ", N, "]");
    check_shape(fn, "grad hidden_states." + std::to_string(i), g.shape(), {B, L, D});
    top = std::max(top, i);
    any = true;
  }
  require(any, fn, "no output gradient given");
  if (!has_last && !has_pooled && !has_embeds) {  // start at the highest hidden state with one
    backward_layers(Tensor3<T>(std::array<std::size_t, 3>{B, L, D}, T(0)), top,
                    grads.hidden_states);
    return;
  }
  Tensor3<T> d_last =
      has_last ? grads.last_hidden_state : Tensor3<T>(std::array<std::size_t, 3>{B, L, D}, T(0));
  if (has_pooled || has_embeds) {  // pooled[b] = last_hidden_state[b, p_b]
    // d pooled = d pooler_output, or W_projᵀ · d text_embeds (text_projection.grad += if trainable)
    const Tensor<T, 2> d_pooled =
        has_embeds ? text_projection->backward(grads.text_embeds) : grads.pooler_output;
    for (std::size_t b = 0; b < B; ++b) {
      T* row = d_last.data() + (b * L + saved_positions_[b]) * D;
      const T* g = d_pooled.data() + b * D;
      for (std::size_t d = 0; d < D; ++d) row[d] += g[d];
    }
  }
  backward_layers(final_layer_norm.backward(d_last), N, grads.hidden_states);
}

template <class T>
void ClipTextModel<T>::backward_layers(Tensor3<T> d, std::size_t top,
                                       const std::map<std::size_t, Tensor3<T>>& hidden_grads) {
  auto add_hidden = [&](std::size_t k) {
    if (auto it = hidden_grads.find(k); it != hidden_grads.end()) d += it->second;
  };
  add_hidden(top);
  for (std::size_t k = top; k > 0; --k) {
    d = layers[k - 1].backward(d);
    add_hidden(k - 1);
  }
  embeddings.token_embedding.backward(d);
  embeddings.position_embedding.backward(d);
  grad_embeddings_ = std::move(d);
}

#ifdef DIFFTRAIN_EXTERN_TEMPLATES
extern template class ClipTextModel<float>;
extern template class ClipTextModel<double>;
#endif

/// A ClipTextModel from a transformers folder: config.json + model.safetensors (or the shards of
/// model.safetensors.index.json). The class is config.json's `architectures` (CLIPTextModel or
/// CLIPTextModelWithProjection) or, without it, CLIPTextModelWithProjection exactly when the
/// weights hold text_projection.weight; Error when the weights do not fit the stated class.
template <class T = float>
ClipTextModel<T> load_clip_text_model(const std::string& folder) {
  const std::string config_path = (std::filesystem::path(folder) / "config.json").string();
  auto config = ClipTextConfig::from_file(config_path);
  const auto files = io::diffusers_weight_files(folder, "model");
  auto state = io::open_safetensors_state<T>(files);
  const std::string what = "load_clip_text_model('" + folder + "')";
  const std::string key = ClipTextModel<T>::kTextProjectionKey;
  const bool has_projection = state.count(key) > 0;
  auto weights = [&] {  // the file(s) searched, for the errors
    std::string names;
    for (const auto& f : files) names += (names.empty() ? "'" : ", '") + f + "'";
    return names;
  };
  if (!config.architecture) {
    config.architecture = has_projection ? ClipTextArchitecture::clip_text_model_with_projection
                                         : ClipTextArchitecture::clip_text_model;
  } else if (config.with_projection()) {
    require(has_projection, what, "'", config_path,
            "' says architectures [\"CLIPTextModelWithProjection\"], but ", weights(),
            " has no tensor ", key, " (expected [", config.projection_dim, ", ", config.hidden_size,
            "])");
  } else {
    require(!has_projection, what, "'", config_path,
            "' says architectures [\"CLIPTextModel\"], but ", weights(), " has tensor ", key,
            " (a CLIPTextModelWithProjection's)");
  }
  ClipTextModel<T> model(config);
  model.load_state_dict(std::move(state), what);
  return model;
}

namespace clip_detail {

// 0, 1, 2 for a q_proj, k_proj, v_proj parameter name ("….self_attn.q_proj.weight"), else -1.
inline int qkv_part(const std::string& name) {
  for (int k = 0; k < 3; ++k)
    if (name.find(std::string(".self_attn.") + "qkv"[k] + "_proj.") != std::string::npos) return k;
  return -1;
}

// A ClipTextModel seen in OpenCLIP's names below `prefix` (open_clip_names.hpp), for
// nn::load_state_dict: each file tensor is one visited parameter. q_proj, k_proj, v_proj of a
// layer are visited as one staging parameter of the fused in_proj's shape ([3D, D] or [3D]) and
// text_projection.weight [P, D] as one of shape [D, P]; after the visit (which checks the file's
// shape before reading anything) the staged values go to the model, split or transposed.
template <class T>
struct OpenClipView {
  ClipTextModel<T>& model;
  const std::string& prefix;

  template <class Visitor>
  void for_each_parameter(const std::string& /*unused*/, Visitor&& visit) {
    std::map<std::string, std::array<nn::Parameter<T>*, 3>> pending;  // in_proj name → q, k, v
    model.for_each_parameter("", [&](const std::string& name, nn::Parameter<T>& p) {
      const std::string file_name = prefix + open_clip_name(name);
      const auto& shape = p.value.shape();
      if (name == ClipTextModel<T>::kTextProjectionKey) {  // W [P, D] = (file [D, P])ᵀ
        const std::size_t P = shape[0], D = shape[1];
        nn::Parameter<T> staged({D, P}, false);
        visit(file_name, staged);
        for (std::size_t i = 0; i < P; ++i)
          for (std::size_t d = 0; d < D; ++d)
            p.value.data()[i * D + d] = staged.value.data()[d * P + i];
        return;
      }
      const int part = qkv_part(name);
      if (part < 0) {
        visit(file_name, p);
        return;
      }
      auto& parts = pending[file_name];
      parts[part] = &p;
      if (!parts[0] || !parts[1] || !parts[2]) return;
      std::vector<std::size_t> fused_shape(shape.begin(), shape.end());
      fused_shape[0] *= 3;  // [Wq; Wk; Wv] stacked along the rows
      nn::Parameter<T> fused(fused_shape, false);
      visit(file_name, fused);
      const std::size_t n = p.value.size();
      for (std::size_t k = 0; k < 3; ++k)
        std::copy(fused.value.data() + k * n, fused.value.data() + (k + 1) * n,
                  parts[k]->value.data());
      pending.erase(file_name);
    });
  }
};

// The block index i of an OpenCLIP name "transformer.resblocks.<i>.…", if it is one.
inline std::optional<std::size_t> open_clip_block(std::string_view rest) {
  constexpr std::string_view blocks = "transformer.resblocks.";
  if (!rest.starts_with(blocks)) return std::nullopt;
  rest.remove_prefix(blocks.size());
  std::size_t index = 0;
  const auto [end, ec] = std::from_chars(rest.data(), rest.data() + rest.size(), index);
  if (ec != std::errc() || end == rest.data() || end == rest.data() + rest.size() || *end != '.')
    return std::nullopt;
  return index;
}

}  // namespace clip_detail

/// A ClipTextModel of `config` from an original single-file checkpoint: the text encoder under
/// the layout's prefix (open_clip_names.hpp: SD 1.x's cond_stage_model.transformer.*, SD 2.x's
/// cond_stage_model.model.*, SDXL's conditioner.embedders.0.transformer.* and .1.model.*), loaded
/// strictly, errors in the file's names; the file's other tensors are ignored.
///   hf_transformer, sdxl_first: transformers' names below the prefix (files of older
///     transformers versions lack the "text_model." level and are read alike); position_ids is
///     ignored.
///   open_clip, sdxl_second: OpenCLIP's names; q/k/v are split from the fused in_proj ([3D, D]
///     checked before it is read) and text_projection is transposed. Ignored: logit_scale,
///     attn_mask, and the resblocks from num_hidden_layers on, as diffusers does for SD 2.x,
///     whose file has 24 blocks and whose config 23 (SD 2 conditions on the penultimate layer).
/// The class: config.architecture if set; else CLIPTextModelWithProjection for sdxl_second and
/// for an hf layout whose file has <prefix>text_projection.weight, CLIPTextModel otherwise. A
/// CLIPTextModel ignores an OpenCLIP file's text_projection (SD 2.x's, which diffusers drops).
template <class T = float>
ClipTextModel<T> load_clip_text_model_single_file(const std::string& path, ClipTextConfig config,
                                                  ClipSingleFileLayout layout) {
  const std::string prefix(clip_single_file_prefix(layout));
  const bool open_clip = is_open_clip(layout);
  const std::string what = "load_clip_text_model_single_file('" + path + "')";
  const auto state = io::open_safetensors_state<T>({path});
  if (!config.architecture) {
    const bool projection =
        layout == ClipSingleFileLayout::sdxl_second ||
        (!open_clip && state.count(prefix + ClipTextModel<T>::kTextProjectionKey) > 0);
    config.architecture = projection ? ClipTextArchitecture::clip_text_model_with_projection
                                     : ClipTextArchitecture::clip_text_model;
  }
  ClipTextModel<T> model(config);
  const auto component = io::rename_state(
      state,
      [&](const std::string& name,
          const std::vector<std::size_t>& shape) -> std::optional<io::StateKey> {
        if (!name.starts_with(prefix)) return std::nullopt;
        std::string rest = name.substr(prefix.size());
        if (open_clip) {
          if (rest == "logit_scale" || rest == "attn_mask") return std::nullopt;
          if (rest == "text_projection" && !model.has_projection()) return std::nullopt;
          const auto block = clip_detail::open_clip_block(rest);
          if (block && *block >= config.num_hidden_layers) return std::nullopt;
          return io::StateKey{name, shape};
        }
        if (!rest.starts_with("text_model.") && rest != ClipTextModel<T>::kTextProjectionKey)
          rest = "text_model." + rest;
        if (rest == ClipTextModel<T>::kPositionIdsKey) return std::nullopt;
        return io::StateKey{prefix + rest, shape};
      },
      what);
  if (component.empty()) {  // name the layouts the file does have
    std::string found;
    for (auto other : {ClipSingleFileLayout::hf_transformer, ClipSingleFileLayout::sdxl_first,
                       ClipSingleFileLayout::open_clip, ClipSingleFileLayout::sdxl_second}) {
      const std::string other_prefix(clip_single_file_prefix(other));
      const auto it = state.lower_bound(other_prefix);
      if (it != state.end() && it->first.starts_with(other_prefix))
        found += (found.empty() ? "; it has " : ", ") + other_prefix +
                 "* (ClipSingleFileLayout::" + std::string(to_string(other)) + ")";
    }
    fail(what, "'", path, "' has no tensor named ", prefix,
         "* (not an original single-file checkpoint of this component?", found, ")");
  }
  if (open_clip) {
    clip_detail::OpenClipView<T> view{model, prefix};
    nn::load_state_dict<T>(view, component, what);
  } else {
    auto to_file_name = [&](const std::string& name) { return prefix + name; };
    RenamedModule<ClipTextModel<T>, decltype(to_file_name)&> view{model, to_file_name};
    nn::load_state_dict<T>(view, component, what);
  }
  return model;
}

/// load_clip_text_model_single_file of an SD 1.x file (ClipSingleFileLayout::hf_transformer:
/// cond_stage_model.transformer.*).
template <class T = float>
ClipTextModel<T> load_clip_text_model_single_file(const std::string& path,
                                                  const ClipTextConfig& config) {
  return load_clip_text_model_single_file<T>(path, config, ClipSingleFileLayout::hf_transformer);
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
