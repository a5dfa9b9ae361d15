// `difftrain text-encode` and `difftrain tokenize`, registered on a CLI11 app by
// add_text_commands and run in-process: golden clip_tiny outputs, the golden tokenizer cases,
// the prompt-file line rules, and exit code 1 with a message on bad input.
#include <CLI/CLI.hpp>
#include <catch2/catch.hpp>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "clip/clip_test_support.hpp"
#include "cmd_text.hpp"
#include "difftrain/io/safetensors.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using Ids = std::vector<std::int64_t>;

namespace {

struct RunResult {
  int exit_code = -1;
  std::string out;
};

// Parses `args` (without the program name) on an app with the text commands, capturing stdout.
RunResult run(std::vector<std::string> args) {
  CLI::App app{"test"};
  app.require_subcommand(1);
  RunResult result;
  tools::add_text_commands(app, result.exit_code);
  std::vector<const char*> argv{"difftrain"};
  for (const auto& a : args) argv.push_back(a.c_str());
  std::ostringstream captured;
  std::streambuf* old = std::cout.rdbuf(captured.rdbuf());
  try {
    app.parse(static_cast<int>(argv.size()), argv.data());
  } catch (...) {
    std::cout.rdbuf(old);
    throw;
  }
  std::cout.rdbuf(old);
  result.out = captured.str();
  return result;
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

nlohmann::json tokenizer_cases() {
  std::ifstream in(test::data_path("tokenizer_tiny/cases.json"));
  return nlohmann::json::parse(in);
}

}  // namespace

TEST_CASE("text-encode writes every golden clip_tiny tensor", "[clip][cli]") {
  test::TempDir dir("cmd_text");
  const std::string out = dir.file("out.safetensors");
  const auto r = run({"text-encode", "--model", test::data_path("clip_tiny"), "--inputs",
                      test::data_path("clip_tiny/inputs.safetensors"), "--out", out});
  REQUIRE(r.exit_code == 0);
  const auto got = io::SafetensorsFile::open(out);
  const auto expected =
      io::SafetensorsFile::open(test::data_path("clip_tiny/expected.safetensors"));
  for (const auto& name : expected.names()) {
    REQUIRE(got.contains(name));
    CHECK(got.info(name).dtype == io::Dtype::F32);
    CHECK(got.info(name).shape == expected.info(name).shape);
    const double error = test::golden_error(got.read<float>(name), expected.read<float>(name));
    INFO(name << " error " << error);
    CHECK(error <= 1e-4);
  }

  // bad input: exit code 1, nothing written
  const std::string none = dir.file("none.safetensors");
  CHECK(run({"text-encode", "--model", dir.file("no_model"), "--inputs",
             test::data_path("clip_tiny/inputs.safetensors"), "--out", none})
            .exit_code == 1);
  CHECK(run({"text-encode", "--model", test::data_path("clip_tiny"), "--inputs",
             test::data_path("clip_tiny/expected.safetensors"), "--out", none})
            .exit_code == 1);  // no input_ids there
  CHECK_FALSE(std::filesystem::exists(none));
}

TEST_CASE("tokenize prints the golden ids, one JSON array per prompt line", "[clip][cli]") {
  const auto cases = tokenizer_cases();
  REQUIRE(cases.size() == 16);
  test::TempDir dir("cmd_tokenize");
  std::string prompts;
  for (const auto& c : cases) {
    const auto text = c["text"].get<std::string>();
    REQUIRE(text.find('\n') == std::string::npos);
    prompts += text + "\n";
  }
  std::ofstream(dir.file("prompts.txt"), std::ios::binary) << prompts;
  const auto r = run({"tokenize", "--tokenizer", test::data_path("tokenizer_tiny"), "--inputs",
                      dir.file("prompts.txt")});
  REQUIRE(r.exit_code == 0);
  const auto lines = lines_of(r.out);
  REQUIRE(lines.size() == cases.size());
  for (std::size_t i = 0; i < cases.size(); ++i) {
    INFO("text: " << cases[i]["text"].get<std::string>());
    const auto ids = nlohmann::json::parse(lines[i]);
    REQUIRE(ids.is_array());
    CHECK(ids.size() == 77);
    CHECK(ids.get<Ids>() == cases[i]["input_ids"].get<Ids>());
  }
}

TEST_CASE("tokenize line rules and errors", "[clip][cli]") {
  test::TempDir dir("cmd_tokenize_lines");
  const auto cases = tokenizer_cases();
  const Ids first = cases[0]["input_ids"].get<Ids>();  // "a photo of a cat"
  Ids empty_prompt;
  for (const auto& c : cases)
    if (c["text"] == "") empty_prompt = c["input_ids"].get<Ids>();
  REQUIRE(empty_prompt.size() == 77);
  const std::string text = cases[0]["text"].get<std::string>();
  auto ids_of = [&](const std::string& content) {
    std::ofstream(dir.file("p.txt"), std::ios::binary | std::ios::trunc) << content;
    const auto r = run({"tokenize", "--tokenizer", test::data_path("tokenizer_tiny"), "--inputs",
                        dir.file("p.txt")});
    REQUIRE(r.exit_code == 0);
    std::vector<Ids> out;
    for (const auto& line : lines_of(r.out)) out.push_back(nlohmann::json::parse(line).get<Ids>());
    return out;
  };
  // an empty line in the middle is the empty prompt; a last line without '\n' is a prompt
  CHECK(ids_of(text + "\n\n" + text) == std::vector<Ids>{first, empty_prompt, first});
  CHECK(ids_of("\n") == std::vector<Ids>{empty_prompt});
  CHECK(ids_of("").empty());

  // invalid UTF-8 and a missing tokenizer or prompt file: exit code 1, nothing printed
  std::ofstream(dir.file("bad.txt"), std::ios::binary) << text << "\n\xff\xfe\n";
  const auto bad = run({"tokenize", "--tokenizer", test::data_path("tokenizer_tiny"), "--inputs",
                        dir.file("bad.txt")});
  CHECK(bad.exit_code == 1);
  CHECK(bad.out.empty());
  CHECK_THROWS_WITH(
      tools::tokenize(test::data_path("tokenizer_tiny"), dir.file("bad.txt"), std::cout),
      Catch::Matchers::Contains("line 2"));
  CHECK(
      run({"tokenize", "--tokenizer", dir.file("none"), "--inputs", dir.file("p.txt")}).exit_code ==
      1);
  CHECK(run({"tokenize", "--tokenizer", test::data_path("tokenizer_tiny"), "--inputs",
             dir.file("missing.txt")})
            .exit_code == 1);
}
