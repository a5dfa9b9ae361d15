#pragma once
// Caches on disk that never go stale (kohya's --cache_latents_to_disk and
// --cache_text_encoder_outputs_to_disk): content-addressed entries. An entry's name is the
// SHA-256 of everything its value depends on (its key: the exact model input and a digest of the
// model's weights and options), so a changed image, bucket, crop, flip, caption, model or option
// names another file, and an old entry is never read for it.
//
//   file     = <dir>/<kind>-<key>.safetensors   (F32 tensors, written atomically)
//   metadata = format "difftrain.disk_cache", version "1", kind, key,
//              checksum = SHA-256 over each tensor's name, shape and bytes, in file order,
//              plus free-form notes (e.g. the image path) for whoever looks at the folder.
// A file that cannot be parsed, or whose kind, key or checksum does not match, is damaged: a
// warning names it and the caller recomputes the entry (store() replaces the file).
// Entries of other runs stay in the folder; deleting it is always safe.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "difftrain/io/sha256.hpp"

namespace difftrain::tools {

/// A named F32 tensor of an entry.
struct CacheTensor {
  std::string name;
  std::vector<std::size_t> shape;
  std::vector<float> values;
};

/// SHA-256 of a sequence of typed fields, each length-prefixed so that no two different
/// sequences hash alike ("ab","c" ≠ "a","bc").
class CacheKey {
 public:
  explicit CacheKey(std::string_view kind) { add(kind); }
  CacheKey& add(std::string_view text);
  CacheKey& add(std::uint64_t value);
  CacheKey& add(std::span<const float> values);
  CacheKey& add(std::span<const std::int64_t> values);
  std::string hex() const { return sha_.hexdigest(); }

 private:
  void add_bytes(const void* data, std::size_t n);
  io::Sha256 sha_;
};

/// A folder of content-addressed entries of one kind ("latents", "text_encoder_outputs").
class DiskCache {
 public:
  /// Creates `dir` if needed (an Error naming it when that fails). Warnings go to `log` (may be
  /// null).
  DiskCache(std::filesystem::path dir, std::string kind, std::FILE* log = nullptr);

  std::filesystem::path path_of(const std::string& key) const;

  /// The entry's tensors, or nullopt when there is none or it is damaged (with a warning).
  std::optional<std::vector<CacheTensor>> load(const std::string& key);

  /// Writes the entry (atomically; replaces a damaged one). `notes` go into the metadata.
  void store(const std::string& key, const std::vector<CacheTensor>& tensors,
             const std::map<std::string, std::string>& notes = {});

  struct Counts {
    std::size_t loaded = 0, stored = 0, damaged = 0;
  };
  const Counts& counts() const { return counts_; }
  const std::filesystem::path& dir() const { return dir_; }
  const std::string& kind() const { return kind_; }

 private:
  std::filesystem::path dir_;
  std::string kind_;
  std::FILE* log_;
  Counts counts_;
};

/// The checksum DiskCache writes: SHA-256 over each tensor's name, shape and values, in order.
std::string cache_checksum(const std::vector<CacheTensor>& tensors);

/// A digest of a model's parameters (each name, shape and value, in visiting order) whose names
/// start with one of `prefixes` (all when empty): the model's part of a key.
template <class Module>
std::string parameter_digest(const Module& module, std::vector<std::string> prefixes = {}) {
  CacheKey key("parameters");
  module.for_each_parameter("", [&](const std::string& name, const auto& p) {
    bool wanted = prefixes.empty();
    for (const auto& prefix : prefixes) wanted |= name.starts_with(prefix);
    if (!wanted) return;
    key.add(name);
    for (std::size_t d : p.value.shape()) key.add(std::uint64_t(d));
    key.add(std::span<const float>(p.value.data(), p.value.size()));
  });
  return key.hex();
}

}  // namespace difftrain::tools
