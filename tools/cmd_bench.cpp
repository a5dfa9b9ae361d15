// The `bench`, `bench-vae` and `bench-clip` commands (cmd_bench.hpp) and the UNet FLOP count.
#include "cmd_bench.hpp"

#include <sys/resource.h>
#include <time.h>

#include <CLI/CLI.hpp>
#include <Eigen/Core>
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <span>
#include <string_view>
#include <utility>

#include "difftrain/core/error.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/core/tensor.hpp"
#include "difftrain/lora/inject.hpp"
#include "difftrain/loss/weighting.hpp"
#include "difftrain/models/clip/clip.hpp"
#include "difftrain/models/unet/unet2d_condition.hpp"
#include "difftrain/models/unet/unet_config.hpp"
#include "difftrain/models/vae/vae.hpp"
#include "difftrain/nn/bf16_weight.hpp"
#include "difftrain/nn/init.hpp"
#include "difftrain/schedule/ddpm_scheduler.hpp"
#include "difftrain/train/collective.hpp"
#include "difftrain/train/diffusion_train_step.hpp"
#include "difftrain/train/identity_encoder.hpp"
#include "difftrain/train/optimizer.hpp"
#include "tool_common.hpp"

namespace difftrain::tools {

// ---- FLOP count of a UNet training step ----

namespace {

// Number i in "<prefix>.<i>.…" (prefix "down_blocks" or "up_blocks").
std::size_t block_index(std::string_view name, std::string_view prefix) {
  const std::string_view rest = name.substr(prefix.size() + 1);
  std::size_t i = 0, k = 0;
  while (k < rest.size() && rest[k] >= '0' && rest[k] <= '9') i = 10 * i + (rest[k++] - '0');
  require(k > 0, "unet_forward_macs", "parameter '", name, "' has no block index");
  return i;
}

bool contains(std::string_view name, std::string_view part) {
  return name.find(part) != std::string_view::npos;
}

}  // namespace

UnetMacsCounter::UnetMacsCounter(const models::UNet2DConditionConfig& config, std::size_t batch,
                                 std::size_t latent, std::size_t seq_len)
    : blocks_(config.num_blocks()),
      size_(blocks_),
      batch_(static_cast<double>(batch)),
      seq_len_(static_cast<double>(seq_len)) {
  std::size_t h = latent;
  for (std::size_t k = 0; k < blocks_; ++k) {
    size_[k] = static_cast<double>(h);
    h = config.downsample_padding == 0 ? (h - 2) / 2 + 1 : (h - 1) / 2 + 1;
  }
}

void UnetMacsCounter::add(const std::string& name, std::span<const std::size_t> shape) {
  constexpr std::size_t kNoLevel = ~std::size_t{0};
  const std::size_t n = blocks_;
  const double B = batch_, L = seq_len_;
  if (shape.size() < 2) return;
  double weight_macs = 1;  // O·I·k² (a linear's k = 1)
  for (auto d : shape) weight_macs *= static_cast<double>(d);
  std::size_t level = kNoLevel;  // time_embedding: one row per sample
  if (name.starts_with("down_blocks.")) {
    const std::size_t i = block_index(name, "down_blocks");
    level = contains(name, ".downsamplers.") ? i + 1 : i;
  } else if (name.starts_with("up_blocks.")) {
    const std::size_t i = block_index(name, "up_blocks");
    level = contains(name, ".upsamplers.") ? n - 2 - i : n - 1 - i;
  } else if (name.starts_with("mid_block.")) {
    level = n - 1;
  } else if (name.starts_with("conv_in.") || name.starts_with("conv_out.")) {
    level = 0;
  } else {
    require(name.starts_with("time_embedding.") || name.starts_with("add_embedding."),
            "unet_forward_macs", "parameter '", name, "' is in no known block");
  }
  require(level == kNoLevel || level < n, "unet_forward_macs", "parameter '", name,
          "' is at level ", level, ", expected below ", n);
  const double tokens = level == kNoLevel ? 0 : size_[level] * size_[level];
  double rows = B * tokens;
  if (level == kNoLevel || contains(name, ".time_emb_proj.")) rows = B;
  if (contains(name, ".attn2.to_k.") || contains(name, ".attn2.to_v.")) rows = B * L;
  const bool adapter = lora::is_adapter_parameter(name);
  (adapter ? macs_.adapters : macs_.layers) += rows * weight_macs;
  if (name.ends_with(".attn1.to_q.weight"))
    macs_.attention += 2 * B * tokens * tokens * static_cast<double>(shape[0]);
  if (name.ends_with(".attn2.to_q.weight"))
    macs_.attention += 2 * B * tokens * L * static_cast<double>(shape[0]);
}

namespace {

/// unet_forward_macs of an allocated model (its adapters included).
template <class T>
UnetMacs model_forward_macs(models::UNet2DConditionModel<T>& model, std::size_t batch,
                            std::size_t latent, std::size_t seq_len) {
  return unet_forward_macs(model.config(), batch, latent, seq_len, [&](auto&& visit) {
    model.for_each_parameter(
        "", [&](const std::string& name, nn::Parameter<T>& p) { visit(name, p.value.shape()); });
  });
}

// ---- measurement ----

void check_steps(const char* fn, int steps, int warmup) {
  require(steps >= 1 && warmup >= 0, fn, "--steps ", steps, " and --warmup ", warmup,
          ", expected steps >= 1 and warmup >= 0");
}

// CPU time of the whole process (all threads), in milliseconds.
double process_cpu_ms() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) * 1e3 + static_cast<double>(t.tv_nsec) * 1e-6;
}

/// Wall and process CPU times of steps warmup … warmup + steps − 1 of run(s), in milliseconds.
/// On a shared machine the wall time grows with the load; FLOPs per CPU second are the rate per
/// busy core, steadier (OpenMP threads waiting at a barrier spin and count as busy).
struct StepTimes {
  std::vector<double> wall_ms, cpu_ms;
};
template <class Run>
StepTimes time_steps(int warmup, int steps, Run&& run) {
  check_steps("bench", steps, warmup);
  StepTimes times;
  for (int s = 0; s < warmup + steps; ++s) {
    const double c0 = process_cpu_ms();
    const auto t0 = std::chrono::steady_clock::now();
    run(static_cast<std::uint64_t>(s));
    const auto t1 = std::chrono::steady_clock::now();
    const double c1 = process_cpu_ms();
    if (s < warmup) continue;
    times.wall_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    times.cpu_ms.push_back(c1 - c0);
  }
  return times;
}

struct TimeSummary {
  double median = 0, min = 0, mean = 0;
};
TimeSummary summarize(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t m = v.size() / 2;
  return {v.size() % 2 ? v[m] : (v[m - 1] + v[m]) / 2, v.front(),
          std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size())};
}

/// The process's high-water RSS in MiB (getrusage; ru_maxrss is in KiB on Linux).
double peak_rss_mb() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;
}

/// Measures the high-water RSS from now on (Linux VmHWM, reset by writing 5 to clear_refs).
class StepPeakRss {
 public:
  StepPeakRss() {
    std::ofstream clear("/proc/self/clear_refs");
    clear << "5";
    clear.flush();
    ok_ = static_cast<bool>(clear);
  }
  /// VmHWM in MiB, or null when the reset or the read failed.
  nlohmann::ordered_json mb() const {
    if (!ok_) return nullptr;
    std::ifstream status("/proc/self/status");
    std::string key;
    while (status >> key) {
      if (key == "VmHWM:") {
        double kib = 0;
        status >> kib;
        return kib / 1024.0;
      }
      status.ignore(1 << 20, '\n');
    }
    return nullptr;
  }

 private:
  bool ok_ = false;
};

template <nn::Module M>
std::size_t parameter_count(M& model, bool trainable_only) {
  std::size_t n = 0;
  model.for_each_parameter("", [&](const std::string&, auto& p) {
    if (!trainable_only || p.trainable) n += p.value.size();
  });
  return n;
}

void require_file(const std::string& path, const char* fn) {
  require(std::filesystem::is_regular_file(path), fn, "config file '", path,
          "' does not exist or is not a file");
}

// ---- bench: the UNet training step ----

/// A TextEncoder returning a fixed context (the prompts' embeddings are not what is timed).
struct FixedContextEncoder {
  using input_type = TokenIds;
  using output_type = Tensor3<float>;
  Tensor3<float> context;
  Tensor3<float> encode(const TokenIds& ids) const {
    check_shape("FixedContextEncoder", "token ids", ids.shape(),
                {context.shape()[0], context.shape()[1]});
    return context;
  }
};
static_assert(TextEncoder<FixedContextEncoder>);

/// diffusers' train_text_to_image_lora.py targets.
const std::vector<std::string> kBenchLoraTargets{"to_q", "to_k", "to_v", "to_out.0"};

template <std::size_t N>
Tensor<float, N> random_tensor(const std::array<std::size_t, N>& shape, RandomStream rs) {
  Tensor<float, N> t(shape);
  fill_normal(std::span<float>(t.data(), t.size()), rs);
  return t;
}

// The fields every encoder benchmark prints, in seconds.
nlohmann::ordered_json encoder_json(const char* name, const EncoderBenchOptions& o,
                                    const StepTimes& times, double setup_peak,
                                    const StepPeakRss& step_peak, int threads, std::size_t params) {
  const TimeSummary t = summarize(times.wall_ms);
  nlohmann::ordered_json j;
  j["benchmark"] = name;
  j["median_s"] = t.median * 1e-3;
  j["min_s"] = t.min * 1e-3;
  j["mean_s"] = t.mean * 1e-3;
  j["median_cpu_s"] = summarize(times.cpu_ms).median * 1e-3;
  j["peak_rss_mb"] = std::max(peak_rss_mb(), setup_peak);
  j["step_peak_rss_mb"] = step_peak.mb();
  j["weights_mb"] = static_cast<double>(params) * sizeof(float) / (1024.0 * 1024.0);
  j["threads"] = threads;
  j["params"] = params;
  j["config"] = o.config.empty() ? "sd15" : o.config;
  j["batch"] = o.batch;
  j["steps"] = o.steps;
  return j;
}

}  // namespace

nlohmann::ordered_json run_bench(const BenchOptions& o, train::Collective* collective) {
  constexpr const char* fn = "bench";
  require(o.mode == "lora" || o.mode == "full", fn, "--mode is '", o.mode,
          "', expected lora or full");
  require_file(o.config, fn);
  require(o.batch > 0 && o.latent > 0 && o.seq_len > 0, fn, "--batch ", o.batch, ", --latent ",
          o.latent, ", --seq-len ", o.seq_len, ": expected all positive");
  check_steps(fn, o.steps, o.warmup);
  const bool full = o.mode == "full";
  const int threads = set_threads("bench", o.threads);

  const bool bf16 = nn::parse_mixed_precision(o.mixed_precision);
  const auto config = models::UNet2DConditionConfig::from_file(o.config);
  std::optional<nn::FrozenConstruction> frozen;  // LoRA: no gradient per base weight, ever
  if (!full) frozen.emplace();
  models::UNet2DConditionModel<float> unet(config);
  frozen.reset();
  nn::init_like_pytorch<float>(unet, RandomStream{o.seed, 1});
  if (!full) {
    const lora::LoraConfig lora_config{
        .rank = o.rank, .alpha = static_cast<double>(o.rank), .init = lora::LoraInit::gaussian};
    lora::inject_lora(unet, kBenchLoraTargets, lora_config, RandomStream{o.seed, 2});
  }
  const UnetMacs macs = model_forward_macs(unet, o.batch, o.latent, o.seq_len);
  const std::size_t params = parameter_count(unet, false);
  if (bf16) nn::store_frozen_weights_bf16(unet);

  train::ParamGroup hyper;  // lr 1e-4, betas (0.9, 0.999), weight_decay 1e-2, eps 1e-8
  train::AdamW optimizer(train::make_param_groups(unet, hyper));

  const std::size_t B = o.batch, S = o.latent, L = o.seq_len;
  IdentityEncoder latents_as_is;
  FixedContextEncoder text{
      random_tensor<3>({B, L, config.cross_attention_dim[0]}, RandomStream{o.seed, 3})};
  const Tensor4<float> latents =
      random_tensor<4>({B, config.in_channels, S, S}, RandomStream{o.seed, 4});
  const TokenIds ids(std::array<std::size_t, 2>{B, L}, 0);
  TrainStepOptions options;
  options.seed = o.seed;
  options.gradient_checkpointing = o.gradient_checkpointing;
  DiffusionTrainStep step(DdpmScheduler::sd15(), unet, latents_as_is, text, loss::MinSnr(5.0),
                          options);
  // SDXL: a pooled embedding and the time ids of an uncropped image of the latent's size
  BatchExtras extras;
  AddedConditions<float> added;
  if (unet.uses_added_conditions()) {
    require(config.projection_class_embeddings_input_dim > 6 * config.addition_time_embed_dim, fn,
            "'", o.config,
            "': projection_class_embeddings_input_dim leaves no text_embeds for 6 "
            "time ids");
    const std::size_t P =
        config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim;
    added.text_embeds = random_tensor<2>({B, P}, RandomStream{o.seed, 5});
    added.time_ids = Tensor<float, 2>(std::array<std::size_t, 2>{B, 6}, 0.f);
    const float pixels = static_cast<float>(8 * S);
    for (std::size_t b = 0; b < B; ++b)
      for (const std::size_t k : {0, 1, 4, 5}) added.time_ids(b, k) = pixels;
    extras.added_conditions = &added;
  }

  const double setup_peak = peak_rss_mb();
  const StepPeakRss step_peak;
  double loss = 0;
  std::vector<train::ParameterRef> trainable;
  for (const auto& [name, p] : train::named_trainable_parameters(unet)) trainable.push_back(p);
  std::vector<float> bucket;
  std::vector<double> allreduce_ms;
  const StepTimes times = time_steps(o.warmup, o.steps, [&](std::uint64_t s) {
    optimizer.zero_grad();
    loss = step.step(latents, ids, s, extras).loss;
    if (collective) {
      const auto start = std::chrono::steady_clock::now();
      train::allreduce_sum_gradients(*collective, trainable, bucket);
      allreduce_ms.push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count());
    }
    optimizer.step();
  });
  const TimeSummary t = summarize(times.wall_ms), cpu = summarize(times.cpu_ms);
  const double step_flops = macs.step_flops(full);

  nlohmann::ordered_json j;
  j["benchmark"] = "unet_train_step";
  j["median_ms"] = t.median;
  j["min_ms"] = t.min;
  j["mean_ms"] = t.mean;
  j["median_cpu_ms"] = cpu.median;
  j["gflops"] = step_flops / (t.median * 1e6);
  j["gflops_per_cpu_s"] = step_flops / (cpu.median * 1e6);
  j["step_gflop"] = step_flops * 1e-9;
  j["forward_gflop"] = macs.forward_flops() * 1e-9;
  j["peak_rss_mb"] = std::max(peak_rss_mb(), setup_peak);
  j["step_peak_rss_mb"] = step_peak.mb();
  j["threads"] = threads;
  j["mode"] = o.mode;
  j["gradient_checkpointing"] = o.gradient_checkpointing;
  j["mixed_precision"] = o.mixed_precision;
  j["config"] = o.config;
  j["batch"] = B;
  j["latent"] = S;
  j["seq_len"] = L;
  j["rank"] = full ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(o.rank);
  j["steps"] = o.steps;
  j["warmup"] = o.warmup;
  j["params"] = params;
  j["trainable_params"] = parameter_count(unet, true);
  j["loss"] = loss;
  if (collective) {
    const std::vector<double> timed(allreduce_ms.begin() + o.warmup, allreduce_ms.end());
    j["ranks"] = collective->size();
    j["global_batch"] = B * std::size_t(collective->size());
    j["allreduce_bytes_per_step"] = parameter_count(unet, true) * sizeof(float);
    j["allreduce_median_ms"] = summarize(timed).median;
  }
  return j;
}

// ---- bench-vae and bench-clip: the frozen encoders ----

nlohmann::ordered_json run_bench_vae(const EncoderBenchOptions& o) {
  constexpr const char* fn = "bench-vae";
  if (!o.config.empty()) require_file(o.config, fn);
  check_steps(fn, o.steps, o.warmup);
  require(o.batch > 0 && o.size > 0, fn, "--batch ", o.batch, " and --size ", o.size,
          ", expected both positive");
  const int threads = set_threads("bench", o.threads);
  const auto config = o.config.empty() ? models::AutoencoderKLConfig::sd15()
                                       : models::AutoencoderKLConfig::from_file(o.config);
  models::AutoencoderKL<float> vae(config);
  nn::init_like_pytorch<float>(vae, RandomStream{o.seed, 1});
  models::VaeEncoder encoder(vae, RandomStream{o.seed, 2});
  const Tensor4<float> images =
      random_tensor<4>({o.batch, config.in_channels, o.size, o.size}, RandomStream{o.seed, 3});
  const double setup_peak = peak_rss_mb();
  const StepPeakRss step_peak;
  Tensor4<float> latents;
  const StepTimes times =
      time_steps(o.warmup, o.steps, [&](std::uint64_t) { latents = encoder.encode(images); });
  for (float v : latents) require(std::isfinite(v), fn, "the latents are not finite");
  auto j = encoder_json("vae_encode", o, times, setup_peak, step_peak, threads,
                        parameter_count(vae, false));
  j["size"] = o.size;
  return j;
}

nlohmann::ordered_json run_bench_clip(const EncoderBenchOptions& o) {
  constexpr const char* fn = "bench-clip";
  if (!o.config.empty()) require_file(o.config, fn);
  check_steps(fn, o.steps, o.warmup);
  require(o.train == "none" || o.train == "lora" || o.train == "full", fn, "--train is '", o.train,
          "', expected none, lora or full");
  require(o.rank > 0, fn, "--rank is 0, expected at least 1");
  const int threads = set_threads("bench", o.threads);
  const auto config = o.config.empty() ? models::ClipTextConfig::sd15()
                                       : models::ClipTextConfig::from_file(o.config);
  require(o.batch > 0 && o.seq_len > 0 && o.seq_len <= config.max_position_embeddings, fn,
          "--batch ", o.batch, " and --seq-len ", o.seq_len,
          ", expected batch > 0 and 0 < seq-len <= max_position_embeddings = ",
          config.max_position_embeddings);
  models::ClipTextModel<float> model(config);
  nn::init_like_pytorch<float>(model, RandomStream{o.seed, 1});
  models::ClipTextEncoder encoder(std::move(model));
  if (o.train == "lora") {
    lora::LoraConfig lora;
    lora.rank = o.rank;
    lora.alpha = static_cast<double>(o.rank);
    lora::inject_lora(encoder, lora::kohya_text_encoder_targets(), lora, RandomStream{o.seed, 3});
  } else if (o.train == "full") {
    nn::set_trainable<float>(encoder, true);
  }
  TokenIds ids(std::array<std::size_t, 2>{o.batch, o.seq_len});
  const RandomStream id_stream{o.seed, 2};
  const auto vocab = static_cast<std::int64_t>(config.vocab_size);
  for (std::size_t i = 0; i < ids.size(); ++i) ids.data()[i] = uniform_int(id_stream, i, 0, vocab);
  Tensor3<float> grad_context;
  if (o.train != "none") {
    grad_context = Tensor3<float>::from_shape({o.batch, o.seq_len, config.hidden_size});
    fill_normal(std::span<float>(grad_context.data(), grad_context.size()),
                RandomStream{o.seed, 4});
  }
  const double setup_peak = peak_rss_mb();
  const StepPeakRss step_peak;
  Tensor3<float> context;
  const StepTimes times = time_steps(o.warmup, o.steps, [&](std::uint64_t) {
    if (o.train == "none") {
      context = encoder.encode(ids);
    } else {
      context = encoder.encode_train(ids);
      encoder.backward(grad_context);
    }
  });
  for (float v : context) require(std::isfinite(v), fn, "the context is not finite");
  auto j = encoder_json(o.train == "none" ? "clip_text_encode" : "clip_text_train", o, times,
                        setup_peak, step_peak, threads, parameter_count(encoder.model(), false));
  j["seq_len"] = o.seq_len;
  j["train"] = o.train;
  j["trainable"] = parameter_count(encoder.model(), true);
  return j;
}

void add_bench_commands(CLI::App& app, int& exit_code, train::Collective* collective) {
  auto o = std::make_shared<BenchOptions>();
  CLI::App* cmd = app.add_subcommand(
      "bench", "Time a UNet training step (random weights) and print one JSON line");
  cmd->add_option("--config", o->config, "diffusers UNet config.json")->required();
  cmd->add_option("--batch", o->batch, "batch size")->required();
  cmd->add_option("--latent", o->latent, "latent height = width")->required();
  cmd->add_option("--seq-len", o->seq_len, "context tokens")->required();
  cmd->add_option("--mode", o->mode, "lora or full")->required();
  cmd->add_option("--rank", o->rank, "LoRA rank (= alpha; default 4)");
  cmd->add_option("--steps", o->steps, "timed steps (default 20)");
  cmd->add_option("--warmup", o->warmup, "untimed steps first (default 3)");
  add_threads_option(*cmd, o->threads);
  cmd->add_option("--seed", o->seed, "seed of the weights and inputs (default 0)");
  cmd->add_flag("--gradient_checkpointing", o->gradient_checkpointing,
                "recompute block activations in backward (as difftrain train)");
  cmd->add_option("--mixed_precision", o->mixed_precision,
                  "no (fp32) or bf16: frozen weights stored in bf16 (as difftrain train)");
  cmd->callback([o, &exit_code, collective] {
    exit_code = run_command("bench", [&] {
      const nlohmann::ordered_json j = run_bench(*o, collective);
      if (!collective || collective->rank() == 0) std::printf("%s\n", j.dump().c_str());
    });
  });

  auto add_encoder = [&](const char* name, const char* what, bool image, auto run) {
    auto e = std::make_shared<EncoderBenchOptions>();
    if (!image) e->steps = 5;
    CLI::App* c = app.add_subcommand(name, what);
    c->add_option("--config", e->config, "config.json (default: the SD 1.5 preset)");
    c->add_option("--batch", e->batch, image ? "images (default 1)" : "prompts (default 8)");
    if (image) {
      c->add_option("--size", e->size, "image height = width (default 512)");
    } else {
      e->batch = 8;
      c->add_option("--seq-len", e->seq_len, "tokens per prompt (default 77)");
      c->add_option("--train", e->train,
                    "none (encode), lora or full: encode_train + backward (default none)");
      c->add_option("--rank", e->rank, "LoRA rank (= alpha) with --train lora (default 4)");
    }
    c->add_option("--steps", e->steps, "timed encodes");
    c->add_option("--warmup", e->warmup, "untimed encodes first (default 1)");
    add_threads_option(*c, e->threads);
    c->add_option("--seed", e->seed, "seed of the weights and inputs (default 0)");
    c->callback([e, name, run, &exit_code] {
      exit_code = run_command(name, [&] { std::printf("%s\n", run(*e).dump().c_str()); });
    });
  };
  add_encoder("bench-vae", "Time the VAE encoder (random weights), print one JSON line", true,
              [](const EncoderBenchOptions& e) { return run_bench_vae(e); });
  add_encoder("bench-clip", "Time the CLIP text encoder (random weights), print one JSON line",
              false, [](const EncoderBenchOptions& e) { return run_bench_clip(e); });
}

}  // namespace difftrain::tools
