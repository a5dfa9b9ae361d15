// io::parse_json (the nesting limit, string literals and escapes, NUL bytes, bounded parse
// errors) and io::json_excerpt (bounded descriptions of any value, however large or deep).
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <string>

#include "difftrain/io/json_file.hpp"

using namespace difftrain;
using Catch::Matchers::Contains;
using Catch::Matchers::StartsWith;
using nlohmann::json;

namespace json_file_test {

std::string nested(std::size_t depth, const std::string& inner = "") {
  return std::string(depth, '[') + inner + std::string(depth, ']');
}

std::string parse_error(const std::string& text) {
  try {
    io::parse_json(text, "f", "'in.json'");
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

// True when `s` is valid UTF-8 (a truncation never splits a sequence).
bool valid_utf8(const std::string& s) {
  try {
    static_cast<void>(json(s).dump());
    return true;
  } catch (const json::type_error&) {
    return false;
  }
}

TEST_CASE("parse_json: nesting is limited to kMaxJsonDepth levels") {
  STATIC_REQUIRE(io::kMaxJsonDepth == 128);
  CHECK(io::parse_json(nested(128), "f", "'in.json'").is_array());
  CHECK(io::parse_json("{\"a\":" + nested(126, "{}") + "}", "f", "'in.json'").is_object());
  const std::string deep = parse_error(nested(129));
  CHECK_THAT(deep, StartsWith("f: 'in.json' nests arrays and objects more than 128 levels deep"));
  CHECK_THAT(deep, Contains("byte 128 of 258 opens level 129"));
  CHECK_THAT(parse_error("{\"a\":" + nested(127, "{}") + "}"), Contains("opens level 129"));
  CHECK_THAT(parse_error(nested(1'000'000)), Contains("more than 128 levels deep"));
}

TEST_CASE("parse_json: brackets in strings do not count, escapes are followed") {
  // Inside a string: escaped quotes do not end it.
  CHECK(io::parse_json("[\"\\\"" + nested(500) + "\"]", "f", "s").size() == 1);
  // An escaped backslash does end the escape: the brackets after the string count.
  const std::string after = "[\"\\\\\"," + nested(128) + "]";
  CHECK_THAT(parse_error(after), Contains("more than 128 levels deep"));
  CHECK(io::parse_json("[\"\\\\\"," + nested(127) + "]", "f", "s").size() == 2);
  // Unbalanced closing brackets are left to the parser.
  CHECK_THAT(parse_error("]]]"), Contains("f: 'in.json' is not valid JSON"));
}

TEST_CASE("parse_json: errors name the function and the source, bounded in length") {
  CHECK_THAT(parse_error("{\"a\": 1"), StartsWith("f: 'in.json' is not valid JSON: "));
  CHECK_THAT(parse_error(""), Contains("is not valid JSON"));
  CHECK_THAT(parse_error("{} /* comment */"), Contains("is not valid JSON"));
  // nlohmann would stop at a NUL byte and accept what follows.
  CHECK_THAT(parse_error(std::string("{}\0junk", 7)),
             Contains("'in.json' is not valid JSON: NUL byte at offset 2"));
  // nlohmann quotes the whole unterminated string as the last token read.
  const std::string unterminated = parse_error("[\"" + std::string(1'000'000, 'a'));
  CHECK_THAT(unterminated, Contains("is not valid JSON") && Contains("characters)"));
  CHECK(unterminated.size() < 1000);
}

TEST_CASE("parse_json: the parser callback sees every event") {
  int keys = 0;
  const json j = io::parse_json(R"({"a": {"b": 1}, "c": [2]})", "f", "s",
                                [&](int, json::parse_event_t event, json&) {
                                  keys += event == json::parse_event_t::key;
                                  return true;
                                });
  CHECK(keys == 3);
  CHECK(j["a"]["b"] == 1);
}

TEST_CASE("json_excerpt: short values are their compact dump") {
  CHECK(io::json_excerpt(json(5)) == "5");
  CHECK(io::json_excerpt(json(nullptr)) == "null");
  CHECK(io::json_excerpt(json("x\"y")) == "\"x\\\"y\"");
  CHECK(io::json_excerpt(json::parse(R"({"a": [1, 2.5, true], "b": {}})")) ==
        R"({"a":[1,2.5,true],"b":{}})");
  json exact = json::array({10});
  while (exact.dump().size() < 80) exact.push_back(1);
  REQUIRE(exact.dump().size() == 80);
  CHECK(io::json_excerpt(exact) == exact.dump());
  exact[0] = 100;  // 81 characters
  CHECK(io::json_excerpt(exact) == exact.dump().substr(0, 80) + "... (a JSON array of 39 items)");
}

TEST_CASE("json_excerpt: large values are cut to max_chars and described") {
  json wide = json::array();
  for (int i = 0; i < 100'000; ++i) wide.push_back(i);
  const std::string w = io::json_excerpt(wide);
  CHECK_THAT(w, StartsWith("[0,1,2,3,") && Contains("... (a JSON array of 100000 items)"));
  CHECK(w.size() < 120);

  const std::string s = io::json_excerpt(json(std::string(1'000'000, 'x')), 10);
  CHECK(s == "\"xxxxxxxxx... (a JSON string of 1000000 bytes)");

  json object;
  object["key"] = std::string(200, 'v');
  CHECK_THAT(io::json_excerpt(object), Contains("... (a JSON object of 1 key)"));

  // A cut never splits a UTF-8 sequence ("é" is 2 bytes).
  std::string accents;
  for (int i = 0; i < 100; ++i) accents += "\xC3\xA9";
  for (std::size_t max = 1; max < 12; ++max)
    CHECK(valid_utf8(io::json_excerpt(json(accents), max)));
  // Invalid UTF-8 (a string built in code) is replaced rather than thrown on.
  CHECK_NOTHROW(io::json_excerpt(json(std::string("a\xFF"))));
}

TEST_CASE("json_excerpt: a value nested 100,000 levels deep does not recurse") {
  // nlohmann's parser and (since 3.10) its destructor are iterative; dump() and copies are not.
  const json deep = json::parse(nested(100'000));
  const std::string e = io::json_excerpt(deep);
  CHECK(e == std::string(80, '[') + "... (a JSON array of 1 item)");
  // A generous max_chars is still bounded in depth.
  const std::string big = io::json_excerpt(deep, 10'000'000);
  CHECK_THAT(big, StartsWith(std::string(100, '[')) && Contains("... (a JSON array of 1 item)"));
  CHECK(big.size() < 1000);
}

}  // namespace json_file_test
