// The `vae-encode` and `vae-decode` commands (cmd_vae.hpp).
#include "cmd_vae.hpp"

#include <CLI/CLI.hpp>
#include <memory>

#include "difftrain/core/random.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/vae/autoencoder_kl.hpp"
#include "difftrain/models/vae/diagonal_gaussian.hpp"
#include "difftrain/models/vae/vae_load.hpp"
#include "tool_common.hpp"

namespace difftrain::tools {

void run_vae_encode(const VaeCommandOptions& o) {
  const auto vae = models::load_vae<float>(o.model);
  const auto in = io::SafetensorsFile::open(o.inputs);
  const Tensor4<float> image = in.read_tensor<float, 4>("image");
  const auto& s = image.shape();
  require(s[1] == vae.config().in_channels, "vae-encode", "image has shape ", shape_string(s),
          ", expected [B,", vae.config().in_channels, ",H,W]");
  const auto latent_shape = vae.latent_shape({s[0], s[1], s[2], s[3]});
  Tensor4<float> noise;
  if (in.contains("noise")) {
    noise = in.read_tensor<float, 4>("noise");
    check_same_shape("vae-encode", "noise", noise.shape(), latent_shape);
  } else {
    noise = models::DiagonalGaussian<float>::draw_noise(latent_shape, RandomStream{o.seed, 0});
  }
  const auto posterior = vae.encode(image);
  const Tensor4<float> latents = vae.scale_latents(posterior.sample(noise));
  io::save_safetensors(o.out, {io::TensorToWrite::from_tensor("mean", posterior.mean),
                               io::TensorToWrite::from_tensor("logvar", posterior.logvar),
                               io::TensorToWrite::from_tensor("latents", latents)});
}

void run_vae_decode(const VaeCommandOptions& o) {
  const auto vae = models::load_vae<float>(o.model);
  const auto in = io::SafetensorsFile::open(o.inputs);
  const Tensor4<float> latents = in.read_tensor<float, 4>("latents");
  const auto& s = latents.shape();
  require(s[1] == vae.config().latent_channels, "vae-decode", "latents has shape ", shape_string(s),
          ", expected [B,", vae.config().latent_channels, ",h,w]");
  const Tensor4<float> image = vae.decode_latents(latents);
  io::save_safetensors(o.out, {io::TensorToWrite::from_tensor("image", image)});
}

void add_vae_commands(CLI::App& app, int& exit_code) {
  auto add = [&](const char* name, const char* description, bool encode) {
    auto options = std::make_shared<VaeCommandOptions>();
    CLI::App* cmd = app.add_subcommand(name, description);
    cmd->add_option("--model", options->model, "diffusers VAE folder")->required();
    cmd->add_option("--inputs", options->inputs, "input safetensors file")->required();
    cmd->add_option("--out", options->out, "output safetensors file")->required();
    if (encode)
      cmd->add_option("--seed", options->seed, "seed of the sampling noise when IN has none");
    cmd->callback([options, name, encode, &exit_code] {
      exit_code = run_command(name, [&] {
        if (encode) {
          run_vae_encode(*options);
        } else {
          run_vae_decode(*options);
        }
      });
    });
  };
  add("vae-encode", "Encode images with a VAE: mean, logvar and sampled scaled latents", true);
  add("vae-decode", "Decode scaled latents with a VAE into images", false);
}

}  // namespace difftrain::tools
