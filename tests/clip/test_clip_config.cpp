// ClipTextConfig: the golden transformers config.json, the presets, ignored keys, and an Error
// naming the key and value for every unsupported or unknown setting.
#include <catch2/catch.hpp>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "clip/clip_test_support.hpp"
#include "difftrain/models/clip/clip_config.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using Catch::Matchers::Contains;
using models::ClipActivation;
using models::ClipTextConfig;
using nlohmann::json;

namespace {

json golden_config() {
  std::ifstream in(test::data_path("clip_tiny/config.json"));
  return json::parse(in);
}

// The message of the Error that parsing `j` throws ("" when it does not throw).
std::string parse_error(const json& j) {
  try {
    ClipTextConfig::from_json(j);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("the golden clip_tiny config.json parses to its values", "[clip][config]") {
  const auto c = ClipTextConfig::from_file(test::data_path("clip_tiny/config.json"));
  CHECK(c.vocab_size == 1000);
  CHECK(c.hidden_size == 32);
  CHECK(c.intermediate_size == 37);
  CHECK(c.num_hidden_layers == 3);
  CHECK(c.num_attention_heads == 4);
  CHECK(c.head_dim() == 8);
  CHECK(c.max_position_embeddings == 77);
  CHECK(c.hidden_act == ClipActivation::quick_gelu);
  CHECK(c.layer_norm_eps == 1e-5);
  CHECK(c.bos_token_id == 998);
  CHECK(c.eos_token_id == 999);
  CHECK(c.pad_token_id == 999);
  CHECK_FALSE(c.pools_at_argmax());
}

TEST_CASE("ClipTextConfig defaults and presets", "[clip][config]") {
  const auto d = ClipTextConfig::from_json(json::object());  // transformers' defaults
  CHECK(d.vocab_size == 49408);
  CHECK(d.hidden_size == 512);
  CHECK(d.num_hidden_layers == 12);
  CHECK(d.eos_token_id == 49407);
  CHECK_FALSE(d.pools_at_argmax());

  const auto sd15 = ClipTextConfig::sd15();
  sd15.validate();
  CHECK(sd15.hidden_size == 768);
  CHECK(sd15.head_dim() == 64);
  CHECK(sd15.pools_at_argmax());  // legacy eos_token_id 2
  const auto sd21 = ClipTextConfig::sd21();
  sd21.validate();
  CHECK(sd21.hidden_act == ClipActivation::gelu);
  CHECK(sd21.num_hidden_layers == 23);
  CHECK(sd21.head_dim() == 64);

  // the SD 1.5 text_encoder/config.json as published
  const json sd15_json = {{"_name_or_path", "openai/clip-vit-large-patch14"},
                          {"architectures", {"CLIPTextModel"}},
                          {"attention_dropout", 0.0},
                          {"bos_token_id", 0},
                          {"dropout", 0.0},
                          {"eos_token_id", 2},
                          {"hidden_act", "quick_gelu"},
                          {"hidden_size", 768},
                          {"initializer_factor", 1.0},
                          {"initializer_range", 0.02},
                          {"intermediate_size", 3072},
                          {"layer_norm_eps", 1e-05},
                          {"max_position_embeddings", 77},
                          {"model_type", "clip_text_model"},
                          {"num_attention_heads", 12},
                          {"num_hidden_layers", 12},
                          {"pad_token_id", 1},
                          {"projection_dim", 768},
                          {"torch_dtype", "float32"},
                          {"transformers_version", "4.22.0.dev0"},
                          {"vocab_size", 49408}};
  const auto parsed = ClipTextConfig::from_json(sd15_json);
  CHECK(parsed.hidden_size == sd15.hidden_size);
  CHECK(parsed.intermediate_size == sd15.intermediate_size);
  CHECK(parsed.num_attention_heads == sd15.num_attention_heads);
  CHECK(parsed.eos_token_id == 2);
  CHECK(parsed.pools_at_argmax());
}

TEST_CASE("ClipTextConfig ignores bookkeeping keys", "[clip][config]") {
  json j = golden_config();
  j["architectures"] = {"CLIPTextModel"};
  j["_name_or_path"] = "somewhere";
  j["_commit_hash"] = "abc";
  j["torch_dtype"] = "float16";
  j["projection_dim"] = 768;
  j["num_beams"] = 4;
  j["id2label"] = {{"0", "LABEL_0"}};
  j["pruned_heads"] = json::object();
  j["is_decoder"] = false;
  j["some_future_key"] = nullptr;  // null: nothing set
  j["bos_token_id"] = nullptr;
  j["gelu_new_thing"] = nullptr;
  const auto c = ClipTextConfig::from_json(j);
  CHECK(c.hidden_size == 32);
  CHECK_FALSE(c.bos_token_id.has_value());
  j["gelu_new_thing"] = 1;
  CHECK_THAT(parse_error(j), Contains("unknown key gelu_new_thing = 1"));
}

TEST_CASE("ClipTextConfig errors name the key and the value", "[clip][config]") {
  struct Case {
    const char* key;
    json value;
    const char* expected;  // substring of the message
  };
  const Case cases[] = {
      {"hidden_act", "relu", "hidden_act = \"relu\" is not supported"},
      {"hidden_act", "gelu_new", "hidden_act = \"gelu_new\" is not supported"},
      {"hidden_size", 30, "hidden_size = 30 is not divisible by num_attention_heads = 4"},
      {"hidden_size", 0, "hidden_size = 0, expected a positive integer"},
      {"hidden_size", 32.5, "hidden_size = 32.5, expected a positive integer"},
      {"hidden_size", "32", "hidden_size = \"32\", expected a positive integer"},
      {"vocab_size", -3, "vocab_size = -3, expected a positive integer"},
      {"num_hidden_layers", 0, "num_hidden_layers = 0"},
      {"num_attention_heads", 5, "not divisible by num_attention_heads = 5"},
      {"intermediate_size", nullptr, ""},  // null keeps the default: no error
      {"layer_norm_eps", 0, "layer_norm_eps = 0, expected a positive number"},
      {"layer_norm_eps", -1e-5, "layer_norm_eps"},
      {"eos_token_id", 1000, "eos_token_id = 1000, expected an id in [0, vocab_size = 1000)"},
      {"eos_token_id", -1, "eos_token_id = -1"},
      {"eos_token_id", nullptr, "eos_token_id = null"},
      {"max_position_embeddings", 0, "max_position_embeddings = 0"},
      {"dropout", 1.5, "dropout = 1.5, expected a probability"},
      {"attention_dropout", "x", "attention_dropout = \"x\""},
      {"pruned_heads", {{"0", {1}}}, "pruned_heads"},
      {"add_cross_attention", true, "add_cross_attention = true, expected false"},
      {"text_config", json::object(), "unknown key text_config"},
      {"num_key_value_heads", 2, "unknown key num_key_value_heads = 2"},
  };
  for (const auto& c : cases) {
    json j = golden_config();
    j[c.key] = c.value;
    INFO(c.key << " = " << c.value.dump());
    const std::string message = parse_error(j);
    if (std::string(c.expected).empty()) {
      CHECK(message.empty());
    } else {
      CHECK_THAT(message, Contains("ClipTextConfig") && Contains(c.expected));
    }
  }
  CHECK_THAT(parse_error(json::array()), Contains("expected an object"));
}

TEST_CASE("ClipTextConfig::from_file reports unreadable files", "[clip][config]") {
  test::TempDir dir("clip_config");
  CHECK_THROWS_WITH(ClipTextConfig::from_file(dir.file("missing.json")), Contains("cannot open"));
  std::ofstream(dir.file("bad.json")) << "{\"hidden_size\": ";
  CHECK_THROWS_WITH(ClipTextConfig::from_file(dir.file("bad.json")), Contains("not valid JSON"));
  std::ofstream(dir.file("act.json")) << "{\"hidden_act\": \"tanh\"}";
  CHECK_THROWS_WITH(ClipTextConfig::from_file(dir.file("act.json")),
                    Contains("hidden_act = \"tanh\"") && Contains("act.json"));
}
