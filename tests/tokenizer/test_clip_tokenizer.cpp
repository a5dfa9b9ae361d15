// ClipTokenizer: the 16 golden cases of transformers' slow CLIPTokenizer (tokens, ids, mask),
// hand-reasoned pre-tokenisation, BPE on a hand-built vocabulary, truncation and padding
// boundaries, special tokens in the text, and every malformed-input rule.
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "difftrain/models/clip_tokenizer.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;
using Strings = std::vector<std::string>;
using Ids = std::vector<std::int64_t>;

namespace {

// A fresh folder under the system temp dir, removed with its content at scope exit.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = fs::temp_directory_path() / ("difftrain_test_tokenizer_" + std::to_string(::getpid()) +
                                         "_" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string str() const { return path_.string(); }
  void write(const std::string& name, const std::string& content) const {
    std::ofstream(path_ / name, std::ios::binary) << content;
  }
  // Copies the golden tokenizer files, so that one of them can be replaced.
  void copy_tiny() const {
    for (const char* name : {"vocab.json", "merges.txt", "tokenizer_config.json"})
      fs::copy_file(test::data_path(std::string("tokenizer_tiny/") + name), path_ / name);
  }

 private:
  fs::path path_;
};

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

const ClipTokenizer& tiny() {
  static const ClipTokenizer t = ClipTokenizer::from_folder(test::data_path("tokenizer_tiny"));
  return t;
}

// In the golden vocabulary (OpenAI CLIP's layout) the byte symbols come in the order of the
// printable table: '!' .. '~' are ids 0..93, the same with "</w>" 256 more.
std::int64_t ascii_id(char c) { return c - '!'; }
std::int64_t ascii_end_id(char c) { return 256 + (c - '!'); }
constexpr std::int64_t kBos = 912, kEos = 913;

// [bos, ids..., eos, pad...] of length 77.
Ids padded(const Ids& ids, std::int64_t pad = kEos) {
  Ids out{kBos};
  out.insert(out.end(), ids.begin(), ids.end());
  out.push_back(kEos);
  out.resize(77, pad);
  return out;
}

std::u32string nfc_of(const std::u32string& s) { return unicode::nfc(s); }

}  // namespace

TEST_CASE("golden cases of the slow CLIPTokenizer (no ftfy)", "[tokenizer]") {
  const auto cases = nlohmann::json::parse(read_text(test::data_path("tokenizer_tiny/cases.json")));
  REQUIRE(cases.size() == 16);
  const auto& t = tiny();
  CHECK(t.vocab_size() == 914);
  CHECK(t.num_merges() == 400);
  CHECK(t.bos_token_id() == kBos);
  CHECK(t.eos_token_id() == kEos);
  CHECK(t.pad_token_id() == kEos);
  CHECK(t.unk_token_id() == kEos);
  CHECK(t.model_max_length() == 77);
  Strings texts;
  for (const auto& c : cases) {
    const auto text = c["text"].get<std::string>();
    texts.push_back(text);
    INFO("text: " << text);
    CHECK(t.bpe_tokens(text) == c["tokens"].get<Strings>());
    const auto e = t.encode(text);
    CHECK(e.input_ids == c["input_ids"].get<Ids>());
    CHECK(e.attention_mask == c["attention_mask"].get<Ids>());
  }
  const TokenIds batch = t.encode_batch(texts);
  REQUIRE(batch.shape(0) == 16);
  REQUIRE(batch.shape(1) == 77);
  for (std::size_t b = 0; b < 16; ++b) {
    const auto expected = cases[b]["input_ids"].get<Ids>();
    for (std::size_t l = 0; l < 77; ++l) CHECK(batch(b, l) == expected[l]);
  }
  CHECK(t.encode_batch({}).shape(0) == 0);
}

TEST_CASE("byte symbols follow the GPT-2 byte-to-unicode table", "[tokenizer]") {
  // Printable Latin-1 bytes stand for themselves; the others take U+0100 + (their rank among
  // the 68 non-printable bytes 0x00-0x20, 0x7F-0xA0, 0xAD).
  CHECK(ClipTokenizer::byte_symbol('a') == U'a');
  CHECK(ClipTokenizer::byte_symbol(0xE9) == U'\u00E9');
  CHECK(ClipTokenizer::byte_symbol(0x00) == 0x100);
  CHECK(ClipTokenizer::byte_symbol(' ') == 0x120);   // 'Ġ': 32 non-printables before it
  CHECK(ClipTokenizer::byte_symbol(0x7F) == 0x121);  // 33 (0x00-0x20) before it
  CHECK(ClipTokenizer::byte_symbol(0xA0) == 0x142);  // 33 + 33 (0x7F-0x9F)
  CHECK(ClipTokenizer::byte_symbol(0xAD) == 0x143);  // the 68th and last
}

TEST_CASE("pre-tokenisation pieces", "[tokenizer]") {
  const auto& t = tiny();
  CHECK(t.pre_tokenize("Hello, World!") == Strings{"hello", ",", "world", "!"});
  // Numbers split one character at a time, any N* (superscript two is No, Arabic-Indic Nd).
  CHECK(t.pre_tokenize("x\u00B2"
                       "12 \u0661\u0662") == Strings{"x", "\u00B2", "1", "2", "\u0661", "\u0662"});
  // Contractions after lower-casing; an apostrophe that starts none joins the punctuation run.
  CHECK(t.pre_tokenize("WE'RE it'LL 'x !'s") ==
        Strings{"we", "'re", "it", "'ll", "'", "x", "!'", "s"});
  CHECK(t.pre_tokenize("it\u2019s") == Strings{"it", "\u2019", "s"});  // not an ASCII apostrophe
  CHECK(t.pre_tokenize("it'\u017F") == Strings{"it", "'\u017F"});      // long s folds to s
  // CJK ideographs become words of their own; kana is a letter run.
  CHECK(t.pre_tokenize("\u65E5\u672C\u306E\u306E") == Strings{"\u65E5", "\u672C", "\u306E\u306E"});
  // U+2028 (Zl) is whitespace for str.split; U+FFFD, zero-width space and soft hyphen (Cf),
  // DEL and BEL (Cc) are dropped, which joins their neighbours.
  CHECK(t.pre_tokenize("a\u2028"
                       "b") == Strings{"a", "b"});
  CHECK(t.pre_tokenize("a\uFFFD"
                       "b\u200B"
                       "c\u00AD"
                       "d\x7F"
                       "e\x07"
                       "f") == Strings{"abcdef"});
  // Unassigned code points (Cn) and private use (Co) are dropped too.
  CHECK(t.pre_tokenize("a\U000E0080"
                       "b\uE000"
                       "c") == Strings{"abc"});
  // NFC: e + combining acute is one letter; a mark alone is not a letter.
  CHECK(t.pre_tokenize("e\u0301t\u00E9") == Strings{"\u00E9t\u00E9"});
  CHECK(t.pre_tokenize(" \u0301x") == Strings{"\u0301", "x"});
  // Full lower-casing: final sigma per word, and dotted capital I becomes i + combining dot.
  CHECK(t.pre_tokenize("\u039F\u0394\u039F\u03A3 \u03A3\u0391") ==
        Strings{"\u03BF\u03B4\u03BF\u03C2", "\u03C3\u03B1"});
  CHECK(t.pre_tokenize("\u0130") == Strings{"i", "\u0307"});
  CHECK(t.pre_tokenize("\u041F\u0420\u0418\u0412\u0415\u0422") ==
        Strings{"\u043F\u0440\u0438\u0432\u0435\u0442"});
  // U+0345 folds to iota: under IGNORECASE no alternative matches it and it is skipped.
  CHECK(t.pre_tokenize("a\u0345"
                       "b !\u0345?") == Strings{"a", "b", "!", "?"});
  CHECK(t.pre_tokenize(" \t\r\n\u00A0\u3000 ").empty());
  CHECK(t.pre_tokenize("").empty());
}

TEST_CASE("a word with no applicable merge stays single byte symbols", "[tokenizer]") {
  // merges.txt has no pair with 'j' or 'q'.
  const auto& t = tiny();
  CHECK(t.bpe_tokens("jqj") == Strings{"j", "q", "j</w>"});
  CHECK(t.encode("JQJ").input_ids == padded({ascii_id('j'), ascii_id('q'), ascii_end_id('j')}));
  // A single-character word is one symbol with </w>.
  CHECK(t.bpe_tokens("q") == Strings{"q</w>"});
  // U+00E9 is the bytes C3 A9, whose symbols are the characters U+00C3 and U+00A9.
  CHECK(t.bpe_tokens("\u00E9") == Strings{"\u00C3\u00A9</w>"});
}

TEST_CASE("truncation and padding boundaries", "[tokenizer]") {
  const auto& t = tiny();
  const std::int64_t a = ascii_end_id('a');  // "a" is the single symbol "a</w>"
  const auto repeat_a = [](std::size_t n) {
    std::string s;
    for (std::size_t i = 0; i < n; ++i) s += "a ";
    return s;
  };
  for (std::size_t n : {74u, 75u, 76u, 200u}) {
    INFO("n = " << n);
    const auto e = t.encode(repeat_a(n));
    const std::size_t kept = std::min<std::size_t>(n, 75);
    REQUIRE(e.input_ids.size() == 77);
    CHECK(e.input_ids[0] == kBos);
    for (std::size_t i = 1; i <= kept; ++i) CHECK(e.input_ids[i] == a);
    CHECK(e.input_ids[kept + 1] == kEos);
    for (std::size_t i = 0; i < 77; ++i) CHECK(e.attention_mask[i] == (i < kept + 2 ? 1 : 0));
  }
  // Only whitespace: bos, eos, padding.
  const auto blank = t.encode("   \t \n ");
  CHECK(blank.input_ids == padded({}));
  CHECK(blank.attention_mask == Ids{1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0});
  // Other lengths: max_length 4 keeps two ids; max_length 2 keeps none.
  CHECK(t.encode("a a a", 4).input_ids == Ids{kBos, a, a, kEos});
  CHECK(t.encode("a a a", 2).input_ids == Ids{kBos, kEos});
  const auto short_batch = t.encode_batch({"a", ""}, 3);
  CHECK(short_batch.shape(1) == 3);
  CHECK(short_batch(0, 1) == a);
  CHECK(short_batch(1, 1) == kEos);
  CHECK(short_batch(1, 2) == kEos);
  REQUIRE_THROWS_WITH(t.encode("a", 1), Contains("max_length is 1"));
}

TEST_CASE("special tokens in the text", "[tokenizer]") {
  const auto& t = tiny();
  // Split out verbatim before anything else, so punctuation in front stays its own piece.
  CHECK(t.bpe_tokens("a<|endoftext|>b") == Strings{"a</w>", "<|endoftext|>", "b</w>"});
  CHECK(t.bpe_tokens("x!<|startoftext|>") == Strings{"x</w>", "!</w>", "<|startoftext|>"});
  CHECK(t.encode("a<|endoftext|>b").input_ids ==
        padded({ascii_end_id('a'), kEos, ascii_end_id('b')}));
  // Upper case is not the special token verbatim, but lower-casing makes it one for the
  // pre-tokeniser, which keeps it whole (no </w>); so does a control character inside.
  CHECK(t.bpe_tokens("<|ENDOFTEXT|>") == Strings{"<|endoftext|>"});
  CHECK(t.bpe_tokens("<|endo\x07"
                     "ftext|>") == Strings{"<|endoftext|>"});
  CHECK(t.pre_tokenize("<|endoftext") == Strings{"<|", "endoftext"});
}

TEST_CASE("special tokens from tokenizer_config.json (SD 2 pads with '!')", "[tokenizer]") {
  TempDir dir;
  dir.copy_tiny();
  dir.write("tokenizer_config.json",
            R"({"bos_token": {"content": "<|startoftext|>", "lstrip": false},
                "eos_token": "<|endoftext|>", "pad_token": "!", "model_max_length": 64})");
  const auto t = ClipTokenizer::from_folder(dir.str());
  CHECK(t.pad_token_id() == ascii_id('!'));
  CHECK(t.bos_token_id() == kBos);
  CHECK(t.model_max_length() == 64);
  const auto e = t.encode("a");
  CHECK(e.input_ids == padded({ascii_end_id('a')}, ascii_id('!')));
  // Every special token is split out verbatim, "!" included: "!!" is two pad ids, not BPE.
  CHECK(t.bpe_tokens("cat!!") == Strings{"cat</w>", "!", "!"});
  CHECK(tiny().bpe_tokens("!!") == Strings{"!", "!</w>"});
  // special_tokens_map.json overrides tokenizer_config.json.
  dir.write("special_tokens_map.json", R"({"pad_token": "<|endoftext|>"})");
  CHECK(ClipTokenizer::from_folder(dir.str()).pad_token_id() == kEos);
  // Without any config the CLIP defaults apply.
  fs::remove(fs::path(dir.str()) / "tokenizer_config.json");
  fs::remove(fs::path(dir.str()) / "special_tokens_map.json");
  const auto d = ClipTokenizer::from_folder(dir.str());
  CHECK(d.bos_token_id() == kBos);
  CHECK(d.pad_token_id() == kEos);
}

TEST_CASE("BPE on a hand-built vocabulary: ranks, every occurrence, unknown symbols",
          "[tokenizer]") {
  TempDir dir;
  // ids 0-255 byte symbols (in byte order), 256-511 with </w>, then the merge results, then
  // the specials.
  nlohmann::json vocab = nlohmann::json::object();
  for (unsigned b = 0; b < 256; ++b) {
    std::string s;
    unicode::append_utf8(s, ClipTokenizer::byte_symbol(static_cast<unsigned char>(b)));
    vocab[s] = b;
    vocab[s + "</w>"] = 256 + b;
  }
  const Strings results{"aa", "aaa</w>", "bc</w>", "ab", "de</w>", "cd"};
  for (std::size_t i = 0; i < results.size(); ++i) vocab[results[i]] = 512 + i;
  vocab["<|startoftext|>"] = 600;
  vocab["<|endoftext|>"] = 601;
  dir.write("vocab.json", vocab.dump());
  // "x y" merges into a symbol missing from the vocabulary; "c d" appears twice: the last
  // rank (7) counts, after "d e</w>" (5).
  dir.write("merges.txt", "#version: 0.2\na a\naa a</w>\nb c</w>\na b\nc d\nd e</w>\nx y\nc d\n\n");
  const auto t = ClipTokenizer::from_folder(dir.str());
  CHECK(t.num_merges() == 7);
  CHECK(t.bpe_tokens("aaa") == Strings{"aaa</w>"});  // a a a</w> → aa a</w> → aaa</w>
  // a a a a a</w>: (a, a) merges left to right without overlap → aa aa a</w> → aa aaa</w>.
  CHECK(t.bpe_tokens("aaaaa") == Strings{"aa", "aaa</w>"});
  // a a a a</w> → aa a a</w>, and neither (aa, a) nor (a, a</w>) is a merge.
  CHECK(t.bpe_tokens("aaaa") == Strings{"aa", "a", "a</w>"});
  // (b, c</w>) has rank 2 < rank 3 of (a, b), and then (a, bc</w>) is no merge.
  CHECK(t.bpe_tokens("abc") == Strings{"a", "bc</w>"});
  CHECK(t.bpe_tokens("cde") == Strings{"c", "de</w>"});
  CHECK(t.bpe_tokens("xyz") == Strings{"xy", "z</w>"});
  // Unknown "xy" → unk (the eos token by default); this vocabulary lists bytes in byte order.
  CHECK(t.token_ids("xyz") == Ids{601, 256 + 'z'});
  CHECK(t.encode("aaa", 5).input_ids == Ids{600, 513, 601, 601, 601});
}

TEST_CASE("copies, repeated calls and threads give the same ids", "[tokenizer]") {
  const auto cases = nlohmann::json::parse(read_text(test::data_path("tokenizer_tiny/cases.json")));
  const ClipTokenizer copy = tiny();
  std::vector<Ids> expected;
  for (const auto& c : cases) expected.push_back(c["input_ids"].get<Ids>());
  std::atomic<int> mismatches{0};
  auto work = [&](const ClipTokenizer& t) {
    for (int round = 0; round < 3; ++round)
      for (std::size_t i = 0; i < cases.size(); ++i)
        if (t.encode(cases[i]["text"].get<std::string>()).input_ids != expected[i]) ++mismatches;
  };
  std::thread a(work, std::cref(copy)), b(work, std::cref(copy));
  a.join();
  b.join();
  work(tiny());
  CHECK(mismatches == 0);
}

TEST_CASE("unicode: NFC, lower-casing, UTF-8", "[tokenizer]") {
  // Hangul: L V T jamo compose algorithmically into one syllable (U+AC01), and back.
  CHECK(nfc_of(U"\u1100\u1161\u11A8") == U"\uAC01");
  CHECK(nfc_of(U"\uAC00\u11A8") == U"\uAC01");
  // Marks reorder by combining class (dot below 220 before dot above 230), then compose
  // with the base: a + dot below = U+1EA1, and the dot above stays.
  CHECK(nfc_of(U"a\u0307\u0323") == U"\u1EA1\u0307");
  // A mark of the same class in between blocks composition: a + double acute (230, no
  // composite) keeps the acute (230) from composing into U+00E1.
  CHECK(nfc_of(U"a\u030B\u0301") == U"a\u030B\u0301");
  // Here the grave composes first, and U+00E0 + acute has no composite.
  CHECK(nfc_of(U"a\u0300\u0301") == U"\u00E0\u0301");
  // Composition exclusion: DEVANAGARI QA never recomposes; singletons (Angstrom, CJK
  // compatibility ideograph) map to their canonical character.
  CHECK(nfc_of(U"\u0958") == U"\u0915\u093C");
  CHECK(nfc_of(U"\u0915\u093C") == U"\u0915\u093C");
  CHECK(nfc_of(U"\u212B") == U"\u00C5");
  CHECK(nfc_of(U"\uF900") == U"\u8C48");
  CHECK(nfc_of(U"\u0301a") == U"\u0301a");  // a leading mark composes with nothing
  CHECK(nfc_of(U"") == U"");
  CHECK(unicode::to_lower(U"\u00C0\u00C9\u00CE\u0178") == U"\u00E0\u00E9\u00EE\u00FF");
  CHECK(unicode::to_lower(U"\u03A3") == U"\u03C3");              // alone: not final
  CHECK(unicode::to_lower(U"A\u03A3.") == U"a\u03C2.");          // then only punctuation
  CHECK(unicode::to_lower(U"A'\u03A3B") == U"a'\u03C3b");        // cased letter follows
  CHECK(unicode::to_lower(U"\u2160\u24B6") == U"\u2170\u24D0");  // roman numeral, circled A
  CHECK(unicode::char_class(U'\u00A0') == unicode::CharClass::kSpaceSeparator);
  CHECK(unicode::char_class(U'\u2029') == unicode::CharClass::kLineSeparator);
  CHECK(unicode::char_class(U'\U00020000') == unicode::CharClass::kLetter);
  CHECK(unicode::char_class(U'\u00AD') == unicode::CharClass::kControl);
  CHECK(unicode::char_class(U'\u0301') == unicode::CharClass::kOther);
  CHECK(unicode::combining_class(U'\u0301') == 230);
  CHECK(unicode::decode_utf8("a\xC3\xA9\xF0\x9F\x90\xB1", "f") == U"a\u00E9\U0001F431");
  CHECK(unicode::encode_utf8(U"a\u00E9\u20AC\U0001F431") ==
        "a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x90\xB1");
}

TEST_CASE("invalid UTF-8 throws naming the byte offset", "[tokenizer]") {
  const auto& t = tiny();
  const Strings bad{
      "ab\x80",              // stray continuation byte
      "ab\xC3",              // truncated two-byte sequence
      "ab\xE2\x82",          // truncated three-byte sequence
      "ab\xC0\xAF",          // overlong '/'
      "ab\xE0\x80\xAF",      // overlong, three bytes
      "ab\xED\xA0\x80",      // surrogate U+D800
      "ab\xF4\x90\x80\x80",  // U+110000
      "ab\xFF",              // never valid
      "ab\xC3(",             // continuation byte missing
  };
  for (const auto& text : bad) {
    INFO("text bytes: " << text.size());
    REQUIRE_THROWS_AS(t.encode(text), Error);
    REQUIRE_THROWS_WITH(t.bpe_tokens(text), Contains("not valid UTF-8 at byte offset 2"));
  }
}

TEST_CASE("missing and malformed tokenizer files name the file", "[tokenizer]") {
  REQUIRE_THROWS_WITH(ClipTokenizer::from_folder("/nonexistent/difftrain/tokenizer"),
                      Contains("/nonexistent/difftrain/tokenizer"));
  {
    TempDir dir;
    dir.copy_tiny();
    fs::remove(fs::path(dir.str()) / "vocab.json");
    REQUIRE_THROWS_WITH(ClipTokenizer::from_folder(dir.str()),
                        Contains("cannot open") && Contains("vocab.json"));
  }
  {
    TempDir dir;
    dir.copy_tiny();
    fs::remove(fs::path(dir.str()) / "merges.txt");
    REQUIRE_THROWS_WITH(ClipTokenizer::from_folder(dir.str()),
                        Contains("cannot open") && Contains("merges.txt"));
  }
  const auto with = [](const std::string& name, const std::string& content) {
    TempDir dir;
    dir.copy_tiny();
    dir.write(name, content);
    try {
      ClipTokenizer::from_folder(dir.str());
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK_THAT(with("vocab.json", "{\"a\": 1"), Contains("vocab.json is not valid JSON"));
  CHECK_THAT(with("vocab.json", "[1, 2]"), Contains("vocab.json must hold a JSON object"));
  CHECK_THAT(with("vocab.json", R"({"a": "1"})"),
             Contains("vocab.json: the id of token \"a\" must be a non-negative integer"));
  CHECK_THAT(with("vocab.json", R"({"a": -3})"), Contains("non-negative integer, got -3"));
  CHECK_THAT(with("vocab.json", R"({"a": 1.5})"), Contains("non-negative integer, got 1.5"));
  CHECK_THAT(with("merges.txt", "#version: 0.2\na b\nc d e\n"),
             Contains("merges.txt line 3: expected two symbols") && Contains("c d e"));
  CHECK_THAT(with("merges.txt", "#version: 0.2\na b\nlonely\nc d\n"),
             Contains("merges.txt line 3"));
  CHECK_THAT(with("tokenizer_config.json", "{oops"),
             Contains("tokenizer_config.json is not valid JSON"));
  CHECK_THAT(with("tokenizer_config.json", R"({"bos_token": 5})"),
             Contains("tokenizer_config.json: bos_token must be a string"));
  CHECK_THAT(with("tokenizer_config.json", R"({"bos_token": "<|begin|>"})"),
             Contains("bos_token \"<|begin|>\" is not in vocab.json"));
  // An empty merges file (header only or nothing) is a vocabulary of single bytes.
  CHECK(with("merges.txt", "#version: 0.2\n") == "no error");
  CHECK(with("merges.txt", "") == "no error");
}
