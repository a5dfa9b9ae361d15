#pragma once
// `difftrain unet`: the UNet's forward and backward on safetensors files — how anyone checks
// difftrain against PyTorch (same weights, same inputs, compare tensors).
//
//   unet --model DIR --inputs IN --out OUT [--lora FILE] [--lora-scale M] [--threads N]
//   unet --model FILE.safetensors --config CONFIG.json|sd15|sd21 --inputs IN --out OUT ...
//     DIR is a diffusers UNet folder; with --config, --model is an original single-file
//     checkpoint (model.diffusion_model.* names) and CONFIG a diffusers config.json or a preset.
//     IN:  sample [B,C,H,W] F32, timestep [B] (I64 or F32), encoder_hidden_states [B,L,D] F32,
//          optional grad_output [B,C_out,H,W] F32
//     OUT: output; with grad_output also grad_sample, grad_encoder_hidden_states and
//          grad.<name> of every trainable parameter: all base parameters (diffusers names)
//          without --lora, only the adapters (grad.<module>.lora_A.weight / .lora_B.weight)
//          with --lora (kohya or PEFT file; the base is then frozen).
//     --lora-scale M multiplies the adapter branch on top of alpha/r (diffusers' "scale").
// The definitions are in cmd_unet.cpp.

#include <string>

namespace CLI {
class App;
}  // namespace CLI

namespace difftrain::tools {

struct UnetCommandOptions {
  std::string model, config, inputs, out, lora;
  double lora_scale = 1.0;
  int threads = 0;
};

/// Runs `difftrain unet` (see the top of the file).
void run_unet(const UnetCommandOptions& o);

/// Registers `unet` on `app`; its callback sets exit_code.
void add_unet_command(CLI::App& app, int& exit_code);

}  // namespace difftrain::tools
