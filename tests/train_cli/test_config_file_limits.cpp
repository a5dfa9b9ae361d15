// tools::read_config_file / apply_config_file on hostile JSON (issue #19): nesting ~90,000 levels
// deep used to kill the process (the entry's value was dumped recursively); now it is an Error
// naming the file and the nesting limit, and a large wrong value is described briefly.
#include <sys/stat.h>

#include <CLI/CLI.hpp>
#include <catch2/catch.hpp>
#include <string>

#include "config_file.hpp"
#include "difftrain/core/error.hpp"
#include "support/error_of.hpp"
#include "support/temp_dir.hpp"

using namespace difftrain;
using Catch::Matchers::Contains;

namespace config_limits_test {

std::string nested(std::size_t depth, const std::string& inner = "") {
  return std::string(depth, '[') + inner + std::string(depth, ']');
}

using test::error_of;

TEST_CASE("config file: deeply nested JSON is an Error naming the file and the limit") {
  test::TempDir dir("config_limits");
  const std::string path = dir.file("deep.json");
  dir.write("deep.json", "{\"a\":" + nested(90'000) + "}");
  CHECK_THAT(
      error_of([&] { tools::read_config_file(path); }),
      Contains(path) && Contains("more than 128 levels deep") && Contains("expected at most 128"));
}

TEST_CASE("config file: a named pipe is refused at once (JSON and TOML)") {
  test::TempDir dir("config_limits");
  for (const char* name : {"pipe.json", "pipe.toml"}) {
    const std::string path = dir.file(name);
    REQUIRE(::mkfifo(path.c_str(), 0600) == 0);
    CHECK_THAT(error_of([&] { tools::read_config_file(path); }),
               Contains(path) && Contains("it is a named pipe, not a regular file"));
  }
}

TEST_CASE("config file: TOML that toml++ 3.3.0 mishandles is refused before it parses") {
  // Found by fuzzing (issue #19): each broke an assumption of Debian's toml++ (undefined
  // behaviour in a release build). All are invalid TOML 1.0; now errors naming the file.
  test::TempDir dir("config_limits");
  const std::string path = dir.file("c.toml");
  const auto error = [&](const std::string& text) {
    dir.write("c.toml", text);
    return error_of([&] { tools::read_config_file(path); });
  };
  CHECK_THAT(error(std::string("[\0\0\0\0]", 6)),
             Contains(path) && Contains("control character 0x0 (only tab and line breaks"));
  CHECK_THAT(error("a = 1\n\xd2\x95lpha = 2"),
             Contains("line 2, column 1") && Contains("non-ASCII character outside a string"));
  CHECK_THAT(error("a = \"\xff\""), Contains("invalid UTF-8"));
  CHECK_THAT(error("[[[[["), Contains(path) && Contains("is not valid TOML"));
  CHECK_THAT(error("a = [[[1}]]]"), Contains(path) && Contains("is not valid TOML"));
  // toml++'s whitespace classifier is undefined for many non-ASCII characters: none may reach it.
  CHECK_THAT(error("seed = 1979_ep-'''/07:\"F8\"N\xc8\x90x"),
             Contains("a quote inside a bare value"));
  CHECK_THAT(error("a = \"\"\"x \\\n  \xc3\xa9\"\"\""),
             Contains("a non-ASCII character after a line-ending backslash"));
  // Non-ASCII text is fine in strings (after escaped quotes too) and comments.
  CHECK(error("# café\noutput_name = \"caf\\\"é\"  # naïve\nrank = 4\n") == "no error");
  CHECK(tools::read_config_file(path).size() == 2);
  CHECK(error("output_name = \"\"\"multi \\\"\"\" ünï\"\"\"\nrank = '''x'y'''\n") == "no error");
  CHECK(tools::read_config_file(path).size() == 2);
}

TEST_CASE("config file: a large wrong value gives a message of bounded length") {
  test::TempDir dir("config_limits");
  CLI::App app;
  CLI::App* cmd = app.add_subcommand("cmd");
  int rank = 0;
  cmd->add_option("--rank", rank);
  const auto apply_error = [&](const std::string& value) {
    dir.write("config.json", "{\"rank\":" + value + "}");
    return error_of([&] { tools::apply_config_file(*cmd, dir.file("config.json")); });
  };
  std::string zeros = "0", words = "\"w\"";
  for (int i = 1; i < 20'000; ++i) {
    zeros += ",0";
    words += ",\"w\"";
  }
  // 60 levels (within the limit) around 20,000 entries: a nested array is not a flag value.
  const std::string deep = apply_error(nested(60, zeros));
  CHECK_THAT(deep, Contains("key 'rank' has value [[[[") && Contains("expected a string, number"));
  CHECK(deep.size() < 1000);
  // 20,000 strings for an int flag: CLI11 refuses them, the message shows the value briefly.
  const std::string wide = apply_error("[" + words + "]");
  CHECK_THAT(wide, Contains("key 'rank' has value [\"w\",\"w\"") && Contains("20000 items"));
  CHECK(wide.size() < 1000);
}

}  // namespace config_limits_test
