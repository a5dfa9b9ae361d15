// The content-addressed disk cache (tools/disk_cache.hpp): keys, round trip, damaged entries.

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>
#include <xtensor/xarray.hpp>

#include "difftrain/io/safetensors.hpp"
#include "disk_cache.hpp"
#include "support/temp_dir.hpp"

namespace fs = std::filesystem;
using namespace difftrain;
using tools::CacheKey;
using tools::CacheTensor;
using tools::DiskCache;

namespace {

std::vector<CacheTensor> cache_sample() {
  return {{"mean", {1, 2, 2, 2}, {1, 2, 3, 4, 5, 6, 7, 8}},
          {"logvar", {1, 2, 2, 2}, {-1, -2, -3, -4, -5, -6, -7, -8.5f}}};
}

bool same_tensors(const std::vector<CacheTensor>& a, const std::vector<CacheTensor>& b) {
  if (a.size() != b.size()) return false;
  for (const CacheTensor& x : a) {
    bool found = false;
    for (const CacheTensor& y : b)
      found |= x.name == y.name && x.shape == y.shape && x.values == y.values;
    if (!found) return false;
  }
  return true;
}

struct DigestParam {
  xt::xarray<float> value;
};
// Two parameters, visited as a module's for_each_parameter does.
struct DigestModel {
  DigestParam a{xt::xarray<float>{1, 2, 3}}, b{xt::xarray<float>{4, 5}};
  std::string name_a = "encoder.a";
  template <class F>
  void for_each_parameter(const std::string&, F&& visit) const {
    visit(name_a, a);
    visit("decoder.b", b);
  }
};

}  // namespace

TEST_CASE("CacheKey: every field counts, and field boundaries count") {
  const std::string ab_c = CacheKey("k").add("ab").add("c").hex();
  CHECK(ab_c.size() == 64);
  CHECK(ab_c == CacheKey("k").add("ab").add("c").hex());
  CHECK(ab_c != CacheKey("k").add("a").add("bc").hex());
  CHECK(ab_c != CacheKey("other kind").add("ab").add("c").hex());
  const std::vector<float> v{1.0f, 2.0f};
  const std::vector<float> w{1.0f, std::nextafter(2.0f, 3.0f)};
  CHECK(CacheKey("k").add(std::span<const float>(v)).hex() !=
        CacheKey("k").add(std::span<const float>(w)).hex());
  CHECK(CacheKey("k").add(std::uint64_t{16}).add(std::uint64_t{8}).hex() !=
        CacheKey("k").add(std::uint64_t{8}).add(std::uint64_t{16}).hex());
}

TEST_CASE("DiskCache: stores, reads back bitwise, and counts") {
  test::TempDir dir("disk_cache");
  DiskCache cache(dir.path() / "nested" / "cache", "latents");
  const std::string key = CacheKey("latents").add("image").hex();
  CHECK_FALSE(cache.load(key));
  cache.store(key, cache_sample(), {{"image", "a.png"}});
  CHECK(fs::exists(cache.path_of(key)));
  const auto back = cache.load(key);
  REQUIRE(back);
  CHECK(same_tensors(*back, cache_sample()));
  CHECK(cache.counts().loaded == 1);
  CHECK(cache.counts().stored == 1);
  CHECK(cache.counts().damaged == 0);
  const auto file = io::SafetensorsFile::open(cache.path_of(key).string());
  CHECK(file.metadata().at("image") == "a.png");
  CHECK(file.metadata().at("checksum") == tools::cache_checksum(cache_sample()));
  // Another kind in the same folder never reads this entry.
  DiskCache other(dir.path() / "nested" / "cache", "text_encoder_outputs");
  CHECK_FALSE(other.load(key));
  CHECK(other.counts().damaged == 0);
}

TEST_CASE("DiskCache: a damaged entry is reported and not returned") {
  test::TempDir dir("disk_cache_damaged");
  std::FILE* log = std::tmpfile();
  DiskCache cache(dir.path(), "latents", log);
  const std::string key = CacheKey("latents").add("x").hex();
  const fs::path path = cache.path_of(key);
  auto rewrite = [&](auto&& change) {
    cache.store(key, cache_sample());
    std::ifstream in(path, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    in.close();
    change(bytes);
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  };
  std::size_t damaged = 0;
  SECTION("a flipped bit in the values") {
    rewrite([](std::string& b) { b[b.size() - 3] ^= 0x10; });
  }
  SECTION("a truncated file") {
    rewrite([](std::string& b) { b.resize(b.size() - 5); });
  }
  SECTION("not a safetensors file") {
    rewrite([](std::string& b) { b = "garbage"; });
  }
  SECTION("an entry copied under another key's name") {
    const std::string other = CacheKey("latents").add("y").hex();
    cache.store(other, cache_sample());
    fs::copy_file(cache.path_of(other), path, fs::copy_options::overwrite_existing);
  }
  CHECK_FALSE(cache.load(key));
  ++damaged;
  CHECK(cache.counts().damaged == damaged);
  std::rewind(log);
  char text[512] = {};
  CHECK(std::fread(text, 1, sizeof text - 1, log) > 0);
  CHECK_THAT(std::string(text), Catch::Contains(path.string()) && Catch::Contains("damaged"));
  // Stored again, it reads back.
  cache.store(key, cache_sample());
  CHECK(cache.load(key));
  std::fclose(log);
}

TEST_CASE("DiskCache: a folder that cannot be made is an Error naming it") {
  test::TempDir dir("disk_cache_bad");
  dir.write("file", "x");
  CHECK_THROWS_WITH(DiskCache(dir.path() / "file" / "cache", "latents"),
                    Catch::Contains("file/cache"));
}

TEST_CASE("parameter_digest: a changed weight, name or selection changes it") {
  DigestModel m;
  const std::string all = tools::parameter_digest(m);
  const std::string encoder = tools::parameter_digest(m, {"encoder."});
  CHECK(all != encoder);
  DigestModel changed_decoder = m;
  changed_decoder.b.value(0) = 4.5f;
  CHECK(tools::parameter_digest(changed_decoder) != all);
  CHECK(tools::parameter_digest(changed_decoder, {"encoder."}) == encoder);
  DigestModel changed_encoder = m;
  changed_encoder.a.value(2) = -3;
  CHECK(tools::parameter_digest(changed_encoder, {"encoder."}) != encoder);
  DigestModel renamed = m;
  renamed.name_a = "encoder.c";
  CHECK(tools::parameter_digest(renamed, {"encoder."}) != encoder);
}
