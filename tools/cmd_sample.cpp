// The `sample` command (cmd_sample.hpp).
#include "cmd_sample.hpp"

#include <CLI/CLI.hpp>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "difftrain/core/error.hpp"
#include "difftrain/lora/lora_file.hpp"
#include "difftrain/pipeline/pipeline.hpp"
#include "difftrain/schedule/sample.hpp"
#include "image_io.hpp"
#include "tool_common.hpp"

namespace difftrain::tools {

pipeline::ModelFolder load_model(const std::string& path, const SingleFileFlags& flags,
                                 const pipeline::ModelFolderOptions& options) {
  return pipeline::load_pipeline(path, {options, flags.single_file_config, flags.tokenizer_name});
}

void run_sample(const SampleCommandOptions& o) {
  constexpr const char* fn = "sample";
  set_threads("sample", o.threads);
  require(o.num_images_per_prompt >= 1, fn, "--num_images_per_prompt is ", o.num_images_per_prompt,
          ", expected at least 1");
  // Bounded so that a typo cannot ask for terabytes (16384² is 4× SDXL's largest buckets' area).
  constexpr std::int64_t kMaxSide = 16384, kMaxImages = 4096;
  require(o.height >= 0 && o.width >= 0 && o.height <= kMaxSide && o.width <= kMaxSide, fn,
          "--height/--width are ", o.height, "/", o.width, ", expected sizes from 1 to ", kMaxSide,
          " (0: the model's)");
  require(o.num_images_per_prompt <= kMaxImages, fn, "--num_images_per_prompt is ",
          o.num_images_per_prompt, ", expected at most ", kMaxImages);
  require(std::isfinite(o.guidance_scale), fn, "--guidance_scale is ", o.guidance_scale,
          ", expected a finite number");
  require(std::isfinite(o.lora_scale), fn, "--lora_scale is ", o.lora_scale,
          ", expected a finite number");
  require(o.num_inference_steps >= 1 && o.num_inference_steps <= 10000, fn,
          "--num_inference_steps is ", o.num_inference_steps, ", expected 1 to 10000");
  std::optional<pipeline::SamplerKind> sampler;
  if (!o.sampler.empty()) sampler = pipeline::parse_sampler_kind(o.sampler);
  pipeline::ModelFolder model = load_model(o.model, o.single_file, {});
  if (!sampler) sampler = pipeline::default_sampler(model.scheduler);  // the model's scheduler
  // Inference only: no gradient buffers for the base weights.
  model.unet.for_each_parameter("", [](const std::string&, auto& p) { p.set_trainable(false); });
  if (!o.lora.empty()) {
    model.apply_lora(o.lora, o.lora_scale);  // UNet and text-encoder parts
  } else {
    require(o.lora_scale == 1.0, fn, "--lora_scale is given without --lora");
  }
  const std::size_t f = model.vae_scale_factor();
  const std::size_t default_size = model.unet.config().sample_size * f;
  const std::size_t height = o.height > 0 ? static_cast<std::size_t>(o.height) : default_size;
  const std::size_t width = o.width > 0 ? static_cast<std::size_t>(o.width) : default_size;

  SampleOptions options;
  options.num_inference_steps = o.num_inference_steps;
  options.guidance_scale = o.guidance_scale;
  options.seed = o.seed;
  const auto k = static_cast<std::size_t>(o.num_images_per_prompt);
  const Tensor4<float> images = pipeline::generate_images(model, o.prompts, o.negative_prompt, k,
                                                          *sampler, height, width, options);
  save_png_grid(o.out, images, k);
  std::printf("wrote %s: %zu prompt(s) x %zu image(s) of %zux%zu, %s, %lld steps, guidance %g\n",
              o.out.c_str(), o.prompts.size(), k, width, height,
              std::string(pipeline::to_string(*sampler)).c_str(),
              static_cast<long long>(o.num_inference_steps), o.guidance_scale);
}

void add_sample_command(CLI::App& app, int& exit_code) {
  auto o = std::make_shared<SampleCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "sample",
      "Generate images from a diffusers model folder (DDIM, Euler or flow Euler, CFG) into a PNG "
      "grid");
  cmd->add_option("--model", o->model,
                  "diffusers pipeline folder (unet/, text_encoder/, ...) or single-file checkpoint")
      ->required();
  cmd->add_option("--prompt", o->prompts, "prompt (repeat for more rows)")->required();
  cmd->add_option("--negative_prompt", o->negative_prompt,
                  "unconditional prompt of classifier-free guidance (default empty)");
  cmd->add_option("--num_images_per_prompt", o->num_images_per_prompt,
                  "images per prompt = grid columns (default 1)");
  cmd->add_option("--num_inference_steps", o->num_inference_steps, "sampler steps (default 30)");
  cmd->add_option("--guidance_scale", o->guidance_scale,
                  "classifier-free guidance scale; <= 1 disables it (default 7.5)");
  cmd->add_option(
      "--sampler", o->sampler,
      "ddim, euler or flow_euler (default: flow_euler for a model whose scheduler is "
      "FlowMatchEulerDiscreteScheduler, ddim otherwise)");  // parse_sampler_kind checks it
  cmd->add_option("--lora", o->lora, "LoRA file (kohya or PEFT naming)");
  cmd->add_option("--lora_scale", o->lora_scale, "multiplier of the LoRA branch (default 1)");
  cmd->add_option("--seed", o->seed, "random seed of the initial noise (default 0)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--height", o->height, "image height in pixels (default: the model's)");
  cmd->add_option("--width", o->width, "image width in pixels (default: the model's)");
  add_threads_option(*cmd, o->threads);
  add_single_file_options(*cmd, o->single_file);
  cmd->add_option("--out", o->out, "output PNG grid")->required();
  cmd->callback([o, &exit_code] { exit_code = run_command("sample", [&] { run_sample(*o); }); });
}

}  // namespace difftrain::tools
