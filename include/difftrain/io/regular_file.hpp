#pragma once
// Opening and reading the files a user names (weights, configs, captions, images, tokenizer
// files): only regular files, checked before anything could block on them. A plain open() of a
// named pipe waits for a writer forever and a read of /dev/zero never ends, so every reader of a
// user's file goes through open_regular_file (O_NONBLOCK, then fstat) and, for whole-file reads,
// a size limit checked before allocating.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>

#include "difftrain/core/error.hpp"

namespace difftrain::io {

/// The largest text file read whole (a config, a tokenizer's vocab.json, a metadata.jsonl): far
/// beyond any real one (CLIP's vocab is 1.6 MB), small enough to refuse a wrong file quickly.
inline constexpr std::uint64_t kMaxTextFileBytes = std::uint64_t(1) << 30;

namespace regular_file_detail {

inline const char* kind_of(mode_t mode) {
  if (S_ISDIR(mode)) return "a folder";
  if (S_ISFIFO(mode)) return "a named pipe";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

}  // namespace regular_file_detail

/// An open, read-only descriptor of a regular file and its size (RAII; movable).
class RegularFile {
 public:
  /// Opens `path`; Error "function: cannot open 'path': it does not exist" (or "it is a named
  /// pipe, not a regular file", or the system's reason). Never blocks: the descriptor is opened
  /// non-blocking and checked with fstat before any read.
  RegularFile(const std::string& path, std::string_view function) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd_ < 0) {
      const int error = errno;
      fail(function, "cannot open '", path,
           "': ", error == ENOENT ? "it does not exist" : std::strerror(error));
    }
    struct stat st {};
    if (::fstat(fd_, &st) != 0) {
      const int error = errno;
      close();
      fail(function, "cannot stat '", path, "': ", std::strerror(error));
    }
    if (!S_ISREG(st.st_mode)) {
      const char* kind = regular_file_detail::kind_of(st.st_mode);
      close();
      fail(function, "cannot open '", path, "': it is ", kind, ", not a regular file");
    }
    size_ = static_cast<std::uint64_t>(st.st_size);
  }
  RegularFile(RegularFile&& other) noexcept
      : path_(std::move(other.path_)), fd_(std::exchange(other.fd_, -1)), size_(other.size_) {}
  RegularFile& operator=(RegularFile&&) = delete;
  RegularFile(const RegularFile&) = delete;
  RegularFile& operator=(const RegularFile&) = delete;
  ~RegularFile() { close(); }

  int fd() const { return fd_; }
  std::uint64_t size() const { return size_; }

  /// The whole file; Error naming it if it holds more than `max_bytes` (checked before
  /// allocating) or a read fails.
  std::string read_all(std::string_view function, std::uint64_t max_bytes) const {
    require(size_ <= max_bytes, function, "'", path_, "' has ", size_, " bytes, more than the ",
            max_bytes, " this reader accepts");
    std::string out(static_cast<std::size_t>(size_), '\0');
    std::size_t done = 0;
    while (done < out.size()) {
      const ssize_t n = ::pread(fd_, out.data() + done, out.size() - done, off_t(done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) fail(function, "cannot read '", path_, "': ", std::strerror(errno));
      if (n == 0) break;  // the file shrank since fstat
      done += std::size_t(n);
    }
    out.resize(done);
    return out;
  }

 private:
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  std::string path_;
  int fd_ = -1;
  std::uint64_t size_ = 0;
};

/// The whole regular file at `path` (at most `max_bytes`); errors as RegularFile's, naming it.
inline std::string read_regular_file(const std::string& path, std::string_view function,
                                     std::uint64_t max_bytes = kMaxTextFileBytes) {
  return RegularFile(path, function).read_all(function, max_bytes);
}

}  // namespace difftrain::io
