// Backward of the CLIP text model (text-encoder training, #13): the golden clip_tiny_grad and
// clip_tiny_lora cases (transformers in float64; both LoRA file formats) through
// `difftrain text-encode` and in double through the library, and double-precision gradient
// checks per block and for the whole model on configurations beyond the golden one (gelu,
// several heads, a sequence longer than the attention's query block, clip skip, LoRA adapters,
// trainable token embeddings).
#include <CLI/CLI.hpp>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "clip/clip_test_support.hpp"
#include "cmd_text.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/lora/lora_file.hpp"
#include "difftrain/models/clip/clip.hpp"
#include "difftrain/models/clip/text_encoder.hpp"
#include "difftrain/nn/gradcheck.hpp"

using namespace difftrain;
using models::ClipTextConfig;
using models::ClipTextModel;

namespace {

int run_cli(std::vector<std::string> args) {
  CLI::App app{"test"};
  app.require_subcommand(1);
  int exit_code = -1;
  tools::add_text_commands(app, exit_code);
  std::vector<const char*> argv{"difftrain"};
  for (const auto& a : args) argv.push_back(a.c_str());
  app.parse(static_cast<int>(argv.size()), argv.data());
  return exit_code;
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, std::abs(double(x)));
  return m;
}

// The golden rule: max|got − ref| / max(max|ref|, floor); floor = 1e-3 × the largest max|ref|
// over the grad.<name> tensors for those, 0 otherwise. Returns {worst forward, worst gradient}.
template <class Got>
std::pair<double, double> golden_errors(const io::SafetensorsFile& expected, Got&& got) {
  double floor = 0;
  for (const auto& name : expected.names())
    if (name.starts_with("grad.")) floor = std::max(floor, max_abs(expected.read<float>(name)));
  floor *= 1e-3;
  double forward = 0, gradient = 0;
  for (const auto& name : expected.names()) {
    const std::vector<float> ref = expected.read<float>(name);
    const std::vector<double> g = got(name, expected.info(name).shape);
    INFO(name);
    REQUIRE(g.size() == ref.size());
    double diff = 0, scale = name.starts_with("grad.") ? floor : 0;
    for (std::size_t i = 0; i < g.size(); ++i) {
      REQUIRE(std::isfinite(g[i]));
      diff = std::max(diff, std::abs(g[i] - double(ref[i])));
      scale = std::max(scale, std::abs(double(ref[i])));
    }
    const double error = diff / scale;
    UNSCOPED_INFO(name << " error " << error);
    (name.starts_with("grad") ? gradient : forward) =
        std::max(name.starts_with("grad") ? gradient : forward, error);
  }
  return {forward, gradient};
}

// The golden case through the CLI: every expected tensor within 1e-4 (forward) / 1e-3 (grad).
void check_cli_case(const std::string& folder, const std::vector<std::string>& extra) {
  test::TempDir dir("clip_backward_cli");
  const std::string out = dir.file("out.safetensors");
  std::vector<std::string> args{"text-encode",
                                "--model",
                                test::data_path(folder),
                                "--inputs",
                                test::data_path(folder + "/inputs.safetensors"),
                                "--out",
                                out};
  args.insert(args.end(), extra.begin(), extra.end());
  REQUIRE(run_cli(args) == 0);
  const auto got = io::SafetensorsFile::open(out);
  const auto expected =
      io::SafetensorsFile::open(test::data_path(folder + "/expected.safetensors"));
  std::size_t grads = 0;
  for (const auto& name : got.names()) grads += name.starts_with("grad.") ? 1 : 0;
  std::size_t expected_grads = 0;
  for (const auto& name : expected.names()) expected_grads += name.starts_with("grad.") ? 1 : 0;
  CHECK(grads == expected_grads);  // exactly the trainable parameters
  const auto [forward, gradient] =
      golden_errors(expected, [&](const std::string& name, const std::vector<std::size_t>& shape) {
        REQUIRE(got.contains(name));
        REQUIRE(got.info(name).shape == shape);
        const auto v = got.read<float>(name);
        return std::vector<double>(v.begin(), v.end());
      });
  CHECK(forward <= 1e-4);
  CHECK(gradient <= 1e-3);
}

template <class T>
models::ClipTextOutputGrads<T> read_grads(const io::SafetensorsFile& inputs) {
  models::ClipTextOutputGrads<T> g;
  for (const auto& name : inputs.names()) {
    if (name == "grad_output.last_hidden_state")
      g.last_hidden_state = inputs.read_tensor<T, 3>(name);
    if (name == "grad_output.pooler_output") g.pooler_output = inputs.read_tensor<T, 2>(name);
    if (name.starts_with("grad_output.hidden_states."))
      g.hidden_states[std::stoul(name.substr(26))] = inputs.read_tensor<T, 3>(name);
  }
  return g;
}

// The golden case through the library in double: far closer to the float64 reference.
void check_double_case(const std::string& folder, const std::string& lora_file) {
  auto model = models::load_clip_text_model<double>(test::data_path(folder));
  if (lora_file.empty()) {
    nn::set_trainable<double>(model, true);
  } else {
    lora::apply_lora(
        model, lora::read_lora(lora_file, lora::module_names(model), "text_encoder", "lora_te"));
  }
  const auto inputs = io::SafetensorsFile::open(test::data_path(folder + "/inputs.safetensors"));
  const TokenIds ids = inputs.read_tensor<std::int64_t, 2>("input_ids");
  const auto out = model.forward_train(ids);
  nn::zero_grad<double>(model);
  model.backward(read_grads<double>(inputs));
  std::map<std::string, const xt::xarray<double>*> grads;
  model.for_each_parameter("", [&](const std::string& name, nn::Parameter<double>& p) {
    if (p.trainable) grads.emplace("grad." + name, &p.grad);
  });
  const auto expected =
      io::SafetensorsFile::open(test::data_path(folder + "/expected.safetensors"));
  const auto [forward, gradient] =
      golden_errors(expected, [&](const std::string& name, const std::vector<std::size_t>&) {
        auto flat = [](const auto& t) { return std::vector<double>(t.begin(), t.end()); };
        if (name == "last_hidden_state") return flat(out.last_hidden_state);
        if (name == "pooler_output") return flat(out.pooler_output);
        if (name.starts_with("hidden_states."))
          return flat(out.hidden_states.at(std::stoul(name.substr(14))));
        REQUIRE(grads.count(name) == 1);
        return flat(*grads.at(name));
      });
  CHECK(forward <= 1e-6);
  CHECK(gradient <= 1e-6);
}

}  // namespace

TEST_CASE("text-encode backward matches transformers on clip_tiny_grad",
          "[clip][backward][golden]") {
  check_cli_case("clip_tiny_grad", {});
  check_double_case("clip_tiny_grad", "");
}

TEST_CASE("text-encode with a text-encoder LoRA matches clip_tiny_lora in both formats",
          "[clip][backward][lora][golden]") {
  for (const char* file : {"lora_kohya.safetensors", "lora_peft.safetensors"}) {
    INFO(file);
    const std::string path = test::data_path(std::string("clip_tiny_lora/") + file);
    check_cli_case("clip_tiny_lora", {"--lora", path});
    check_double_case("clip_tiny_lora", path);
  }
  // --lora-scale 0: the base model's outputs (clip_tiny_grad's forward)
  test::TempDir dir("clip_lora_scale0");
  const std::string out = dir.file("out.safetensors");
  REQUIRE(run_cli({"text-encode", "--model", test::data_path("clip_tiny_lora"), "--inputs",
                   test::data_path("clip_tiny_grad/inputs.safetensors"), "--out", out, "--lora",
                   test::data_path("clip_tiny_lora/lora_kohya.safetensors"), "--lora-scale",
                   "0"}) == 0);
  const auto got = io::SafetensorsFile::open(out);
  const auto base =
      io::SafetensorsFile::open(test::data_path("clip_tiny_grad/expected.safetensors"));
  for (const char* name : {"last_hidden_state", "pooler_output", "hidden_states.3"}) {
    INFO(name);
    CHECK(test::golden_error(got.read<float>(name), base.read<float>(name)) <= 1e-4);
  }
}

TEST_CASE("text-encode rejects bad output gradients", "[clip][backward][cli]") {
  test::TempDir dir("clip_backward_bad");
  const TokenIds ids =
      io::SafetensorsFile::open(test::data_path("clip_tiny_grad/inputs.safetensors"))
          .read_tensor<std::int64_t, 2>("input_ids");
  auto write_inputs = [&](const std::string& grad_name, std::vector<std::size_t> shape) {
    xt::xarray<float> g = xt::ones<float>(shape);
    const std::string path = dir.file("in.safetensors");
    io::save_safetensors(path, {io::TensorToWrite::from_tensor("input_ids", ids),
                                io::TensorToWrite::from_tensor(grad_name, g)});
    return path;
  };
  const std::string out = dir.file("out.safetensors");
  auto fails = [&](const std::string& in) {
    return run_cli({"text-encode", "--model", test::data_path("clip_tiny_grad"), "--inputs", in,
                    "--out", out}) == 1 &&
           !std::filesystem::exists(out);
  };
  CHECK(fails(write_inputs("grad_output.hidden_states.4", {2, 77, 32})));  // 3 layers: 0..3
  CHECK(fails(write_inputs("grad_output.text_embeds", {2, 32})));
  CHECK(fails(write_inputs("grad_output.logits", {2, 32})));
  CHECK(fails(write_inputs("grad_output.last_hidden_state", {2, 76, 32})));
  CHECK(fails(write_inputs("grad_output.pooler_output", {2, 31})));
  CHECK_FALSE(fails(write_inputs("grad_output.hidden_states.0", {2, 77, 32})));
}

namespace {

ClipTextConfig small_config(models::ClipActivation act, std::size_t layers = 2) {
  ClipTextConfig c;
  c.vocab_size = 50;
  c.hidden_size = 12;
  c.intermediate_size = 20;
  c.num_hidden_layers = layers;
  c.num_attention_heads = 3;
  c.max_position_embeddings = 140;
  c.hidden_act = act;
  c.eos_token_id = 49;
  c.bos_token_id = 48;
  c.pad_token_id = 0;
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

TokenIds random_ids(std::size_t B, std::size_t L, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  TokenIds ids(std::array<std::size_t, 2>{B, L});
  for (auto& id : ids) id = std::int64_t(rng() % 47);
  for (std::size_t b = 0; b < B; ++b) ids(b, L - 1 - 3 * b) = 49;  // eos, then padding
  return ids;
}

template <class Tensor>
Tensor random_like(std::vector<std::size_t> shape, std::uint64_t seed) {
  Tensor t = Tensor::from_shape(shape);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (auto& v : t) v = normal(rng);
  return t;
}

// A key bias adds the same number to every score of a query, which softmax removes: its gradient
// is exactly zero in exact arithmetic (the difference quotient holds only round-off), so it is
// checked as that invariant instead.
bool zero_gradient_by_symmetry(const std::string& name) { return name.ends_with("k_proj.bias"); }
double max_abs_grad(const nn::Parameter<double>& p) {
  double m = 0;
  for (double v : p.grad) m = std::max(m, std::abs(v));
  return m;
}

template <class T>
double dot(const T& a, const T& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += double(a.data()[i]) * double(b.data()[i]);
  return s;
}

}  // namespace

namespace {

// A block's analytic gradients of L = ⟨block(x), w⟩ (backward(w) after forward(x)) against
// central differences, for x and every parameter (key biases: the zero-gradient invariant).
template <class Block>
void check_block(Block& block, std::size_t L, std::size_t D, std::uint64_t seed) {
  nn::GradCheckOptions options;
  options.max_checks = 40;
  auto x = random_like<Tensor3<double>>({2, L, D}, seed);
  const auto w = random_like<Tensor3<double>>({2, L, D}, seed + 1);
  block.forward(x);
  nn::zero_grad<double>(block);
  const Tensor3<double> dx = block.backward(w);
  auto loss = [&] { return dot(block.forward_inference(x), w); };
  const auto r = nn::check_gradient(x, dx, loss, options);
  INFO(r.message);
  CHECK(r.max_error <= 1e-6);
  block.for_each_parameter("", [&](const std::string& name, nn::Parameter<double>& p) {
    if (zero_gradient_by_symmetry(name)) {
      CHECK(max_abs_grad(p) < 1e-12);
      return;
    }
    const auto rp = nn::check_gradient(p, loss, options);
    INFO(name << ": " << rp.message);
    CHECK(rp.max_error <= 1e-6);
  });
}

}  // namespace

TEST_CASE("CLIP blocks pass double-precision gradient checks", "[clip][backward][gradcheck]") {
  const auto act = GENERATE(models::ClipActivation::quick_gelu, models::ClipActivation::gelu);
  const ClipTextConfig c = small_config(act);
  ClipTextModel<double> model(c);
  randomize(model, 5);
  nn::set_trainable<double>(model, true);
  // attention with L beyond one query block (the causal block sees keys up to its last row)
  check_block(model.layers[0].self_attn, nn::kQueryBlock + 5, c.hidden_size, 1);
  check_block(model.layers[1].mlp, 5, c.hidden_size, 3);
  check_block(model.layers[1], 5, c.hidden_size, 5);
}

TEST_CASE("ClipTextModel backward: every output, clip skip, LoRA, token embeddings",
          "[clip][backward][gradcheck]") {
  const ClipTextConfig c = small_config(models::ClipActivation::quick_gelu, 3);
  ClipTextModel<double> model(c);
  randomize(model, 9);
  const std::size_t B = 2, L = 9, D = c.hidden_size;
  const TokenIds ids = random_ids(B, L, 3);
  nn::GradCheckOptions options;
  options.max_checks = 30;

  SECTION("all parameters, gradients into last, pooled and two hidden states") {
    nn::set_trainable<double>(model, true);
    models::ClipTextOutputGrads<double> g;
    g.last_hidden_state = random_like<Tensor3<double>>({B, L, D}, 11);
    g.pooler_output = random_like<Tensor<double, 2>>({B, D}, 12);
    g.hidden_states[1] = random_like<Tensor3<double>>({B, L, D}, 13);
    g.hidden_states[3] = random_like<Tensor3<double>>({B, L, D}, 14);
    auto loss = [&] {
      const auto o = model.forward(ids);
      return dot(o.last_hidden_state, g.last_hidden_state) + dot(o.pooler_output, g.pooler_output) +
             dot(o.hidden_states[1], g.hidden_states[1]) +
             dot(o.hidden_states[3], g.hidden_states[3]);
    };
    const auto out = model.forward_train(ids);
    CHECK(std::abs(loss() - (dot(out.last_hidden_state, g.last_hidden_state) +
                             dot(out.pooler_output, g.pooler_output) +
                             dot(out.hidden_states[1], g.hidden_states[1]) +
                             dot(out.hidden_states[3], g.hidden_states[3]))) < 1e-12);
    nn::zero_grad<double>(model);
    model.backward(g);
    std::size_t checked = 0;
    model.for_each_parameter("", [&](const std::string& name, nn::Parameter<double>& p) {
      ++checked;
      if (zero_gradient_by_symmetry(name)) {
        CHECK(max_abs_grad(p) < 1e-12);
        return;
      }
      const auto r = nn::check_gradient(p, loss, options);
      INFO(name << ": " << r.message);
      CHECK(r.max_error <= 1e-6);
    });
    CHECK(checked == 2 + 3 * 16 + 2);
    // token embedding rows of unused ids get nothing (textual inversion's rows do)
    const auto& tg = model.embeddings.token_embedding.weight.grad;
    bool used[50] = {};
    for (auto id : ids) used[id] = true;
    for (std::size_t v = 0; v < 50; ++v) {
      double row = 0;
      for (std::size_t d = 0; d < D; ++d) row += std::abs(tg(v, d));
      CHECK((row > 0) == used[v]);
    }
    CHECK(model.grad_input_embeddings().shape() == std::array<std::size_t, 3>{B, L, D});
  }

  SECTION("encode_train / encode_backward with clip skip and a LoRA on every Linear") {
    lora::LoraConfig lc;
    lc.rank = 2;
    lc.alpha = 3;
    const auto adapted =
        lora::inject_lora(model, lora::kohya_text_encoder_targets(), lc, RandomStream{4, 0});
    CHECK(adapted.size() == 3 * 6);
    CHECK(adapted.front() == "text_model.encoder.layers.0.self_attn.q_proj");
    lora::for_each_adapter(model, [&](const std::string&, auto& a) {  // B ≠ 0: a real adapter
      auto b = random_like<xt::xarray<double>>(
          {a.lora_B.weight.value.shape()[0], a.lora_B.weight.value.shape()[1]}, 21);
      a.lora_B.weight.value = 0.3 * b;
    });
    const std::size_t clip_skip = 1;
    const auto w = random_like<Tensor3<double>>({B, L, D}, 15);
    auto loss = [&] { return dot(model.encode(ids, clip_skip), w); };
    const Tensor3<double> ctx = model.encode_train(ids, clip_skip);
    CHECK(std::abs(dot(ctx, w) - loss()) < 1e-12);
    nn::zero_grad<double>(model);
    model.encode_backward(w);
    std::size_t trainable = 0;
    model.for_each_parameter("", [&](const std::string& name, nn::Parameter<double>& p) {
      if (!p.trainable) return;
      ++trainable;
      if (zero_gradient_by_symmetry(name)) {
        CHECK(max_abs_grad(p) < 1e-12);
        return;
      }
      const auto r = nn::check_gradient(p, loss, options);
      INFO(name << ": " << r.message);
      CHECK(r.max_error <= 1e-6);
      if (name.find("layers.2.") != std::string::npos) {  // skipped layer: no gradient
        double s = 0;
        for (double v : p.grad) s += std::abs(v);
        CHECK(s == 0);
      }
    });
    CHECK(trainable == 2 * 18);
    // errors: backward of the other kind, wrong shape
    CHECK_THROWS_WITH(model.backward({}), Catch::Contains("no saved forward_train"));
    CHECK_THROWS_WITH(model.encode_backward(Tensor3<double>(std::array<std::size_t, 3>{B, L, 5})),
                      Catch::Contains("grad_context"));
  }
}

TEST_CASE("ClipTextEncoder trains only when it has trainable parameters", "[clip][backward]") {
  ClipTextModel<float> model(small_config(models::ClipActivation::quick_gelu));
  models::ClipTextEncoder encoder(std::move(model));
  CHECK_FALSE(encoder.is_training());
  lora::inject_lora(encoder, lora::diffusers_text_encoder_targets(), {}, RandomStream{1, 2});
  CHECK(encoder.is_training());
  std::size_t adapters = 0;
  lora::for_each_adapter(encoder, [&](const std::string& name, auto&) {
    ++adapters;
    CHECK(name.find("mlp") == std::string::npos);
  });
  CHECK(adapters == 2 * 4);
}
