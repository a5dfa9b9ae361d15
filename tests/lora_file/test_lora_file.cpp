// LoRA files: kohya and PEFT round trips with the exact key spellings, legacy names, the golden
// files of diffusers' unet_tiny_lora case, files with UNet and text-encoder parts, and errors.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "difftrain/io/sha256.hpp"
#include "difftrain/lora/lora_file.hpp"
#include "support/temp_dir.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
namespace fs = std::filesystem;

namespace {
// A model with three adaptable slots under diffusers-like names.
struct TinyModel {
  lora::LinearSlot<float> to_q{nn::Linear<float>(6, 4, false)};
  lora::LinearSlot<float> to_out{nn::Linear<float>(4, 6)};
  lora::Conv2dSlot<float> proj_in{nn::Conv2d<float>(3, 5, 3, 1, 1)};

  TinyModel() {
    int k = 0;
    for_each_parameter("", [&](const std::string&, nn::Parameter<float>& p) {
      for (auto& v : p.value) v = 0.01f * float((k++ * 37) % 23) - 0.1f;
    });
  }
  template <class V>
  void for_each_parameter(const std::string& prefix, V&& v) {
    to_q.for_each_parameter(nn::join_name(prefix, "blocks.0.attn1.to_q"), v);
    to_out.for_each_parameter(nn::join_name(prefix, "blocks.0.attn1.to_out.0"), v);
    proj_in.for_each_parameter(nn::join_name(prefix, "blocks.0.proj_in"), v);
  }
  template <class V>
  void for_each_slot(const std::string& prefix, V&& v) {
    to_q.for_each_slot(nn::join_name(prefix, "blocks.0.attn1.to_q"), v);
    to_out.for_each_slot(nn::join_name(prefix, "blocks.0.attn1.to_out.0"), v);
    proj_in.for_each_slot(nn::join_name(prefix, "blocks.0.proj_in"), v);
  }
  std::pair<Tensor<float, 2>, Tensor4<float>> forward(const Tensor<float, 2>& x,
                                                      const Tensor4<float>& image) {
    return {to_out.forward_inference(to_q.forward_inference(x)), proj_in.forward_inference(image)};
  }
};

using test::TempDir;

// An adapted model whose B matrices are non-zero, so that the adapters matter.
TinyModel adapted_model(double alpha, bool use_rslora = false) {
  TinyModel m;
  lora::LoraConfig config;
  config.rank = 2;
  config.alpha = alpha;
  config.use_rslora = use_rslora;
  lora::inject_lora(m, {"to_q", "to_out.0", "proj_in"}, config, RandomStream{3, 4});
  lora::for_each_adapter(m, [](const std::string&, auto& a) {
    std::size_t k = 0;
    for (auto& v : a.lora_B.weight.value) v = 0.05f * float(k++ % 7) - 0.1f;
  });
  return m;
}

const Tensor<float, 2> x = xt::ones<float>({std::size_t{3}, std::size_t{6}});
const Tensor4<float> image =
    xt::ones<float>({std::size_t{1}, std::size_t{3}, std::size_t{5}, std::size_t{4}});

void require_same_outputs(TinyModel& a, TinyModel& b) {
  const auto [ya, ia] = a.forward(x, image);
  const auto [yb, ib] = b.forward(x, image);
  REQUIRE_CLOSE(ya, yb, 0, 0);
  REQUIRE_CLOSE(ia, ib, 0, 0);
}

// A text encoder's module names (one CLIP encoder layer, transformers' paths).
const std::vector<std::string> kTextEncoderModules = {
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.0.self_attn.k_proj",
    "text_model.encoder.layers.0.self_attn.v_proj",
    "text_model.encoder.layers.0.self_attn.out_proj",
    "text_model.encoder.layers.0.mlp.fc1",
    "text_model.encoder.layers.0.mlp.fc2"};

// A text-encoder part built directly: rank-3 adapters on q_proj and v_proj ([3, 8] / [8, 3]),
// their values set by `offset`, so two parts with the same module names differ.
lora::LoraState text_encoder_state(float offset, double alpha, bool use_rslora = false) {
  lora::LoraState state;
  std::size_t k = 0;
  for (const char* proj : {"q_proj", "v_proj"}) {
    lora::LoraModuleWeights w;
    w.down = xt::xarray<float>::from_shape({3, 8});
    w.up = xt::xarray<float>::from_shape({8, 3});
    for (auto& v : w.down) v = offset + 0.01f * float(k++ % 13);
    for (auto& v : w.up) v = offset - 0.02f * float(k++ % 11);
    w.alpha = alpha;
    w.use_rslora = use_rslora;
    state.emplace(std::string("text_model.encoder.layers.0.self_attn.") + proj, std::move(w));
  }
  return state;
}

void require_same_state(const lora::LoraState& got, const lora::LoraState& expected) {
  REQUIRE(got.size() == expected.size());
  for (const auto& [name, w] : expected) {
    INFO(name);
    REQUIRE(got.count(name) == 1);
    const lora::LoraModuleWeights& g = got.at(name);
    REQUIRE_CLOSE(g.down, w.down, 0, 0);
    REQUIRE_CLOSE(g.up, w.up, 0, 0);
    REQUIRE(g.alpha == w.alpha);
    REQUIRE(g.use_rslora == w.use_rslora);
  }
}

// SHA-256 of a safetensors file's data buffer [8 + N, EOF): kohya's sshs_model_hash.
std::string data_buffer_sha256(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  const std::vector<char> chars((std::istreambuf_iterator<char>(in)),
                                std::istreambuf_iterator<char>());
  std::uint64_t n = 0;
  std::memcpy(&n, chars.data(), 8);
  std::vector<std::byte> bytes(chars.size() - 8 - n);
  std::memcpy(bytes.data(), chars.data() + 8 + n, bytes.size());
  io::Sha256 h;
  h.update(std::span<const std::byte>(bytes));
  return h.hexdigest();
}
}  // namespace

TEST_CASE("kohya format: exact keys, rank-0 alpha, metadata; read back and applied identically") {
  TempDir dir;
  TinyModel model = adapted_model(8.0);
  const std::string path = dir.file("lora.safetensors");
  lora::save_lora(path, lora::collect_lora(model), lora::LoraFormat::kohya);
  const auto file = io::SafetensorsFile::open(path);
  const std::vector<std::string> expected_keys = {
      "lora_unet_blocks_0_attn1_to_out_0.alpha",
      "lora_unet_blocks_0_attn1_to_out_0.lora_down.weight",
      "lora_unet_blocks_0_attn1_to_out_0.lora_up.weight",
      "lora_unet_blocks_0_attn1_to_q.alpha",
      "lora_unet_blocks_0_attn1_to_q.lora_down.weight",
      "lora_unet_blocks_0_attn1_to_q.lora_up.weight",
      "lora_unet_blocks_0_proj_in.alpha",
      "lora_unet_blocks_0_proj_in.lora_down.weight",
      "lora_unet_blocks_0_proj_in.lora_up.weight"};
  REQUIRE(file.names() == expected_keys);
  REQUIRE(file.info("lora_unet_blocks_0_attn1_to_q.alpha").shape.empty());
  REQUIRE(file.read<float>("lora_unet_blocks_0_attn1_to_q.alpha")[0] == 8.0f);
  REQUIRE(file.info("lora_unet_blocks_0_proj_in.lora_down.weight").shape ==
          std::vector<std::size_t>{2, 3, 3, 3});
  REQUIRE(file.info("lora_unet_blocks_0_proj_in.lora_up.weight").shape ==
          std::vector<std::size_t>{5, 2, 1, 1});
  REQUIRE(file.metadata().at("ss_network_module") == "networks.lora");
  REQUIRE(file.metadata().at("ss_network_dim") == "2");
  REQUIRE(file.metadata().at("ss_network_alpha") == "8.0");
  REQUIRE(file.metadata().at("ss_base_model_version") == "sd_v1");

  TinyModel fresh;
  const auto state = lora::read_lora(path, lora::module_names(fresh));
  REQUIRE(state.size() == 3);
  REQUIRE(state.at("blocks.0.attn1.to_out.0").alpha == 8.0);
  REQUIRE(lora::apply_lora(fresh, state).size() == 3);
  require_same_outputs(model, fresh);
  // Only the adapters are trainable after applying.
  fresh.for_each_parameter("", [](const std::string& name, nn::Parameter<float>& p) {
    REQUIRE(p.trainable == lora::is_adapter_parameter(name));
  });
}

TEST_CASE("PEFT format: exact keys and lora_adapter_metadata; read back identically") {
  TempDir dir;
  TinyModel model = adapted_model(0.0);  // alpha 0 means alpha = rank
  const std::string path = dir.file("peft.safetensors");
  TinyModel names_only;
  lora::save_lora(path, lora::collect_lora(model), lora::LoraFormat::peft, {},
                  lora::module_names(names_only));
  const auto file = io::SafetensorsFile::open(path);
  REQUIRE(file.contains("unet.blocks.0.attn1.to_q.lora_A.weight"));
  REQUIRE(file.contains("unet.blocks.0.attn1.to_out.0.lora_B.weight"));
  REQUIRE(file.contains("unet.blocks.0.proj_in.lora_A.weight"));
  REQUIRE(file.size() == 6);
  // diffusers >= 0.34 reads only the keys prefixed by the component, and "format": "pt".
  REQUIRE(file.metadata().at("format") == "pt");
  const auto meta = nlohmann::json::parse(file.metadata().at("lora_adapter_metadata"));
  REQUIRE(meta["unet.r"] == 2);
  REQUIRE(meta["unet.lora_alpha"] == 2.0);
  REQUIRE(meta["unet.use_rslora"] == false);
  REQUIRE(meta["unet.peft_type"] == "LORA");
  REQUIRE(meta["unet.target_modules"] == nlohmann::json({"proj_in", "to_out.0", "to_q"}));
  for (const auto& [key, value] : meta.items()) REQUIRE(key.rfind("unet.", 0) == 0);

  TinyModel fresh;
  lora::apply_lora(fresh, lora::read_lora(path, lora::module_names(fresh)));
  require_same_outputs(model, fresh);
}

TEST_CASE("rsLoRA adapters keep their scale through kohya and PEFT files") {
  // Trained with scale alpha/√r = 3/√2: a kohya reader applies alpha/r, so the file must hold
  // alpha·√r; a PEFT file says use_rslora. Before the fix both stored alpha 3 (scale 3/2).
  TempDir dir;
  TinyModel model = adapted_model(3.0, true);
  TinyModel names_only;
  const auto state = lora::collect_lora(model);
  REQUIRE(state.at("blocks.0.attn1.to_q").use_rslora);

  const std::string kohya = dir.file("rs_kohya.safetensors");
  lora::save_lora(kohya, state, lora::LoraFormat::kohya);
  const auto kohya_file = io::SafetensorsFile::open(kohya);
  REQUIRE(kohya_file.read<float>("lora_unet_blocks_0_attn1_to_q.alpha")[0] ==
          Approx(3.0 * std::sqrt(2.0)));
  TinyModel from_kohya;
  const auto kohya_state = lora::read_lora(kohya, lora::module_names(from_kohya));
  REQUIRE_FALSE(kohya_state.at("blocks.0.attn1.to_q").use_rslora);
  lora::apply_lora(from_kohya, kohya_state);
  const auto [y, i] = model.forward(x, image);
  const auto [yk, ik] = from_kohya.forward(x, image);
  REQUIRE_CLOSE(yk, y, 1e-6, 1e-6);
  REQUIRE_CLOSE(ik, i, 1e-6, 1e-6);

  const std::string peft = dir.file("rs_peft.safetensors");
  lora::save_lora(peft, state, lora::LoraFormat::peft, {}, lora::module_names(names_only));
  const auto meta =
      nlohmann::json::parse(io::SafetensorsFile::open(peft).metadata().at("lora_adapter_metadata"));
  REQUIRE(meta["unet.use_rslora"] == true);
  REQUIRE(meta["unet.lora_alpha"] == 3.0);
  TinyModel from_peft;
  const auto peft_state = lora::read_lora(peft, lora::module_names(from_peft));
  REQUIRE(peft_state.at("blocks.0.proj_in").use_rslora);
  lora::apply_lora(from_peft, peft_state);
  require_same_outputs(model, from_peft);
}

TEST_CASE("legacy diffusers names and PEFT without alpha: alpha defaults to the rank") {
  TempDir dir;
  TinyModel model = adapted_model(0.0);
  const auto state = lora::collect_lora(model);
  const auto& q = state.at("blocks.0.attn1.to_q");
  const auto& o = state.at("blocks.0.attn1.to_out.0");
  const std::string path = dir.file("legacy.safetensors");
  io::save_safetensors(path, {io::TensorToWrite::from_tensor(
                                  "unet.blocks.0.attn1.processor.to_q_lora.down.weight", q.down),
                              io::TensorToWrite::from_tensor(
                                  "unet.blocks.0.attn1.processor.to_q_lora.up.weight", q.up),
                              io::TensorToWrite::from_tensor(
                                  "unet.blocks.0.attn1.processor.to_out_lora.down.weight", o.down),
                              io::TensorToWrite::from_tensor(
                                  "unet.blocks.0.attn1.processor.to_out_lora.up.weight", o.up)});
  TinyModel fresh;
  std::vector<std::string> warnings;
  const WarningHandler previous =
      set_warning_handler([&](const std::string& w) { warnings.push_back(w); });
  const auto read = lora::read_lora(path, lora::module_names(fresh));
  set_warning_handler(previous);
  REQUIRE(warnings.size() == 1);
  REQUIRE_THAT(warnings[0], Catch::Contains(path) && Catch::Contains("alpha = rank"));
  REQUIRE(read.size() == 2);
  REQUIRE(read.at("blocks.0.attn1.to_q").alpha == 2.0);
  REQUIRE_CLOSE(read.at("blocks.0.attn1.to_out.0").up, o.up, 0, 0);
}

TEST_CASE("golden unet_tiny_lora: diffusers' kohya and PEFT files read to the same adapters") {
  const auto peft_file = io::SafetensorsFile::open(test::data_path("lora/lora_peft.safetensors"));
  std::vector<std::string> modules;
  for (const auto& key : peft_file.names()) {
    if (!lora::lora_file_detail::ends_with(key, ".lora_A.weight")) continue;
    modules.push_back(key.substr(5, key.size() - 5 - 14));  // strip "unet." and ".lora_A.weight"
  }
  REQUIRE(modules.size() == 32);
  const auto kohya = lora::read_lora(test::data_path("lora/lora_kohya.safetensors"), modules);
  const auto peft = lora::read_lora(test::data_path("lora/lora_peft.safetensors"), modules);
  REQUIRE(kohya.size() == 32);
  REQUIRE(peft.size() == 32);
  for (const auto& [name, w] : kohya) {
    INFO(name);
    REQUIRE(w.alpha == 8.0);              // the .alpha tensor
    REQUIRE(peft.at(name).alpha == 8.0);  // lora_alpha in lora_adapter_metadata
    REQUIRE(w.rank() == 4);
    REQUIRE_CLOSE(w.down, peft.at(name).down, 0, 0);
    REQUIRE_CLOSE(w.up, peft.at(name).up, 0, 0);
  }
  // Written back in kohya format, the keys are diffusers' own spelling.
  TempDir dir;
  lora::save_lora(dir.file("k.safetensors"), kohya, lora::LoraFormat::kohya);
  const auto mine = io::SafetensorsFile::open(dir.file("k.safetensors"));
  const auto theirs = io::SafetensorsFile::open(test::data_path("lora/lora_kohya.safetensors"));
  REQUIRE(mine.names() == theirs.names());
  for (const char* key :
       {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version"})
    REQUIRE(mine.metadata().at(key) == theirs.metadata().at(key));
}

TEST_CASE("LoRA files: unknown keys, half adapters, shape mismatches and absent modules") {
  TempDir dir;
  TinyModel model = adapted_model(4.0);
  const auto state = lora::collect_lora(model);
  const auto& q = state.at("blocks.0.attn1.to_q");
  TinyModel fresh;
  const auto names = lora::module_names(fresh);

  io::save_safetensors(
      dir.file("unknown.safetensors"),
      {io::TensorToWrite::from_tensor("lora_unet_blocks_0_attn9_to_q.lora_down.weight", q.down)});
  REQUIRE_THROWS_WITH(
      lora::read_lora(dir.file("unknown.safetensors"), names),
      Catch::Contains("name no module of the model: lora_unet_blocks_0_attn9_to_q"));

  io::save_safetensors(
      dir.file("half.safetensors"),
      {io::TensorToWrite::from_tensor("unet.blocks.0.attn1.to_q.lora_A.weight", q.down)});
  REQUIRE_THROWS_WITH(lora::read_lora(dir.file("half.safetensors"), names),
                      Catch::Contains("no up (B) weight for module blocks.0.attn1.to_q"));

  lora::LoraState wrong = state;
  wrong.at("blocks.0.attn1.to_q").down = xt::zeros<float>({std::size_t{2}, std::size_t{7}});
  REQUIRE_THROWS_WITH(
      lora::apply_lora(fresh, wrong),
      Catch::Contains("blocks.0.attn1.to_q down (A) has shape [2,7], expected [2,6]"));
  lora::LoraState absent;
  absent["blocks.1.attn1.to_q"] = q;
  TinyModel other;
  REQUIRE_THROWS_WITH(lora::apply_lora(other, absent),
                      Catch::Contains("modules not found in the model: blocks.1.attn1.to_q"));
  REQUIRE_THROWS_AS(
      lora::save_lora(dir.file("empty.safetensors"), lora::LoraState{}, lora::LoraFormat::kohya),
      Error);
  REQUIRE_THROWS_AS(lora::parse_lora_format("lycoris"), Error);
}

TEST_CASE("kohya file with UNet and text-encoder parts: keys, metadata, each part read back") {
  TempDir dir;
  TinyModel model = adapted_model(8.0);
  TinyModel names_only;
  const auto unet_modules = lora::module_names(names_only);
  const lora::LoraState unet = lora::collect_lora(model);
  const lora::LoraState te = text_encoder_state(0.1f, 6.0);
  const std::string path = dir.file("two_parts.safetensors");
  lora::save_lora(
      path,
      {{lora::kLoraUnet, unet, unet_modules}, {lora::kLoraTextEncoder, te, kTextEncoderModules}},
      lora::LoraFormat::kohya);
  const auto file = io::SafetensorsFile::open(path);
  REQUIRE(file.size() == 9 + 6);
  for (const char* key :
       {"lora_unet_blocks_0_attn1_to_q.lora_down.weight", "lora_unet_blocks_0_proj_in.alpha",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_v_proj.alpha"}) {
    INFO(key);
    REQUIRE(file.contains(key));
  }
  REQUIRE(file.info("lora_te_text_model_encoder_layers_0_self_attn_v_proj.alpha").shape.empty());
  REQUIRE(file.read<float>("lora_te_text_model_encoder_layers_0_self_attn_v_proj.alpha")[0] ==
          6.0f);
  REQUIRE(file.read<float>("lora_unet_blocks_0_attn1_to_q.alpha")[0] == 8.0f);
  // Over all parts: the first (smallest) rank and alpha; the hash over every tensor.
  REQUIRE(file.metadata().at("ss_network_dim") == "2");
  REQUIRE(file.metadata().at("ss_network_alpha") == "6.0");
  REQUIRE(file.metadata().at("ss_network_module") == "networks.lora");
  REQUIRE(file.metadata().at("sshs_model_hash") == data_buffer_sha256(path));

  // Each component reads its own part and skips the other's keys.
  require_same_state(lora::read_lora(path, unet_modules), unet);
  require_same_state(lora::read_lora(path, unet_modules, lora::kLoraUnet), unet);
  require_same_state(lora::read_lora(path, kTextEncoderModules, lora::kLoraTextEncoder), te);
  require_same_state(lora::read_lora(path, kTextEncoderModules, "text_encoder", "lora_te"), te);
  // lora_te1_ (SDXL's first encoder) is not lora_te_: no part for it here.
  REQUIRE(lora::read_lora(path, kTextEncoderModules, lora::kLoraSdxlTextEncoder1).empty());
  TinyModel fresh;
  REQUIRE(lora::apply_lora(fresh, lora::read_lora(path, lora::module_names(fresh))).size() == 3);
  require_same_outputs(model, fresh);

  REQUIRE(lora::lora_file_components(path) == std::set<std::string>{"text_encoder", "unet"});
  REQUIRE_NOTHROW(lora::require_lora_components(path, {lora::kLoraUnet, lora::kLoraTextEncoder}));
  // A text-encoder part given a model without one is an error naming the file, the component
  // and its first key.
  REQUIRE_THROWS_WITH(
      lora::require_lora_components(path, {lora::kLoraUnet}),
      Catch::Contains(path) && Catch::Contains("part for text_encoder (kohya prefix lora_te_)") &&
          Catch::Contains("first key lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"));
  REQUIRE_THROWS_WITH(
      lora::require_lora_components(
          path, {lora::kLoraUnet, lora::kLoraSdxlTextEncoder1, lora::kLoraSdxlTextEncoder2}),
      Catch::Contains("kohya prefix lora_te_"));
}

TEST_CASE("PEFT file with UNet and text-encoder parts: one lora_adapter_metadata, prefixed") {
  TempDir dir;
  TinyModel model = adapted_model(8.0);
  TinyModel names_only;
  const auto unet_modules = lora::module_names(names_only);
  const lora::LoraState unet = lora::collect_lora(model);
  const lora::LoraState te = text_encoder_state(0.1f, 6.0, true);  // use_rslora stays per part
  const std::string path = dir.file("two_parts_peft.safetensors");
  lora::save_lora(
      path,
      {{lora::kLoraUnet, unet, unet_modules}, {lora::kLoraTextEncoder, te, kTextEncoderModules}},
      lora::LoraFormat::peft);
  const auto file = io::SafetensorsFile::open(path);
  REQUIRE(file.size() == 6 + 4);
  for (const char* key :
       {"unet.blocks.0.attn1.to_q.lora_A.weight", "unet.blocks.0.proj_in.lora_B.weight",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
        "text_encoder.text_model.encoder.layers.0.self_attn.v_proj.lora_B.weight"}) {
    INFO(key);
    REQUIRE(file.contains(key));
  }
  // diffusers' save_lora_weights: every component's LoraConfig under "<component>." in one JSON.
  REQUIRE(file.metadata().at("format") == "pt");
  const auto meta = nlohmann::json::parse(file.metadata().at("lora_adapter_metadata"));
  REQUIRE(meta["unet.r"] == 2);
  REQUIRE(meta["unet.lora_alpha"] == 8.0);
  REQUIRE(meta["unet.use_rslora"] == false);
  REQUIRE(meta["unet.target_modules"] == nlohmann::json({"proj_in", "to_out.0", "to_q"}));
  REQUIRE(meta["text_encoder.peft_type"] == "LORA");
  REQUIRE(meta["text_encoder.r"] == 3);
  REQUIRE(meta["text_encoder.lora_alpha"] == 6.0);
  REQUIRE(meta["text_encoder.use_rslora"] == true);
  REQUIRE(meta["text_encoder.target_modules"] == nlohmann::json({"q_proj", "v_proj"}));
  REQUIRE(meta.size() == 2 * 11);
  for (const auto& [key, value] : meta.items())
    REQUIRE((key.rfind("unet.", 0) == 0 || key.rfind("text_encoder.", 0) == 0));

  require_same_state(lora::read_lora(path, unet_modules), unet);
  require_same_state(lora::read_lora(path, kTextEncoderModules, lora::kLoraTextEncoder), te);
  // SDXL's first encoder has the same PEFT prefix.
  require_same_state(lora::read_lora(path, kTextEncoderModules, lora::kLoraSdxlTextEncoder1), te);
  TinyModel fresh;
  lora::apply_lora(fresh, lora::read_lora(path, lora::module_names(fresh)));
  require_same_outputs(model, fresh);

  REQUIRE(lora::lora_file_components(path) == std::set<std::string>{"text_encoder", "unet"});
  REQUIRE_NOTHROW(
      lora::require_lora_components(path, {lora::kLoraUnet, lora::kLoraSdxlTextEncoder1}));
  REQUIRE_THROWS_WITH(
      lora::require_lora_components(path, {lora::kLoraUnet}),
      Catch::Contains(path) &&
          Catch::Contains("part for text_encoder (PEFT prefix text_encoder.)") &&
          Catch::Contains(
              "first key text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"));
}

TEST_CASE("SDXL: the two text encoders' parts stay apart in kohya and PEFT files") {
  TempDir dir;
  TinyModel model = adapted_model(4.0);
  TinyModel names_only;
  const auto unet_modules = lora::module_names(names_only);
  const lora::LoraState unet = lora::collect_lora(model);
  // The same module names in both encoders, different weights and alphas.
  const lora::LoraState te1 = text_encoder_state(0.1f, 6.0);
  const lora::LoraState te2 = text_encoder_state(-0.3f, 5.0);
  for (const auto format : {lora::LoraFormat::kohya, lora::LoraFormat::peft}) {
    const bool kohya = format == lora::LoraFormat::kohya;
    INFO((kohya ? "kohya" : "peft"));
    const std::string path = dir.file(kohya ? "sdxl_kohya.safetensors" : "sdxl_peft.safetensors");
    lora::LoraSaveOptions options;
    options.base_model_version = "sdxl_base_v1-0";
    lora::save_lora(path,
                    {{lora::kLoraUnet, unet, unet_modules},
                     {lora::kLoraSdxlTextEncoder1, te1, kTextEncoderModules},
                     {lora::kLoraSdxlTextEncoder2, te2, kTextEncoderModules}},
                    format, options);
    const auto file = io::SafetensorsFile::open(path);
    if (kohya) {
      REQUIRE(file.size() == 9 + 6 + 6);
      REQUIRE(file.contains("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"));
      REQUIRE(file.contains("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha"));
      REQUIRE(file.read<float>("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha")[0] ==
              5.0f);
      REQUIRE(file.metadata().at("ss_network_alpha") == "4.0");
      REQUIRE(file.metadata().at("ss_base_model_version") == "sdxl_base_v1-0");
    } else {
      REQUIRE(file.size() == 6 + 4 + 4);
      REQUIRE(
          file.contains("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"));
      REQUIRE(file.contains(
          "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"));
      const auto meta = nlohmann::json::parse(file.metadata().at("lora_adapter_metadata"));
      REQUIRE(meta.size() == 3 * 11);
      REQUIRE(meta["text_encoder.lora_alpha"] == 6.0);
      REQUIRE(meta["text_encoder_2.lora_alpha"] == 5.0);
      REQUIRE(meta["unet.lora_alpha"] == 4.0);
    }
    require_same_state(lora::read_lora(path, unet_modules), unet);
    require_same_state(lora::read_lora(path, kTextEncoderModules, lora::kLoraSdxlTextEncoder1),
                       te1);
    require_same_state(lora::read_lora(path, kTextEncoderModules, lora::kLoraSdxlTextEncoder2),
                       te2);
    REQUIRE(lora::lora_file_components(path) ==
            std::set<std::string>{"text_encoder", "text_encoder_2", "unet"});
    REQUIRE_NOTHROW(lora::require_lora_components(
        path, {lora::kLoraUnet, lora::kLoraSdxlTextEncoder1, lora::kLoraSdxlTextEncoder2}));
    // An SD 1.x model (one text encoder) given an SDXL file.
    REQUIRE_THROWS_WITH(
        lora::require_lora_components(path, {lora::kLoraUnet, lora::kLoraTextEncoder}),
        Catch::Contains(path) && Catch::Contains("part for text_encoder") &&
            Catch::Contains(kohya ? "lora_te1_" : "text_encoder_2."));
  }
}

TEST_CASE("text-encoder parts: plain and prefixed metadata, unknown keys, bad parts") {
  TempDir dir;
  const lora::LoraState te = text_encoder_state(0.2f, 12.0);
  const auto& q = te.at("text_model.encoder.layers.0.self_attn.q_proj");
  const std::string q_key = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj";
  auto write = [&](const std::string& name, std::vector<io::TensorToWrite> extra,
                   const std::string& meta) {
    std::vector<io::TensorToWrite> tensors = {
        io::TensorToWrite::from_tensor(q_key + ".lora_A.weight", q.down),
        io::TensorToWrite::from_tensor(q_key + ".lora_B.weight", q.up)};
    for (auto& t : extra) tensors.push_back(std::move(t));
    std::map<std::string, std::string> metadata;
    if (!meta.empty()) metadata["lora_adapter_metadata"] = meta;
    io::save_safetensors(dir.file(name), tensors, metadata);
    return dir.file(name);
  };
  // Older files: plain LoraConfig keys; the component's prefixed keys win over plain ones.
  const auto plain =
      lora::read_lora(write("plain.safetensors", {}, R"({"r": 3, "lora_alpha": 12})"),
                      kTextEncoderModules, lora::kLoraTextEncoder);
  REQUIRE(plain.at("text_model.encoder.layers.0.self_attn.q_proj").alpha == 12.0);
  const auto both = lora::read_lora(
      write("both.safetensors", {},
            R"({"lora_alpha": 12, "text_encoder.lora_alpha": 3, "text_encoder_2.lora_alpha": 7})"),
      kTextEncoderModules, lora::kLoraTextEncoder);
  REQUIRE(both.at("text_model.encoder.layers.0.self_attn.q_proj").alpha == 3.0);
  REQUIRE_THROWS_WITH(lora::read_lora(write("array.safetensors", {}, "[1, 2]"), kTextEncoderModules,
                                      lora::kLoraTextEncoder),
                      Catch::Contains("array.safetensors") &&
                          Catch::Contains("lora_adapter_metadata that is not a JSON object"));

  // Keys under no known component's prefix that name no module stay an error naming them;
  // text_encoder_3. is not text_encoder. and lora_vae_ is no known component.
  const std::string unknown =
      write("unknown.safetensors",
            {io::TensorToWrite::from_tensor("text_encoder_3.layers.0.q_proj.lora_A.weight", q.down),
             io::TensorToWrite::from_tensor("unet.blocks.0.attn1.to_q.lora_A.weight", q.down),
             io::TensorToWrite::from_tensor("lora_vae_encoder_conv_in.lora_down.weight", q.down)},
            R"({"text_encoder.lora_alpha": 3})");
  REQUIRE_THROWS_WITH(
      lora::read_lora(unknown, kTextEncoderModules, lora::kLoraTextEncoder),
      Catch::Contains(unknown) && Catch::Contains("2 keys that name no module of the model: "
                                                  "lora_vae_encoder_conv_in.lora_down.weight, "
                                                  "text_encoder_3.layers.0.q_proj.lora_A.weight"));
  REQUIRE(lora::lora_file_components(unknown) == std::set<std::string>{"text_encoder", "unet"});
  // A key of the requested component that names none of its modules.
  const std::string stray =
      write("stray.safetensors",
            {io::TensorToWrite::from_tensor(
                "text_encoder.text_model.encoder.layers.9.mlp.fc1.lora_A.weight", q.down)},
            "");
  REQUIRE_THROWS_WITH(lora::read_lora(stray, kTextEncoderModules, lora::kLoraTextEncoder),
                      Catch::Contains("text_encoder.text_model.encoder.layers.9.mlp.fc1"));
  // The UNet of this file has a key for a module the model does not have.
  TinyModel names_only;
  REQUIRE_THROWS_WITH(lora::read_lora(unknown, lora::module_names(names_only)),
                      Catch::Contains("name no module of the model: "));

  // Saving: no parts, a part without adapters, two parts under one prefix.
  const auto all = kTextEncoderModules;
  REQUIRE_THROWS_AS(lora::save_lora(dir.file("none.safetensors"), std::vector<lora::LoraPart>{},
                                    lora::LoraFormat::kohya),
                    Error);
  REQUIRE_THROWS_WITH(
      lora::save_lora(dir.file("empty_part.safetensors"),
                      {{lora::kLoraUnet, te, all}, {lora::kLoraTextEncoder, {}, all}},
                      lora::LoraFormat::peft),
      Catch::Contains("empty_part.safetensors") && Catch::Contains("no adapters") &&
          Catch::Contains("text_encoder"));
  REQUIRE_THROWS_WITH(lora::save_lora(dir.file("twice.safetensors"),
                                      {{lora::kLoraUnet, te, all}, {lora::kLoraUnet, te, all}},
                                      lora::LoraFormat::kohya),
                      Catch::Contains("twice.safetensors") &&
                          Catch::Contains("two parts have the kohya prefix 'lora_unet'"));
  // lora_te_ and lora_te1_ differ, but both are PEFT text_encoder.
  REQUIRE_NOTHROW(
      lora::save_lora(dir.file("te_te1.safetensors"),
                      {{lora::kLoraTextEncoder, te, all}, {lora::kLoraSdxlTextEncoder1, te, all}},
                      lora::LoraFormat::kohya));
  REQUIRE_THROWS_WITH(
      lora::save_lora(dir.file("te_te1_peft.safetensors"),
                      {{lora::kLoraTextEncoder, te, all}, {lora::kLoraSdxlTextEncoder1, te, all}},
                      lora::LoraFormat::peft),
      Catch::Contains("two parts have the PEFT prefix 'text_encoder'"));
  REQUIRE_THROWS_WITH(lora::save_lora(dir.file("no_prefix.safetensors"),
                                      {{lora::kLoraUnet, te, all}, {{"", "lora_te"}, te, all}},
                                      lora::LoraFormat::peft),
                      Catch::Contains("empty PEFT prefix"));
}

TEST_CASE("LoRA files: empty, duplicate, non-finite and mistyped input is refused (issue #19)") {
  TempDir dir;
  TinyModel model = adapted_model(4.0);
  const auto state = lora::collect_lora(model);
  const auto& q = state.at("blocks.0.attn1.to_q");
  TinyModel fresh;
  const auto names = lora::module_names(fresh);
  const std::string path = dir.file("bad.safetensors");
  auto q_tensors = [&](const xt::xarray<float>& up) {
    std::vector<io::TensorToWrite> tensors;
    tensors.push_back(
        io::TensorToWrite::from_tensor("unet.blocks.0.attn1.to_q.lora_A.weight", q.down));
    tensors.push_back(io::TensorToWrite::from_tensor("unet.blocks.0.attn1.to_q.lora_B.weight", up));
    return tensors;
  };
  const std::string peft_meta = "lora_adapter_metadata";

  SECTION("a file without tensors would apply as a no-op") {
    io::save_safetensors(path, {});
    REQUIRE_THROWS_WITH(lora::read_lora(path, names),
                        Catch::Contains(path) && Catch::Contains("holds no tensors"));
  }
  SECTION("kohya and PEFT keys for one module: neither silently wins") {
    auto tensors = q_tensors(q.up);
    tensors.push_back(
        io::TensorToWrite::from_tensor("lora_unet_blocks_0_attn1_to_q.lora_down.weight", q.down));
    io::save_safetensors(path, tensors);
    REQUIRE_THROWS_WITH(lora::read_lora(path, names),
                        Catch::Contains("two tensors for the down of module blocks.0.attn1.to_q") &&
                            Catch::Contains("lora_unet_blocks_0_attn1_to_q.lora_down.weight") &&
                            Catch::Contains("unet.blocks.0.attn1.to_q.lora_A.weight"));
  }
  SECTION("NaN and Inf weights are refused, naming the tensor and element") {
    for (const float bad : {std::nanf(""), std::numeric_limits<float>::infinity()}) {
      xt::xarray<float> up = q.up;
      up(3, 1) = bad;
      io::save_safetensors(path, q_tensors(up));
      REQUIRE_THROWS_WITH(
          lora::read_lora(path, names),
          Catch::Contains("tensor 'unet.blocks.0.attn1.to_q.lora_B.weight' holds") &&
              Catch::Contains("at element 7, expected finite weights"));
    }
  }
  SECTION("PEFT metadata of the wrong type is an error, not alpha = r") {
    const std::vector<std::pair<std::string, std::string>> cases = {
        {R"({"lora_alpha": "8"})", R"("lora_alpha" is "8", expected a number)"},
        {R"({"unet.lora_alpha": [8]})", R"("unet.lora_alpha" is [8], expected a number)"},
        {R"({"alpha_pattern": 3})", R"("alpha_pattern" is 3, expected an object)"},
        {R"({"alpha_pattern": {"blocks.0.attn1.to_q": "2"}})",
         R"(alpha_pattern "blocks.0.attn1.to_q" is "2", expected a finite number)"},
        {R"({"use_rslora": "yes"})", R"("use_rslora" is "yes", expected true or false)"},
        {R"([1, 2])", "lora_adapter_metadata that is not a JSON object"}};
    for (const auto& [meta, expected] : cases) {
      INFO(meta);
      io::save_safetensors(path, q_tensors(q.up), {{peft_meta, meta}});
      REQUIRE_THROWS_WITH(lora::read_lora(path, names),
                          Catch::Contains(path) && Catch::Contains(expected));
    }
    // null is PEFT's "not set": the default, as before
    io::save_safetensors(path, q_tensors(q.up), {{peft_meta, R"({"lora_alpha": null, "r": 2})"}});
    REQUIRE(lora::read_lora(path, names).at("blocks.0.attn1.to_q").alpha == 2.0);
    io::save_safetensors(path, q_tensors(q.up), {{peft_meta, R"({"unet.lora_alpha": 8})"}});
    REQUIRE(lora::read_lora(path, names).at("blocks.0.attn1.to_q").alpha == 8.0);
  }
}
