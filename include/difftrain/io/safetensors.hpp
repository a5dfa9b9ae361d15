#pragma once
// safetensors files: reading through a memory map (validated at open), atomic writing, and the
// same bytes in memory (SafetensorsLayout: one plan for save_safetensors and
// serialize_safetensors).
//
// Layout: [0, 8) header length N (u64, little-endian) · [8, 8+N) UTF-8 JSON object
// {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {string: string}},
// optionally padded with spaces · [8+N, EOF) the data buffer; offsets are relative to its start,
// tensors are row-major and little-endian, and together they cover the buffer exactly.
//
// Reading converts between element types as follows (read<T>, read_into, read_tensor):
//   T floating (float, double): from F16, BF16, F32, F64 (F64 → float rounds to nearest),
//     from F8_E4M3 and F8_E5M2 (OCP float8, exact),
//     from every integer dtype (static_cast; I64 timesteps read as float), from BOOL as 0 / 1.
//   T integral (int8_t ... uint64_t, not bool): from integer dtypes when every value fits in T
//     (otherwise Error naming the element), from BOOL as 0 / 1. Floating dtypes are refused:
//     a float → integer conversion would have to pick a rounding, so the caller does it.
//   BOOL bytes must be 0 or 1. F4, F6_*, F8_E8M0, the FNUZ float8 variants and C64 are validated
//   and reachable via raw() but not converted.
// Writing (TensorToWrite::from_span / from_tensor) converts the same way in the other direction;
// float → F16 / BF16 rounds to nearest even (see half.hpp).
//
// The library assumes a little-endian host (as safetensors does); big-endian hosts fail to build.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>
#include <xtensor/xarray.hpp>
#include <xtensor/xtensor.hpp>

#include "difftrain/core/error.hpp"
#include "difftrain/core/half.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/io/json_file.hpp"
#include "difftrain/io/regular_file.hpp"

namespace difftrain::io {

static_assert(std::endian::native == std::endian::little,
              "difftrain::io reads and writes safetensors (little-endian) in host byte order");

// ---------------------------------------------------------------------------------------------
// Element types

/// safetensors element types, in the format's order (ascending alignment).
enum class Dtype : std::uint8_t {
  BOOL,
  F4,
  F6_E2M3,
  F6_E3M2,
  U8,
  I8,
  F8_E5M2,
  F8_E4M3,
  F8_E8M0,
  F8_E4M3FNUZ,
  F8_E5M2FNUZ,
  I16,
  U16,
  F16,
  BF16,
  I32,
  U32,
  F32,
  C64,
  F64,
  I64,
  U64,
};

inline constexpr std::array<Dtype, 22> kAllDtypes = {
    Dtype::BOOL,        Dtype::F4,      Dtype::F6_E2M3, Dtype::F6_E3M2, Dtype::U8,
    Dtype::I8,          Dtype::F8_E5M2, Dtype::F8_E4M3, Dtype::F8_E8M0, Dtype::F8_E4M3FNUZ,
    Dtype::F8_E5M2FNUZ, Dtype::I16,     Dtype::U16,     Dtype::F16,     Dtype::BF16,
    Dtype::I32,         Dtype::U32,     Dtype::F32,     Dtype::C64,     Dtype::F64,
    Dtype::I64,         Dtype::U64};

/// The dtype's name in the header ("F32", "BF16", ...).
constexpr std::string_view to_string(Dtype dtype) {
  switch (dtype) {
    case Dtype::BOOL:
      return "BOOL";
    case Dtype::F4:
      return "F4";
    case Dtype::F6_E2M3:
      return "F6_E2M3";
    case Dtype::F6_E3M2:
      return "F6_E3M2";
    case Dtype::U8:
      return "U8";
    case Dtype::I8:
      return "I8";
    case Dtype::F8_E5M2:
      return "F8_E5M2";
    case Dtype::F8_E4M3:
      return "F8_E4M3";
    case Dtype::F8_E8M0:
      return "F8_E8M0";
    case Dtype::F8_E4M3FNUZ:
      return "F8_E4M3FNUZ";
    case Dtype::F8_E5M2FNUZ:
      return "F8_E5M2FNUZ";
    case Dtype::I16:
      return "I16";
    case Dtype::U16:
      return "U16";
    case Dtype::F16:
      return "F16";
    case Dtype::BF16:
      return "BF16";
    case Dtype::I32:
      return "I32";
    case Dtype::U32:
      return "U32";
    case Dtype::F32:
      return "F32";
    case Dtype::C64:
      return "C64";
    case Dtype::F64:
      return "F64";
    case Dtype::I64:
      return "I64";
    case Dtype::U64:
      return "U64";
  }
  return "?";
}

/// The dtype named `name`, or nothing.
constexpr std::optional<Dtype> try_parse_dtype(std::string_view name) {
  for (Dtype dtype : kAllDtypes) {
    if (to_string(dtype) == name) return dtype;
  }
  return std::nullopt;
}

/// The dtype named `name`; Error "parse_dtype: unknown dtype 'F12', expected one of ...".
inline Dtype parse_dtype(std::string_view name) {
  if (auto dtype = try_parse_dtype(name)) return *dtype;
  std::string known;
  for (Dtype dtype : kAllDtypes)
    known += (known.empty() ? "" : ", ") + std::string(to_string(dtype));
  throw Error(message("parse_dtype: unknown dtype '", name, "', expected one of ", known));
}

/// Bits per element (F4: 4, F6_*: 6, BOOL: 8, C64: 64 for the complex pair of F32).
constexpr std::size_t dtype_bits(Dtype dtype) {
  switch (dtype) {
    case Dtype::F4:
      return 4;
    case Dtype::F6_E2M3:
    case Dtype::F6_E3M2:
      return 6;
    case Dtype::BOOL:
    case Dtype::U8:
    case Dtype::I8:
    case Dtype::F8_E5M2:
    case Dtype::F8_E4M3:
    case Dtype::F8_E8M0:
    case Dtype::F8_E4M3FNUZ:
    case Dtype::F8_E5M2FNUZ:
      return 8;
    case Dtype::I16:
    case Dtype::U16:
    case Dtype::F16:
    case Dtype::BF16:
      return 16;
    case Dtype::I32:
    case Dtype::U32:
    case Dtype::F32:
      return 32;
    case Dtype::C64:
    case Dtype::F64:
    case Dtype::I64:
    case Dtype::U64:
      return 64;
  }
  return 0;
}

/// Bytes per element; Error for the sub-byte dtypes F4 and F6_* (use dtype_bits).
inline std::size_t dtype_size(Dtype dtype) {
  const std::size_t bits = dtype_bits(dtype);
  require(bits % 8 == 0, "dtype_size", to_string(dtype), " has ", bits,
          " bits per element, not a whole number of bytes");
  return bits / 8;
}

/// The dtype that stores T unchanged: float → F32, double → F64, int64_t → I64, bool → BOOL, ...
template <class T>
constexpr Dtype dtype_of() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, bool>)
    return Dtype::BOOL;
  else if constexpr (std::is_same_v<U, float>)
    return Dtype::F32;
  else if constexpr (std::is_same_v<U, double>)
    return Dtype::F64;
  else if constexpr (std::is_integral_v<U> && std::is_signed_v<U> && sizeof(U) == 1)
    return Dtype::I8;
  else if constexpr (std::is_integral_v<U> && std::is_signed_v<U> && sizeof(U) == 2)
    return Dtype::I16;
  else if constexpr (std::is_integral_v<U> && std::is_signed_v<U> && sizeof(U) == 4)
    return Dtype::I32;
  else if constexpr (std::is_integral_v<U> && std::is_signed_v<U> && sizeof(U) == 8)
    return Dtype::I64;
  else if constexpr (std::is_integral_v<U> && sizeof(U) == 1)
    return Dtype::U8;
  else if constexpr (std::is_integral_v<U> && sizeof(U) == 2)
    return Dtype::U16;
  else if constexpr (std::is_integral_v<U> && sizeof(U) == 4)
    return Dtype::U32;
  else if constexpr (std::is_integral_v<U> && sizeof(U) == 8)
    return Dtype::U64;
  else
    static_assert(sizeof(U) == 0, "dtype_of: no safetensors dtype stores this type");
}

/// A tensor's entry in the header. Offsets are relative to the data buffer; [begin, end).
struct TensorInfo {
  Dtype dtype = Dtype::F32;
  std::vector<std::size_t> shape;
  std::size_t begin = 0, end = 0;

  /// Product of the extents (1 for rank 0, 0 when an extent is 0).
  std::size_t numel() const {
    std::size_t n = 1;
    for (std::size_t extent : shape) n *= extent;  // validated at open: cannot overflow
    return n;
  }
  std::size_t nbytes() const { return end - begin; }
};

namespace safetensors_detail {

inline constexpr std::uint64_t kMaxHeaderSize = 100'000'000;
// The most dimensions a tensor's shape may have (PyTorch's limit is 64 too).
inline constexpr std::size_t kMaxRank = 64;

// a · b, or nothing on overflow.
inline std::optional<std::size_t> checked_mul(std::size_t a, std::size_t b) {
  std::size_t product = 0;
  if (__builtin_mul_overflow(a, b, &product)) return std::nullopt;
  return product;
}

// numel(shape) · bits(dtype) / 8, or nothing on overflow or when it does not end on a byte.
inline std::optional<std::size_t> byte_size(Dtype dtype, std::span<const std::size_t> shape) {
  std::optional<std::size_t> bits = dtype_bits(dtype);
  for (std::size_t extent : shape) {
    if (!bits) return std::nullopt;
    bits = checked_mul(*bits, extent);
  }
  if (!bits || *bits % 8 != 0) return std::nullopt;
  return *bits / 8;
}

inline std::string errno_text(int error) { return std::strerror(error); }

// A read-only memory map of a whole regular file (RAII; movable, not copyable).
class MappedFile {
 public:
  MappedFile() = default;
  // Maps `path`; the file must exist, be a regular file and hold at least `min_size` bytes.
  static MappedFile open(const std::string& path, std::string_view function, std::size_t min_size) {
    const RegularFile regular(path, function);  // refuses a pipe or a device before blocking
    const auto size = static_cast<std::size_t>(regular.size());
    require(size >= min_size, function, "'", path, "' has ", size, " bytes, expected at least ",
            min_size, " (the 8-byte header length)");
    const int fd = regular.fd();
    MappedFile file;
    file.size_ = size;
    if (size > 0) {
      void* data = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
      if (data == MAP_FAILED) fail(function, "cannot map '", path, "': ", errno_text(errno));
      file.data_ = static_cast<const std::byte*>(data);
    }
    return file;  // the descriptor closes; the mapping keeps the file's pages reachable
  }

  MappedFile(MappedFile&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  MappedFile& operator=(MappedFile&& other) noexcept {
    if (this != &other) {
      unmap();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() { unmap(); }

  std::span<const std::byte> bytes() const { return {data_, size_}; }

 private:
  void unmap() {
    if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), size_);
    data_ = nullptr;
    size_ = 0;
  }
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// "I64" for int64_t: how messages name the requested element type.
template <class T>
std::string_view type_name() {
  return to_string(dtype_of<T>());
}

}  // namespace safetensors_detail

// ---------------------------------------------------------------------------------------------
// Reading

/// A safetensors file opened through a read-only memory map; the header is fully validated at
/// open, so every accessor afterwards only fails for an unknown name or a refused conversion.
/// Tensor bytes are not copied until read() converts them. Movable, not copyable.
class SafetensorsFile {
 public:
  /// Maps and validates `path`; Error naming the file and the first problem found.
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const { return path_; }
  /// Tensor names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& [name, info] : tensors_) out.push_back(name);
    return out;
  }
  std::size_t size() const { return tensors_.size(); }
  bool contains(std::string_view name) const { return tensors_.find(name) != tensors_.end(); }
  /// Error "SafetensorsFile::info: no tensor 'x' in 'file' (4 tensors: a, b, ...)" if absent.
  const TensorInfo& info(std::string_view name) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) throw_unknown("SafetensorsFile::info", name);
    return it->second;
  }
  /// The "__metadata__" map (empty when the header has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// The tensor's bytes inside the mapped file (no alignment guaranteed).
  std::span<const std::byte> raw(std::string_view name) const {
    const TensorInfo& ti = info(name);
    return buffer_.subspan(ti.begin, ti.nbytes());
  }

  /// Zero-copy view when the stored dtype is T's own (dtype_of<T>) and the bytes are aligned
  /// for T (always so for files written by save_safetensors); Error otherwise — use read().
  template <class T>
  std::span<const T> view(std::string_view name) const {
    const TensorInfo& ti = info(name);
    require(ti.dtype == dtype_of<T>(), "SafetensorsFile::view", "tensor '", name, "' in '", path_,
            "' has dtype ", to_string(ti.dtype), ", expected ", to_string(dtype_of<T>()));
    const std::byte* first = buffer_.data() + ti.begin;
    require(ti.nbytes() == 0 || reinterpret_cast<std::uintptr_t>(first) % alignof(T) == 0,
            "SafetensorsFile::view", "tensor '", name, "' in '", path_, "' is not aligned to ",
            alignof(T), " bytes; use read()");
    return {reinterpret_cast<const T*>(first), ti.numel()};
  }

  /// Converts the tensor's elements into `out` (row-major); out.size() must equal numel.
  template <class T>
  void read_into(std::string_view name, std::span<T> out) const;

  /// The tensor's elements converted to T, row-major (conversion rules at the top of the file).
  template <class T>
  std::vector<T> read(std::string_view name) const {
    std::vector<T> out(info(name).numel());
    read_into(name, std::span<T>(out));
    return out;
  }

  /// The tensor as an xtensor of rank N; Error "read_tensor: sample has rank 3, expected 4".
  template <class T, std::size_t N>
  Tensor<T, N> read_tensor(std::string_view name) const {
    const TensorInfo& ti = info(name);
    require(ti.shape.size() == N, "read_tensor", name, " has rank ", ti.shape.size(), ", expected ",
            N, " (shape ", shape_string(ti.shape), " in '", path_, "')");
    std::array<std::size_t, N> shape{};
    if constexpr (N > 0) std::copy(ti.shape.begin(), ti.shape.end(), shape.begin());
    auto tensor = Tensor<T, N>::from_shape(shape);
    read_into(name, std::span<T>(tensor.data(), tensor.size()));
    return tensor;
  }

 private:
  SafetensorsFile() = default;
  [[noreturn]] void throw_unknown(std::string_view function, std::string_view name) const;
  void parse_header(std::span<const std::byte> header);

  std::string path_;
  safetensors_detail::MappedFile file_;
  std::span<const std::byte> buffer_;  // the data buffer inside file_
  std::map<std::string, TensorInfo, std::less<>> tensors_;
  std::map<std::string, std::string> metadata_;
};

inline void SafetensorsFile::throw_unknown(std::string_view function, std::string_view name) const {
  std::string listing;
  std::size_t shown = 0;
  for (const auto& [known, info] : tensors_) {
    if (shown++ == 8) {
      listing += ", ...";
      break;
    }
    listing += (listing.empty() ? "" : ", ") + known;
  }
  fail(function, "no tensor '", name, "' in '", path_, "' (", tensors_.size(), " tensors",
       listing.empty() ? "" : ": ", listing, ")");
}

inline SafetensorsFile SafetensorsFile::open(const std::string& path) {
  constexpr std::string_view kFunction = "SafetensorsFile::open";
  SafetensorsFile file;
  file.path_ = path;
  file.file_ = safetensors_detail::MappedFile::open(path, kFunction, 8);
  const std::span<const std::byte> bytes = file.file_.bytes();

  std::uint64_t header_size = 0;
  std::memcpy(&header_size, bytes.data(), 8);
  require(header_size <= safetensors_detail::kMaxHeaderSize, kFunction, "'", path,
          "': header length ", header_size, " exceeds the limit of ",
          safetensors_detail::kMaxHeaderSize, " bytes");
  require(header_size <= bytes.size() - 8, kFunction, "'", path, "': header length ", header_size,
          " runs past the end of the file (", bytes.size() - 8, " bytes after the 8-byte length)");
  file.buffer_ = bytes.subspan(8 + header_size);
  file.parse_header(bytes.subspan(8, header_size));
  return file;
}

inline void SafetensorsFile::parse_header(std::span<const std::byte> header) {
  using nlohmann::json;
  auto error = [this](auto&&... parts) {
    return Error(
        message("SafetensorsFile::open: '", path_, "': ", std::forward<decltype(parts)>(parts)...));
  };
  const char* text = reinterpret_cast<const char*>(header.data());
  const std::string_view view(text, header.size());

  // nlohmann's lexer takes a NUL byte for the end of input, which would let arbitrary bytes
  // follow a valid object; JSON text never contains one.
  if (const std::size_t nul = view.find('\0'); nul != std::string_view::npos) {
    throw error("header is not valid JSON: NUL byte at offset ", nul, " of ", header.size());
  }
  // The format requires an object; writers may pad with whitespace on either side.
  const std::size_t first = view.find_first_not_of(" \t\n\r");
  if (first == std::string_view::npos) throw error("header is empty (", header.size(), " bytes)");
  if (view[first] != '{') {
    throw error("header is not a JSON object: it starts with '", view.substr(first, 16), "'");
  }

  // nlohmann keeps one of two equal keys silently; a parse callback sees every key as it comes.
  struct Scope {
    std::set<std::string, std::less<>> keys;
    std::string last_key;
  };
  std::vector<Scope> scopes;
  std::string duplicate;
  // Arrays hold a shape or data_offsets: a few numbers. A header of one long array ("shape":
  // [1,1,1,...]) is refused while parsing: its DOM would take ~16 bytes per 2 bytes of text.
  std::vector<std::size_t> open;  // per open container: elements so far (arrays) or npos
  constexpr std::size_t kObject = std::size_t(-1);
  auto element = [&] {
    if (!open.empty() && open.back() != kObject && ++open.back() > safetensors_detail::kMaxRank)
      throw error("header has an array of more than ", safetensors_detail::kMaxRank,
                  " elements, expected a shape of at most ", safetensors_detail::kMaxRank,
                  " dimensions or data_offsets [begin, end]");
  };
  auto on_event = [&](int, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
        element();
        open.push_back(kObject);
        scopes.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!open.empty()) open.pop_back();
        if (!scopes.empty()) scopes.pop_back();
        break;
      case json::parse_event_t::array_start:
        element();
        open.push_back(0);
        break;
      case json::parse_event_t::array_end:
        if (!open.empty()) open.pop_back();
        break;
      case json::parse_event_t::value:  // a number, string, bool or null
        element();
        break;
      case json::parse_event_t::key: {
        auto key = parsed.get<std::string>();
        if (!scopes.empty() && duplicate.empty() && !scopes.back().keys.insert(key).second) {
          duplicate = scopes.size() > 1 && !scopes.front().last_key.empty()
                          ? "'" + key + "' in the entry of '" + scopes.front().last_key + "'"
                          : "'" + key + "'";
        }
        if (!scopes.empty()) scopes.back().last_key = std::move(key);
        break;
      }
      default:
        break;
    }
    return true;
  };
  // parse_json refuses deep nesting before building anything: a 20 MB header of nested arrays
  // would otherwise take ~750 MB of DOM, and describing it in a message would overflow the stack.
  const json root = parse_json(view, "SafetensorsFile::open", "'" + path_ + "': header", on_event);
  if (!duplicate.empty()) throw error("header has the key ", duplicate, " twice");
  if (!root.is_object()) throw error("header is not a JSON object but ", root.type_name());

  // A JSON extent or offset: a non-negative integer.
  auto as_size = [&](const json& value, std::string_view tensor, std::string_view what,
                     const json& whole) -> std::size_t {
    if (value.is_number_unsigned()) return value.get<std::size_t>();
    throw error("tensor '", tensor, "': ", what, " ", json_excerpt(whole), " holds ",
                json_excerpt(value), ", expected ",
                value.is_number_integer() ? "a non-negative integer (it is negative)"
                                          : "a non-negative integer");
  };

  std::vector<std::pair<std::string_view, const TensorInfo*>> by_offset;
  for (const auto& [name, entry] : root.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object())
        throw error("__metadata__ is a JSON ", entry.type_name(), ", expected an object");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          throw error("__metadata__ value of '", key, "' is ", json_excerpt(value), " (a JSON ",
                      value.type_name(), "), expected a string");
        }
        metadata_.emplace(key, value.get<std::string>());
      }
      continue;
    }
    if (!entry.is_object()) {
      throw error("tensor '", name, "': entry is a JSON ", entry.type_name(),
                  ", expected an object");
    }
    for (const auto& [key, value] : entry.items()) {
      if (key != "dtype" && key != "shape" && key != "data_offsets") {
        throw error("tensor '", name, "': unexpected key '", key,
                    "', expected only dtype, shape and data_offsets");
      }
    }
    for (const char* key : {"dtype", "shape", "data_offsets"}) {
      if (!entry.contains(key)) throw error("tensor '", name, "': entry has no '", key, "'");
    }
    TensorInfo info;
    const json& dtype = entry["dtype"];
    if (!dtype.is_string())
      throw error("tensor '", name, "': dtype is ", json_excerpt(dtype), ", expected a string");
    const auto parsed = try_parse_dtype(dtype.get<std::string>());
    if (!parsed) throw error("tensor '", name, "': unknown dtype ", json_excerpt(dtype));
    info.dtype = *parsed;

    const json& shape = entry["shape"];
    if (!shape.is_array())
      throw error("tensor '", name, "': shape is ", json_excerpt(shape), ", expected an array");
    for (const json& extent : shape) info.shape.push_back(as_size(extent, name, "shape", shape));

    const json& offsets = entry["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2) {
      throw error("tensor '", name, "': data_offsets is ", json_excerpt(offsets),
                  ", expected [begin, end]");
    }
    info.begin = as_size(offsets[0], name, "data_offsets", offsets);
    info.end = as_size(offsets[1], name, "data_offsets", offsets);
    if (info.begin > info.end) {
      throw error("tensor '", name, "': data_offsets ", json_excerpt(offsets), " has begin > end");
    }
    const auto expected = safetensors_detail::byte_size(info.dtype, info.shape);
    if (!expected) {
      throw error("tensor '", name, "': ", to_string(info.dtype), " ", shape_string(info.shape),
                  " has no valid byte size (overflow, or it does not end on a byte boundary)");
    }
    if (info.nbytes() != *expected) {
      throw error("tensor '", name, "': data_offsets ", json_excerpt(offsets), " span ",
                  info.nbytes(), " bytes, expected ", *expected, " for ", to_string(info.dtype),
                  " ", shape_string(info.shape));
    }
    auto [it, inserted] = tensors_.emplace(name, std::move(info));
    by_offset.emplace_back(it->first, &it->second);
  }

  // The tensors must tile the data buffer: sorted by offset, each starts where the previous
  // ended, the first at 0 and the last at the end of the file (no holes, no overlaps).
  std::sort(by_offset.begin(), by_offset.end(), [](const auto& a, const auto& b) {
    return std::pair(a.second->begin, a.second->end) < std::pair(b.second->begin, b.second->end);
  });
  std::size_t position = 0;
  std::string_view previous;
  for (const auto& [name, info] : by_offset) {
    if (info->begin != position) {
      if (previous.empty()) {
        throw error("tensor '", name, "' begins at byte ", info->begin,
                    " of the data buffer, expected 0 (the first tensor must start the buffer)");
      }
      throw error("tensor '", name, "' begins at byte ", info->begin, ", expected ", position,
                  " where '", previous, "' ends (",
                  info->begin > position ? "a hole" : "an overlap", " in the data buffer)");
    }
    position = info->end;
    previous = name;
  }
  if (position != buffer_.size()) {
    throw error("the tensors cover ", position, " bytes of the data buffer, but the file holds ",
                buffer_.size(),
                " bytes after the header (expected the last tensor to end the file)");
  }
}

template <class T>
void SafetensorsFile::read_into(std::string_view name, std::span<T> out) const {
  static_assert(std::is_arithmetic_v<T> && !std::is_same_v<T, bool>,
                "read: T must be a floating or integer type other than bool");
  const TensorInfo& ti = info(name);
  require(out.size() == ti.numel(), "SafetensorsFile::read", "output for tensor '", name, "' has ",
          out.size(), " elements, expected ", ti.numel(), " (shape ", shape_string(ti.shape), ")");
  const std::byte* src = buffer_.data() + ti.begin;
  const std::size_t n = out.size();

  auto refuse = [&](std::string_view why) {
    throw Error(message("SafetensorsFile::read: tensor '", name, "' in '", path_, "' has dtype ",
                        to_string(ti.dtype), ", which ", why));
  };
  // One loop per stored type: S is the stored element, decode turns it into a number.
  auto convert = [&]<class S>(S, auto decode) {
    if constexpr (std::is_same_v<S, T>) {
      if (n > 0) std::memcpy(out.data(), src, n * sizeof(T));  // memcpy: no alignment assumed
      return;
    }
    for (std::size_t i = 0; i < n; ++i) {
      S stored;
      std::memcpy(&stored, src + i * sizeof(S), sizeof(S));
      const auto value = decode(stored);
      if constexpr (std::is_integral_v<T>) {
        if (!std::in_range<T>(value)) {
          throw Error(message("SafetensorsFile::read: tensor '", name, "' in '", path_, "' holds ",
                              +value, " at element ", i, ", which does not fit in ",
                              safetensors_detail::type_name<T>()));
        }
      }
      out[i] = static_cast<T>(value);
    }
  };
  auto same = [](auto v) { return v; };
  auto floating = [&](auto decode_to_float_like, auto stored_tag) {
    if constexpr (std::is_integral_v<T>) {
      refuse(message("does not convert to the integer type ", safetensors_detail::type_name<T>(),
                     "; read it as float or double"));
    } else {
      convert(stored_tag, decode_to_float_like);
    }
  };

  switch (ti.dtype) {
    case Dtype::F32:
      floating(same, float{});
      break;
    case Dtype::F64:
      floating(same, double{});
      break;
    case Dtype::F16:
      floating([](std::uint16_t h) { return f16_to_float(h); }, std::uint16_t{});
      break;
    case Dtype::BF16:
      floating([](std::uint16_t b) { return bf16_to_float(b); }, std::uint16_t{});
      break;
    case Dtype::F8_E4M3:
      floating([](std::uint8_t b) { return f8_e4m3_to_float(b); }, std::uint8_t{});
      break;
    case Dtype::F8_E5M2:
      floating([](std::uint8_t b) { return f8_e5m2_to_float(b); }, std::uint8_t{});
      break;
    case Dtype::I8:
      convert(std::int8_t{}, same);
      break;
    case Dtype::I16:
      convert(std::int16_t{}, same);
      break;
    case Dtype::I32:
      convert(std::int32_t{}, same);
      break;
    case Dtype::I64:
      convert(std::int64_t{}, same);
      break;
    case Dtype::U8:
      convert(std::uint8_t{}, same);
      break;
    case Dtype::U16:
      convert(std::uint16_t{}, same);
      break;
    case Dtype::U32:
      convert(std::uint32_t{}, same);
      break;
    case Dtype::U64:
      convert(std::uint64_t{}, same);
      break;
    case Dtype::BOOL:
      for (std::size_t i = 0; i < n; ++i) {
        const auto byte = std::to_integer<unsigned>(src[i]);
        if (byte > 1) {
          throw Error(message("SafetensorsFile::read: BOOL tensor '", name, "' in '", path_,
                              "' holds byte ", byte, " at element ", i, ", expected 0 or 1"));
        }
        out[i] = static_cast<T>(byte);
      }
      break;
    default:
      refuse("read() does not convert; use raw()");
  }
}

// ---------------------------------------------------------------------------------------------
// Writing

namespace safetensors_detail {

// Encodes `values` as `dtype` (conversion rules at the top of the file).
template <class T>
std::vector<std::byte> encode(std::span<const T> values, Dtype dtype, std::string_view name) {
  static_assert(std::is_arithmetic_v<T> && !std::is_same_v<T, bool>,
                "encode: T must be a floating or integer type other than bool (write BOOL from "
                "uint8_t)");
  auto refuse = [&](std::string_view why) {
    throw Error(message("TensorToWrite: tensor '", name, "': ", type_name<T>(),
                        " values do not convert to ", to_string(dtype), why));
  };
  const std::size_t n = values.size();
  std::vector<std::byte> bytes;
  // One loop per stored type S; encode_one turns a value into S (or throws).
  auto emit = [&]<class S>(S, auto encode_one) {
    bytes.resize(n * sizeof(S));
    for (std::size_t i = 0; i < n; ++i) {
      const S stored = encode_one(values[i], i);
      std::memcpy(bytes.data() + i * sizeof(S), &stored, sizeof(S));
    }
  };
  // Integer dtypes take integer values that fit; floats would need a rounding choice.
  auto integer = [&]<class S>(S tag) {
    if constexpr (std::is_floating_point_v<T>) {
      refuse(" (floating values are not rounded to integers)");
    } else {
      emit(tag, [&](T v, std::size_t i) {
        if (!std::in_range<S>(v)) {
          throw Error(message("TensorToWrite: tensor '", name, "' holds ", +v, " at element ", i,
                              ", which does not fit in ", to_string(dtype)));
        }
        return static_cast<S>(v);
      });
    }
  };
  switch (dtype) {
    case Dtype::F32:
      emit(float{}, [](T v, std::size_t) { return static_cast<float>(v); });
      break;
    case Dtype::F64:
      emit(double{}, [](T v, std::size_t) { return static_cast<double>(v); });
      break;
    case Dtype::F16:
      emit(std::uint16_t{}, [](T v, std::size_t) {
        if constexpr (std::is_same_v<T, float>)
          return float_to_f16(v);
        else
          return double_to_f16(static_cast<double>(v));
      });
      break;
    case Dtype::BF16:
      emit(std::uint16_t{}, [](T v, std::size_t) {
        if constexpr (std::is_same_v<T, float>)
          return float_to_bf16(v);
        else
          return double_to_bf16(static_cast<double>(v));
      });
      break;
    case Dtype::I8:
      integer(std::int8_t{});
      break;
    case Dtype::I16:
      integer(std::int16_t{});
      break;
    case Dtype::I32:
      integer(std::int32_t{});
      break;
    case Dtype::I64:
      integer(std::int64_t{});
      break;
    case Dtype::U8:
      integer(std::uint8_t{});
      break;
    case Dtype::U16:
      integer(std::uint16_t{});
      break;
    case Dtype::U32:
      integer(std::uint32_t{});
      break;
    case Dtype::U64:
      integer(std::uint64_t{});
      break;
    case Dtype::BOOL:
      emit(std::uint8_t{}, [&](T v, std::size_t i) {
        if (!(v == T(0) || v == T(1))) {
          throw Error(message("TensorToWrite: tensor '", name, "' holds ", +v, " at element ", i,
                              ", expected 0 or 1 for BOOL"));
        }
        return static_cast<std::uint8_t>(v == T(1));
      });
      break;
    default:
      refuse("; pass the encoded bytes with TensorToWrite::from_bytes");
  }
  return bytes;
}

}  // namespace safetensors_detail

/// One tensor for save_safetensors: name, dtype, shape and its encoded bytes (row-major,
/// little-endian). `data` either views caller memory (which must outlive the save) or points
/// into `storage`, which the struct shares, so copies of a TensorToWrite stay valid.
struct TensorToWrite {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::size_t> shape;
  std::span<const std::byte> data;
  std::shared_ptr<const std::vector<std::byte>> storage;

  /// Already-encoded bytes, not copied.
  static TensorToWrite from_bytes(std::string name, Dtype dtype, std::vector<std::size_t> shape,
                                  std::span<const std::byte> bytes) {
    return {std::move(name), dtype, std::move(shape), bytes, nullptr};
  }

  /// `values` (row-major, numel(shape) of them) stored as `dtype`: viewed without a copy when
  /// dtype is T's own (keep `values` alive until the save), converted into owned bytes otherwise.
  template <class T>
  static TensorToWrite from_span(std::string name, std::span<const T> values,
                                 std::vector<std::size_t> shape, Dtype dtype = dtype_of<T>()) {
    std::size_t numel = 1;
    for (std::size_t extent : shape) {
      const auto product = safetensors_detail::checked_mul(numel, extent);
      require(product.has_value(), "TensorToWrite::from_span", "tensor '", name, "': shape ",
              shape_string(shape), " has too many elements");
      numel = *product;
    }
    require(values.size() == numel, "TensorToWrite::from_span", "tensor '", name, "' has ",
            values.size(), " values, expected ", numel, " for shape ", shape_string(shape));
    if (dtype == dtype_of<T>()) {
      return from_bytes(std::move(name), dtype, std::move(shape), std::as_bytes(values));
    }
    auto owned = std::make_shared<const std::vector<std::byte>>(
        safetensors_detail::encode(values, dtype, name));
    TensorToWrite out{std::move(name), dtype, std::move(shape), std::span(*owned), owned};
    return out;
  }

  /// A copy of an xtensor expression (any layout), stored row-major as `dtype`.
  template <class E>
  static TensorToWrite from_tensor(std::string name, const xt::xexpression<E>& expression,
                                   Dtype dtype = dtype_of<typename E::value_type>()) {
    using T = std::remove_cv_t<typename E::value_type>;
    const xt::xarray<T, xt::layout_type::row_major> values = expression.derived_cast();
    std::vector<std::size_t> shape(values.shape().begin(), values.shape().end());
    std::vector<std::byte> bytes =
        safetensors_detail::encode(std::span<const T>(values.data(), values.size()), dtype, name);
    auto owned = std::make_shared<const std::vector<std::byte>>(std::move(bytes));
    return {std::move(name), dtype, std::move(shape), std::span(*owned), owned};
  }
};

namespace safetensors_detail {

// Writes all of `bytes` to fd, retrying short writes and EINTR; false on error (errno set).
inline bool write_all(int fd, std::span<const std::byte> bytes) {
  while (!bytes.empty()) {
    const ::ssize_t written = ::write(fd, bytes.data(), bytes.size());
    if (written < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    bytes = bytes.subspan(static_cast<std::size_t>(written));
  }
  return true;
}

}  // namespace safetensors_detail

/// The bytes save_safetensors writes, planned without copying any tensor: the 8-byte header
/// length, the header (metadata first) padded with spaces to a multiple of 8 bytes, then the
/// tensors back to back ordered by dtype width (widest first) and then by name, so every tensor
/// is aligned to its element size in the file (safetensors' own order). The plan points into
/// the TensorToWrite list it was made from, which must outlive it.
class SafetensorsLayout {
 public:
  /// Validates `tensors` (duplicate, empty or reserved names, byte counts that do not match
  /// dtype × shape, strings that are not UTF-8: Errors from `function`, after `context`, e.g.
  /// "save_safetensors: 'out.safetensors': tensor name 'x' appears twice") and plans the file.
  static SafetensorsLayout plan(const std::vector<TensorToWrite>& tensors,
                                const std::map<std::string, std::string>& metadata,
                                std::string_view function = "plan_safetensors",
                                std::string_view context = "");

  /// N: the header's length in bytes, padding included (the file's first 8 bytes).
  std::uint64_t header_size() const { return header_.size(); }
  /// The header text, padding included.
  const std::string& header() const { return header_; }
  /// The tensors in file order.
  const std::vector<const TensorToWrite*>& order() const { return order_; }
  /// Bytes of the data buffer ([8 + N, EOF)).
  std::size_t data_size() const { return data_size_; }
  /// Bytes of the whole file: 8 + N + data_size().
  std::size_t file_size() const { return 8 + header_.size() + data_size_; }

  /// Calls `sink(std::span<const std::byte>)` with the file's bytes in order (the length, the
  /// header, each tensor's bytes); stops and returns false as soon as sink returns false.
  template <class Sink>
  bool for_each_chunk(Sink&& sink) const {
    if (!sink(std::span<const std::byte>(length_))) return false;
    if (!sink(std::as_bytes(std::span(header_)))) return false;
    for (const TensorToWrite* t : order_) {
      if (!sink(t->data)) return false;
    }
    return true;
  }

 private:
  std::array<std::byte, 8> length_{};  // N, little-endian (the host's order, see the top)
  std::string header_;
  std::vector<const TensorToWrite*> order_;
  std::size_t data_size_ = 0;
};

inline SafetensorsLayout SafetensorsLayout::plan(const std::vector<TensorToWrite>& tensors,
                                                 const std::map<std::string, std::string>& metadata,
                                                 std::string_view function,
                                                 std::string_view context) {
  SafetensorsLayout layout;
  std::vector<const TensorToWrite*>& order = layout.order_;
  order.reserve(tensors.size());
  for (const TensorToWrite& t : tensors) {
    require(!t.name.empty(), function, context, "a tensor has an empty name");
    require(t.name != "__metadata__", function, context,
            "'__metadata__' is reserved, not a tensor name");
    const auto expected = safetensors_detail::byte_size(t.dtype, t.shape);
    require(expected.has_value(), function, context, "tensor '", t.name, "': ", to_string(t.dtype),
            " ", shape_string(t.shape),
            " has no valid byte size (overflow, or it does not end on a byte boundary)");
    require(t.data.size() == *expected, function, context, "tensor '", t.name, "' has ",
            t.data.size(), " bytes, expected ", *expected, " for ", to_string(t.dtype), " ",
            shape_string(t.shape));
    order.push_back(&t);
  }
  std::sort(order.begin(), order.end(),
            [](const TensorToWrite* a, const TensorToWrite* b) { return a->name < b->name; });
  for (std::size_t i = 1; i < order.size(); ++i) {
    require(order[i]->name != order[i - 1]->name, function, context, "tensor name '",
            order[i]->name, "' appears twice");
  }
  std::stable_sort(order.begin(), order.end(), [](const TensorToWrite* a, const TensorToWrite* b) {
    return dtype_bits(a->dtype) > dtype_bits(b->dtype);
  });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::size_t offset = 0;
  for (const TensorToWrite* t : order) {
    header[t->name] = {{"dtype", std::string(to_string(t->dtype))},
                       {"shape", t->shape},
                       {"data_offsets", {offset, offset + t->data.size()}}};
    offset += t->data.size();
  }
  layout.data_size_ = offset;
  try {
    layout.header_ = header.dump();
  } catch (const nlohmann::json::exception& e) {
    fail(function, context, "a name or metadata string is not valid UTF-8: ", e.what());
  }
  // the data buffer starts 8-byte aligned
  layout.header_.append((8 - layout.header_.size() % 8) % 8, ' ');
  const std::uint64_t header_size = layout.header_.size();
  std::memcpy(layout.length_.data(), &header_size, sizeof header_size);
  return layout;
}

/// The layout save_safetensors(path, tensors, metadata) writes (see SafetensorsLayout).
inline SafetensorsLayout plan_safetensors(const std::vector<TensorToWrite>& tensors,
                                          const std::map<std::string, std::string>& metadata = {}) {
  return SafetensorsLayout::plan(tensors, metadata, "plan_safetensors");
}

/// The bytes of the file save_safetensors(path, tensors, metadata) writes, in memory (what
/// Python's safetensors.torch.save returns, up to the header's key order).
inline std::vector<std::byte> serialize_safetensors(
    const std::vector<TensorToWrite>& tensors,
    const std::map<std::string, std::string>& metadata = {}) {
  const SafetensorsLayout layout =
      SafetensorsLayout::plan(tensors, metadata, "serialize_safetensors");
  std::vector<std::byte> bytes;
  bytes.reserve(layout.file_size());
  layout.for_each_chunk([&](std::span<const std::byte> chunk) {
    bytes.insert(bytes.end(), chunk.begin(), chunk.end());
    return true;
  });
  return bytes;
}

/// Writes a safetensors file laid out as SafetensorsLayout says (the bytes serialize_safetensors
/// returns). The file is written next to `path` under a temporary name and renamed over it only
/// when complete: on any failure `path` is untouched. Duplicate, empty or reserved names and
/// byte counts that do not match dtype × shape are Errors raised before anything is written.
inline void save_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                             const std::map<std::string, std::string>& metadata = {}) {
  constexpr std::string_view kFunction = "save_safetensors";
  using safetensors_detail::errno_text;

  require(!path.empty(), kFunction, "the path is empty");
  const std::string context = message("'", path, "': ");
  const SafetensorsLayout layout = SafetensorsLayout::plan(tensors, metadata, kFunction, context);

  // Unique temporary name in the target's folder, so that rename() is atomic.
  // O_EXCL never reuses a leftover file; a stale one (same pid, crashed run) is skipped.
  static std::atomic<std::uint64_t> counter{0};
  std::string temporary;
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    temporary = message(path, ".tmp.", ::getpid(), ".", counter++);
    fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) {
    fail(kFunction, "cannot create '", temporary, "' to write '", path, "': ", errno_text(errno));
  }
  auto abandon = [&](std::string_view what) {
    const int error = errno;
    if (fd >= 0) ::close(fd);
    ::unlink(temporary.c_str());
    fail(kFunction, what, " '", path, "': ", errno_text(error));
  };
  const bool ok = layout.for_each_chunk(
      [&](std::span<const std::byte> chunk) { return safetensors_detail::write_all(fd, chunk); });
  if (!ok) abandon("cannot write");
  if (::fsync(fd) != 0) abandon("cannot flush");
  if (::close(fd) != 0) {
    const int error = errno;
    ::unlink(temporary.c_str());
    fail(kFunction, "cannot close '", path, "': ", errno_text(error));
  }
  if (::rename(temporary.c_str(), path.c_str()) != 0) {
    const int error = errno;
    ::unlink(temporary.c_str());
    fail(kFunction, "cannot move the written file onto '", path, "': ", errno_text(error));
  }
}

}  // namespace difftrain::io
