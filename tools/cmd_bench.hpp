#pragma once
// `difftrain bench`, `bench-vae`, `bench-clip`: time the training step and the frozen encoders of
// models built from a config with random weights (nn::init_like_pytorch, PyTorch's default
// init), printing one JSON line each.
//
//   bench --config UNET.json --batch B --latent S --seq-len L --mode lora|full [--rank 4]
//         [--steps 20] [--warmup 3] [--threads N] [--seed 0] [--gradient_checkpointing]
//         [--mixed_precision no|bf16]
//     One step = what a user's training step is: zero_grad, DiffusionTrainStep::step (identity
//     "VAE" on random latents [B, in_channels, S, S], a text encoder returning a fixed random
//     context [B, L, cross_attention_dim], SD 1.5 DDPM schedule, Min-SNR-5 weighted MSE, forward
//     and backward), then AdamW (lr 1e-4, betas 0.9/0.999, weight_decay 1e-2, eps 1e-8). LoRA mode:
//     rank r, alpha r, gaussian init on every attention's to_q/to_k/to_v/to_out.0, base frozen.
//   bench-vae  [--config VAE.json] [--size 512] [--batch 1] [--steps 3] [--warmup 1] [--threads N]
//     VaeEncoder::encode (latents sampled from q(z|x), scaled) of random images (SD 1.5 VAE
//     config when --config is not given).
//   bench-clip [--config TEXT.json] [--batch 8] [--seq-len 77] [--steps 5] [--warmup 1]
//              [--threads N] [--train none|lora|full] [--rank 4]
//     ClipTextEncoder::encode of random token ids (SD 1.5 text config when --config is not given).
//     --train lora|full: the text encoder's share of a training step instead — encode_train and
//     backward of a fixed random dL/dcontext (LoRA: rank r, alpha r on kohya's targets q_proj,
//     k_proj, v_proj, out_proj, fc1, fc2, base frozen; full: every parameter trainable).
//
// Timing: steady-clock wall time of each step after the warmup steps (median, min, mean), and the
// median process CPU time (all threads; gflops_per_cpu_s, the rate per busy core, is what to
// compare on a loaded machine).
// Memory: peak_rss_mb is the process's high-water RSS (getrusage ru_maxrss), which includes
// building the model (the UNet allocates a gradient for every parameter before LoRA injection
// frees the base ones); step_peak_rss_mb is the high-water RSS of the timed loop alone (Linux
// VmHWM, reset through /proc/self/clear_refs before the first step; null where that is not
// available). One process per measurement: run the command once per configuration.
// --threads sets OpenMP's and Eigen's thread counts (0: OpenMP's default).
//
// FLOPs (gflops = step FLOPs / median time; a multiply-add is 2 FLOPs) count the GEMMs of the
// conv, linear and attention layers, from the model's parameter shapes (unet_forward_macs,
// UnetMacs::step_flops); norms, activations, the loss and the optimizer are left out.
// The definitions are in cmd_bench.cpp.

#include <cstddef>
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <span>
#include <string>
#include <vector>

namespace CLI {
class App;
}  // namespace CLI

namespace difftrain::models {
struct UNet2DConditionConfig;
}  // namespace difftrain::models
namespace difftrain::train {
class Collective;
}  // namespace difftrain::train

namespace difftrain::tools {

// ---- FLOP count of a UNet training step ----

/// Multiply-adds of one UNet forward, split by how the backward treats them.
struct UnetMacs {
  double layers = 0;     // conv and linear layers of the base model
  double attention = 0;  // the two attention matmuls, softmax(Q·Kᵀ/√d)·V
  double adapters = 0;   // LoRA down and up projections

  // forward: 2 FLOPs per multiply-add
  double forward_flops() const { return 2 * (layers + attention + adapters); }
  // step = 2·(forward + backward MACs). Backward: a trainable layer computes its input gradient
  // and its weight gradient (2× its forward), a frozen one its input gradient only (1×);
  // attention's backward is four matmuls (2× its forward; the recompute of the probabilities is
  // not useful work and is not counted). full: 3·layers + 3·attention; lora: 2·layers +
  // 3·attention + 3·adapters.
  double step_flops(bool full_training) const {
    return 2 * ((full_training ? 3 : 2) * layers + 3 * attention + 3 * adapters);
  }
};

/// Sums the forward MACs of a UNet parameter by parameter (the rules of unet_forward_macs).
class UnetMacsCounter {
 public:
  UnetMacsCounter(const models::UNet2DConditionConfig& config, std::size_t batch,
                  std::size_t latent, std::size_t seq_len);
  /// Adds the MACs of the parameter `name` of shape `shape` (nothing for a 1-D one).
  void add(const std::string& name, std::span<const std::size_t> shape);
  const UnetMacs& macs() const { return macs_; }

 private:
  std::size_t blocks_;
  std::vector<double> size_;  // h = w of each level
  double batch_, seq_len_;
  UnetMacs macs_;
};

/// Forward MACs of a UNet at batch B, latent S×S, context of L tokens, from its parameters'
/// (name, shape), visited by for_each_shape(visit) — base parameters and LoRA adapters alike:
///   conv weight [O, I, k, k] at output h×w:  B·h·w·O·I·k²
///   linear weight [O, I] on R rows:          R·O·I, R = B·L for attn2.to_k / attn2.to_v (the
///                                            context), B for time_embedding and time_emb_proj,
///                                            B·h·w otherwise
///   attention on N = h·w tokens, width C (to_q's O):  attn1 2·B·N²·C, attn2 2·B·N·L·C
/// h×w of a parameter is its block's resolution: level 0 = S×S, level k+1 = the stride-2 conv's
/// output of level k; down block i runs at level i and its downsampler outputs level i+1; the mid
/// block runs at the last level n−1; up block i runs at level n−1−i and its upsampler outputs
/// level n−2−i; conv_in and conv_out at level 0. 1-D parameters (biases, norms) are not GEMMs.
template <class ForEachShape>
UnetMacs unet_forward_macs(const models::UNet2DConditionConfig& config, std::size_t batch,
                           std::size_t latent, std::size_t seq_len, ForEachShape&& for_each_shape) {
  UnetMacsCounter counter(config, batch, latent, seq_len);
  for_each_shape([&](const std::string& name, const auto& shape) {
    const std::vector<std::size_t> dims(shape.begin(), shape.end());
    counter.add(name, dims);
  });
  return counter.macs();
}

// ---- the commands ----

struct BenchOptions {
  std::string config, mode;
  std::size_t batch = 1, latent = 64, seq_len = 77, rank = 4;
  int steps = 20, warmup = 3, threads = 0;
  std::uint64_t seed = 0;
  bool gradient_checkpointing = false;  // as difftrain train's flags
  std::string mixed_precision = "no";
};

struct EncoderBenchOptions {
  std::string config;          // empty: the SD 1.5 preset
  std::string train = "none";  // bench-clip: none (encode), lora or full (encode_train + backward)
  std::size_t batch = 1, size = 512, seq_len = 77, rank = 4;
  int steps = 3, warmup = 1, threads = 0;
  std::uint64_t seed = 0;
};

/// bench: the JSON line of the UNet training step (see the header comment).
/// With `collective` (mpirun -np R difftrain bench …): every rank steps on its own batch and the
/// ranks sum their gradients before the optimizer, as data-parallel training does; the JSON adds
/// ranks, the global batch, the bytes each rank sends per step and the allreduce's time.
nlohmann::ordered_json run_bench(const BenchOptions& o, train::Collective* collective = nullptr);
/// bench-vae: the JSON line of the VAE encoder.
nlohmann::ordered_json run_bench_vae(const EncoderBenchOptions& o);
/// bench-clip: the JSON line of the CLIP text encoder.
nlohmann::ordered_json run_bench_clip(const EncoderBenchOptions& o);

/// Registers `bench`, `bench-vae` and `bench-clip` on `app`; their callbacks print one JSON line
/// and set exit_code.
void add_bench_commands(CLI::App& app, int& exit_code, train::Collective* collective = nullptr);

}  // namespace difftrain::tools
