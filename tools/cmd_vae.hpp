#pragma once
// `difftrain vae-encode` and `difftrain vae-decode`: the frozen AutoencoderKL on safetensors files.
//
//   vae-encode --model DIR --inputs IN --out OUT [--seed S]
//     IN:  image [B, Cin, H, W] in [−1, 1]; optional noise [B, Z, h, w] (else drawn from
//          RandomStream{S, 0}: element i of the [B, Z, h, w] noise = normal number i)
//     OUT: mean, logvar (unscaled posterior, logvar clamped to [−30, 20]) and
//          latents = scaling_factor · (mean + exp(½·logvar)·noise − shift_factor), F32
//   vae-decode --model DIR --inputs IN --out OUT
//     IN:  latents [B, Z, h, w] (scaled, what the UNet works on)
//     OUT: image = decoder(post_quant_conv(latents / scaling_factor + shift_factor)), not clamped
// DIR is a diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors). A missing or
// misshapen tensor is an error naming it (exit code 1).
// The definitions are in cmd_vae.cpp.

#include <cstdint>
#include <string>

namespace CLI {
class App;
}  // namespace CLI

namespace difftrain::tools {

struct VaeCommandOptions {
  std::string model, inputs, out;
  std::uint64_t seed = 0;
};

/// vae-encode: see the header comment.
void run_vae_encode(const VaeCommandOptions& o);

/// vae-decode: see the header comment.
void run_vae_decode(const VaeCommandOptions& o);

/// Registers vae-encode and vae-decode on `app`; their callbacks set exit_code.
void add_vae_commands(CLI::App& app, int& exit_code);

}  // namespace difftrain::tools
