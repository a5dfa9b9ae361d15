// The content-addressed disk caches of disk_cache.hpp.
#include "disk_cache.hpp"

#include <algorithm>
#include <cstring>
#include <system_error>

#include "difftrain/core/error.hpp"
#include "difftrain/io/safetensors.hpp"

namespace difftrain::tools {

namespace fs = std::filesystem;

namespace {
constexpr const char* kFormat = "difftrain.disk_cache";
constexpr const char* kVersion = "1";
}  // namespace

void CacheKey::add_bytes(const void* data, std::size_t n) {
  const std::uint64_t length = n;
  sha_.update(std::as_bytes(std::span<const std::uint64_t>(&length, 1)));
  sha_.update(std::span<const std::byte>(static_cast<const std::byte*>(data), n));
}
CacheKey& CacheKey::add(std::string_view text) {
  add_bytes(text.data(), text.size());
  return *this;
}
CacheKey& CacheKey::add(std::uint64_t value) {
  add_bytes(&value, sizeof value);
  return *this;
}
CacheKey& CacheKey::add(std::span<const float> values) {
  add_bytes(values.data(), values.size_bytes());
  return *this;
}
CacheKey& CacheKey::add(std::span<const std::int64_t> values) {
  add_bytes(values.data(), values.size_bytes());
  return *this;
}

std::string cache_checksum(const std::vector<CacheTensor>& tensors) {
  std::vector<const CacheTensor*> sorted;
  for (const auto& t : tensors) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(),
            [](const CacheTensor* a, const CacheTensor* b) { return a->name < b->name; });
  CacheKey key("checksum");
  for (const CacheTensor* t : sorted) {
    key.add(t->name);
    for (std::size_t d : t->shape) key.add(std::uint64_t(d));
    key.add(std::span<const float>(t->values));
  }
  return key.hex();
}

DiskCache::DiskCache(fs::path dir, std::string kind, std::FILE* log)
    : dir_(std::move(dir)), kind_(std::move(kind)), log_(log) {
  std::error_code ec;
  fs::create_directories(dir_, ec);
  require(!ec && fs::is_directory(dir_), "disk cache", "cannot create the cache folder '",
          dir_.string(), "': ", ec ? ec.message() : std::string("not a folder"));
}

fs::path DiskCache::path_of(const std::string& key) const {
  return dir_ / (kind_ + "-" + key + ".safetensors");
}

std::optional<std::vector<CacheTensor>> DiskCache::load(const std::string& key) {
  const fs::path path = path_of(key);
  std::error_code ec;
  if (!fs::exists(path, ec)) return std::nullopt;
  std::string problem;
  try {
    const io::SafetensorsFile file = io::SafetensorsFile::open(path.string());
    const auto& meta = file.metadata();
    auto field = [&meta](const char* name) {
      auto it = meta.find(name);
      return it == meta.end() ? std::string() : it->second;
    };
    if (field("format") != kFormat || field("version") != kVersion)
      problem = "not a difftrain cache entry of version " + std::string(kVersion);
    else if (field("kind") != kind_ || field("key") != key)
      problem = "its kind or key does not match its name";
    else {
      std::vector<CacheTensor> tensors;
      for (const std::string& name : file.names()) {
        const io::TensorInfo& info = file.info(name);
        tensors.push_back({name, info.shape, file.read<float>(name)});
      }
      if (cache_checksum(tensors) != field("checksum"))
        problem = "its checksum does not match its contents";
      else {
        ++counts_.loaded;
        return tensors;
      }
    }
  } catch (const Error& e) {
    problem = e.what();
  }
  ++counts_.damaged;
  if (log_)
    std::fprintf(
        log_,
        "difftrain train: warning: the cache entry '%s' is damaged (%s); computing it again\n",
        path.string().c_str(), problem.c_str());
  return std::nullopt;
}

void DiskCache::store(const std::string& key, const std::vector<CacheTensor>& tensors,
                      const std::map<std::string, std::string>& notes) {
  std::map<std::string, std::string> metadata = notes;
  metadata["format"] = kFormat;
  metadata["version"] = kVersion;
  metadata["kind"] = kind_;
  metadata["key"] = key;
  metadata["checksum"] = cache_checksum(tensors);
  std::vector<io::TensorToWrite> out;
  for (const CacheTensor& t : tensors)
    out.push_back(io::TensorToWrite::from_bytes(t.name, io::Dtype::F32, t.shape,
                                                std::as_bytes(std::span<const float>(t.values))));
  io::save_safetensors(path_of(key).string(), out, metadata);
  ++counts_.stored;
}

}  // namespace difftrain::tools
