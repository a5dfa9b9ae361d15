// tools/caption.hpp: kohya's caption handling, each rule against its definition (prefix/suffix,
// keep_tokens and keep_tokens_separator, shuffle, tag dropout, caption dropout by rate and every
// n epochs, secondary separator) and the draws' statistics; and through ImageCaptionDataSource
// (deterministic per (seed, epoch, index), so a resumed run sees the same captions).

#include <catch2/catch.hpp>
#include <cmath>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "caption.hpp"
#include "dataset.hpp"
#include "support/temp_dir.hpp"

namespace tools = difftrain::tools;
using difftrain::Error;
using difftrain::RandomStream;
using tools::CaptionOptions;
using tools::process_caption;

namespace {

std::vector<std::string> tags_of(const std::string& caption) {
  std::vector<std::string> out;
  std::size_t start = 0;
  while (true) {
    const auto end = caption.find(", ", start);
    out.push_back(caption.substr(start, end == std::string::npos ? end : end - start));
    if (end == std::string::npos) return out;
    start = end + 2;
  }
}

// |observed − expected| within 5 standard deviations of a binomial count.
void check_rate(std::size_t hits, std::size_t n, double p) {
  const double sd = std::sqrt(double(n) * p * (1 - p));
  INFO(hits << " of " << n << ", expected rate " << p);
  CHECK(std::abs(double(hits) - double(n) * p) <= 5 * sd + 1e-9);
}

}  // namespace

TEST_CASE("captions: prefix and suffix; without shuffle or tag dropout the text is kept",
          "[dataset][caption]") {
  CaptionOptions o;
  CHECK(o.is_identity());
  o.caption_prefix = "sks dog";
  o.caption_suffix = "masterpiece";
  CHECK_FALSE(o.is_identity());
  CHECK(process_caption("on grass,  sunny", o, 0, {1, 2}) ==
        "sks dog on grass,  sunny masterpiece");
  o.caption_prefix.clear();
  o.secondary_separator = ";;";
  CHECK(process_caption("a;;b, c", o, 3, {1, 2}) == "a,b, c masterpiece");
}

TEST_CASE("captions: keep_tokens fixes the first tags, shuffle permutes the rest uniformly",
          "[dataset][caption]") {
  CaptionOptions o;
  o.shuffle_caption = true;
  o.keep_tokens = 1;
  std::map<std::string, std::size_t> seen;
  const std::size_t n = 6000;
  for (std::uint64_t i = 0; i < n; ++i) {
    const std::string c = process_caption(" sks,  b ,c,d ", o, 0, RandomStream{7, 1}.derive(i, 0));
    const auto tags = tags_of(c);
    REQUIRE(tags.size() == 4);
    REQUIRE(tags[0] == "sks");  // stripped and fixed
    REQUIRE(std::multiset<std::string>(tags.begin(), tags.end()) ==
            std::multiset<std::string>{"sks", "b", "c", "d"});
    seen[c] += 1;
  }
  CHECK(seen.size() == 6);  // 3! orders of the flex tags
  for (const auto& [caption, count] : seen) check_rate(count, n, 1.0 / 6);
  // The same stream gives the same caption (resume); another gives another order sometimes.
  CHECK(process_caption("a, b, c, d, e", o, 4, {3, 9}) ==
        process_caption("a, b, c, d, e", o, 4, {3, 9}));
}

TEST_CASE("captions: keep_tokens_separator splits fixed ||| flex ||| fixed suffix",
          "[dataset][caption]") {
  CaptionOptions o;
  o.shuffle_caption = true;
  o.keep_tokens = 3;  // ignored when the separator is present
  o.keep_tokens_separator = "|||";
  std::set<std::string> middles;
  for (std::uint64_t i = 0; i < 200; ++i) {
    const auto tags =
        tags_of(process_caption("1girl, sks ||| red, blue,, green ||| best", o, 0, {2, i}));
    REQUIRE(tags.size() == 6);  // the empty tag is dropped in this form
    CHECK(tags[0] == "1girl");
    CHECK(tags[1] == "sks");
    CHECK(tags[5] == "best");
    middles.insert(tags[2] + tags[3] + tags[4]);
  }
  CHECK(middles.size() == 6);
  // Without the separator in the caption, keep_tokens applies.
  const auto tags = tags_of(process_caption("a, b, c, d", o, 0, {2, 0}));
  CHECK(tags[0] == "a");
  CHECK(tags[1] == "b");
  CHECK(tags[2] == "c");
}

TEST_CASE("captions: tag dropout keeps each flex tag with probability 1 − rate",
          "[dataset][caption]") {
  CaptionOptions o;
  o.keep_tokens = 1;
  o.caption_tag_dropout_rate = 0.25;
  std::map<std::string, std::size_t> kept;
  const std::size_t n = 4000;
  for (std::uint64_t i = 0; i < n; ++i) {
    const std::string c = process_caption("sks, a, b, c, d", o, 1, RandomStream{4, i});
    const auto tags = tags_of(c);
    REQUIRE(tags[0] == "sks");
    std::string previous = "";
    for (std::size_t k = 1; k < tags.size(); ++k) {
      CHECK(tags[k] > previous);  // no shuffle: the order is kept
      previous = tags[k];
      kept[tags[k]] += 1;
    }
  }
  REQUIRE(kept.size() == 4);
  for (const auto& [tag, count] : kept) check_rate(count, n, 0.75);
}

TEST_CASE("captions: caption dropout by rate and every n-th epoch (kohya counts from 1)",
          "[dataset][caption]") {
  CaptionOptions o;
  o.caption_prefix = "p";
  o.caption_dropout_rate = 0.3;
  std::size_t empty = 0;
  const std::size_t n = 5000;
  for (std::uint64_t i = 0; i < n; ++i) {
    const std::string c = process_caption("x", o, 0, RandomStream{5, i});
    CHECK((c.empty() || c == "p x"));
    empty += c.empty();
  }
  check_rate(empty, n, 0.3);

  o.caption_dropout_rate = 0;
  o.caption_dropout_every_n_epochs = 3;
  for (std::uint64_t e = 0; e < 9; ++e) {
    INFO("epoch " << e << " (kohya's " << e + 1 << ")");
    CHECK(process_caption("x", o, e, {5, 0}).empty() == (e % 3 == 2));
  }
}

TEST_CASE("captions: out-of-range options are errors naming the flag", "[dataset][caption]") {
  CaptionOptions o;
  o.caption_dropout_rate = 1.5;
  CHECK_THROWS_WITH(o.validate(), Catch::Contains("--caption_dropout_rate is 1.5"));
  o = {};
  o.caption_tag_dropout_rate = -0.1;
  CHECK_THROWS_WITH(o.validate(), Catch::Contains("--caption_tag_dropout_rate"));
  o = {};
  o.keep_tokens = -1;
  CHECK_THROWS_WITH(o.validate(), Catch::Contains("--keep_tokens is -1"));
  o = {};
  o.caption_dropout_every_n_epochs = -2;
  CHECK_THROWS_WITH(o.validate(), Catch::Contains("--caption_dropout_every_n_epochs"));
  o = {};
  o.caption_separator = "";
  CHECK_THROWS_AS(o.validate(), Error);
}

TEST_CASE("captions through the data source: per (seed, epoch, index), the same on resume",
          "[dataset][caption]") {
  difftrain::test::TempDir dir;
  std::vector<tools::Example> ex;
  for (int i = 0; i < 4; ++i) {
    tools::Image im(8, 8);
    const std::string path = (dir.path() / difftrain::message("img", i, ".png")).string();
    tools::save_png(path, im);
    ex.push_back({path, "sks, a, b, c"});
  }
  tools::DataSourceOptions o{
      .resolution = 8, .center_crop = true, .train_batch_size = 2, .seed = 3};
  o.caption.shuffle_caption = true;
  o.caption.keep_tokens = 1;
  std::vector<std::string> captions;
  // Tokens: the caption's characters, so batches can be compared with example_caption.
  const tools::Tokenize tokenize = [&captions](const std::vector<std::string>& cs) {
    difftrain::TokenIds ids(difftrain::TokenIds::shape_type{cs.size(), 16});
    ids.fill(0);
    for (std::size_t b = 0; b < cs.size(); ++b)
      for (std::size_t k = 0; k < cs[b].size() && k < 16; ++k) ids(b, k) = cs[b][k];
    for (const auto& c : cs) captions.push_back(c);
    return ids;
  };
  tools::ImageCaptionDataSource data(ex, tokenize, o);
  std::set<std::string> distinct;
  for (std::uint64_t e = 0; e < 10; ++e)
    for (std::size_t i = 0; i < 4; ++i) {
      const std::string c = data.example_caption(i, e);
      CHECK(c.rfind("sks, ", 0) == 0);
      distinct.insert(c);
    }
  CHECK(distinct.size() == 6);
  tools::ImageCaptionDataSource fresh(ex, tokenize, o);
  for (std::uint64_t m : {5u, 0u, 13u})
    REQUIRE(bool(fresh.batch_token_ids(m) == data.batch_token_ids(m)));
  // The batch's captions are example_caption of its rows in its epoch.
  captions.clear();
  const auto rows = data.batch_indices(7);
  data.batch_token_ids(7);
  REQUIRE(captions.size() == rows.size());
  for (std::size_t j = 0; j < rows.size(); ++j)
    CHECK(captions[j] == data.example_caption(rows[j], 7 / data.steps_per_epoch()));

  o.caption.caption_dropout_rate = 2;
  CHECK_THROWS_WITH(tools::ImageCaptionDataSource(ex, tokenize, o),
                    Catch::Contains("--caption_dropout_rate is 2"));
}
