// CLIPTextModelWithProjection (SDXL's second text encoder): golden parity of text_embeds,
// last_hidden_state and every hidden state with transformers on clip_proj_tiny (float and double,
// library and `difftrain text-encode`), the class rules (config.json's architectures; without it
// the presence of text_projection.weight; weights that contradict the config), no LoRA slot on
// text_projection, and double-precision gradient checks of text_embeds w.r.t. text_projection and
// the rest of the model.
#include <CLI/CLI.hpp>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>
#include <xtensor/xarray.hpp>
#include <xtensor/xbuilder.hpp>

#include "clip/clip_test_support.hpp"
#include "cmd_text.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/lora/lora_file.hpp"
#include "difftrain/models/clip/clip.hpp"
#include "difftrain/nn/gradcheck.hpp"

using namespace difftrain;
using Catch::Matchers::Contains;
using models::ClipTextArchitecture;
using models::ClipTextConfig;
using models::ClipTextModel;

// Helpers in a named namespace: the test executable is one translation unit (unity build).
namespace clip_projection_test {

// The golden README's forward rule is 1e-4; float32 reaches ~1e-6 on this case.
constexpr double kFloatTolerance = 1e-5;
constexpr double kDoubleTolerance = 1e-6;  // the reference is float64 stored as F32

std::string golden(const std::string& name) { return test::data_path("clip_proj_tiny/" + name); }

TokenIds golden_ids() {
  return io::SafetensorsFile::open(golden("inputs.safetensors"))
      .read_tensor<std::int64_t, 2>("input_ids");
}

// Every tensor of expected.safetensors against `out` (text_embeds, last_hidden_state,
// hidden_states.<i>); returns the worst golden error.
template <class T>
double worst_golden_error(const models::ClipTextOutput<T>& out) {
  const auto expected = io::SafetensorsFile::open(golden("expected.safetensors"));
  double worst = 0;
  std::size_t compared = 0;
  for (const auto& name : expected.names()) {
    const std::vector<float> ref = expected.read<float>(name);
    std::vector<double> got;
    auto take = [&](const auto& t) { got.assign(t.begin(), t.end()); };
    if (name == "text_embeds") {
      take(out.text_embeds);
      CHECK(out.text_embeds.shape() == std::array<std::size_t, 2>{2, 24});
    } else if (name == "last_hidden_state") {
      take(out.last_hidden_state);
    } else if (name.starts_with("hidden_states.")) {
      const std::size_t i = std::stoul(name.substr(14));
      REQUIRE(i < out.hidden_states.size());
      take(out.hidden_states[i]);
    } else {
      FAIL("unexpected golden tensor " << name);
    }
    const double error = test::golden_error(got, ref);
    UNSCOPED_INFO(name << " error " << error);
    worst = std::max(worst, error);
    ++compared;
  }
  CHECK(compared == 6);  // text_embeds, last_hidden_state, hidden_states.0..3
  return worst;
}

// Runs `difftrain text-encode` in-process.
int run_text_encode(std::vector<std::string> args) {
  CLI::App app{"test"};
  app.require_subcommand(1);
  int exit_code = -1;
  tools::add_text_commands(app, exit_code);
  std::vector<const char*> argv{"difftrain", "text-encode"};
  for (const auto& a : args) argv.push_back(a.c_str());
  app.parse(static_cast<int>(argv.size()), argv.data());
  return exit_code;
}

// A copy of a golden model folder in `dir` with config.json edited by `edit` and the weights of
// `weights_folder`.
template <class Edit>
std::string model_copy(const test::TempDir& dir, const std::string& weights_folder, Edit&& edit) {
  nlohmann::json config = nlohmann::json::parse(std::ifstream(golden("config.json")));
  edit(config);
  dir.write("config.json", config.dump(2));
  std::filesystem::copy_file(test::data_path(weights_folder + "/model.safetensors"),
                             dir.file("model.safetensors"));
  return dir.str();
}

template <class T>
std::string load_error(const std::string& folder) {
  try {
    models::load_clip_text_model<T>(folder);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

ClipTextConfig small_projection_config() {
  ClipTextConfig c;
  c.vocab_size = 50;
  c.hidden_size = 12;
  c.intermediate_size = 20;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 3;
  c.max_position_embeddings = 16;
  c.hidden_act = models::ClipActivation::gelu;
  c.eos_token_id = 49;
  c.bos_token_id = 48;
  c.pad_token_id = 49;
  c.projection_dim = 7;
  c.architecture = ClipTextArchitecture::clip_text_model_with_projection;
  return c;
}

void randomize(ClipTextModel<double>& model, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  model.for_each_parameter("", [&](const std::string& name, nn::Parameter<double>& p) {
    const bool vector = p.value.dimension() == 1;
    const double scale =
        vector ? 0.1 : 1.0 / std::sqrt(double(p.value.size() / p.value.shape()[0]));
    for (auto& v : p.value) v = scale * normal(rng);
    if (vector && name.find("layer_norm") != std::string::npos && name.ends_with("weight"))
      p.value += 1.0;
  });
}

// Rows with the eos (49) at different positions, then eos padding; other ids below 47.
TokenIds ids_with_eos(std::size_t B, std::size_t L, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  TokenIds ids(std::array<std::size_t, 2>{B, L});
  for (auto& id : ids) id = std::int64_t(rng() % 47);
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t l = L - 2 - 3 * b; l < L; ++l) ids(b, l) = 49;
  return ids;
}

Tensor<double, 2> random_matrix(std::size_t rows, std::size_t cols, std::uint64_t seed) {
  Tensor<double, 2> t(std::array<std::size_t, 2>{rows, cols});
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (auto& v : t) v = normal(rng);
  return t;
}

template <class A, class B>
double dot(const A& a, const B& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += double(a.data()[i]) * double(b.data()[i]);
  return s;
}

double max_abs(const xt::xarray<double>& t) {
  double m = 0;
  for (double v : t) m = std::max(m, std::abs(v));
  return m;
}

}  // namespace clip_projection_test

namespace cpt = clip_projection_test;

TEST_CASE("CLIPTextModelWithProjection matches transformers on clip_proj_tiny",
          "[clip][projection][golden]") {
  const TokenIds ids = cpt::golden_ids();
  REQUIRE(ids.shape() == std::array<std::size_t, 2>{2, 77});

  auto model = models::load_clip_text_model<float>(test::data_path("clip_proj_tiny"));
  REQUIRE(model.has_projection());
  CHECK(model.config().projection_dim == 24);
  CHECK(model.pooled_positions(ids) == std::vector<std::size_t>{8, 76});
  const auto out = model.forward(ids);
  CHECK(out.pooler_output.size() == 0);  // transformers' class has no pooler_output
  CHECK(cpt::worst_golden_error(out) <= cpt::kFloatTolerance);

  // forward_train computes the same outputs
  const auto trained = model.forward_train(ids);
  CHECK(test::golden_error(trained.text_embeds, out.text_embeds) == 0);
  CHECK(test::golden_error(trained.last_hidden_state, out.last_hidden_state) == 0);

  auto model64 = models::load_clip_text_model<double>(test::data_path("clip_proj_tiny"));
  CHECK(cpt::worst_golden_error(model64.forward(ids)) <= cpt::kDoubleTolerance);
}

TEST_CASE("the CLIP text model class comes from architectures or text_projection.weight",
          "[clip][projection][config]") {
  SECTION("config.json: architectures and projection_dim parse") {
    const auto proj = ClipTextConfig::from_file(cpt::golden("config.json"));
    CHECK(proj.architecture == ClipTextArchitecture::clip_text_model_with_projection);
    CHECK(proj.with_projection());
    CHECK(proj.projection_dim == 24);
    const auto plain = ClipTextConfig::from_file(test::clip_golden("config.json"));
    CHECK_FALSE(plain.architecture.has_value());  // clip_tiny states no class
    CHECK(plain.projection_dim == 512);
    CHECK_FALSE(plain.with_projection());
    CHECK(ClipTextConfig::sd15().architecture == ClipTextArchitecture::clip_text_model);

    nlohmann::json j = nlohmann::json::parse(std::ifstream(cpt::golden("config.json")));
    j["architectures"] = {"CLIPTextModel"};
    CHECK(ClipTextConfig::from_json(j).architecture == ClipTextArchitecture::clip_text_model);
    for (const nlohmann::json& unset : {nlohmann::json(nullptr), nlohmann::json::array()}) {
      j["architectures"] = unset;
      CHECK_FALSE(ClipTextConfig::from_json(j).architecture.has_value());
    }
    j["architectures"] = {"CLIPModel"};
    CHECK_THROWS_WITH(ClipTextConfig::from_json(j), Contains("architectures = [\"CLIPModel\"]") &&
                                                        Contains("CLIPTextModelWithProjection"));
    j["architectures"] = "CLIPTextModelWithProjection";  // not a list
    CHECK_THROWS_WITH(ClipTextConfig::from_json(j), Contains("architectures = "));
    j["architectures"] = {"CLIPTextModelWithProjection"};
    j["projection_dim"] = 0;
    CHECK_THROWS_WITH(ClipTextConfig::from_json(j),
                      Contains("projection_dim = 0, expected a positive integer"));
  }

  SECTION("clip_tiny (projection_dim 512, no architectures, no text_projection) stays plain") {
    auto model = models::load_clip_text_model<float>(test::clip_golden(""));
    CHECK_FALSE(model.has_projection());
    CHECK(model.config().architecture == ClipTextArchitecture::clip_text_model);
    bool visited = false;
    model.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>&) {
      visited |= name == "text_projection.weight";
    });
    CHECK_FALSE(visited);
  }

  SECTION("without architectures, text_projection.weight makes the projection model") {
    test::TempDir dir("clip_proj_fallback");
    const auto folder =
        cpt::model_copy(dir, "clip_proj_tiny", [](nlohmann::json& c) { c.erase("architectures"); });
    auto model = models::load_clip_text_model<float>(folder);
    CHECK(model.has_projection());
    CHECK(model.config().architecture == ClipTextArchitecture::clip_text_model_with_projection);
    CHECK(cpt::worst_golden_error(model.forward(cpt::golden_ids())) <= cpt::kFloatTolerance);
  }

  SECTION("weights that contradict the stated class are an Error naming file and tensor") {
    test::TempDir dir("clip_proj_missing");
    // CLIPTextModelWithProjection, but clip_tiny's weights (no text_projection.weight)
    const auto missing = cpt::model_copy(dir, "clip_tiny", [](nlohmann::json&) {});
    CHECK_THAT(cpt::load_error<float>(missing),
               Contains("load_clip_text_model") && Contains("config.json") &&
                   Contains("CLIPTextModelWithProjection") &&
                   Contains(dir.file("model.safetensors")) &&
                   Contains("has no tensor text_projection.weight") && Contains("[24, 32]"));
    test::TempDir dir2("clip_proj_extra");
    const auto extra = cpt::model_copy(
        dir2, "clip_proj_tiny", [](nlohmann::json& c) { c["architectures"] = {"CLIPTextModel"}; });
    CHECK_THAT(cpt::load_error<double>(extra), Contains("[\"CLIPTextModel\"]") &&
                                                   Contains(dir2.file("model.safetensors")) &&
                                                   Contains("has tensor text_projection.weight"));
  }

  SECTION("a misshapen text_projection.weight is a load Error naming the tensor") {
    test::TempDir dir("clip_proj_shape");
    const auto folder =
        cpt::model_copy(dir, "clip_proj_tiny", [](nlohmann::json& c) { c["projection_dim"] = 16; });
    CHECK_THAT(cpt::load_error<float>(folder), Contains("text_projection.weight"));
  }
}

TEST_CASE("text_projection is a parameter but no LoRA slot", "[clip][projection][lora]") {
  ClipTextModel<double> model(cpt::small_projection_config());
  std::vector<std::string> names;
  model.for_each_parameter("te", [&](const std::string& name, nn::Parameter<double>& p) {
    names.push_back(name);
    CHECK_FALSE(p.trainable);  // frozen at construction, like every parameter
  });
  REQUIRE(names.size() == 2 + 2 * 16 + 2 + 1);
  CHECK(names.back() == "te.text_projection.weight");
  REQUIRE(model.text_projection->weight.value.dimension() == 2);
  CHECK(model.text_projection->weight.value.shape()[0] == 7);
  CHECK(model.text_projection->weight.value.shape()[1] == 12);
  CHECK_FALSE(model.text_projection->has_bias());
  const auto modules = lora::module_names(model);
  CHECK(modules.size() == 2 * 6);
  for (const auto& m : modules) CHECK(m.find("text_projection") == std::string::npos);
}

TEST_CASE("CLIPTextModelWithProjection backward passes gradient checks",
          "[clip][projection][backward][gradcheck]") {
  const ClipTextConfig c = cpt::small_projection_config();
  ClipTextModel<double> model(c);
  cpt::randomize(model, 17);
  const std::size_t B = 2, L = 11, D = c.hidden_size, P = c.projection_dim;
  const TokenIds ids = cpt::ids_with_eos(B, L, 5);
  REQUIRE(model.pooled_positions(ids) == std::vector<std::size_t>{L - 2, L - 5});
  models::ClipTextOutputGrads<double> g;
  g.text_embeds = cpt::random_matrix(B, P, 23);
  auto loss = [&] { return cpt::dot(model.forward(ids).text_embeds, g.text_embeds); };
  nn::GradCheckOptions options;
  options.max_checks = 40;

  SECTION("text_embeds alone into every parameter") {
    nn::set_trainable<double>(model, true);
    const auto out = model.forward_train(ids);
    REQUIRE(out.text_embeds.shape() == std::array<std::size_t, 2>{B, P});
    CHECK(std::abs(cpt::dot(out.text_embeds, g.text_embeds) - loss()) < 1e-12);
    nn::zero_grad<double>(model);
    model.backward(g);
    std::size_t checked = 0;
    model.for_each_parameter("", [&](const std::string& name, nn::Parameter<double>& p) {
      if (name.ends_with("k_proj.bias")) {  // softmax removes a key bias: zero gradient
        CHECK(cpt::max_abs(p.grad) < 1e-12);
        return;
      }
      const auto r = nn::check_gradient(p, loss, options);
      INFO(name << ": " << r.message);
      CHECK(r.max_error <= 1e-6);
      ++checked;
    });
    CHECK(checked == 2 + 2 * 15 + 2 + 1);
    // d text_embeds reaches the embeddings only through the pooled positions' causal past
    const auto& d0 = model.grad_input_embeddings();
    REQUIRE(d0.shape() == std::array<std::size_t, 3>{B, L, D});
    double after = 0;
    for (std::size_t d = 0; d < D; ++d)
      after += std::abs(d0(0, L - 1, d)) + std::abs(d0(1, L - 1, d));
    CHECK(after == 0);
    CHECK(cpt::max_abs(model.embeddings.token_embedding.weight.grad) > 0);
  }

  SECTION("text_embeds with last_hidden_state and a hidden state, text_projection frozen") {
    nn::set_trainable<double>(model, true);
    model.text_projection->weight.set_trainable(false);
    g.last_hidden_state = Tensor3<double>(std::array<std::size_t, 3>{B, L, D});
    const auto w = cpt::random_matrix(B * L, D, 31);
    std::copy(w.begin(), w.end(), g.last_hidden_state.begin());
    g.hidden_states[1] = Tensor3<double>(std::array<std::size_t, 3>{B, L, D});
    const auto w1 = cpt::random_matrix(B * L, D, 32);
    std::copy(w1.begin(), w1.end(), g.hidden_states[1].begin());
    auto full_loss = [&] {
      const auto o = model.forward(ids);
      return cpt::dot(o.text_embeds, g.text_embeds) +
             cpt::dot(o.last_hidden_state, g.last_hidden_state) +
             cpt::dot(o.hidden_states[1], g.hidden_states[1]);
    };
    model.forward_train(ids);
    nn::zero_grad<double>(model);
    model.backward(g);
    CHECK(model.text_projection->weight.grad.size() == 0);
    for (auto* p :
         {&model.embeddings.token_embedding.weight, &model.layers[0].mlp.fc1.base().weight,
          &model.layers[1].self_attn.q_proj.base().weight, &model.final_layer_norm.weight}) {
      const auto r = nn::check_gradient(*p, full_loss, options);
      INFO(r.message);
      CHECK(r.max_error <= 1e-6);
    }
  }

  SECTION("only text_projection trainable: gradient Σ_b d text_embeds[b] ⊗ pooled[b]") {
    model.text_projection->weight.set_trainable(true);
    model.forward_train(ids);
    nn::zero_grad<double>(model);
    model.backward(g);
    const auto r = nn::check_gradient(model.text_projection->weight, loss, options);
    INFO(r.message);
    CHECK(r.max_error <= 1e-6);
  }

  SECTION("errors: the other class's pooled output, wrong shapes") {
    model.forward_train(ids);
    models::ClipTextOutputGrads<double> pooled;
    pooled.pooler_output = cpt::random_matrix(B, D, 1);
    CHECK_THROWS_WITH(model.backward(pooled),
                      Contains("pooler_output") && Contains("CLIPTextModelWithProjection"));
    models::ClipTextOutputGrads<double> bad;
    bad.text_embeds = cpt::random_matrix(B, P + 1, 1);
    CHECK_THROWS_WITH(model.backward(bad), Contains("grad text_embeds"));

    ClipTextConfig plain_config = c;
    plain_config.architecture = ClipTextArchitecture::clip_text_model;
    ClipTextModel<double> plain(plain_config);
    CHECK_FALSE(plain.has_projection());
    const auto out = plain.forward_train(ids);
    CHECK(out.text_embeds.size() == 0);
    CHECK(out.pooler_output.size() == B * D);
    CHECK_THROWS_WITH(plain.backward(g), Contains("text_embeds") && Contains("CLIPTextModel"));
  }
}

TEST_CASE("text-encode runs CLIPTextModelWithProjection folders", "[clip][projection][cli]") {
  test::TempDir dir("clip_proj_cli");
  const std::string out = dir.file("out.safetensors");

  SECTION("the golden outputs: text_embeds instead of pooler_output") {
    REQUIRE(cpt::run_text_encode({"--model", test::data_path("clip_proj_tiny"), "--inputs",
                                  cpt::golden("inputs.safetensors"), "--out", out}) == 0);
    const auto got = io::SafetensorsFile::open(out);
    const auto expected = io::SafetensorsFile::open(cpt::golden("expected.safetensors"));
    CHECK_FALSE(got.contains("pooler_output"));
    CHECK(got.names().size() == expected.names().size());
    for (const auto& name : expected.names()) {
      REQUIRE(got.contains(name));
      CHECK(got.info(name).dtype == io::Dtype::F32);
      CHECK(got.info(name).shape == expected.info(name).shape);
      const double error = test::golden_error(got.read<float>(name), expected.read<float>(name));
      INFO(name << " error " << error);
      CHECK(error <= cpt::kFloatTolerance);
    }
  }

  SECTION("grad_output.text_embeds: gradients as the library's in double") {
    const TokenIds ids = cpt::golden_ids();
    Tensor<double, 2> g64 = cpt::random_matrix(2, 24, 3);
    Tensor<float, 2> g32(g64.shape());
    std::copy(g64.begin(), g64.end(), g32.begin());
    const std::string in = dir.file("in.safetensors");
    io::save_safetensors(in, {io::TensorToWrite::from_tensor("input_ids", ids),
                              io::TensorToWrite::from_tensor("grad_output.text_embeds", g32)});
    REQUIRE(cpt::run_text_encode(
                {"--model", test::data_path("clip_proj_tiny"), "--inputs", in, "--out", out}) == 0);
    const auto got = io::SafetensorsFile::open(out);

    auto model = models::load_clip_text_model<double>(test::data_path("clip_proj_tiny"));
    nn::set_trainable<double>(model, true);
    model.forward_train(ids);
    nn::zero_grad<double>(model);
    models::ClipTextOutputGrads<double> g;
    g.text_embeds = g64;
    model.backward(g);
    // the golden rule's floor: 1e-3 × the largest gradient (the key biases' is zero in exact
    // arithmetic, float round-off here)
    double floor = 0;
    model.for_each_parameter("", [&](const std::string&, nn::Parameter<double>& p) {
      floor = std::max(floor, 1e-3 * cpt::max_abs(p.grad));
    });
    std::size_t compared = 0;
    model.for_each_parameter("", [&](const std::string& name, nn::Parameter<double>& p) {
      REQUIRE(got.contains("grad." + name));
      const auto v = got.read<float>("grad." + name);
      double diff = 0, scale = floor;
      for (std::size_t i = 0; i < v.size(); ++i) {
        diff = std::max(diff, std::abs(double(v[i]) - p.grad.data()[i]));
        scale = std::max(scale, std::abs(p.grad.data()[i]));
      }
      INFO(name << " error " << diff / scale);
      CHECK(diff / scale <= 1e-3);
      ++compared;
    });
    CHECK(compared == 2 + 3 * 16 + 2 + 1);
    CHECK(cpt::max_abs(model.text_projection->weight.grad) > 0);
  }

  SECTION("grad_output.pooler_output is rejected for the projection model") {
    const std::string in = dir.file("in.safetensors");
    xt::xarray<float> g = xt::ones<float>({2, 32});
    io::save_safetensors(in, {io::TensorToWrite::from_tensor("input_ids", cpt::golden_ids()),
                              io::TensorToWrite::from_tensor("grad_output.pooler_output", g)});
    CHECK(cpt::run_text_encode(
              {"--model", test::data_path("clip_proj_tiny"), "--inputs", in, "--out", out}) == 1);
    CHECK_FALSE(std::filesystem::exists(out));
  }
}
