#pragma once
// SHA-256 (FIPS 180-4), streaming: the model hashes of safetensors files (kohya's sshs_*,
// A1111's and Civitai's "AutoV2") are SHA-256 over parts of the file.
//
//   Sha256 h;  h.update(bytes); h.update(more);  h.hexdigest() == "ba7816bf…" (64 hex digits)
//
// Like Python's hashlib: digest() and hexdigest() do not end the stream (they finish a copy),
// so update() may continue afterwards.

#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>

namespace difftrain::io {

class Sha256 {
 public:
  using Digest = std::array<std::uint8_t, 32>;

  Sha256() = default;

  /// Appends `bytes` to the message.
  Sha256& update(std::span<const std::byte> bytes) {
    const auto* p = reinterpret_cast<const std::uint8_t*>(bytes.data());
    std::size_t n = bytes.size();
    length_ += n;
    if (buffered_ > 0) {
      const std::size_t take = std::min(n, kBlock - buffered_);
      std::memcpy(buffer_.data() + buffered_, p, take);
      buffered_ += take;
      p += take;
      n -= take;
      if (buffered_ < kBlock) return *this;
      compress(buffer_.data());
      buffered_ = 0;
    }
    for (; n >= kBlock; p += kBlock, n -= kBlock) compress(p);
    if (n > 0) std::memcpy(buffer_.data(), p, n);
    buffered_ = n;
    return *this;
  }
  Sha256& update(std::string_view text) { return update(std::as_bytes(std::span(text))); }

  /// The 32-byte digest of everything appended so far.
  Digest digest() const {
    Sha256 copy = *this;
    return copy.finish();
  }

  /// The digest as 64 lowercase hex digits (Python's hexdigest()).
  std::string hexdigest() const {
    static constexpr char kHex[] = "0123456789abcdef";
    const Digest d = digest();
    std::string out(64, '0');
    for (std::size_t i = 0; i < d.size(); ++i) {
      out[2 * i] = kHex[d[i] >> 4];
      out[2 * i + 1] = kHex[d[i] & 15];
    }
    return out;
  }

 private:
  static constexpr std::size_t kBlock = 64;

  // Pads (0x80, zeros, the bit length big-endian) and returns the state big-endian.
  Digest finish() {
    const std::uint64_t bits = length_ * 8;
    static constexpr std::uint8_t kPad[kBlock] = {0x80};
    const std::size_t pad = buffered_ < 56 ? 56 - buffered_ : 120 - buffered_;
    update(std::as_bytes(std::span(kPad, pad)));
    std::array<std::uint8_t, 8> tail{};
    for (int i = 0; i < 8; ++i) tail[i] = static_cast<std::uint8_t>(bits >> (56 - 8 * i));
    update(std::as_bytes(std::span(tail)));
    Digest out{};
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 4; ++j) out[4 * i + j] = static_cast<std::uint8_t>(h_[i] >> (24 - 8 * j));
    return out;
  }

  // One 64-byte block: the FIPS 180-4 §6.2.2 rounds.
  void compress(const std::uint8_t* block) {
    static constexpr std::uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2};
    std::uint32_t w[64];
    for (int t = 0; t < 16; ++t) {
      w[t] = std::uint32_t(block[4 * t]) << 24 | std::uint32_t(block[4 * t + 1]) << 16 |
             std::uint32_t(block[4 * t + 2]) << 8 | std::uint32_t(block[4 * t + 3]);
    }
    for (int t = 16; t < 64; ++t) {
      const std::uint32_t s0 =
          std::rotr(w[t - 15], 7) ^ std::rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
      const std::uint32_t s1 = std::rotr(w[t - 2], 17) ^ std::rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
      w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    std::uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6],
                  h = h_[7];
    for (int t = 0; t < 64; ++t) {
      const std::uint32_t s1 = std::rotr(e, 6) ^ std::rotr(e, 11) ^ std::rotr(e, 25);
      const std::uint32_t ch = (e & f) ^ (~e & g);
      const std::uint32_t t1 = h + s1 + ch + k[t] + w[t];
      const std::uint32_t s0 = std::rotr(a, 2) ^ std::rotr(a, 13) ^ std::rotr(a, 22);
      const std::uint32_t maj = (a & b) ^ (a & c) ^ (b & c);
      const std::uint32_t t2 = s0 + maj;
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    h_[0] += a;
    h_[1] += b;
    h_[2] += c;
    h_[3] += d;
    h_[4] += e;
    h_[5] += f;
    h_[6] += g;
    h_[7] += h;
  }

  std::array<std::uint32_t, 8> h_ = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  std::array<std::uint8_t, kBlock> buffer_{};
  std::size_t buffered_ = 0;
  std::uint64_t length_ = 0;  // bytes appended
};

/// SHA-256 of `bytes` as 64 lowercase hex digits.
inline std::string sha256_hex(std::span<const std::byte> bytes) {
  return Sha256().update(bytes).hexdigest();
}
inline std::string sha256_hex(std::string_view text) { return Sha256().update(text).hexdigest(); }

}  // namespace difftrain::io
