// safetensors: round trips, the written layout, one test per malformed-file rule, the golden
// unet_tiny inputs, and the atomic write.
#include <unistd.h>

#include <atomic>
#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <string>
#include <vector>
#include <xtensor/xbuilder.hpp>
#include <xtensor/xmanipulation.hpp>

#include "difftrain/io/safetensors.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using namespace difftrain::io;
using Catch::Matchers::Contains;
using namespace std::string_literals;
namespace fs = std::filesystem;

namespace {

// A fresh folder under the system temp dir, removed with its content at scope exit.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = fs::temp_directory_path() /
            ("difftrain_test_io_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

std::string le64(std::uint64_t n) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out;
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// length + header + data, the header length taken from the header unless overridden.
std::string file_bytes(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

// The Error message of opening a file with these bytes (the test fails if it opens).
std::string open_error(const TempDir& dir, const std::string& bytes) {
  const std::string path = dir.file("bad.safetensors");
  write_bytes(path, bytes);
  try {
    SafetensorsFile::open(path);
  } catch (const Error& e) {
    const std::string message = e.what();
    CHECK_THAT(message, Contains(path));  // every open error names the file
    return message;
  }
  FAIL("SafetensorsFile::open accepted a malformed file: "
       << bytes.substr(std::min<std::size_t>(8, bytes.size())));
  return {};
}

std::vector<float> iota_floats(std::size_t n, float start = 0.5f, float step = 0.25f) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = start + step * static_cast<float>(i);
  return v;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Dtypes

TEST_CASE("Dtype names round-trip, sizes follow the format, unknown names are refused") {
  for (Dtype dtype : kAllDtypes) REQUIRE(parse_dtype(to_string(dtype)) == dtype);
  CHECK(dtype_size(Dtype::F32) == 4);
  CHECK(dtype_size(Dtype::BF16) == 2);
  CHECK(dtype_size(Dtype::F16) == 2);
  CHECK(dtype_size(Dtype::I64) == 8);
  CHECK(dtype_size(Dtype::BOOL) == 1);
  CHECK(dtype_size(Dtype::F8_E4M3) == 1);
  CHECK(dtype_size(Dtype::C64) == 8);
  CHECK(dtype_bits(Dtype::F4) == 4);
  REQUIRE_THROWS_WITH(dtype_size(Dtype::F6_E2M3), Contains("6 bits"));
  REQUIRE_THROWS_WITH(parse_dtype("F12"), Contains("unknown dtype 'F12'"));
  REQUIRE_THROWS_AS(parse_dtype("f32"), Error);  // case matters
  CHECK(dtype_of<float>() == Dtype::F32);
  CHECK(dtype_of<std::int64_t>() == Dtype::I64);
  CHECK(dtype_of<std::uint8_t>() == Dtype::U8);
}

// ---------------------------------------------------------------------------------------------
// Round trips

TEST_CASE("F32 and I64 round trip with metadata and dotted names") {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  const auto weight = iota_floats(2 * 3 * 4);
  const std::vector<std::int64_t> steps = {877, 469, -3, std::int64_t{1} << 40};
  const std::vector<float> bias = {-1.5f, 2.25f, 1e-30f};
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"ss_network_alpha", "8.0"}, {"quote\"and\\", "ünïcødé \n 文字"}};
  save_safetensors(path,
                   {TensorToWrite::from_span<float>("down_blocks.0.conv.weight", weight, {2, 3, 4}),
                    TensorToWrite::from_span<std::int64_t>("timestep", steps, {4}),
                    TensorToWrite::from_span<float>("down_blocks.0.conv.bias", bias, {3})},
                   metadata);

  const auto file = SafetensorsFile::open(path);
  CHECK(file.path() == path);
  CHECK(file.size() == 3);
  CHECK(file.names() == std::vector<std::string>{"down_blocks.0.conv.bias",
                                                 "down_blocks.0.conv.weight", "timestep"});
  CHECK(file.contains("timestep"));
  CHECK_FALSE(file.contains("down_blocks.0"));
  CHECK(file.metadata() == metadata);

  const TensorInfo& w = file.info("down_blocks.0.conv.weight");
  CHECK(w.dtype == Dtype::F32);
  CHECK(w.shape == std::vector<std::size_t>{2, 3, 4});
  CHECK(w.nbytes() == weight.size() * 4);
  CHECK(file.read<float>("down_blocks.0.conv.weight") == weight);
  CHECK(file.read<float>("down_blocks.0.conv.bias") == bias);
  CHECK(file.read<std::int64_t>("timestep") == steps);
  // The raw bytes are the values' own bytes.
  const auto raw = file.raw("down_blocks.0.conv.bias");
  REQUIRE(raw.size() == 12);
  CHECK(std::memcmp(raw.data(), bias.data(), 12) == 0);
  // Zero-copy view (the writer aligns every tensor to its element size).
  const auto view = file.view<float>("down_blocks.0.conv.weight");
  CHECK(std::equal(view.begin(), view.end(), weight.begin(), weight.end()));
  REQUIRE_THROWS_WITH(file.view<double>("timestep"), Contains("has dtype I64, expected F64"));

  // Converting reads.
  const auto as_double = file.read<double>("timestep");
  CHECK(as_double == std::vector<double>{877, 469, -3, std::ldexp(1.0, 40)});
  const auto weight_tensor = file.read_tensor<float, 3>("down_blocks.0.conv.weight");
  CHECK(weight_tensor.shape()[0] == 2);
  CHECK(weight_tensor.shape()[2] == 4);
  CHECK(weight_tensor(1, 2, 3) == weight[1 * 12 + 2 * 4 + 3]);
  REQUIRE_THROWS_WITH(file.read<std::int16_t>("timestep"),
                      Contains("holds 1099511627776 at element 3") && Contains("I16"));
  REQUIRE_THROWS_WITH(file.read<std::uint64_t>("timestep"), Contains("holds -3 at element 2"));
  REQUIRE_THROWS_WITH(file.read<std::int64_t>("down_blocks.0.conv.bias"),
                      Contains("has dtype F32") && Contains("integer type I64"));
}

TEST_CASE("read_tensor checks the rank; unknown names name the tensor and the file") {
  TempDir dir;
  const std::string path = dir.file("s.safetensors");
  const auto values = iota_floats(2 * 4 * 3);
  save_safetensors(path, {TensorToWrite::from_span<float>("sample", values, {2, 4, 3})});
  const auto file = SafetensorsFile::open(path);
  REQUIRE_THROWS_WITH((file.read_tensor<float, 4>("sample")),
                      Contains("read_tensor: sample has rank 3, expected 4"));
  REQUIRE_THROWS_WITH(file.read<float>("samples"),
                      Contains("no tensor 'samples'") && Contains(path) && Contains("sample"));
  REQUIRE_THROWS_WITH(file.info("x"), Contains("'x'"));
  REQUIRE_THROWS_WITH(file.raw("x"), Contains(path));
  std::vector<float> too_small(5);
  REQUIRE_THROWS_WITH(file.read_into<float>("sample", too_small), Contains("expected 24"));
}

TEST_CASE("F16 and BF16 are written with round-to-nearest-even and read back exactly") {
  TempDir dir;
  const std::string path = dir.file("half.safetensors");
  const std::vector<float> values = {1.0f,
                                     -2.5f,
                                     0.1f,
                                     65504.0f,
                                     1e6f,
                                     std::ldexp(1.0f, -24),
                                     1.0f + std::ldexp(1.0f, -11),
                                     1.0f + std::ldexp(1.0f, -8),
                                     -0.0f,
                                     std::numeric_limits<float>::infinity()};
  save_safetensors(path, {TensorToWrite::from_span<float>("h", values, {2, 5}, Dtype::F16),
                          TensorToWrite::from_span<float>("b", values, {10}, Dtype::BF16)});
  const auto file = SafetensorsFile::open(path);
  CHECK(file.info("h").dtype == Dtype::F16);
  CHECK(file.info("b").dtype == Dtype::BF16);
  CHECK(file.info("h").nbytes() == 20);

  const auto h_raw = file.raw("h");
  const auto b_raw = file.raw("b");
  const auto h = file.read<float>("h");
  const auto b = file.read<double>("b");
  for (std::size_t i = 0; i < values.size(); ++i) {
    std::uint16_t h_bits, b_bits;
    std::memcpy(&h_bits, h_raw.data() + 2 * i, 2);
    std::memcpy(&b_bits, b_raw.data() + 2 * i, 2);
    INFO("element " << i);
    CHECK(h_bits == float_to_f16(values[i]));
    CHECK(b_bits == float_to_bf16(values[i]));
    CHECK(std::bit_cast<std::uint32_t>(h[i]) == std::bit_cast<std::uint32_t>(f16_to_float(h_bits)));
    CHECK(b[i] == static_cast<double>(bf16_to_float(b_bits)));
  }
  // Hand-computed: 0.1 → f16 0x2E66; 1e6 → inf; 1 + 2^-11 ties to 1.0; bf16(0.1) = 0x3DCD.
  std::uint16_t bits;
  std::memcpy(&bits, h_raw.data() + 2 * 2, 2);
  CHECK(bits == 0x2E66);
  std::memcpy(&bits, b_raw.data() + 2 * 2, 2);
  CHECK(bits == 0x3DCD);
  CHECK(std::isinf(h[4]));
  CHECK(h[6] == 1.0f);
  CHECK(b[7] == 1.0);
  REQUIRE_THROWS_WITH(file.read<std::int32_t>("h"), Contains("F16"));
}

TEST_CASE("F64, small integer dtypes and BOOL convert as documented") {
  TempDir dir;
  const std::string path = dir.file("mixed.safetensors");
  const std::vector<double> d = {0.1, -1e300, 3.0};
  const std::vector<std::int32_t> small = {-7, 0, 300};
  const std::vector<std::uint8_t> flags = {0, 1, 1, 0};
  save_safetensors(path, {TensorToWrite::from_span<double>("d", d, {3}),
                          TensorToWrite::from_span<std::int32_t>("i8", small, {3}, Dtype::I16),
                          TensorToWrite::from_span<std::uint8_t>("flags", flags, {4}, Dtype::BOOL),
                          TensorToWrite::from_span<std::int32_t>(
                              "u", {std::vector<std::int32_t>{1, 2}}, {2}, Dtype::U32)});
  const auto file = SafetensorsFile::open(path);
  CHECK(file.read<double>("d") == d);
  const auto d_float = file.read<float>("d");
  CHECK(d_float[0] == 0.1f);
  CHECK(std::isinf(d_float[1]));
  CHECK(file.info("i8").dtype == Dtype::I16);
  CHECK(file.read<std::int64_t>("i8") == std::vector<std::int64_t>{-7, 0, 300});
  CHECK(file.read<float>("i8") == std::vector<float>{-7, 0, 300});
  REQUIRE_THROWS_WITH(file.read<std::int8_t>("i8"), Contains("holds 300 at element 2"));
  CHECK(file.read<float>("flags") == std::vector<float>{0, 1, 1, 0});
  CHECK(file.read<std::uint8_t>("flags") == flags);
  CHECK(file.read<std::uint16_t>("u") == std::vector<std::uint16_t>{1, 2});

  // Conversions refused when writing.
  const std::vector<float> fractional = {0.5f};
  REQUIRE_THROWS_WITH(TensorToWrite::from_span<float>("x", fractional, {1}, Dtype::I64),
                      Contains("F32 values do not convert to I64"));
  const std::vector<std::int32_t> big = {1000};
  REQUIRE_THROWS_WITH(TensorToWrite::from_span<std::int32_t>("x", big, {1}, Dtype::I8),
                      Contains("holds 1000 at element 0"));
  const std::vector<std::uint8_t> not_bool = {2};
  REQUIRE_THROWS_WITH(TensorToWrite::from_span<std::uint8_t>("x", not_bool, {1}, Dtype::BOOL),
                      Contains("expected 0 or 1"));
  REQUIRE_THROWS_WITH(TensorToWrite::from_span<float>("x", fractional, {1}, Dtype::F8_E4M3),
                      Contains("from_bytes"));
  REQUIRE_THROWS_WITH(TensorToWrite::from_span<float>("x", fractional, {2}),
                      Contains("has 1 values, expected 2"));
}

TEST_CASE("a BOOL byte other than 0 or 1 and an unconverted dtype are read errors; F8 decodes") {
  TempDir dir;
  const std::string path = dir.file("b.safetensors");
  const std::string header = R"({"b":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]},)"
                             R"("f8":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[3,5]},)"
                             R"("e5":{"dtype":"F8_E5M2","shape":[2],"data_offsets":[5,7]},)"
                             R"("c":{"dtype":"C64","shape":[1],"data_offsets":[7,15]}})";
  write_bytes(path, file_bytes(header, std::string("\x01\x00\x02\x38\xC0\x3C\x7C", 7) +
                                           std::string(8, '\0')));
  const auto file = SafetensorsFile::open(path);
  REQUIRE_THROWS_WITH(file.read<float>("b"), Contains("byte 2 at element 2"));
  // E4M3: 0x38 = 0.0111.000 = 1.0, 0xC0 = 1.1000.000 = -2.0; E5M2: 0x3C = 1.0, 0x7C = inf.
  CHECK(file.read<float>("f8") == std::vector<float>{1.0f, -2.0f});
  const auto e5 = file.read<double>("e5");
  CHECK(e5[0] == 1.0);
  CHECK(std::isinf(e5[1]));
  REQUIRE_THROWS_WITH(file.read<int>("f8"), Contains("integer type I32"));
  REQUIRE_THROWS_WITH(file.read<float>("c"), Contains("C64") && Contains("raw()"));
  CHECK(file.raw("c").size() == 8);
  CHECK(std::to_integer<int>(file.raw("f8")[1]) == 0xC0);
}

TEST_CASE("rank-0 and empty tensors round trip") {
  TempDir dir;
  const std::string path = dir.file("edge.safetensors");
  const std::vector<float> alpha = {8.0f};
  const std::vector<float> none;
  const std::vector<std::int64_t> no_ints;
  save_safetensors(path, {TensorToWrite::from_span<float>("lora.alpha", alpha, {}),
                          TensorToWrite::from_span<float>("empty", none, {2, 0, 3}),
                          TensorToWrite::from_span<std::int64_t>("empty_i", no_ints, {0}),
                          TensorToWrite::from_span<float>("b", alpha, {1})});
  const auto file = SafetensorsFile::open(path);
  CHECK(file.info("lora.alpha").shape.empty());
  CHECK(file.info("lora.alpha").numel() == 1);
  CHECK(file.read<float>("lora.alpha") == alpha);
  const auto scalar = file.read_tensor<float, 0>("lora.alpha");
  CHECK(scalar() == 8.0f);
  const TensorInfo& empty = file.info("empty");
  CHECK(empty.shape == std::vector<std::size_t>{2, 0, 3});
  CHECK(empty.begin == empty.end);
  CHECK(file.read<float>("empty").empty());
  CHECK(file.read<float>("empty_i").empty());
  const auto empty_tensor = file.read_tensor<float, 3>("empty");
  CHECK(empty_tensor.size() == 0);
  CHECK(empty_tensor.shape()[2] == 3);
  CHECK(file.view<float>("empty").empty());

  // A file with no tensors at all, and one with only metadata.
  save_safetensors(dir.file("none.safetensors"), {});
  CHECK(SafetensorsFile::open(dir.file("none.safetensors")).size() == 0);
  save_safetensors(dir.file("meta.safetensors"), {}, {{"k", "v"}});
  CHECK(SafetensorsFile::open(dir.file("meta.safetensors")).metadata().at("k") == "v");
}

TEST_CASE("from_tensor copies any xtensor expression row-major") {
  TempDir dir;
  const std::string path = dir.file("x.safetensors");
  Tensor<float, 2> a = {{1, 2, 3}, {4, 5, 6}};
  auto transposed = xt::transpose(a);  // a strided view: [3, 2]
  Tensor<std::int64_t, 1> t = {877, 469};
  Tensor<double, 4> sample = xt::arange<double>(2 * 3 * 2 * 2).reshape({2, 3, 2, 2}) * 0.5;
  save_safetensors(path, {TensorToWrite::from_tensor("a_t", transposed),
                          TensorToWrite::from_tensor("a_half", a * 0.5f, Dtype::BF16),
                          TensorToWrite::from_tensor("t", t),
                          TensorToWrite::from_tensor("sample", sample, Dtype::F32)});
  const auto file = SafetensorsFile::open(path);
  CHECK(file.info("a_t").shape == std::vector<std::size_t>{3, 2});
  CHECK(file.read<float>("a_t") == std::vector<float>{1, 4, 2, 5, 3, 6});
  CHECK(file.read<float>("a_half") == std::vector<float>{0.5f, 1, 1.5f, 2, 2.5f, 3});
  CHECK(file.read<std::int64_t>("t") == std::vector<std::int64_t>{877, 469});
  const auto back = file.read_tensor<double, 4>("sample");
  CHECK(file.info("sample").dtype == Dtype::F32);
  REQUIRE_CLOSE(back, sample, 0.0, 0.0);
}

TEST_CASE("a TensorToWrite copy keeps its converted bytes alive") {
  TempDir dir;
  std::vector<TensorToWrite> tensors;
  {
    const std::vector<float> values = {1.0f, 2.0f};
    TensorToWrite original = TensorToWrite::from_span<float>("v", values, {2}, Dtype::F16);
    tensors.push_back(original);  // copy
  }  // original and values are gone; the copy shares the converted storage
  save_safetensors(dir.file("c.safetensors"), tensors);
  CHECK(SafetensorsFile::open(dir.file("c.safetensors")).read<float>("v") ==
        std::vector<float>{1.0f, 2.0f});
}

// ---------------------------------------------------------------------------------------------
// Written layout

TEST_CASE("written files: header padded to 8 with spaces, tensors contiguous and aligned") {
  TempDir dir;
  const std::string path = dir.file("layout.safetensors");
  const auto f32 = iota_floats(5);
  const std::vector<float> f16_values = {1, 2, 3};  // 6 bytes: would misalign a following F32
  const std::vector<std::int64_t> i64 = {1, 2, 3};
  for (const std::string name : {"z", "zz_long_name_to_shift_padding", "a.b.c"}) {
    save_safetensors(path,
                     {TensorToWrite::from_span<float>("c", f32, {5}),
                      TensorToWrite::from_span<float>("a", f16_values, {3}, Dtype::F16),
                      TensorToWrite::from_span<std::int64_t>("b", i64, {3}),
                      TensorToWrite::from_span<float>(name, f32, {5})},
                     {{"format", "pt"}});
    const std::string bytes = read_bytes(path);
    std::uint64_t n = 0;
    std::memcpy(&n, bytes.data(), 8);
    INFO("name " << name << ", header length " << n);
    CHECK(n % 8 == 0);
    const std::string header = bytes.substr(8, n);
    CHECK(header.front() == '{');
    const std::size_t close = header.find_last_of('}');
    CHECK(header.find_first_not_of(' ', close + 1) == std::string::npos);  // only spaces after
    CHECK(n - close - 1 < 8);
    CHECK(header.rfind("{\"__metadata__\"", 0) == 0);  // metadata first

    // Offsets tile [0, buffer size) with no holes; each tensor is aligned to its element size.
    const auto json = nlohmann::json::parse(header);
    std::vector<std::pair<std::size_t, std::size_t>> ranges;
    for (const auto& [key, entry] : json.items()) {
      if (key == "__metadata__") continue;
      const std::size_t begin = entry["data_offsets"][0], end = entry["data_offsets"][1];
      ranges.emplace_back(begin, end);
      CHECK((8 + n + begin) % dtype_size(parse_dtype(entry["dtype"].get<std::string>())) == 0);
    }
    std::sort(ranges.begin(), ranges.end());
    std::size_t position = 0;
    for (auto [begin, end] : ranges) {
      CHECK(begin == position);
      position = end;
    }
    CHECK(8 + n + position == bytes.size());
    // Within one dtype the order is by name; wider dtypes come first.
    const auto file = SafetensorsFile::open(path);
    CHECK(file.info("b").begin == 0);       // I64 first
    CHECK(file.info("a").end == position);  // F16 last
    const auto& first_f32 = name < "c" ? file.info(name) : file.info("c");
    CHECK(first_f32.begin == 24);
    CHECK(file.read<float>(name) == f32);
  }
}

// ---------------------------------------------------------------------------------------------
// Malformed files: each rule of the format, one Error each

TEST_CASE("open: files too short or with a bad header length") {
  TempDir dir;
  CHECK_THAT(open_error(dir, ""), Contains("has 0 bytes, expected at least 8"));
  CHECK_THAT(open_error(dir, "12345"), Contains("has 5 bytes, expected at least 8"));
  CHECK_THAT(open_error(dir, le64(100'000'001) + "{}"),
             Contains("header length 100000001") && Contains("exceeds the limit"));
  CHECK_THAT(open_error(dir, le64(~std::uint64_t{0}) + "{}"), Contains("exceeds the limit"));
  CHECK_THAT(open_error(dir, le64(30) + "{}"), Contains("runs past the end of the file"));
  CHECK_THAT(open_error(dir, le64(0)), Contains("header is empty"));
  CHECK_THAT(open_error(dir, le64(4) + "    "), Contains("header is empty"));
  REQUIRE_THROWS_WITH(SafetensorsFile::open(dir.file("missing.safetensors")),
                      Contains("cannot open") && Contains("missing.safetensors"));
  REQUIRE_THROWS_WITH(SafetensorsFile::open(dir.path().string()), Contains("not a regular file"));
}

TEST_CASE("open: header that is not a JSON object") {
  TempDir dir;
  CHECK_THAT(open_error(dir, file_bytes("[1, 2]", "")), Contains("not a JSON object"));
  CHECK_THAT(open_error(dir, file_bytes("\"text\"", "")), Contains("not a JSON object"));
  CHECK_THAT(open_error(dir, file_bytes("{\"a\":", "")), Contains("not valid JSON"));
  CHECK_THAT(open_error(dir, file_bytes("{} {}", "")), Contains("not valid JSON"));
  CHECK_THAT(open_error(dir, file_bytes("{}\0\0\0"s, "")), Contains("NUL byte at offset 2"));
  CHECK_THAT(open_error(dir, file_bytes("{}\0{\"x\":1}"s, "")), Contains("NUL byte"));
  CHECK_THAT(open_error(dir, file_bytes("{\"\xff\":{}}", "")), Contains("not valid JSON"));
  CHECK_THAT(open_error(dir, file_bytes("{/*c*/}", "")), Contains("not valid JSON"));
}

TEST_CASE("open: entries that are not well-formed objects") {
  TempDir dir;
  auto bad = [&](const std::string& header) { return open_error(dir, file_bytes(header, "")); };
  CHECK_THAT(bad(R"({"a":5})"), Contains("tensor 'a': entry is a JSON number, expected an object"));
  CHECK_THAT(bad(R"({"a":{"shape":[],"data_offsets":[0,0]}})"), Contains("has no 'dtype'"));
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","data_offsets":[0,0]}})"), Contains("has no 'shape'"));
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[0]}})"), Contains("has no 'data_offsets'"));
  CHECK_THAT(bad(R"({"a":{"dtype":32,"shape":[0],"data_offsets":[0,0]}})"),
             Contains("dtype is 32, expected a string"));
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":"0","data_offsets":[0,0]}})"),
             Contains("expected an array"));
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0]}})"),
             Contains("expected [begin, end]"));
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":{"b":0}}})"),
             Contains("expected [begin, end]"));
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,"0"]}})"),
             Contains("expected a non-negative integer"));
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"extra":1}})"),
             Contains("unexpected key 'extra'"));
}

TEST_CASE("open: unknown dtype, bad extents, bad offsets") {
  TempDir dir;
  auto bad = [&](const std::string& header, const std::string& data = "") {
    return open_error(dir, file_bytes(header, data));
  };
  CHECK_THAT(bad(R"({"a":{"dtype":"F12","shape":[1],"data_offsets":[0,4]}})", "1234"),
             Contains("unknown dtype \"F12\""));
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", "1234"),
             Contains("negative"));
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", "1234"),
             Contains("holds 1.5, expected a non-negative integer"));
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}})", "1234"),
             Contains("expected a non-negative integer"));
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[1e30],"data_offsets":[0,4]}})", "1234"),
             Contains("expected a non-negative integer"));
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", "1234"),
             Contains("negative"));
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", "1234"),
             Contains("begin > end"));
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", "1234"),
             Contains("span 4 bytes, expected 8 for F32 [2]"));
  // numel · 4 overflows 64 bits: 2^32 · 2^32 elements.
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})"),
             Contains("no valid byte size"));
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})"),
             Contains("no valid byte size"));
  // Sub-byte dtype that does not end on a byte boundary: 3 · 4 bits.
  CHECK_THAT(bad(R"({"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", "12"),
             Contains("no valid byte size"));
}

TEST_CASE("open: tensors must tile the data buffer exactly") {
  TempDir dir;
  auto bad = [&](const std::string& header, const std::string& data) {
    return open_error(dir, file_bytes(header, data));
  };
  const std::string data8(8, 'x');
  // The first tensor does not start at 0.
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", data8),
             Contains("tensor 'a' begins at byte 4") && Contains("expected 0"));
  // A hole between two tensors.
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                 R"("b":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}})",
                 data8),
             Contains("a hole") && Contains("expected 4 where 'a' ends"));
  // Overlapping tensors.
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                 R"("b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]},)"
                 R"("c":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}})",
                 data8),
             Contains("an overlap"));
  // Two tensors on the same bytes.
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                 R"("b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                 std::string(4, 'x')),
             Contains("an overlap"));
  // Bytes left after the last tensor, and a file cut short.
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", data8),
             Contains("cover 4 bytes") && Contains("holds 8 bytes after the header"));
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", "1234"),
             Contains("cover 8 bytes") && Contains("holds 4 bytes"));
  CHECK_THAT(bad("{}", "x"), Contains("cover 0 bytes"));
}

TEST_CASE("open: duplicate keys are refused, at the top level and inside an entry") {
  TempDir dir;
  auto bad = [&](const std::string& header, const std::string& data) {
    return open_error(dir, file_bytes(header, data));
  };
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                 R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                 std::string(8, 'x')),
             Contains("key 'a' twice"));
  CHECK_THAT(bad(R"({"a":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}})", "1234"),
             Contains("key 'dtype' in the entry of 'a' twice"));
  CHECK_THAT(bad(R"({"__metadata__":{"k":"1","k":"2"}})", ""),
             Contains("'k'") && Contains("twice"));
  CHECK_THAT(bad(R"({"__metadata__":{},"__metadata__":{}})", ""), Contains("twice"));
  // The same key in different objects is fine.
  const std::string path = dir.file("ok.safetensors");
  write_bytes(path, file_bytes(R"({"__metadata__":{"a":"x"},)"
                               R"("a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})",
                               "z"));
  CHECK(SafetensorsFile::open(path).metadata().at("a") == "x");
}

TEST_CASE("open: __metadata__ must map strings to strings") {
  TempDir dir;
  auto bad = [&](const std::string& header) { return open_error(dir, file_bytes(header, "")); };
  CHECK_THAT(bad(R"({"__metadata__":{"ss_network_dim":4}})"),
             Contains("value of 'ss_network_dim' is 4") && Contains("expected a string"));
  CHECK_THAT(bad(R"({"__metadata__":{"nested":{"a":"b"}}})"), Contains("expected a string"));
  CHECK_THAT(bad(R"({"__metadata__":{"n":null}})"), Contains("expected a string"));
  CHECK_THAT(bad(R"({"__metadata__":["a"]})"), Contains("expected an object"));
}

TEST_CASE("open: whitespace around the header JSON is accepted") {
  TempDir dir;
  const std::string path = dir.file("ws.safetensors");
  const std::string header =
      " \t\n{\"a\":{\"dtype\":\"I32\",\"shape\":[],\"data_offsets\":[0,4]}}   ";
  const std::int32_t value = -42;
  std::string data(4, '\0');
  std::memcpy(data.data(), &value, 4);
  write_bytes(path, file_bytes(header, data));
  const auto file = SafetensorsFile::open(path);
  CHECK(file.read<std::int64_t>("a") == std::vector<std::int64_t>{-42});
  // An odd header length: the data is misaligned, read() still works via memcpy, view() refuses.
  CHECK((8 + header.size()) % 4 != 0);
  REQUIRE_THROWS_WITH(file.view<std::int32_t>("a"), Contains("not aligned"));
}

// ---------------------------------------------------------------------------------------------
// Golden file written by the reference tools (torch + safetensors)

TEST_CASE("reads the golden unet_tiny inputs written by safetensors' own writer") {
  const auto file = SafetensorsFile::open(test::data_path("io/unet_tiny_inputs.safetensors"));
  CHECK(file.names() ==
        std::vector<std::string>{"encoder_hidden_states", "grad_output", "sample", "timestep"});
  CHECK(file.info("sample").dtype == Dtype::F32);
  CHECK(file.info("sample").shape == std::vector<std::size_t>{2, 4, 16, 16});
  CHECK(file.info("encoder_hidden_states").shape == std::vector<std::size_t>{2, 7, 32});
  CHECK(file.info("grad_output").shape == std::vector<std::size_t>{2, 4, 16, 16});
  CHECK(file.info("timestep").dtype == Dtype::I64);
  CHECK(file.info("timestep").shape == std::vector<std::size_t>{2});
  CHECK(file.read<std::int64_t>("timestep") == std::vector<std::int64_t>{877, 469});
  CHECK(file.read<float>("timestep") == std::vector<float>{877.0f, 469.0f});
  // safetensors' writer pads the header to 8 bytes: zero-copy views work on its files too.
  CHECK(file.view<std::int64_t>("timestep")[1] == 469);
  CHECK(file.view<float>("sample").size() == 2 * 4 * 16 * 16);
  CHECK(file.metadata().at("generator") == "make_unet_case.py");
  CHECK(file.metadata().at("compute_dtype") == "float64");

  // First, last element and sum as decoded independently (Python struct/array on the file).
  const auto sample = file.read_tensor<float, 4>("sample");
  CHECK(sample(0, 0, 0, 0) == 0.8701026439666748f);
  CHECK(sample(1, 3, 15, 15) == 2.3924920558929443f);
  CHECK(std::accumulate(sample.begin(), sample.end(), 0.0) ==
        Approx(-3.4295117330984795).margin(1e-9));
  const auto context = file.read<double>("encoder_hidden_states");
  CHECK(context.front() == static_cast<double>(0.9825025200843811f));
  CHECK(std::accumulate(context.begin(), context.end(), 0.0) ==
        Approx(1.0019934172742069).margin(1e-9));
  const auto grad = file.read<float>("grad_output");
  CHECK(grad.back() == -1.4695961475372314f);
  CHECK(std::accumulate(grad.begin(), grad.end(), 0.0) == Approx(-24.39003706430958).margin(1e-9));

  // Re-writing the tensors with our writer and reading back gives identical bytes per tensor.
  TempDir dir;
  const std::string path = dir.file("rewritten.safetensors");
  std::vector<TensorToWrite> tensors;
  for (const auto& name : file.names()) {
    const TensorInfo& info = file.info(name);
    tensors.push_back(TensorToWrite::from_bytes(name, info.dtype, info.shape, file.raw(name)));
  }
  save_safetensors(path, tensors, file.metadata());
  const auto again = SafetensorsFile::open(path);
  CHECK(again.metadata() == file.metadata());
  for (const auto& name : file.names()) {
    const auto a = file.raw(name), b = again.raw(name);
    CHECK(again.info(name).shape == file.info(name).shape);
    REQUIRE(a.size() == b.size());
    CHECK(std::memcmp(a.data(), b.data(), a.size()) == 0);
  }
}

// ---------------------------------------------------------------------------------------------
// Atomic write

TEST_CASE("save_safetensors: a failed write leaves the target untouched and no temporary") {
  TempDir dir;
  const std::string path = dir.file("target.safetensors");
  const auto values = iota_floats(6);
  save_safetensors(path, {TensorToWrite::from_span<float>("w", values, {2, 3})});
  const std::string before = read_bytes(path);

  auto only_target_left = [&] {
    std::vector<std::string> entries;
    for (const auto& entry : fs::directory_iterator(dir.path()))
      entries.push_back(entry.path().filename().string());
    return entries == std::vector<std::string>{"target.safetensors"};
  };

  REQUIRE_THROWS_WITH(
      save_safetensors(path, {TensorToWrite::from_span<float>("x", values, {6}),
                              TensorToWrite::from_span<float>("x", values, {2, 3})}),
      Contains("tensor name 'x' appears twice"));
  CHECK(read_bytes(path) == before);
  CHECK(only_target_left());

  // Bytes that do not match dtype × shape.
  TensorToWrite wrong = TensorToWrite::from_span<float>("w", values, {2, 3});
  wrong.shape = {7};
  REQUIRE_THROWS_WITH(save_safetensors(path, {wrong}),
                      Contains("has 24 bytes, expected 28 for F32 [7]"));
  wrong = TensorToWrite::from_span<float>("w", values, {2, 3});
  wrong.dtype = Dtype::F16;
  REQUIRE_THROWS_WITH(save_safetensors(path, {wrong}), Contains("expected 12 for F16 [2,3]"));
  REQUIRE_THROWS_WITH(save_safetensors(path, {TensorToWrite::from_span<float>("", values, {6})}),
                      Contains("empty name"));
  REQUIRE_THROWS_WITH(
      save_safetensors(path, {TensorToWrite::from_span<float>("__metadata__", values, {6})}),
      Contains("reserved"));
  REQUIRE_THROWS_WITH(save_safetensors(path, {}, {{"bad", std::string("\xff\xfe")}}),
                      Contains("not valid UTF-8"));
  CHECK(read_bytes(path) == before);
  CHECK(only_target_left());

  // The rename fails when the target is a directory: the temporary is removed.
  const std::string folder_target = dir.file("folder");
  fs::create_directory(folder_target);
  fs::create_directory(folder_target + "/inside");
  REQUIRE_THROWS_WITH(
      save_safetensors(folder_target, {TensorToWrite::from_span<float>("w", values, {6})}),
      Contains("cannot move"));
  fs::remove_all(folder_target);
  CHECK(only_target_left());

  // A successful write replaces the old file completely.
  const std::vector<float> other = {9, 8};
  save_safetensors(path, {TensorToWrite::from_span<float>("v", other, {2})});
  const auto file = SafetensorsFile::open(path);
  CHECK(file.names() == std::vector<std::string>{"v"});
  CHECK(only_target_left());
}

TEST_CASE("save_safetensors: a folder that does not exist is an Error, nothing is created") {
  TempDir dir;
  const std::string path = dir.file("no/such/folder/model.safetensors");
  const std::vector<float> values = {1};
  REQUIRE_THROWS_WITH(save_safetensors(path, {TensorToWrite::from_span<float>("w", values, {1})}),
                      Contains("cannot create") && Contains("no/such/folder/model.safetensors"));
  CHECK_FALSE(fs::exists(dir.file("no")));
}

TEST_CASE("SafetensorsFile is movable and the moved-to object keeps the mapping") {
  TempDir dir;
  const std::string path = dir.file("m.safetensors");
  const auto values = iota_floats(4);
  save_safetensors(path, {TensorToWrite::from_span<float>("w", values, {4})});
  static_assert(!std::is_copy_constructible_v<SafetensorsFile>);
  static_assert(std::is_nothrow_move_constructible_v<SafetensorsFile> ||
                std::is_move_constructible_v<SafetensorsFile>);
  auto first = SafetensorsFile::open(path);
  SafetensorsFile second = std::move(first);
  CHECK(second.read<float>("w") == values);
  auto third = SafetensorsFile::open(path);
  third = std::move(second);
  CHECK(third.read<float>("w") == values);
}
