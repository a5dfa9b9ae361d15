#pragma once
// `difftrain train`: LoRA (and DreamBooth) fine-tuning of a diffusers model folder on a folder
// of captioned images — what diffusers' train_text_to_image_lora.py and
// train_dreambooth_lora.py do, with their flag names and defaults, as one command.
//
//   difftrain train --pretrained_model_name_or_path MODEL --train_data_dir DATA
//                   --output_dir OUT [--resolution 512] [--rank 4] [--learning_rate 1e-4] ...
//   difftrain train --config train.json        (the same keys, without "--")
//
// MODEL: unet/, text_encoder/, tokenizer/, scheduler/ and optionally vae/ (without it the model
// works in pixel space). DATA: images with same-named .txt captions (kohya) or a
// metadata.jsonl (diffusers imagefolder). DreamBooth: --instance_data_dir + --instance_prompt
// [--with_prior_preservation --class_data_dir --class_prompt].
// OUT: the LoRA (<output_name>.safetensors, kohya or --save_format peft) with training metadata,
// checkpoint-<step>/ folders, training_log.csv, validation/<step>.png grids.
// Ctrl-C saves a checkpoint and the LoRA, then exits with status 130.

#include <omp.h>

#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cmd_sample.hpp"
#include "dataset.hpp"
#include "difftrain/lora/lora_file.hpp"
#include "difftrain/models/vae/vae_encoder.hpp"
#include "difftrain/train/trainer.hpp"
#include "image_io.hpp"
#include "json_config.hpp"
#include "model_folder.hpp"
#include "progress.hpp"
#include "tool_common.hpp"

namespace difftrain::tools {

struct TrainCommandOptions {
  std::string config;

  // Model and data.
  std::string pretrained_model_name_or_path;
  std::string train_data_dir;
  std::string caption_column = "text";
  std::string caption_extension = ".txt";
  std::string instance_data_dir, instance_prompt, class_data_dir, class_prompt;
  bool with_prior_preservation = false;
  double prior_loss_weight = 1.0;
  int resolution = 512;
  bool center_crop = false;
  bool random_flip = false;
  bool cache_latents = false;

  // LoRA.
  std::size_t rank = 4;
  double lora_alpha = 0;  // 0: = rank (diffusers passes lora_alpha = rank)
  std::vector<std::string> lora_target_modules = {"to_q", "to_k", "to_v", "to_out.0"};
  std::string save_format = "kohya";
  std::string output_name = "pytorch_lora_weights";

  // Loop (TrainerOptions).
  std::int64_t train_batch_size = 16;
  std::int64_t gradient_accumulation_steps = 1;
  std::int64_t max_train_steps = 0;  // 0: num_train_epochs × update steps per epoch
  std::int64_t num_train_epochs = 100;
  double learning_rate = 1e-4;
  bool scale_lr = false;
  std::string lr_scheduler = "constant";
  std::int64_t lr_warmup_steps = 500;
  double max_grad_norm = 1.0;
  double snr_gamma = 0;  // 0: off
  double noise_offset = 0;
  double input_perturbation = 0;
  std::string prediction_type;  // "": the scheduler's
  // kohya's / diffusers' further step options (TrainerOptions has their meaning).
  bool debiased_estimation_loss = false;
  std::string loss_type = "l2";
  std::string huber_schedule = "snr";
  double huber_c = 0.1;
  std::int64_t min_timestep = -1, max_timestep = -1;  // -1: unset
  std::string timestep_bias_strategy = "none";
  double timestep_bias_multiplier = 1.0;
  std::int64_t timestep_bias_begin = 0, timestep_bias_end = 1000;
  double timestep_bias_portion = 0.25;
  int multires_noise_iterations = 0;
  double multires_noise_discount = 0.3;
  double adam_beta1 = 0.9, adam_beta2 = 0.999, adam_weight_decay = 1e-2, adam_epsilon = 1e-8;
  std::uint64_t seed = 0;
  std::string output_dir = "sd-model-finetuned-lora";
  std::int64_t checkpointing_steps = 500;
  std::int64_t checkpoints_total_limit = 0;  // 0: keep all
  std::string resume_from_checkpoint;

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
  std::filesystem::path lora_file;
  std::vector<std::filesystem::path> validation_images;
};

namespace train_detail {

/// The frozen latent encoder of a model folder: its VAE (a posterior sample, as diffusers'
/// training scripts take), or nothing in pixel space and for cached latents (the batch already
/// holds latents).
struct FolderLatentEncoder {
  using input_type = Tensor4<float>;
  using output_type = Tensor4<float>;
  std::optional<models::VaeEncoder> vae;
  Tensor4<float> encode(const Tensor4<float>& images) { return vae ? vae->encode(images) : images; }
};
static_assert(LatentEncoder<FolderLatentEncoder>);

/// Micro-batches whose images are replaced by VAE latents computed once per example
/// (--cache_latents, as diffusers' DreamBooth script does: the posterior of each example's first
/// preprocessing is kept and sampled anew every micro-batch, deterministic in m).
class CachedLatentSource {
 public:
  CachedLatentSource(ImageCaptionDataSource& data, const models::AutoencoderKL<float>& vae,
                     std::uint64_t seed)
      : data_(data), vae_(vae), stream_{seed, 0x6c6174} {}

  train::TrainBatch operator()(std::uint64_t m) {
    train::TrainBatch batch;
    const std::vector<std::size_t> rows = data_.batch_indices(m);
    batch.images = latents(rows, false, m);
    batch.token_ids = data_.batch_token_ids(m, false);
    if (data_.with_prior_preservation()) {
      batch.class_images = latents(rows, true, m);
      batch.class_token_ids = data_.batch_token_ids(m, true);
    }
    return batch;
  }

 private:
  Tensor4<float> latents(const std::vector<std::size_t>& rows, bool class_set, std::uint64_t m) {
    auto& cache = cache_[class_set ? 1 : 0];
    std::vector<Tensor4<float>> per_row;
    for (std::size_t r = 0; r < rows.size(); ++r) {
      const std::size_t i = rows[r];
      auto it = cache.find(i);
      if (it == cache.end()) {
        const Tensor3<float> image = image_to_tensor(data_.example_image(i, 0, class_set));
        Tensor4<float> batch1(std::array<std::size_t, 4>{1, image.shape()[0], image.shape()[1],
                                                         image.shape()[2]});
        std::copy(image.begin(), image.end(), batch1.begin());
        it = cache.emplace(i, vae_.encode(batch1)).first;
      }
      const RandomStream rs = stream_.derive(m, (class_set ? 2u : 1u) + 4u * std::uint32_t(r));
      per_row.push_back(vae_.scale_latents(it->second.sample(rs)));
    }
    const auto& s = per_row.front().shape();
    Tensor4<float> out(std::array<std::size_t, 4>{per_row.size(), s[1], s[2], s[3]});
    for (std::size_t r = 0; r < per_row.size(); ++r)
      std::copy(per_row[r].begin(), per_row[r].end(), out.begin() + std::ptrdiff_t(r * per_row[r].size()));
    return out;
  }

  ImageCaptionDataSource& data_;
  const models::AutoencoderKL<float>& vae_;
  RandomStream stream_;
  std::map<std::size_t, models::DiagonalGaussian<float>> cache_[2];
};

inline std::string number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

}  // namespace train_detail

/// Called after every global step (after its log line and checkpoint).
using TrainStepHook = std::function<void(const train::StepLog&)>;

/// Runs `difftrain train` (see the top of the file).
inline TrainRunResult run_train(const TrainCommandOptions& o, std::FILE* log = stderr,
                                const TrainStepHook& on_step = {}) {
  namespace fs = std::filesystem;
  using namespace train_detail;
  constexpr const char* fn = "train";
  if (o.threads > 0) omp_set_num_threads(o.threads);

  // ---- what to train on
  require(!o.pretrained_model_name_or_path.empty(), fn,
          "--pretrained_model_name_or_path is required (a diffusers model folder)");
  const bool dreambooth = !o.instance_data_dir.empty();
  require(dreambooth != !o.train_data_dir.empty(), fn,
          "give exactly one of --train_data_dir (captioned images) and --instance_data_dir "
          "(DreamBooth)");
  if (dreambooth)
    require(!o.instance_prompt.empty(), fn, "--instance_data_dir needs --instance_prompt");
  if (o.with_prior_preservation)
    require(dreambooth && !o.class_data_dir.empty() && !o.class_prompt.empty(), fn,
            "--with_prior_preservation needs --instance_data_dir, --class_data_dir and "
            "--class_prompt");
  require(o.train_batch_size >= 1, fn, "--train_batch_size is ", o.train_batch_size,
          ", expected >= 1");
  require(o.num_train_epochs >= 1 || o.max_train_steps >= 1, fn,
          "--num_train_epochs is ", o.num_train_epochs, ", expected >= 1");
  require(o.validation_epochs >= 1, fn, "--validation_epochs is ", o.validation_epochs,
          ", expected >= 1");
  require(o.num_validation_images >= 1, fn, "--num_validation_images is ",
          o.num_validation_images, ", expected >= 1");
  const lora::LoraFormat format = lora::parse_lora_format(o.save_format);
  require(!o.output_dir.empty(), fn, "--output_dir is empty");

  ModelFolder model = load_model_folder(o.pretrained_model_name_or_path);
  ClipTokenizer& tokenizer = model.tokenizer;
  Tokenize tokenize = [&tokenizer](const std::vector<std::string>& captions) {
    return tokenizer.encode_batch(captions, tokenizer.model_max_length());
  };
  DataSourceOptions data_options;
  data_options.resolution = o.resolution;
  data_options.center_crop = o.center_crop;
  data_options.random_flip = o.random_flip;
  data_options.train_batch_size = std::size_t(o.train_batch_size);
  data_options.seed = o.seed;
  data_options.cache_images = true;
  ImageFolderOptions folder_options;
  folder_options.caption_column = o.caption_column;
  folder_options.caption_extension = o.caption_extension;
  std::vector<Example> examples =
      dreambooth ? scan_dreambooth_folder(o.instance_data_dir, o.instance_prompt)
                 : scan_image_folder(o.train_data_dir, folder_options);
  std::vector<Example> class_examples;
  if (o.with_prior_preservation)
    class_examples = scan_dreambooth_folder(o.class_data_dir, o.class_prompt);
  ImageCaptionDataSource data(std::move(examples), tokenize, data_options,
                              std::move(class_examples));
  (void)model.latent_shape(std::size_t(o.resolution), std::size_t(o.resolution));

  // ---- the LoRA
  lora::LoraConfig lora_config;
  lora_config.rank = o.rank;
  lora_config.alpha = o.lora_alpha > 0 ? o.lora_alpha : double(o.rank);
  lora::inject_lora(model.unet, o.lora_target_modules, lora_config,
                    RandomStream{o.seed, 0x6c6f7261});

  // ---- the loop's settings (diffusers' names)
  const std::int64_t micro_per_epoch = std::int64_t(data.steps_per_epoch());
  const std::int64_t updates_per_epoch =
      (micro_per_epoch + o.gradient_accumulation_steps - 1) /
      std::max<std::int64_t>(1, o.gradient_accumulation_steps);
  train::TrainerOptions t;
  t.learning_rate = o.learning_rate;
  t.scale_lr = o.scale_lr;
  t.train_batch_size = o.train_batch_size;
  t.lr_scheduler = o.lr_scheduler;
  t.lr_warmup_steps = o.lr_warmup_steps;
  t.max_train_steps =
      o.max_train_steps > 0 ? o.max_train_steps : o.num_train_epochs * updates_per_epoch;
  t.gradient_accumulation_steps = o.gradient_accumulation_steps;
  t.max_grad_norm = o.max_grad_norm;
  t.with_prior_preservation = o.with_prior_preservation;
  t.prior_loss_weight = o.prior_loss_weight;
  if (o.snr_gamma > 0) t.snr_gamma = o.snr_gamma;
  t.noise_offset = float(o.noise_offset);
  t.input_perturbation = float(o.input_perturbation);
  if (!o.prediction_type.empty()) t.prediction_type = parse_prediction_type(o.prediction_type);
  t.debiased_estimation_loss = o.debiased_estimation_loss;
  t.loss_type = o.loss_type;
  t.huber_schedule = o.huber_schedule;
  t.huber_c = o.huber_c;
  if (o.min_timestep >= 0) t.min_timestep = o.min_timestep;
  if (o.max_timestep >= 0) t.max_timestep = o.max_timestep;
  t.timestep_bias_strategy = o.timestep_bias_strategy;
  t.timestep_bias_multiplier = o.timestep_bias_multiplier;
  t.timestep_bias_begin = o.timestep_bias_begin;
  t.timestep_bias_end = o.timestep_bias_end;
  t.timestep_bias_portion = o.timestep_bias_portion;
  t.multires_noise_iterations = o.multires_noise_iterations;
  t.multires_noise_discount = float(o.multires_noise_discount);
  t.adam_beta1 = o.adam_beta1;
  t.adam_beta2 = o.adam_beta2;
  t.adam_weight_decay = o.adam_weight_decay;
  t.adam_epsilon = o.adam_epsilon;
  t.seed = o.seed;
  t.output_dir = o.output_dir;
  t.checkpointing_steps = o.checkpointing_steps;
  if (o.checkpoints_total_limit > 0) t.checkpoints_total_limit = o.checkpoints_total_limit;
  t.resume_from_checkpoint = o.resume_from_checkpoint;

  FolderLatentEncoder latent_encoder;
  std::optional<CachedLatentSource> cached;
  if (model.vae) {
    if (o.cache_latents)
      cached.emplace(data, *model.vae, o.seed);
    else
      latent_encoder.vae.emplace(*model.vae, RandomStream{o.seed, 0x766165});
  }
  auto step = train::make_train_step(DdpmScheduler(model.scheduler.train), model.unet,
                                     latent_encoder, model.text_encoder, t);
  train::Trainer trainer(step, model.unet, t);

  fs::create_directories(o.output_dir);
  const std::string& from = o.resume_from_checkpoint;
  if (!from.empty() && !(from == "latest" && train::list_checkpoints(o.output_dir).empty())) {
    trainer.resume(from);
    if (latent_encoder.vae) latent_encoder.vae->set_calls(trainer.micro_batch_index());
  }

  // ---- validation: a grid of the validation prompt, DDIM with classifier-free guidance
  TrainRunResult result;
  result.max_train_steps = t.max_train_steps;
  auto validate = [&](std::int64_t step_number) {
    if (o.validation_prompt.empty()) return;
    lora::set_lora_training(model.unet, false);
    SampleOptions so;
    so.num_inference_steps = o.validation_inference_steps;
    so.guidance_scale = o.validation_guidance_scale;
    so.seed = o.seed;
    const auto size = std::size_t(o.resolution);
    const Tensor4<float> images =
        generate_images(model, {o.validation_prompt}, "", std::size_t(o.num_validation_images),
                        SamplerKind::ddim, size, size, so);
    fs::create_directories(fs::path(o.output_dir) / "validation");
    const fs::path path = fs::path(o.output_dir) / "validation" /
                          ("step-" + std::to_string(step_number) + ".png");
    save_png_grid(path.string(), images,
                  std::size_t(std::ceil(std::sqrt(double(o.num_validation_images)))));
    result.validation_images.push_back(path);
    lora::set_lora_training(model.unet, true);
  };

  // ---- the LoRA file with the run's settings as metadata (kohya's ss_* keys)
  auto save_lora_file = [&] {
    lora::LoraSaveOptions so;
    auto& m = so.metadata;
    m["ss_training_comment"] = "difftrain train";
    m["ss_learning_rate"] = number(o.learning_rate);
    m["ss_unet_lr"] = number(o.learning_rate);
    m["ss_lr_scheduler"] = o.lr_scheduler;
    m["ss_lr_warmup_steps"] = std::to_string(o.lr_warmup_steps);
    m["ss_max_train_steps"] = std::to_string(t.max_train_steps);
    m["ss_steps"] = std::to_string(trainer.global_step());
    m["ss_num_train_images"] = std::to_string(data.num_examples());
    m["ss_batch_size_per_device"] = std::to_string(o.train_batch_size);
    m["ss_gradient_accumulation_steps"] = std::to_string(o.gradient_accumulation_steps);
    m["ss_max_grad_norm"] = number(o.max_grad_norm);
    m["ss_resolution"] = "(" + std::to_string(o.resolution) + ", " + std::to_string(o.resolution) + ")";
    m["ss_seed"] = std::to_string(o.seed);
    m["ss_noise_offset"] = number(o.noise_offset);
    m["ss_min_snr_gamma"] = number(o.snr_gamma);
    m["ss_prior_loss_weight"] = number(o.prior_loss_weight);
    m["ss_optimizer"] = "AdamW";
    m["ss_v2"] = "False";
    if (!o.prediction_type.empty()) m["ss_prediction_type"] = o.prediction_type;
    const fs::path path = fs::path(o.output_dir) / (o.output_name + ".safetensors");
    lora::save_lora(path.string(), lora::collect_lora(model.unet), format, so,
                    lora::module_names(model.unet));
    return path;
  };

  // ---- the loop
  ProgressReporter progress(log, o.plain_log);
  CsvLog csv(fs::path(o.output_dir) / "training_log.csv", trainer.global_step() > 0);
  InterruptGuard interrupt;
  progress.message(difftrain::detail::concat(
      "difftrain train: ", data.num_examples(), " examples, ", micro_per_epoch,
      " micro-batches of ", o.train_batch_size, " per epoch, ", t.max_train_steps,
      " steps from step ", trainer.global_step()));
  std::int64_t epochs_done = std::int64_t(trainer.micro_batch_index()) / micro_per_epoch;
  while (trainer.global_step() < t.max_train_steps) {
    const train::StepLog s =
        cached ? trainer.train_step(*cached) : trainer.train_step(data);
    csv.write(s.step, s.loss, s.lr, s.grad_norm, s.skipped);
    progress.update({s.step, t.max_train_steps, s.loss, s.lr, s.it_per_s});
    if (t.checkpointing_steps > 0 && s.step % t.checkpointing_steps == 0)
      trainer.save_checkpoint();
    const std::int64_t epochs = std::int64_t(trainer.micro_batch_index()) / micro_per_epoch;
    if (epochs > epochs_done) {
      epochs_done = epochs;
      if (epochs % o.validation_epochs == 0 && s.step < t.max_train_steps) validate(s.step);
    }
    if (on_step) on_step(s);
    if (interrupt.interrupted()) {
      const fs::path where = trainer.save_checkpoint();
      result.lora_file = save_lora_file();
      progress.message(difftrain::detail::concat("interrupted at step ", s.step, ": saved ",
                                                 where.string(), " and ",
                                                 result.lora_file.string()));
      result.interrupted = true;
      result.global_step = trainer.global_step();
      return result;
    }
  }
  result.lora_file = save_lora_file();
  validate(trainer.global_step());
  result.global_step = trainer.global_step();
  progress.message("saved " + result.lora_file.string());
  return result;
}

/// Registers `train` on `app`; its callback sets exit_code (130 after Ctrl-C).
inline void add_train_command(CLI::App& app, int& exit_code) {
  auto o = std::make_shared<TrainCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "train", "LoRA / DreamBooth fine-tuning of a diffusers model folder (diffusers' flags)");
  cmd->add_option("--config", o->config, "JSON file with the same keys as the flags");
  cmd->add_option("--pretrained_model_name_or_path", o->pretrained_model_name_or_path,
                  "diffusers model folder (unet/, text_encoder/, tokenizer/, scheduler/, vae/)");
  cmd->add_option("--train_data_dir", o->train_data_dir,
                  "images with .txt captions or a metadata.jsonl");
  cmd->add_option("--caption_column", o->caption_column, "metadata.jsonl caption key");
  cmd->add_option("--caption_extension", o->caption_extension, "caption file extension");
  cmd->add_option("--instance_data_dir", o->instance_data_dir, "DreamBooth instance images");
  cmd->add_option("--instance_prompt", o->instance_prompt, "DreamBooth instance prompt");
  cmd->add_option("--class_data_dir", o->class_data_dir, "DreamBooth class images");
  cmd->add_option("--class_prompt", o->class_prompt, "DreamBooth class prompt");
  cmd->add_flag("--with_prior_preservation", o->with_prior_preservation,
                "add the class images' loss × prior_loss_weight");
  cmd->add_option("--prior_loss_weight", o->prior_loss_weight, "λ of the prior loss");
  cmd->add_option("--resolution", o->resolution, "training image size");
  cmd->add_flag("--center_crop", o->center_crop, "center crop (default: random crop)");
  cmd->add_flag("--random_flip", o->random_flip, "random horizontal flips");
  cmd->add_flag("--cache_latents", o->cache_latents, "encode each image with the VAE once");
  cmd->add_option("--rank", o->rank, "LoRA rank");
  cmd->add_option("--lora_alpha", o->lora_alpha, "LoRA alpha (default: = rank)");
  cmd->add_option("--lora_target_modules", o->lora_target_modules,
                  "module names to adapt (default to_q to_k to_v to_out.0)");
  cmd->add_option("--save_format", o->save_format, "kohya (default) or peft");
  cmd->add_option("--output_name", o->output_name, "LoRA file name without .safetensors");
  cmd->add_option("--train_batch_size", o->train_batch_size, "micro-batch size");
  cmd->add_option("--gradient_accumulation_steps", o->gradient_accumulation_steps,
                  "micro-batches per optimizer step");
  cmd->add_option("--max_train_steps", o->max_train_steps,
                  "optimizer steps (default: num_train_epochs × steps per epoch)");
  cmd->add_option("--num_train_epochs", o->num_train_epochs, "epochs when no max_train_steps");
  cmd->add_option("--learning_rate", o->learning_rate, "AdamW learning rate");
  cmd->add_flag("--scale_lr", o->scale_lr, "lr × accumulation × batch size");
  cmd->add_option("--lr_scheduler", o->lr_scheduler,
                  "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, "
                  "polynomial");
  cmd->add_option("--lr_warmup_steps", o->lr_warmup_steps, "warm-up steps");
  cmd->add_option("--max_grad_norm", o->max_grad_norm, "gradient clipping norm (<= 0: off)");
  cmd->add_option("--snr_gamma", o->snr_gamma, "Min-SNR-γ weighting (0: off)");
  cmd->add_option("--noise_offset", o->noise_offset, "offset noise strength");
  cmd->add_option("--input_perturbation", o->input_perturbation, "input perturbation γ");
  cmd->add_option("--prediction_type", o->prediction_type,
                  "epsilon or v_prediction (default: the scheduler's)");
  cmd->add_flag("--debiased_estimation_loss", o->debiased_estimation_loss,
                "kohya's debiased estimation weighting");
  cmd->add_option("--loss_type", o->loss_type, "l2 (default), huber or smooth_l1");
  cmd->add_option("--huber_schedule", o->huber_schedule, "constant, exponential or snr");
  cmd->add_option("--huber_c", o->huber_c, "Huber c in (0, 1]");
  cmd->add_option("--min_timestep", o->min_timestep, "lowest training timestep (kohya)");
  cmd->add_option("--max_timestep", o->max_timestep, "training timesteps below this (kohya)");
  cmd->add_option("--timestep_bias_strategy", o->timestep_bias_strategy,
                  "none, earlier, later or range (diffusers)");
  cmd->add_option("--timestep_bias_multiplier", o->timestep_bias_multiplier, "bias weight");
  cmd->add_option("--timestep_bias_begin", o->timestep_bias_begin, "range bias: first timestep");
  cmd->add_option("--timestep_bias_end", o->timestep_bias_end, "range bias: end timestep");
  cmd->add_option("--timestep_bias_portion", o->timestep_bias_portion,
                  "earlier/later bias: fraction of the timesteps");
  cmd->add_option("--multires_noise_iterations", o->multires_noise_iterations,
                  "pyramid noise levels (kohya; 0: off)");
  cmd->add_option("--multires_noise_discount", o->multires_noise_discount,
                  "pyramid noise discount");
  cmd->add_option("--adam_beta1", o->adam_beta1, "AdamW beta1");
  cmd->add_option("--adam_beta2", o->adam_beta2, "AdamW beta2");
  cmd->add_option("--adam_weight_decay", o->adam_weight_decay, "AdamW weight decay");
  cmd->add_option("--adam_epsilon", o->adam_epsilon, "AdamW epsilon");
  cmd->add_option("--seed", o->seed, "seed of every random draw");
  cmd->add_option("--output_dir", o->output_dir, "where the LoRA, checkpoints and logs go");
  cmd->add_option("--checkpointing_steps", o->checkpointing_steps,
                  "save a checkpoint every N steps (0: never)");
  cmd->add_option("--checkpoints_total_limit", o->checkpoints_total_limit,
                  "keep the last N checkpoints (0: all)");
  cmd->add_option("--resume_from_checkpoint", o->resume_from_checkpoint,
                  "\"latest\" or a checkpoint folder");
  cmd->add_option("--validation_prompt", o->validation_prompt, "prompt of the validation grids");
  cmd->add_option("--num_validation_images", o->num_validation_images, "images per grid");
  cmd->add_option("--validation_epochs", o->validation_epochs, "validate every N epochs");
  cmd->add_option("--validation_inference_steps", o->validation_inference_steps,
                  "DDIM steps of the validation images");
  cmd->add_option("--validation_guidance_scale", o->validation_guidance_scale,
                  "classifier-free guidance of the validation images");
  cmd->add_option("--threads", o->threads, "OpenMP threads (default: all)");
  cmd->add_flag("--plain_log", o->plain_log, "log lines instead of a progress bar");
  cmd->callback([cmd, o, &exit_code] {
    bool interrupted = false;
    exit_code = run_command("train", [&] {
      if (!o->config.empty()) apply_json_config(*cmd, o->config);
      interrupted = run_train(*o).interrupted;
    });
    if (exit_code == 0 && interrupted) exit_code = 130;
  });
}

}  // namespace difftrain::tools
