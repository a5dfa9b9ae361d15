// ClipTextModel: golden parity with transformers' CLIPTextModel (float64 reference), the causal
// mask (against a naive masked attention and by perturbing later tokens), clip skip, both pooling
// rules, strict loading (position_ids accepted, F16 converted) and input errors.
#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>
#include <xtensor/xarray.hpp>
#include <xtensor/xview.hpp>

#include "clip/clip_test_support.hpp"
#include "difftrain/core/half.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/clip/clip.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using Catch::Matchers::Contains;
using models::ClipTextConfig;
using models::ClipTextEncoder;
using models::ClipTextModel;
namespace fs = std::filesystem;

namespace {

constexpr double kForwardTolerance = 1e-4;  // the golden README's forward rule

ClipTextModel<float>& golden_model() {
  static ClipTextModel<float> model = models::load_clip_text_model<float>(test::clip_golden(""));
  return model;
}

TokenIds golden_ids() {
  return io::SafetensorsFile::open(test::clip_golden("inputs.safetensors"))
      .read_tensor<std::int64_t, 2>("input_ids");
}

Tensor3<float> expected3(const std::string& name) {
  return io::SafetensorsFile::open(test::clip_golden("expected.safetensors"))
      .read_tensor<float, 3>(name);
}

// LayerNorm over the last dim in double: (x − μ)/√(σ² + eps)·γ + β.
Tensor3<double> layer_norm_reference(const Tensor3<float>& x, const nn::LayerNorm<float>& norm) {
  const std::size_t D = x.shape()[2], rows = x.size() / D;
  Tensor3<double> y(x.shape());
  for (std::size_t r = 0; r < rows; ++r) {
    double mean = 0, var = 0;
    for (std::size_t i = 0; i < D; ++i) mean += x.data()[r * D + i];
    mean /= D;
    for (std::size_t i = 0; i < D; ++i) var += std::pow(x.data()[r * D + i] - mean, 2);
    var /= D;
    for (std::size_t i = 0; i < D; ++i)
      y.data()[r * D + i] =
          (x.data()[r * D + i] - mean) / std::sqrt(var + norm.config().eps) * norm.weight.value(i) +
          norm.bias.value(i);
  }
  return y;
}

// Every parameter of the golden file as name → F32 array.
std::map<std::string, xt::xarray<float>> golden_state() {
  const auto file = io::SafetensorsFile::open(test::clip_golden("model.safetensors"));
  std::map<std::string, xt::xarray<float>> state;
  for (const auto& name : file.names()) {
    const auto& info = file.info(name);
    xt::xarray<float> value = xt::xarray<float>::from_shape(info.shape);
    file.read_into(name, std::span<float>(value.data(), value.size()));
    state.emplace(name, std::move(value));
  }
  return state;
}

std::string load_error(ClipTextModel<float>& model,
                       const std::map<std::string, xt::xarray<float>>& state) {
  try {
    model.load_state_dict(state);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("ClipTextModel matches transformers' CLIPTextModel on clip_tiny", "[clip][golden]") {
  auto& model = golden_model();
  const TokenIds ids = golden_ids();
  REQUIRE(ids.shape()[0] == 2);
  REQUIRE(ids.shape()[1] == 77);
  const auto out = model.forward(ids);
  const auto expected = io::SafetensorsFile::open(test::clip_golden("expected.safetensors"));

  const auto last = expected.read_tensor<float, 3>("last_hidden_state");
  const double last_error = test::golden_error(out.last_hidden_state, last);
  INFO("last_hidden_state error " << last_error);
  CHECK(out.last_hidden_state.shape() == last.shape());
  CHECK(last_error <= kForwardTolerance);

  const auto pooled = expected.read_tensor<float, 2>("pooler_output");
  const double pooled_error = test::golden_error(out.pooler_output, pooled);
  INFO("pooler_output error " << pooled_error);
  CHECK(out.pooler_output.shape() == pooled.shape());
  CHECK(pooled_error <= kForwardTolerance);

  REQUIRE(out.hidden_states.size() == 4);
  for (std::size_t i = 0; i < out.hidden_states.size(); ++i) {
    const auto ref = expected.read_tensor<float, 3>("hidden_states." + std::to_string(i));
    const double error = test::golden_error(out.hidden_states[i], ref);
    INFO("hidden_states." << i << " error " << error);
    CHECK(out.hidden_states[i].shape() == ref.shape());
    CHECK(error <= kForwardTolerance);
  }

  // case.json: pooled at the first eos, positions 76 and 64
  CHECK(model.pooled_positions(ids) == std::vector<std::size_t>{76, 64});
  // every expected tensor is covered
  CHECK(expected.size() == 2 + out.hidden_states.size());
}

TEST_CASE("clip skip is final_layer_norm of an earlier hidden state", "[clip][golden]") {
  auto& model = golden_model();
  const TokenIds ids = golden_ids();

  // clip_skip 0: last_hidden_state
  CHECK(test::golden_error(model.encode(ids, 0), expected3("last_hidden_state")) <=
        kForwardTolerance);
  // clip_skip k: final_layer_norm(hidden_states[3 − k]), the LayerNorm done here in double on the
  // golden hidden state
  for (std::size_t skip = 1; skip <= 3; ++skip) {
    const auto ref = layer_norm_reference(expected3("hidden_states." + std::to_string(3 - skip)),
                                          model.final_layer_norm);
    const double error = test::golden_error(model.encode(ids, skip), ref);
    INFO("clip_skip " << skip << " error " << error);
    CHECK(error <= kForwardTolerance);
  }
  // and the same as the model's own hidden_states[-2] through final_layer_norm
  const auto out = model.forward(ids);
  const auto penultimate = model.final_layer_norm.forward_inference(out.hidden_states[2]);
  REQUIRE_CLOSE(model.encode(ids, 1), penultimate, 1e-6, 1e-6);
  CHECK_THROWS_WITH(model.encode(ids, 4), Contains("clip_skip is 4, expected at most"));

  // the TextEncoder wrapper
  auto encoder = ClipTextEncoder::from_folder(test::clip_golden(""), {.clip_skip = 1});
  static_assert(TextEncoder<ClipTextEncoder>);
  REQUIRE_CLOSE(encoder.encode(ids), penultimate, 1e-6, 1e-6);
  auto plain = ClipTextEncoder::from_folder(test::clip_golden(""));
  CHECK(test::golden_error(plain.encode(ids), expected3("last_hidden_state")) <= kForwardTolerance);
  CHECK_THROWS_WITH(
      ClipTextEncoder(models::load_clip_text_model<float>(test::clip_golden("")), {.clip_skip = 5}),
      Contains("clip_skip is 5"));
}

TEST_CASE("the causal mask: earlier positions ignore later tokens", "[clip][causal]") {
  auto& model = golden_model();
  TokenIds ids = golden_ids();
  const auto base = model.forward(ids);
  constexpr std::size_t p = 20;  // a text token of both rows (row 1's eos is at 64)
  ids(0, p) = (ids(0, p) + 17) % 900;
  ids(1, p) = (ids(1, p) + 311) % 900;
  const auto changed = model.forward(ids);
  for (std::size_t k = 0; k < base.hidden_states.size(); ++k) {
    INFO("hidden_states." << k);
    const auto before = xt::view(base.hidden_states[k], xt::all(), xt::range(0, p), xt::all());
    const auto after = xt::view(changed.hidden_states[k], xt::all(), xt::range(0, p), xt::all());
    REQUIRE_CLOSE(after, before, 1e-6, 1e-7);
    // the perturbation does reach position p and (after one layer) every later position
    const auto at_p = xt::view(changed.hidden_states[k], xt::all(), p, xt::all());
    const auto at_p0 = xt::view(base.hidden_states[k], xt::all(), p, xt::all());
    CHECK(xt::amax(xt::abs(at_p - at_p0))() > 1e-3);
    if (k > 0) {
      const auto last = xt::view(changed.hidden_states[k], xt::all(), 76, xt::all());
      const auto last0 = xt::view(base.hidden_states[k], xt::all(), 76, xt::all());
      CHECK(xt::amax(xt::abs(last - last0))() > 1e-5);
    }
  }

  // a prefix of length L < 77 gives the same first L positions (positions 0..L−1 only)
  const TokenIds full = golden_ids();
  const TokenIds prefix = xt::view(full, xt::all(), xt::range(0, 40));
  // (encode does not pool: row 0 has no eos among its first 40 ids)
  const auto short_state = model.encode(prefix);
  const auto full_prefix = xt::view(base.last_hidden_state, xt::all(), xt::range(0, 40), xt::all());
  REQUIRE_CLOSE(short_state, full_prefix, 1e-5, 1e-6);
}

TEST_CASE("causal attention equals a naive masked softmax attention", "[clip][causal]") {
  // L = 150 > kQueryBlock exercises the second query block (keys up to its last row)
  const std::size_t B = 2, L = 150, Hn = 3, Hd = 5, I = Hn * Hd;
  nn::AttentionShape s{B, L, L, Hn, Hd};
  s.causal = true;
  std::vector<double> q(B * L * I), k(q.size()), v(q.size()), o(q.size());
  std::vector<float> noise(3 * q.size());
  fill_normal(std::span<float>(noise), RandomStream{7, 1}, 0);
  for (std::size_t i = 0; i < q.size(); ++i) {
    q[i] = noise[i];
    k[i] = noise[q.size() + i];
    v[i] = noise[2 * q.size() + i];
  }
  const double scale = 0.7;
  nn::AttentionWorkspace<double> ws;
  nn::scaled_dot_product_attention_forward(q.data(), k.data(), v.data(), o.data(), s, scale, ws);

  double worst = 0;
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t h = 0; h < Hn; ++h)
      for (std::size_t i = 0; i < L; ++i) {
        std::vector<double> score(L);
        double m = -std::numeric_limits<double>::infinity();
        for (std::size_t j = 0; j < L; ++j) {
          double dot = 0;
          for (std::size_t d = 0; d < Hd; ++d)
            dot += q[(b * L + i) * I + h * Hd + d] * k[(b * L + j) * I + h * Hd + d];
          score[j] = j > i ? -std::numeric_limits<double>::infinity() : dot * scale;
          m = std::max(m, score[j]);
        }
        double sum = 0;
        for (auto& x : score) sum += (x = std::exp(x - m));
        for (std::size_t d = 0; d < Hd; ++d) {
          double ref = 0;
          for (std::size_t j = 0; j < L; ++j)
            ref += score[j] / sum * v[(b * L + j) * I + h * Hd + d];
          worst = std::max(worst, std::abs(ref - o[(b * L + i) * I + h * Hd + d]));
        }
      }
  INFO("max abs difference " << worst);
  CHECK(worst < 1e-12);

  nn::AttentionShape cross{B, L, L - 1, Hn, Hd};
  cross.causal = true;
  CHECK_THROWS_WITH(nn::scaled_dot_product_attention_forward(q.data(), k.data(), v.data(), o.data(),
                                                             cross, scale, ws),
                    Contains("causal attention needs queries (150) == keys (149)"));
}

TEST_CASE("pooling: first eos, or argmax of the ids for legacy eos_token_id 2", "[clip][pool]") {
  auto config = ClipTextConfig::from_file(test::clip_golden("config.json"));
  ClipTextModel<float> first_eos(config);
  // eos 999 first at 3; padding with another id (0) after it
  TokenIds ids = xt::zeros<std::int64_t>({2, 8});
  ids(0, 0) = 998, ids(0, 1) = 5, ids(0, 2) = 7, ids(0, 3) = 999;
  ids(1, 0) = 998, ids(1, 1) = 999, ids(1, 2) = 999, ids(1, 7) = 999;
  CHECK(first_eos.pooled_positions(ids) == std::vector<std::size_t>{3, 1});

  // pooler_output rows are rows of last_hidden_state
  first_eos.load_state_dict(golden_state());
  const auto out = first_eos.forward(ids);
  for (std::size_t d = 0; d < 32; ++d) {
    CHECK(out.pooler_output(0, d) == out.last_hidden_state(0, 3, d));
    CHECK(out.pooler_output(1, d) == out.last_hidden_state(1, 1, d));
  }

  // a row without eos has no pooled position
  ids(0, 3) = 4;
  CHECK_THROWS_WITH(first_eos.forward(ids), Contains("input_ids row 0 has no eos_token_id 999"));
  CHECK_NOTHROW(first_eos.encode(ids));  // no pooling there

  // legacy configs (SD 1.x/2.x: eos_token_id 2) pool at the first maximum id
  config.eos_token_id = 2;
  ClipTextModel<float> legacy(config);
  ids(0, 2) = 2;  // the legacy rule does not look for the id 2
  ids(0, 5) = 999, ids(0, 6) = 999;
  CHECK(legacy.pooled_positions(ids) == std::vector<std::size_t>{5, 1});
  ids(0, 5) = ids(0, 6) = 4;  // no id above bos: position 0
  CHECK(legacy.pooled_positions(ids) == std::vector<std::size_t>{0, 1});
}

TEST_CASE("loading: strict names, position_ids accepted, F16 converted", "[clip][load]") {
  const auto config = ClipTextConfig::from_file(test::clip_golden("config.json"));
  ClipTextModel<float> model(config);

  // the names are transformers' (every name of the golden file, and only those)
  std::vector<std::string> names;
  model.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>& p) {
    names.push_back(name);
    CHECK_FALSE(p.trainable);  // frozen: no gradient memory
    CHECK(p.grad.size() == 0);
  });
  auto state = golden_state();
  std::vector<std::string> file_names;
  for (const auto& [name, value] : state) file_names.push_back(name);
  std::sort(names.begin(), names.end());
  CHECK(names == file_names);
  CHECK(names.size() == 2 + 3 * 16 + 2);

  // the position_ids buffer (I64 [1, 77] in many SD checkpoints) is accepted and ignored
  auto with_ids = state;
  with_ids.emplace(ClipTextModel<float>::kPositionIdsKey, xt::xarray<float>(xt::arange<float>(77)));
  CHECK(load_error(model, with_ids).empty());

  auto missing = state;
  missing.erase("text_model.encoder.layers.1.self_attn.q_proj.bias");
  CHECK_THAT(load_error(model, missing),
             Contains("1 missing: text_model.encoder.layers.1.self_attn.q_proj.bias"));
  auto unexpected = state;
  unexpected.emplace("text_model.encoder.layers.3.mlp.fc1.bias", xt::zeros<float>({37}));
  CHECK_THAT(load_error(model, unexpected),
             Contains("1 unexpected: text_model.encoder.layers.3.mlp.fc1.bias"));
  auto misshapen = state;
  misshapen["text_model.final_layer_norm.weight"] = xt::zeros<float>({31});
  CHECK_THAT(load_error(model, misshapen),
             Contains("text_model.final_layer_norm.weight has shape [31], expected [32]"));

  // a folder with F16 weights and the position_ids buffer as I64
  test::TempDir dir("clip_load");
  fs::copy_file(test::clip_golden("config.json"), dir.path() / "config.json");
  std::vector<io::TensorToWrite> tensors;
  for (const auto& [name, value] : state)
    tensors.push_back(io::TensorToWrite::from_tensor(name, value, io::Dtype::F16));
  tensors.push_back(io::TensorToWrite::from_tensor(
      ClipTextModel<float>::kPositionIdsKey,
      xt::xarray<std::int64_t>(xt::reshape_view(xt::arange<std::int64_t>(77), {1, 77}))));
  io::save_safetensors(dir.file("model.safetensors"), tensors);
  auto half_model = models::load_clip_text_model<float>(dir.path().string());
  std::size_t checked = 0;
  half_model.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>& p) {
    const auto& ref = state.at(name);
    bool same = true;
    for (std::size_t i = 0; i < ref.size(); ++i)
      same = same && p.value.data()[i] == f16_to_float(float_to_f16(ref.data()[i]));
    INFO(name);
    CHECK(same);
    ++checked;
  });
  CHECK(checked == names.size());

  // a folder without weights, and a file with a wrong name
  test::TempDir empty("clip_empty");
  fs::copy_file(test::clip_golden("config.json"), empty.path() / "config.json");
  CHECK_THROWS_WITH(models::load_clip_text_model<float>(empty.path().string()),
                    Contains("model.safetensors"));
  tensors.push_back(io::TensorToWrite::from_tensor("text_model.extra", xt::xarray<float>{1.0f}));
  io::save_safetensors(dir.file("model.safetensors"), tensors);
  CHECK_THROWS_WITH(models::load_clip_text_model<float>(dir.path().string()),
                    Contains("1 unexpected: text_model.extra") && Contains("load_clip_text_model"));
}

TEST_CASE("ClipTextModel input errors", "[clip][errors]") {
  auto& model = golden_model();
  TokenIds ids = golden_ids();
  ids(1, 5) = 1000;
  CHECK_THROWS_WITH(model.forward(ids), Contains("ids[1,5] is 1000, expected in [0, 1000)"));
  ids(1, 5) = -1;
  CHECK_THROWS_AS(model.encode(ids), Error);
  const TokenIds too_long = xt::zeros<std::int64_t>({1, 78});
  CHECK_THROWS_WITH(model.forward(too_long), Contains("input_ids has shape [1,78]") &&
                                                 Contains("max_position_embeddings = 77"));
  const TokenIds empty = xt::zeros<std::int64_t>({1, 0});
  CHECK_THROWS_WITH(model.encode(empty), Contains("input_ids has shape [1,0]"));
  auto bad = ClipTextConfig::from_file(test::clip_golden("config.json"));
  bad.num_attention_heads = 5;
  CHECK_THROWS_WITH(ClipTextModel<float>(bad), Contains("not divisible"));
}
