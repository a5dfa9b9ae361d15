// The `train` command (cmd_train.hpp): LoRA / DreamBooth fine-tuning of a model folder.
#include "cmd_train.hpp"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <map>
#include <memory>
#include <optional>
#include <utility>

#include "cmd_sample.hpp"
#include "dataset.hpp"
#include "difftrain/lora/lora_file.hpp"
#include "difftrain/models/vae/vae_encoder.hpp"
#include "difftrain/pipeline/pipeline.hpp"
#include "difftrain/schedule/sample.hpp"
#include "difftrain/train/trainer.hpp"
#include "image_io.hpp"
#include "json_config.hpp"
#include "progress.hpp"
#include "tool_common.hpp"

namespace difftrain::tools {

namespace {

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
        Tensor4<float> batch1(
            std::array<std::size_t, 4>{1, image.shape()[0], image.shape()[1], image.shape()[2]});
        std::copy(image.begin(), image.end(), batch1.begin());
        it = cache.emplace(i, vae_.encode(batch1)).first;
      }
      const RandomStream rs =
          stream_.derive(m, purpose_id(class_set ? StreamPurpose::latent_sample_class
                                                 : StreamPurpose::latent_sample_instance) +
                                4u * std::uint32_t(r));
      per_row.push_back(vae_.scale_latents(it->second.sample(rs)));
    }
    const auto& s = per_row.front().shape();
    Tensor4<float> out(std::array<std::size_t, 4>{per_row.size(), s[1], s[2], s[3]});
    for (std::size_t r = 0; r < per_row.size(); ++r)
      std::copy(per_row[r].begin(), per_row[r].end(),
                out.begin() + std::ptrdiff_t(r * per_row[r].size()));
    return out;
  }

  ImageCaptionDataSource& data_;
  const models::AutoencoderKL<float>& vae_;
  RandomStream stream_;
  std::map<std::size_t, models::DiagonalGaussian<float>> cache_[2];
};

std::string number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}
// A float flag as typed (0.05f prints "0.05", not its double value 0.0500000007).
std::string number(float v) {
  char buf[64];
  const auto end = std::to_chars(buf, buf + sizeof buf, v).ptr;
  return std::string(buf, end);
}

namespace fs = std::filesystem;
constexpr const char* fn = "train";

/// Checks the flags that depend on each other; returns the LoRA file format.
lora::LoraFormat check_options(const TrainCommandOptions& o) {
  require(!o.pretrained_model_name_or_path.empty(), fn,
          "--pretrained_model_name_or_path is required (a diffusers model folder)");
  const bool dreambooth = !o.instance_data_dir.empty();
  require(dreambooth != !o.train_data_dir.empty(), fn,
          "give exactly one of --train_data_dir (captioned images) and --instance_data_dir "
          "(DreamBooth)");
  if (dreambooth)
    require(!o.instance_prompt.empty(), fn, "--instance_data_dir needs --instance_prompt");
  if (o.trainer.with_prior_preservation)
    require(dreambooth && !o.class_data_dir.empty() && !o.class_prompt.empty(), fn,
            "--with_prior_preservation needs --instance_data_dir, --class_data_dir and "
            "--class_prompt");
  require(o.trainer.train_batch_size >= 1, fn, "--train_batch_size is ", o.trainer.train_batch_size,
          ", expected >= 1");
  require(o.num_train_epochs >= 1 || o.max_train_steps >= 1, fn, "--num_train_epochs is ",
          o.num_train_epochs, ", expected >= 1");
  require(o.validation_epochs >= 1, fn, "--validation_epochs is ", o.validation_epochs,
          ", expected >= 1");
  require(o.num_validation_images >= 1, fn, "--num_validation_images is ", o.num_validation_images,
          ", expected >= 1");
  require(!o.trainer.output_dir.empty(), fn, "--output_dir is empty");
  return lora::parse_lora_format(o.save_format);
}

/// The captioned images (or the DreamBooth instance and class images) as micro-batches.
ImageCaptionDataSource make_data_source(const TrainCommandOptions& o, ClipTokenizer& tokenizer) {
  Tokenize tokenize = [&tokenizer](const std::vector<std::string>& captions) {
    return tokenizer.encode_batch(captions, tokenizer.model_max_length());
  };
  DataSourceOptions data_options;
  data_options.resolution = o.resolution;
  data_options.center_crop = o.center_crop;
  data_options.random_flip = o.random_flip;
  data_options.train_batch_size = std::size_t(o.trainer.train_batch_size);
  data_options.seed = o.trainer.seed;
  data_options.cache_images = true;
  ImageFolderOptions folder_options;
  folder_options.caption_column = o.caption_column;
  folder_options.caption_extension = o.caption_extension;
  std::vector<Example> examples =
      !o.instance_data_dir.empty() ? scan_dreambooth_folder(o.instance_data_dir, o.instance_prompt)
                                   : scan_image_folder(o.train_data_dir, folder_options);
  std::vector<Example> class_examples;
  if (o.trainer.with_prior_preservation)
    class_examples = scan_dreambooth_folder(o.class_data_dir, o.class_prompt);
  return ImageCaptionDataSource(std::move(examples), tokenize, data_options,
                                std::move(class_examples));
}

/// The run's settings as kohya's ss_* metadata keys of the LoRA file.
std::map<std::string, std::string> lora_metadata(const TrainCommandOptions& o,
                                                 const train::TrainerOptions& t, std::int64_t steps,
                                                 std::size_t num_images) {
  std::map<std::string, std::string> m;
  m["ss_training_comment"] = "difftrain train";
  m["ss_learning_rate"] = number(t.learning_rate);
  m["ss_unet_lr"] = number(t.learning_rate);
  m["ss_lr_scheduler"] = t.lr_scheduler;
  m["ss_lr_warmup_steps"] = std::to_string(t.lr_warmup_steps);
  m["ss_max_train_steps"] = std::to_string(t.max_train_steps);
  m["ss_steps"] = std::to_string(steps);
  m["ss_num_train_images"] = std::to_string(num_images);
  m["ss_batch_size_per_device"] = std::to_string(t.train_batch_size);
  m["ss_gradient_accumulation_steps"] = std::to_string(t.gradient_accumulation_steps);
  m["ss_max_grad_norm"] = number(t.max_grad_norm);
  m["ss_resolution"] =
      "(" + std::to_string(o.resolution) + ", " + std::to_string(o.resolution) + ")";
  m["ss_seed"] = std::to_string(t.seed);
  m["ss_noise_offset"] = number(t.noise.noise_offset);
  m["ss_min_snr_gamma"] = number(o.snr_gamma);
  m["ss_prior_loss_weight"] = number(t.prior_loss_weight);
  m["ss_optimizer"] = "AdamW";
  m["ss_v2"] = "False";
  if (!o.prediction_type.empty()) m["ss_prediction_type"] = o.prediction_type;
  return m;
}

/// validation/step-<n>.png: a grid of the validation prompt, DDIM with classifier-free guidance,
/// LoRA dropout off while sampling.
fs::path save_validation_grid(const TrainCommandOptions& o, pipeline::ModelFolder& model,
                              std::int64_t step_number) {
  lora::set_lora_training(model.unet, false);
  SampleOptions so;
  so.num_inference_steps = o.validation_inference_steps;
  so.guidance_scale = o.validation_guidance_scale;
  so.seed = o.trainer.seed;
  const auto size = std::size_t(o.resolution);
  const Tensor4<float> images = pipeline::generate_images(
      model, {o.validation_prompt}, "", std::size_t(o.num_validation_images),
      pipeline::SamplerKind::ddim, size, size, so);
  fs::create_directories(fs::path(o.trainer.output_dir) / "validation");
  const fs::path path = fs::path(o.trainer.output_dir) / "validation" /
                        ("step-" + std::to_string(step_number) + ".png");
  save_png_grid(path.string(), images,
                std::size_t(std::ceil(std::sqrt(double(o.num_validation_images)))));
  lora::set_lora_training(model.unet, true);
  return path;
}

}  // namespace

/// TrainerOptions with the flags that have an "unset" form resolved (diffusers' None).
train::TrainerOptions trainer_options(const TrainCommandOptions& o,
                                      std::int64_t micro_batches_per_epoch) {
  const std::int64_t accumulation =
      std::max<std::int64_t>(1, o.trainer.gradient_accumulation_steps);
  const std::int64_t updates_per_epoch =
      (micro_batches_per_epoch + accumulation - 1) / accumulation;
  train::TrainerOptions t = o.trainer;
  t.micro_batches_per_epoch = micro_batches_per_epoch;
  t.max_train_steps =
      o.max_train_steps > 0 ? o.max_train_steps : o.num_train_epochs * updates_per_epoch;
  if (o.snr_gamma > 0) t.weighting.snr_gamma = o.snr_gamma;
  if (o.p2_gamma > 0) t.weighting.p2_gamma = o.p2_gamma;
  if (!o.prediction_type.empty()) t.prediction_type = parse_prediction_type(o.prediction_type);
  if (o.v_parameterization) {
    require(!t.prediction_type || *t.prediction_type == PredictionType::v_prediction, fn,
            "--v_parameterization contradicts --prediction_type ", o.prediction_type);
    t.prediction_type = PredictionType::v_prediction;
  }
  if (o.min_timestep >= 0) t.min_timestep = o.min_timestep;
  if (o.max_timestep >= 0) t.max_timestep = o.max_timestep;
  if (o.checkpoints_total_limit > 0) t.checkpoints_total_limit = o.checkpoints_total_limit;
  return t;
}

lora::LoraConfig lora_config(const TrainCommandOptions& o) {
  lora::LoraConfig c;
  c.rank = o.rank;
  c.alpha = o.lora_alpha > 0 ? o.lora_alpha : double(o.rank);
  c.init = parse_choice("--init_lora_weights", o.init_lora_weights, lora::kLoraInits);
  c.use_rslora = o.use_rslora;
  c.dropout = o.lora_dropout;
  c.rank_dropout = o.rank_dropout;
  c.module_dropout = o.module_dropout;
  c.validate("difftrain train: LoRA options");
  return c;
}

TrainRunResult run_train(const TrainCommandOptions& o, std::FILE* log,
                         const TrainStepHook& on_step) {
  set_threads(fn, o.threads);
  const lora::LoraFormat format = check_options(o);
  const lora::LoraConfig lora = lora_config(o);

  pipeline::ModelFolderOptions folder_options;
  folder_options.clip_skip = o.clip_skip > 1 ? o.clip_skip - 1 : 0;  // kohya's count → diffusers'
  pipeline::ModelFolder model =
      pipeline::load_model_folder(o.pretrained_model_name_or_path, folder_options);
  if (o.zero_terminal_snr) model.scheduler.train.rescale_betas_zero_snr = true;
  ImageCaptionDataSource data = make_data_source(o, model.tokenizer);
  (void)model.latent_shape(std::size_t(o.resolution), std::size_t(o.resolution));

  lora::inject_lora(model.unet, o.lora_target_modules, lora,
                    RandomStream{o.trainer.seed, 0x6c6f7261});

  const std::int64_t micro_per_epoch = std::int64_t(data.steps_per_epoch());
  const train::TrainerOptions t = trainer_options(o, micro_per_epoch);
  FolderLatentEncoder latent_encoder;
  std::optional<CachedLatentSource> cached;
  if (model.vae) {
    if (o.cache_latents)
      cached.emplace(data, *model.vae, t.seed);
    else
      latent_encoder.vae.emplace(*model.vae, RandomStream{t.seed, 0x766165});
  }
  auto step = train::make_train_step(DdpmScheduler(model.scheduler.train), model.unet,
                                     latent_encoder, model.text_encoder, t);
  train::Trainer trainer(step, model.unet, t);

  fs::create_directories(t.output_dir);
  const std::string& from = t.resume_from_checkpoint;
  if (!from.empty() && !(from == "latest" && train::list_checkpoints(t.output_dir).empty())) {
    trainer.resume(from);
    if (latent_encoder.vae) latent_encoder.vae->set_calls(trainer.micro_batch_index());
  }

  TrainRunResult result;
  result.max_train_steps = t.max_train_steps;
  auto validate = [&](std::int64_t step_number) {
    if (!o.validation_prompt.empty())
      result.validation_images.push_back(save_validation_grid(o, model, step_number));
  };
  auto save_lora_file = [&] {
    lora::LoraSaveOptions so;
    so.metadata = lora_metadata(o, t, trainer.global_step(), data.num_examples());
    const fs::path path = fs::path(t.output_dir) / (o.output_name + ".safetensors");
    if (train::EmaModel* ema = trainer.ema()) ema->copy_to();  // the EMA weights are the result
    lora::save_lora(path.string(), lora::collect_lora(model.unet), format, so,
                    lora::module_names(model.unet));
    return path;
  };

  // The loop: log, checkpoint every checkpointing_steps, validate every validation_epochs.
  ProgressReporter progress(log, o.plain_log);
  CsvLog csv(fs::path(t.output_dir) / "training_log.csv", trainer.global_step() > 0);
  InterruptGuard interrupt;
  progress.message(message("difftrain train: ", data.num_examples(), " examples, ", micro_per_epoch,
                           " micro-batches of ", t.train_batch_size, " per epoch, ",
                           t.max_train_steps, " steps from step ", trainer.global_step()));
  std::int64_t epochs_done = std::int64_t(trainer.micro_batch_index()) / micro_per_epoch;
  while (trainer.global_step() < t.max_train_steps) {
    const train::StepLog s = cached ? trainer.train_step(*cached) : trainer.train_step(data);
    csv.write(s.step, s.loss, s.lr, s.grad_norm, s.skipped);
    progress.update({s.step, t.max_train_steps, s.loss, s.lr, s.it_per_s});
    if (t.checkpointing_steps > 0 && s.step % t.checkpointing_steps == 0) trainer.save_checkpoint();
    const std::int64_t epochs = std::int64_t(trainer.micro_batch_index()) / micro_per_epoch;
    if (epochs > epochs_done) {
      epochs_done = epochs;
      if (epochs % o.validation_epochs == 0 && s.step < t.max_train_steps) validate(s.step);
    }
    if (on_step) on_step(s);
    if (interrupt.interrupted()) {
      const fs::path where = trainer.save_checkpoint();
      result.lora_file = save_lora_file();
      progress.message(message("interrupted at step ", s.step, ": saved ", where.string(), " and ",
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

void add_train_options(CLI::App& cmd, TrainCommandOptions& o) {
  cmd.add_option("--config", o.config, "JSON file with the same keys as the flags");
  cmd.add_option("--pretrained_model_name_or_path", o.pretrained_model_name_or_path,
                 "diffusers model folder (unet/, text_encoder/, tokenizer/, scheduler/, vae/)");
  cmd.add_option("--train_data_dir", o.train_data_dir,
                 "images with .txt captions or a metadata.jsonl");
  cmd.add_option("--caption_column", o.caption_column, "metadata.jsonl caption key");
  cmd.add_option("--caption_extension", o.caption_extension, "caption file extension");
  cmd.add_option("--instance_data_dir", o.instance_data_dir, "DreamBooth instance images");
  cmd.add_option("--instance_prompt", o.instance_prompt, "DreamBooth instance prompt");
  cmd.add_option("--class_data_dir", o.class_data_dir, "DreamBooth class images");
  cmd.add_option("--class_prompt", o.class_prompt, "DreamBooth class prompt");
  cmd.add_flag("--with_prior_preservation", o.trainer.with_prior_preservation,
               "add the class images' loss × prior_loss_weight");
  cmd.add_option("--prior_loss_weight", o.trainer.prior_loss_weight, "λ of the prior loss");
  cmd.add_option("--resolution", o.resolution, "training image size");
  cmd.add_flag("--center_crop", o.center_crop, "center crop (default: random crop)");
  cmd.add_flag("--random_flip", o.random_flip, "random horizontal flips");
  cmd.add_flag("--cache_latents", o.cache_latents, "encode each image with the VAE once");
  cmd.add_option("--clip_skip", o.clip_skip,
                 "kohya's count: 2 uses the text encoder's penultimate layer (0, 1: the last)");
  cmd.add_flag("--zero_terminal_snr", o.zero_terminal_snr,
               "rescale the betas to zero terminal SNR (kohya; scheduler rescale_betas_zero_snr)");
  cmd.add_option("--rank,--network_dim", o.rank, "LoRA rank");
  cmd.add_option("--lora_alpha,--network_alpha", o.lora_alpha, "LoRA alpha (default: = rank)");
  cmd.add_flag("--use_rslora", o.use_rslora, "rsLoRA: scale alpha/√rank (PEFT)");
  cmd.add_option("--lora_dropout", o.lora_dropout, "dropout on the adapters' input (PEFT)");
  cmd.add_option("--rank_dropout", o.rank_dropout, "dropout of LoRA ranks (kohya)");
  cmd.add_option("--module_dropout", o.module_dropout,
                 "probability of skipping an adapter in a forward (kohya)");
  cmd.add_option("--init_lora_weights", o.init_lora_weights,
                 "LoRA A init: gaussian (default, diffusers' scripts) or kaiming_uniform (kohya)");
  cmd.add_option("--lora_target_modules", o.lora_target_modules,
                 "module names to adapt (default to_q to_k to_v to_out.0)");
  cmd.add_option("--save_format", o.save_format, "kohya (default) or peft");
  cmd.add_option("--output_name", o.output_name, "LoRA file name without .safetensors");
  cmd.add_option("--train_batch_size", o.trainer.train_batch_size, "micro-batch size");
  cmd.add_option("--gradient_accumulation_steps", o.trainer.gradient_accumulation_steps,
                 "micro-batches per optimizer step");
  cmd.add_option("--max_train_steps", o.max_train_steps,
                 "optimizer steps (default: num_train_epochs × steps per epoch)");
  cmd.add_option("--num_train_epochs", o.num_train_epochs, "epochs when no max_train_steps");
  cmd.add_option("--learning_rate", o.trainer.learning_rate, "AdamW learning rate");
  cmd.add_flag("--scale_lr", o.trainer.scale_lr, "lr × accumulation × batch size");
  cmd.add_option("--lr_scheduler", o.trainer.lr_scheduler,
                 "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, "
                 "polynomial");
  cmd.add_option("--lr_warmup_steps", o.trainer.lr_warmup_steps, "warm-up steps");
  cmd.add_option("--lr_num_cycles", o.trainer.lr_num_cycles,
                 "cosine_with_restarts: number of cycles (default 1)");
  cmd.add_option("--lr_power", o.trainer.lr_power, "polynomial: power");
  cmd.add_option("--loraplus_lr_ratio", o.trainer.loraplus_lr_ratio,
                 "LoRA+: learning rate of the up (B) matrices × ratio (kohya)");
  cmd.add_flag("--use_ema", o.trainer.use_ema,
               "keep an EMA of the trained weights (EMAModel defaults) and save it");
  cmd.add_option("--max_grad_norm", o.trainer.max_grad_norm, "gradient clipping norm (<= 0: off)");
  cmd.add_option("--snr_gamma,--min_snr_gamma", o.snr_gamma, "Min-SNR-γ weighting (0: off)");
  cmd.add_option("--p2_gamma", o.p2_gamma, "P2 loss weighting strength (0: off)");
  cmd.add_flag("--scale_v_pred_loss_like_noise_pred",
               o.trainer.weighting.scale_v_pred_loss_like_noise_pred,
               "v-prediction loss × SNR/(SNR + 1) (kohya)");
  cmd.add_option("--noise_offset", o.trainer.noise.noise_offset, "offset noise strength");
  cmd.add_flag("--noise_offset_random_strength", o.trainer.noise.noise_offset_random_strength,
               "noise offset × U(0, 1) per batch (kohya)");
  cmd.add_option("--adaptive_noise_scale", o.trainer.noise.adaptive_noise_scale,
                 "noise offset + scale × |mean of the latents| (kohya; needs --noise_offset)");
  cmd.add_option("--input_perturbation,--ip_noise_gamma", o.trainer.noise.input_perturbation,
                 "input perturbation γ");
  cmd.add_flag("--ip_noise_gamma_random_strength",
               o.trainer.noise.input_perturbation_random_strength,
               "input perturbation γ × U(0, 1) per batch (kohya)");
  cmd.add_option("--prediction_type", o.prediction_type,
                 "epsilon or v_prediction (default: the scheduler's)");
  cmd.add_flag("--v_parameterization", o.v_parameterization,
               "kohya's spelling of --prediction_type v_prediction");
  cmd.add_flag("--debiased_estimation_loss", o.trainer.weighting.debiased_estimation_loss,
               "kohya's debiased estimation weighting");
  cmd.add_option("--loss_type", o.trainer.loss_type, "l2 (default), l1, huber or smooth_l1");
  cmd.add_option("--huber_schedule", o.trainer.huber_schedule, "constant, exponential or snr");
  cmd.add_option("--huber_c", o.trainer.huber_c, "Huber c in (0, 1]");
  cmd.add_option("--huber_scale", o.trainer.huber_scale, "Huber c scale (kohya)");
  cmd.add_option("--min_timestep", o.min_timestep, "lowest training timestep (kohya)");
  cmd.add_option("--max_timestep", o.max_timestep, "training timesteps below this (kohya)");
  cmd.add_option("--timestep_bias_strategy", o.trainer.timestep_bias_strategy,
                 "none, earlier, later or range (diffusers)");
  cmd.add_option("--timestep_bias_multiplier", o.trainer.timestep_bias_multiplier, "bias weight");
  cmd.add_option("--timestep_bias_begin", o.trainer.timestep_bias_begin,
                 "range bias: first timestep");
  cmd.add_option("--timestep_bias_end", o.trainer.timestep_bias_end, "range bias: end timestep");
  cmd.add_option("--timestep_bias_portion", o.trainer.timestep_bias_portion,
                 "earlier/later bias: fraction of the timesteps");
  cmd.add_option("--multires_noise_iterations", o.trainer.noise.multires_noise_iterations,
                 "pyramid noise levels (kohya; 0: off)");
  cmd.add_option("--multires_noise_discount", o.trainer.noise.multires_noise_discount,
                 "pyramid noise discount");
  cmd.add_option("--adam_beta1", o.trainer.adam_beta1, "AdamW beta1");
  cmd.add_option("--adam_beta2", o.trainer.adam_beta2, "AdamW beta2");
  cmd.add_option("--adam_weight_decay", o.trainer.adam_weight_decay, "AdamW weight decay");
  cmd.add_option("--adam_epsilon", o.trainer.adam_epsilon, "AdamW epsilon");
  cmd.add_option("--seed", o.trainer.seed, "seed of every random draw");
  cmd.add_option("--output_dir", o.trainer.output_dir, "where the LoRA, checkpoints and logs go");
  cmd.add_option("--checkpointing_steps", o.trainer.checkpointing_steps,
                 "save a checkpoint every N steps (0: never)");
  cmd.add_option("--checkpoints_total_limit", o.checkpoints_total_limit,
                 "keep the last N checkpoints (0: all)");
  cmd.add_option("--resume_from_checkpoint", o.trainer.resume_from_checkpoint,
                 "\"latest\" or a checkpoint folder");
  cmd.add_option("--validation_prompt", o.validation_prompt, "prompt of the validation grids");
  cmd.add_option("--num_validation_images", o.num_validation_images, "images per grid");
  cmd.add_option("--validation_epochs", o.validation_epochs, "validate every N epochs");
  cmd.add_option("--validation_inference_steps", o.validation_inference_steps,
                 "DDIM steps of the validation images");
  cmd.add_option("--validation_guidance_scale", o.validation_guidance_scale,
                 "classifier-free guidance of the validation images");
  add_threads_option(cmd, o.threads);
  cmd.add_flag("--plain_log", o.plain_log, "log lines instead of a progress bar");
}

void add_train_command(CLI::App& app, int& exit_code) {
  auto o = std::make_shared<TrainCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "train", "LoRA / DreamBooth fine-tuning of a diffusers model folder (diffusers' flags)");
  add_train_options(*cmd, *o);
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
