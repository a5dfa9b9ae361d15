#pragma once
// Building original single-file checkpoints in tests: a safetensors file under construction and
// the text encoders of a transformers model file in the names SD files use (transformers' names
// under a prefix, or OpenCLIP's: fused in_proj q/k/v, text_projection transposed), renamed by this
// header's own table (independent of the library's open_clip_name).

#include <cstddef>
#include <deque>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "difftrain/io/safetensors.hpp"

namespace difftrain::test {

// A safetensors file under construction (F32), its values kept alive until written.
class FileBuilder {
 public:
  void add(const std::string& name, std::vector<float> values, std::vector<std::size_t> shape) {
    values_.push_back(std::move(values));
    list_.push_back(io::TensorToWrite::from_span(name, std::span<const float>(values_.back()),
                                                 std::move(shape), io::Dtype::F32));
  }
  // A tensor (xtensor expression) by value.
  template <class E>
  void add_tensor(const std::string& name, const E& tensor) {
    add(name, std::vector<float>(tensor.begin(), tensor.end()),
        std::vector<std::size_t>(tensor.shape().begin(), tensor.shape().end()));
  }
  void write(const std::string& path) const { io::save_safetensors(path, list_); }

 private:
  std::deque<std::vector<float>> values_;
  std::vector<io::TensorToWrite> list_;
};

// transformers → OpenCLIP below "text_model.encoder.layers.<i>." / "transformer.resblocks.<i>."
// (q_proj, k_proj, v_proj are fused separately)
inline constexpr std::pair<const char*, const char*> kOpenClipLayerNames[] = {
    {"layer_norm1.weight", "ln_1.weight"},
    {"layer_norm1.bias", "ln_1.bias"},
    {"self_attn.out_proj.weight", "attn.out_proj.weight"},
    {"self_attn.out_proj.bias", "attn.out_proj.bias"},
    {"layer_norm2.weight", "ln_2.weight"},
    {"layer_norm2.bias", "ln_2.bias"},
    {"mlp.fc1.weight", "mlp.c_fc.weight"},
    {"mlp.fc1.bias", "mlp.c_fc.bias"},
    {"mlp.fc2.weight", "mlp.c_proj.weight"},
    {"mlp.fc2.bias", "mlp.c_proj.bias"},
};
inline constexpr std::pair<const char*, const char*> kOpenClipTopNames[] = {
    {"text_model.embeddings.token_embedding.weight", "token_embedding.weight"},
    {"text_model.embeddings.position_embedding.weight", "positional_embedding"},
    {"text_model.final_layer_norm.weight", "ln_final.weight"},
    {"text_model.final_layer_norm.bias", "ln_final.bias"},
};

struct OpenClipOptions {
  std::string skip;                         // an OpenCLIP name (below the prefix) left out
  std::optional<std::size_t> in_proj_rows;  // rows written for resblocks.0's in_proj_weight (3D)
  bool extra_block = false;                 // a resblock beyond the model's (SD 2.x's 24th)
  bool transpose_projection = true;
};

// The transformers CLIP text model in `model_file` (a model.safetensors) in OpenCLIP names under
// `prefix`, with logit_scale and attn_mask; text_projection only when the model has one.
inline void add_open_clip(FileBuilder& out, const std::string& model_file,
                          const std::string& prefix, const OpenClipOptions& o = {}) {
  const auto file = io::SafetensorsFile::open(model_file);
  const std::size_t D = file.info("text_model.final_layer_norm.weight").shape[0];
  std::set<std::size_t> layer_ids;
  for (const auto& name : file.names()) {
    const std::string layers = "text_model.encoder.layers.";
    if (name.starts_with(layers)) layer_ids.insert(std::stoul(name.substr(layers.size())));
  }
  const std::size_t layers = layer_ids.size();
  auto put = [&](const std::string& name, std::vector<float> values,
                 std::vector<std::size_t> shape) {
    if (name != o.skip) out.add(prefix + name, std::move(values), std::move(shape));
  };
  for (const auto& [hf, oc] : kOpenClipTopNames) put(oc, file.read<float>(hf), file.info(hf).shape);
  for (std::size_t i = 0; i < layers + (o.extra_block ? 1 : 0); ++i) {
    const std::size_t src = i < layers ? i : 0;  // the extra block: layer 0's values, scaled
    const float scale = i < layers ? 1.0f : 3.0f;
    const std::string hf = "text_model.encoder.layers." + std::to_string(src) + ".";
    const std::string oc = "transformer.resblocks." + std::to_string(i) + ".";
    auto read = [&](const std::string& name) {
      auto values = file.read<float>(hf + name);
      for (auto& v : values) v *= scale;
      return values;
    };
    for (const auto& [h, c] : kOpenClipLayerNames) put(oc + c, read(h), file.info(hf + h).shape);
    std::vector<float> weight, bias;  // rows [Wq; Wk; Wv], [bq; bk; bv]
    for (const char* x : {"q", "k", "v"}) {
      const auto w = read(std::string("self_attn.") + x + "_proj.weight");
      const auto b = read(std::string("self_attn.") + x + "_proj.bias");
      weight.insert(weight.end(), w.begin(), w.end());
      bias.insert(bias.end(), b.begin(), b.end());
    }
    const std::size_t rows = i == 0 ? o.in_proj_rows.value_or(3 * D) : 3 * D;
    weight.resize(rows * D);
    put(oc + "attn.in_proj_weight", weight, {rows, D});
    put(oc + "attn.in_proj_bias", bias, {3 * D});
  }
  if (file.contains("text_projection.weight")) {  // [P, D] → [D, P]
    const auto w = file.read<float>("text_projection.weight");
    const std::size_t P = file.info("text_projection.weight").shape[0];
    std::vector<float> t(w.size());
    for (std::size_t p = 0; p < P; ++p)
      for (std::size_t d = 0; d < D; ++d) t[d * P + p] = w[p * D + d];
    if (o.transpose_projection) {
      put("text_projection", t, {D, P});
    } else {
      put("text_projection", w, {P, D});
    }
  }
  put("logit_scale", {4.6052f}, {});
  std::vector<float> mask(77 * 77, 0.0f);
  for (std::size_t r = 0; r < 77; ++r)
    for (std::size_t c = r + 1; c < 77; ++c) mask[r * 77 + c] = -1e30f;
  put("attn_mask", mask, {77, 77});
}

// The transformers model in `model_file` with transformers' names under `prefix` (SD 1.x's
// cond_stage_model.transformer., SDXL's first encoder conditioner.embedders.0.transformer.).
inline void add_transformers(FileBuilder& out, const std::string& model_file,
                             const std::string& prefix) {
  const auto file = io::SafetensorsFile::open(model_file);
  for (const auto& name : file.names())
    if (name != "text_model.embeddings.position_ids")
      out.add(prefix + name, file.read<float>(name), file.info(name).shape);
}

}  // namespace difftrain::test
