#pragma once
// `difftrain sample`: text-to-image sampling from a diffusers pipeline folder, written as a PNG
// grid.
//
//   sample --model DIR --prompt P [--prompt P2 ...] [--negative_prompt N]
//          [--num_images_per_prompt K] [--num_inference_steps 30] [--guidance_scale 7.5]
//          [--sampler ddim|euler|flow_euler] [--lora FILE [--lora_scale 1.0]] [--seed S]
//          [--height H --width W] [--threads N] --out grid.png
//
// DIR: see difftrain/pipeline/model_folder.hpp (vae/ optional: pixel space); or an original single
// file (pipeline/single_file.hpp) with [--single_file_config DIR | --tokenizer_name DIR]. The grid
// has one row per prompt and K columns. Classifier-free guidance (guidance_scale > 1) uses the
// negative prompt
// ("" by default, diffusers' empty-prompt unconditional branch). Image i of the batch (prompt i div
// K) starts from normal numbers i·C·h·w.. of RandomStream{S}.derive(0,
// StreamPurpose::sample_noise): the same seed gives the same grid. H and W default to the UNet's
// sample_size × the VAE's factor. The definitions are in cmd_sample.cpp.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "difftrain/core/tensor.hpp"
#include "tool_common.hpp"

namespace CLI {
class App;
}  // namespace CLI

namespace difftrain::pipeline {
struct ModelFolder;
struct ModelFolderOptions;
}  // namespace difftrain::pipeline

namespace difftrain::tools {

struct SampleCommandOptions {
  std::string model, out, negative_prompt, sampler, lora;  // sampler "": the model's
  std::vector<std::string> prompts;
  std::int64_t num_images_per_prompt = 1, num_inference_steps = 30;
  double guidance_scale = 7.5, lora_scale = 1.0;
  std::uint64_t seed = 0;
  std::int64_t height = 0, width = 0;  // 0: sample_size × VAE factor
  int threads = 0;
  SingleFileFlags single_file;  // when --model is a single file
};

/// The pipeline at `path`: a diffusers folder (pipeline::load_model_folder with `options`), or an
/// original single file (SD 1.x/2.x/SDXL, detected) with `flags` (pipeline::load_pipeline).
pipeline::ModelFolder load_model(const std::string& path, const SingleFileFlags& flags,
                                 const pipeline::ModelFolderOptions& options);

/// Runs `difftrain sample` (see the top of the file).
void run_sample(const SampleCommandOptions& o);

/// Registers `sample` on `app`; its callback sets exit_code.
void add_sample_command(CLI::App& app, int& exit_code);

}  // namespace difftrain::tools
