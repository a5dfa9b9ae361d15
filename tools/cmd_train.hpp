#pragma once
// `difftrain train`: LoRA (and DreamBooth) fine-tuning of a diffusers model folder on a folder
// of captioned images — what diffusers' train_text_to_image_lora.py and
// train_dreambooth_lora.py do, with their flag names and defaults, as one command.
//
//   difftrain train --pretrained_model_name_or_path MODEL --train_data_dir DATA
//                   --output_dir OUT [--resolution 512] [--rank 4] [--learning_rate 1e-4] ...
//   difftrain train --config train.json        (the same keys, without "--")
//   difftrain train --config_file kohya.toml   (kohya's TOML config: sections group keys)
//
// MODEL: unet/, text_encoder/, tokenizer/, scheduler/ and optionally vae/ (without it the model
// works in pixel space). DATA: images with same-named .txt captions (kohya) or a
// metadata.jsonl (diffusers imagefolder). DreamBooth: --instance_data_dir + --instance_prompt
// [--with_prior_preservation --class_data_dir --class_prompt].
// OUT: the LoRA (<output_name>.safetensors, kohya or --save_format peft) with training metadata,
// checkpoint-<step>/ folders, training_log.csv, validation/<step>.png grids.
// Ctrl-C saves a checkpoint and the LoRA, then exits with status 130.
// The definitions are in cmd_train.cpp.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "buckets.hpp"
#include "caption.hpp"
#include "difftrain/lora/lora_linear.hpp"
#include "difftrain/models/unet/unet2d_condition.hpp"
#include "difftrain/pipeline/model_folder.hpp"
#include "difftrain/schedule/flow_match.hpp"
#include "difftrain/train/trainer.hpp"
#include "disk_cache.hpp"
#include "tool_common.hpp"

namespace CLI {
class App;
}  // namespace CLI

namespace difftrain::tools {

/// TrainerOptions with the defaults of diffusers' train_text_to_image_lora.py where they differ.
inline train::TrainerOptions default_trainer_options() {
  train::TrainerOptions t;
  t.train_batch_size = 16;
  t.output_dir = "sd-model-finetuned-lora";
  return t;
}

/// One image folder of a kohya dataset config ([[datasets.subsets]], dataset_config.hpp).
struct DatasetSubset {
  std::string image_dir;
  std::size_t num_repeats = 1;
  bool is_reg = false;
  std::string class_tokens;  // the caption of an image without a caption file
  std::string caption_extension = ".txt";
  CaptionOptions caption;
};

struct TrainCommandOptions {
  std::string config;
  std::string dataset_config;  // kohya --dataset_config (TOML)
  // From dataset_config (run_train reads it): the image folders, with their caption options.
  std::vector<DatasetSubset> dataset_subsets;

  // Model and data.
  std::string pretrained_model_name_or_path;  // a diffusers folder or an original single file
  SingleFileFlags single_file;                // for a single file: its configs and tokenizer
  std::string train_data_dir;
  std::string caption_column = "text";
  std::string caption_extension = ".txt";
  CaptionOptions caption;  // kohya's caption handling (caption.hpp), one flag per member
  // kohya's aspect-ratio buckets (--enable_bucket; buckets.hpp); the resolution is --resolution.
  bool enable_bucket = false;
  BucketOptions buckets;
  std::string instance_data_dir, instance_prompt, class_data_dir, class_prompt;
  std::string reg_data_dir;             // kohya: regularisation images, "<N>_<name>" folders
  std::int64_t num_class_images = 100;  // diffusers: the first N class images, generated if fewer
  std::int64_t sample_batch_size = 4;   // diffusers: images per batch when generating them
  int resolution = 512;
  bool center_crop = false;
  bool random_flip = false;
  std::string image_interpolation_mode = "bilinear";  // diffusers; newer versions: lanczos
  bool cache_latents = false;
  // Caches on disk (disk_cache.hpp), in disk_cache_dir (empty: <output_dir>/cache); the _to_disk
  // flags imply the in-memory ones, as in kohya.
  bool cache_latents_to_disk = false;
  bool cache_text_encoder_outputs = false;  // kohya: each caption's context computed once
  bool cache_text_encoder_outputs_to_disk = false;
  std::string disk_cache_dir;
  // kohya's masked loss: --masked_loss with masks from --conditioning_data_dir (same-named
  // images, red channel), or --alpha_mask (the images' alpha channel; enables it alone).
  bool strict_images = false;  // an unreadable image is an Error instead of being skipped
  bool masked_loss = false;
  bool alpha_mask = false;
  std::string conditioning_data_dir;
  std::size_t clip_skip = 0;       // kohya's --clip_skip: 2 = the penultimate layer; 0, 1: last
  bool zero_terminal_snr = false;  // kohya: rescale the betas to zero terminal SNR

  // LoRA.
  std::size_t rank = 4;
  double lora_alpha = 0;                        // 0: = rank (diffusers passes lora_alpha = rank)
  std::string init_lora_weights = "gaussian";   // diffusers' scripts; kaiming_uniform: kohya's
  bool use_rslora = false;                      // PEFT: scale alpha/√r
  double lora_dropout = 0;                      // PEFT lora_dropout (on the adapter input)
  double network_dropout = 0;                   // kohya --network_dropout (on A·x)
  double rank_dropout = 0, module_dropout = 0;  // kohya network_args
  std::vector<std::string> lora_target_modules = {"to_q", "to_k", "to_v", "to_out.0"};
  std::string lora_target_set = "attention";  // kohya: every Linear of the transformer blocks
  std::size_t conv_dim = 0;                   // kohya LoCon: ResNet and sampler convs; 0: off
  double conv_alpha = 1;                      // kohya's default when conv_dim is given
  std::vector<std::string> network_args;      // kohya "key=value": conv_dim, conv_alpha, ...
  std::string save_format = "kohya";
  std::string output_name = "pytorch_lora_weights";
  std::string save_model_as = "safetensors";     // kohya --save_model_as
  bool train_text_encoder = false;               // diffusers: a LoRA on the text encoder too
  bool network_train_unet_only = false;          // kohya: no text-encoder LoRA (the default here)
  bool network_train_text_encoder_only = false;  // kohya: the text encoder's LoRA only
  bool full_finetune = false;  // every UNet weight; a model folder instead of a LoRA
  // diffusers --mixed_precision: no (fp32) or bf16 (the UNet's frozen weights stored in bf16)
  std::string mixed_precision = "no";

  // The loop and the step: every TrainerOptions member with a flag of its own is bound to it
  // directly (add_train_command), with diffusers' script defaults where they differ from the
  // library's (train_batch_size 16, output_dir). The flags below have a "0 or -1: unset" form
  // (diffusers' None) and are resolved into `trainer` by run_train.
  train::TrainerOptions trainer = default_trainer_options();
  std::int64_t max_train_steps = 0;  // 0: num_train_epochs × update steps per epoch
  std::int64_t num_train_epochs = 100;
  double snr_gamma = 0;                               // 0: off
  double p2_gamma = 0;                                // 0: off
  double v_pred_like_loss = 0;                        // kohya; 0: off
  double lr_warmup_steps = 500;                       // < 1: a ratio of max_train_steps (kohya)
  double unet_lr = 0;                                 // kohya; 0: learning_rate
  double text_encoder_lr = 0;                         // kohya; 0: learning_rate
  std::string prediction_type;                        // "": the scheduler's
  bool v_parameterization = false;                    // kohya: prediction_type v_prediction
  std::int64_t min_timestep = -1, max_timestep = -1;  // -1: unset

  // The objective: "ddpm" (eps / v / x0 of the DDPM schedule), "flow" (flow matching: x_t =
  // (1 − σ)·x0 + σ·eps, target eps − x0), or "" for the model's scheduler config's (flow for a
  // FlowMatchEulerDiscreteScheduler). Flow matching's σ density and weighting, kohya's and
  // diffusers' flags (schedule/flow_match.hpp); its scheduler is the model's, or with a DDPM
  // model folder FlowMatchEulerDiscreteScheduler(shift = --discrete_flow_shift).
  std::string objective;
  std::string timestep_sampling = "sigma";   // kohya --timestep_sampling (+ OneTrainer's two)
  std::string weighting_scheme = "none";     // diffusers / kohya --weighting_scheme
  FlowMatchTimestepOptions flow;             // the numeric flags (logit_mean, ...)
  std::string on_nonfinite = "skip";         // a NaN/Inf loss or gradient: skip the step, or stop
  std::int64_t checkpoints_total_limit = 0;  // 0: keep all

  // Validation.
  std::string validation_prompt;
  std::int64_t num_validation_images = 4;
  std::int64_t validation_epochs = 1;
  std::int64_t validation_inference_steps = 30;
  double validation_guidance_scale = 7.5;

  int threads = 0;
  bool plain_log = false;  // log lines even on a terminal
};

/// What a run did (for tests and the final message).
struct TrainRunResult {
  std::int64_t global_step = 0, max_train_steps = 0;
  bool interrupted = false;
  std::filesystem::path lora_file;  // with --full_finetune: the folder's UNet weights
  std::vector<std::filesystem::path> validation_images;
  // The disk caches' entries read, written and found damaged in this run.
  DiskCache::Counts latent_cache, text_encoder_cache;
};

/// Called after every global step (after its log line and checkpoint).
using TrainStepHook = std::function<void(const train::StepLog&)>;

/// Registers every `difftrain train` flag on `cmd`, bound to `o` (the one flag table).
void add_train_options(CLI::App& cmd, TrainCommandOptions& o);

/// --full_finetune's result: `base`'s model folder copied to output_dir with the UNet's weights
/// replaced by `unet`'s (one F32 safetensors file); returns the path of that file.
std::filesystem::path save_finetuned_folder(const std::filesystem::path& base,
                                            models::UNet2DConditionModel<float>& unet,
                                            const std::filesystem::path& output_dir);

/// DreamBooth mode (--instance_data_dir): the defaults of diffusers' train_dreambooth_lora.py
/// where they differ from train_text_to_image_lora.py's (batch 4, learning rate 5e-4, 1 epoch,
/// validation every 50 epochs, output_dir lora-dreambooth-model), for the flags of `cmd` that were
/// given neither on the command line nor in the config file.
void apply_dreambooth_defaults(const CLI::App& cmd, TrainCommandOptions& o);

/// --with_prior_preservation: when --class_data_dir holds fewer than --num_class_images images,
/// draws the missing ones from the base model with --class_prompt (as diffusers' DreamBooth
/// scripts do: 50 steps, guidance 7.5; DDIM here, at --resolution) into that folder as
/// <index>-generated.png. Returns how many it wrote.
std::size_t generate_class_images(const TrainCommandOptions& o, pipeline::ModelFolder& model);

/// TrainerOptions with the flags that have an "unset" form resolved (diffusers' None);
/// `micro_batches_per_epoch` turns num_train_epochs into max_train_steps.
train::TrainerOptions trainer_options(const TrainCommandOptions& o,
                                      std::int64_t micro_batches_per_epoch);

/// The adapters' configuration from the LoRA flags (throws Error for bad values).
lora::LoraConfig lora_config(const TrainCommandOptions& o);

/// Adapts the UNet as the LoRA flags say (--lora_target_set, --lora_target_modules, --conv_dim,
/// --network_args); returns the adapted module names.
std::vector<std::string> inject_adapters(models::UNet2DConditionModel<float>& unet,
                                         const TrainCommandOptions& o);

/// With --train_text_encoder or --network_train_text_encoder_only: adapts the text encoder's
/// Linear layers (q_proj, k_proj, v_proj, out_proj as diffusers' DreamBooth LoRA script; with
/// --lora_target_set kohya also mlp.fc1, mlp.fc2 as kohya) with the LoRA flags' configuration;
/// returns the adapted module names (none when the text encoder is not trained). encoder_index:
/// 0, or 1 for SDXL's text_encoder_2 (its own initialisation stream).
std::vector<std::string> inject_text_encoder_adapters(models::ClipTextEncoder& text_encoder,
                                                      const TrainCommandOptions& o,
                                                      std::uint64_t encoder_index = 0);

/// Runs `difftrain train` (see the top of the file).
/// With `collective` (dist/mpi.hpp under mpirun): this process is one rank of a data-parallel
/// run; --train_batch_size is per rank, rank 0 prints, validates and writes every file.
TrainRunResult run_train(const TrainCommandOptions& o, std::FILE* log = stderr,
                         const TrainStepHook& on_step = {},
                         train::Collective* collective = nullptr);

/// Registers `train` on `app`; its callback sets exit_code (130 after Ctrl-C). `collective`: the
/// ranks of an MPI launch (run_train), or nullptr.
void add_train_command(CLI::App& app, int& exit_code, train::Collective* collective = nullptr);

}  // namespace difftrain::tools
