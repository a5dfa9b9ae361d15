#pragma once
// The shapes demo's pipeline, shared by examples/shapes_demo.cpp and tests/demo: a tiny
// pixel-space text-to-image model (diffusers UNet2DConditionModel + a random frozen CLIP text
// model + a CLIP tokenizer written for the demo's words), trained from scratch on shapes.hpp's
// images, then taught a new concept with a DreamBooth LoRA (prior preservation), sampled with
// DDIM + classifier-free guidance, judged by shapes::classify.
//
// Dims: B batch, S image side, L = max_length tokens, D text hidden size.
// Images are the "latents" (IdentityEncoder): x0 = image ∈ [-1, 1]^(3×S×S).
// Schedule: the cosine schedule (squaredcos_cap_v2, T = 1000) made for small pixel-space images
// (ᾱ_T ≈ 0: sampling from pure noise matches training), v-prediction with uniform weights: the
// x0-space weight SNR + 1 keeps the low-SNR steps, where colour and shape are decided, in the
// loss (ε-prediction weighs them by SNR ≈ 0, and the text conditioning is then learned late).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <difftrain/difftrain.hpp>
#include <difftrain/lora/lora_file.hpp>
#include <difftrain/models/clip/clip.hpp>
#include <difftrain/models/clip_tokenizer.hpp>
#include <difftrain/models/unet/load.hpp>
#include <difftrain/nn/init.hpp>
#include <difftrain/schedule/ddim_scheduler.hpp>
#include <difftrain/schedule/sample.hpp>
#include <difftrain/schedule/sampling_config.hpp>
#include <difftrain/train/trainer.hpp>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "shapes.hpp"

namespace shapes {

using difftrain::RandomStream;
using difftrain::TokenIds;
using difftrain::models::ClipTextEncoder;
using difftrain::models::UNet2DConditionModel;

// ---------------------------------------------------------------------------------------------
// Tokenizer: a CLIP BPE vocabulary for the demo's words.

/// Every word a prompt may use.
inline std::vector<std::string> demo_words() {
  std::vector<std::string> words = {"a", "shape", "sks"};
  for (Colour c : kColours) words.push_back(name(c));
  for (Shape s : kShapes) words.push_back(name(s));
  return words;
}

/// Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json of a CLIP
/// tokenizer in which each word is one token. For each word in turn, BPE with the merges so far
/// splits it into symbols, and new merges (ranked after all earlier ones, so earlier words keep
/// their single token) join those left to right ("s h" → "sh", "sh a" → "sha", …). Every symbol,
/// intermediate ones included, is in the vocabulary (the tokenizers library requires it). Ids:
/// the symbols, then <|startoftext|> and <|endoftext|> last, as in CLIP.
inline void write_tokenizer(const std::filesystem::path& dir, const std::vector<std::string>& words,
                            std::size_t max_length) {
  std::filesystem::create_directories(dir);
  std::vector<std::string> symbols, merges;
  std::set<std::string> seen_symbols;
  std::map<std::pair<std::string, std::string>, std::size_t> rank;
  auto add_symbol = [&](const std::string& s) {
    if (seen_symbols.insert(s).second) symbols.push_back(s);
  };
  for (const auto& word : words) {
    difftrain::require(!word.empty(), "shapes::write_tokenizer", "empty word");
    std::vector<std::string> parts;
    for (std::size_t i = 0; i < word.size(); ++i) parts.push_back(std::string(1, word[i]));
    parts.back() += "</w>";
    for (const auto& p : parts) add_symbol(p);
    // BPE: repeatedly merge every occurrence of the lowest-ranked adjacent pair.
    for (;;) {
      std::size_t best = rank.size();
      for (std::size_t i = 0; i + 1 < parts.size(); ++i) {
        const auto it = rank.find({parts[i], parts[i + 1]});
        if (it != rank.end()) best = std::min(best, it->second);
      }
      if (best == rank.size()) break;
      std::vector<std::string> merged;
      for (std::size_t i = 0; i < parts.size(); ++i) {
        const auto it = i + 1 < parts.size() ? rank.find({parts[i], parts[i + 1]}) : rank.end();
        if (it != rank.end() && it->second == best) {
          merged.push_back(parts[i] + parts[i + 1]);
          ++i;
        } else {
          merged.push_back(parts[i]);
        }
      }
      parts = std::move(merged);
    }
    while (parts.size() > 1) {
      rank.emplace(std::pair{parts[0], parts[1]}, rank.size());
      merges.push_back(parts[0] + " " + parts[1]);
      parts[0] += parts[1];
      parts.erase(parts.begin() + 1);
      add_symbol(parts[0]);
    }
  }
  nlohmann::json vocab = nlohmann::json::object();
  for (std::size_t i = 0; i < symbols.size(); ++i) vocab[symbols[i]] = i;
  vocab["<|startoftext|>"] = symbols.size();
  vocab["<|endoftext|>"] = symbols.size() + 1;
  std::ofstream(dir / "vocab.json") << vocab.dump();
  std::ofstream m(dir / "merges.txt");
  m << "#version: 0.2\n";
  for (const auto& merge : merges) m << merge << "\n";
  m.close();
  const nlohmann::json special = {{"bos_token", "<|startoftext|>"},
                                  {"eos_token", "<|endoftext|>"},
                                  {"unk_token", "<|endoftext|>"},
                                  {"pad_token", "<|endoftext|>"}};
  nlohmann::json config = special;
  config["model_max_length"] = max_length;
  config["tokenizer_class"] = "CLIPTokenizer";
  config["do_lower_case"] = true;
  std::ofstream(dir / "tokenizer_config.json") << config.dump(2);
  std::ofstream(dir / "special_tokens_map.json") << special.dump(2);
}

// ---------------------------------------------------------------------------------------------
// Models: configurations as diffusers / transformers config.json objects (one source of truth:
// the objects are parsed into the library's configs and saved unchanged).

struct ModelSizes {
  std::size_t image_size = 16;
  std::vector<std::size_t> block_out_channels = {16, 32};
  bool attention_at_full_resolution = false;  // cross-attention at S×S too, not only at S/2
  std::size_t norm_num_groups = 8;
  std::size_t attention_head_dim = 4;  // the number of heads (diffusers' SD 1.x misnomer)
  std::size_t text_hidden_size = 32;
  std::size_t text_layers = 2;
  std::size_t max_length = 8;  // tokens per prompt: bos, ≤ 6 words, eos/pad
};

/// diffusers UNet2DConditionModel config.json (pixel space: 3 channels in and out).
inline nlohmann::json unet_config_json(const ModelSizes& m) {
  return {
      {"_class_name", "UNet2DConditionModel"},
      {"_diffusers_version", "0.26.3"},
      {"sample_size", m.image_size},
      {"in_channels", 3},
      {"out_channels", 3},
      {"center_input_sample", false},
      {"flip_sin_to_cos", true},
      {"freq_shift", 0},
      {"down_block_types",
       {m.attention_at_full_resolution ? "CrossAttnDownBlock2D" : "DownBlock2D",
        "CrossAttnDownBlock2D"}},
      {"mid_block_type", "UNetMidBlock2DCrossAttn"},
      {"up_block_types",
       {"CrossAttnUpBlock2D", m.attention_at_full_resolution ? "CrossAttnUpBlock2D" : "UpBlock2D"}},
      {"block_out_channels", m.block_out_channels},
      {"layers_per_block", 1},
      {"downsample_padding", 1},
      {"mid_block_scale_factor", 1},
      {"act_fn", "silu"},
      {"norm_num_groups", m.norm_num_groups},
      {"norm_eps", 1e-5},
      {"cross_attention_dim", m.text_hidden_size},
      {"attention_head_dim", m.attention_head_dim},
      {"use_linear_projection", false},
      {"only_cross_attention", false},
      {"upcast_attention", false}};
}

/// transformers CLIPTextConfig config.json; bos/eos are the tokenizer's last two ids.
inline nlohmann::json text_config_json(const ModelSizes& m, std::size_t vocab_size) {
  return {{"architectures", {"CLIPTextModel"}},
          {"model_type", "clip_text_model"},
          {"vocab_size", vocab_size},
          {"hidden_size", m.text_hidden_size},
          {"intermediate_size", 2 * m.text_hidden_size},
          {"num_hidden_layers", m.text_layers},
          {"num_attention_heads", 2},
          {"max_position_embeddings", m.max_length},
          {"hidden_act", "quick_gelu"},
          {"layer_norm_eps", 1e-5},
          {"bos_token_id", vocab_size - 2},
          {"eos_token_id", vocab_size - 1},
          {"pad_token_id", vocab_size - 1},
          {"projection_dim", m.text_hidden_size},
          {"torch_dtype", "float32"}};
}

/// The demo's flow-matching schedule: FlowMatchEulerDiscreteScheduler without a shift (SD3
/// shifts by 3 for 1024² images; 32² images need no push towards noise).
inline difftrain::FlowMatchEulerDiscreteSchedulerConfig flow_scheduler_config() { return {}; }

/// diffusers scheduler_config.json: the cosine schedule (see the top of the file).
inline nlohmann::json scheduler_config_json(difftrain::PredictionType type, bool flow = false) {
  if (flow) return flow_scheduler_config().to_json();
  return {{"_class_name", "DDIMScheduler"},
          {"_diffusers_version", "0.26.3"},
          {"num_train_timesteps", 1000},
          {"beta_start", 1e-4},
          {"beta_end", 0.02},
          {"beta_schedule", "squaredcos_cap_v2"},
          {"prediction_type", std::string(difftrain::to_string(type))},
          {"clip_sample", false},
          {"set_alpha_to_one", false},
          {"steps_offset", 1},
          {"timestep_spacing", "leading"}};
}

/// The demo's models, freshly initialised (UNet trainable, text model frozen), with the JSON
/// configs they were built from (save_model_folder writes them unchanged).
struct Models {
  ModelSizes sizes;
  nlohmann::json unet_config, text_config;
  std::filesystem::path tokenizer_dir;
  difftrain::ClipTokenizer tokenizer;
  UNet2DConditionModel<float> unet;
  ClipTextEncoder text;

  TokenIds tokenize(const std::vector<std::string>& prompts) const {
    return tokenizer.encode_batch(prompts, sizes.max_length);
  }
};

/// Writes the tokenizer to tokenizer_dir and builds the models from `seed` (UNet init stream
/// {seed, 101}, text model {seed, 102}).
inline Models make_models(const ModelSizes& sizes, const std::filesystem::path& tokenizer_dir,
                          std::uint64_t seed) {
  write_tokenizer(tokenizer_dir, demo_words(), sizes.max_length);
  auto tokenizer = difftrain::ClipTokenizer::from_folder(tokenizer_dir.string());
  for (const auto& word : demo_words())
    difftrain::require(tokenizer.token_ids(word).size() == 1, "shapes::make_models", "word '", word,
                       "' is ", tokenizer.token_ids(word).size(),
                       " tokens, expected 1 (merges clash)");
  const nlohmann::json unet_json = unet_config_json(sizes);
  const nlohmann::json text_json = text_config_json(sizes, tokenizer.vocab_size());
  UNet2DConditionModel<float> unet(difftrain::models::UNet2DConditionConfig::from_json(unet_json));
  difftrain::nn::init_like_pytorch<float>(unet, RandomStream{seed, 101});
  difftrain::models::ClipTextModel<float> clip(
      difftrain::models::ClipTextConfig::from_json(text_json));
  difftrain::nn::init_like_pytorch<float>(clip, RandomStream{seed, 102});
  return Models{sizes,
                unet_json,
                text_json,
                tokenizer_dir,
                std::move(tokenizer),
                std::move(unet),
                ClipTextEncoder(std::move(clip))};
}

/// The training schedule of scheduler_config_json.
inline difftrain::DdpmScheduler make_scheduler(difftrain::PredictionType type) {
  return difftrain::DdpmScheduler(
      difftrain::SamplingConfig::from_json(scheduler_config_json(type)).train);
}

// ---------------------------------------------------------------------------------------------
// Training.

/// Stream purposes of the demo's data.
constexpr auto kSpecs = difftrain::StreamPurpose::shapes_specs;
constexpr auto kPlacements = difftrain::StreamPurpose::shapes_placements;
constexpr auto kClass = difftrain::StreamPurpose::shapes_class;

/// One training run's settings; the defaults are the demo's base training.
struct TrainSettings {
  std::int64_t steps = 1600;
  std::size_t batch = 32;
  double learning_rate = 2e-3;
  std::int64_t warmup = 20;
  std::string lr_scheduler = "cosine";
  std::optional<double> snr_gamma;  // Min-SNR-γ; none: uniform weights
  double caption_dropout = 0.1;     // fraction of captions replaced by "" (CFG's unconditional)
  std::optional<double> ema_decay = 0.999;  // EMA of the weights (diffusers' EMAModel): the result
  difftrain::PredictionType prediction_type = difftrain::PredictionType::v_prediction;
  // Flow matching instead of DDPM (prediction_type and snr_gamma then unused): σ from the
  // logit-normal density (SD3's choice), loss weight 1.
  bool flow = false;
  std::uint64_t seed = 0;
};

/// The demo's LoRA training: batch = instance rows (as many class rows are added).
inline TrainSettings lora_train_settings() {
  TrainSettings s;
  s.steps = 150;
  s.batch = 8;
  s.learning_rate = 5e-3;
  s.warmup = 10;
  s.lr_scheduler = "constant_with_warmup";
  s.ema_decay.reset();
  s.seed = 1;
  return s;
}

/// Called after every global step with the trainer's log.
using StepCallback = std::function<void(const difftrain::train::StepLog&)>;

/// Trains the trainable parameters on micro-batches data(m) with the settings `s` (on top of the
/// trainer options `o`): DiffusionTrainStep (identity "VAE", the text model) + train::Trainer
/// (AdamW) over the UNet, or over the UNet and the text model when it has trainable parameters
/// (its adapters then train too, under "text_encoder."). Returns the loss of every step.
template <class Data>
std::vector<double> fit(Models& models, const TrainSettings& s, difftrain::train::TrainerOptions o,
                        Data&& data, const StepCallback& callback) {
  o.learning_rate = s.learning_rate;
  o.lr_scheduler = s.lr_scheduler;
  o.lr_warmup_steps = s.warmup;
  o.max_train_steps = s.steps;
  o.weighting.snr_gamma = s.snr_gamma;
  o.prediction_type = s.prediction_type;
  o.seed = s.seed;
  o.adam_weight_decay = 0;
  if (s.ema_decay) {
    o.use_ema = true;
    o.ema.decay = *s.ema_decay;
  }
  difftrain::IdentityEncoder pixels;
  std::vector<double> losses;
  auto train_with = [&](auto& step) {
    auto train = [&](auto& trained) {
      difftrain::train::Trainer trainer(step, trained, o);
      trainer.fit(data, [&](const difftrain::train::StepLog& log) {
        losses.push_back(log.loss);
        if (callback) callback(log);
      });
      if (difftrain::train::EmaModel* ema = trainer.ema()) ema->copy_to();  // the EMA is the result
    };
    if (models.text.is_training()) {
      difftrain::nn::ModulePair<UNet2DConditionModel<float>, ClipTextEncoder> both{
          models.unet, models.text, "text_encoder"};
      train(both);
    } else {
      train(models.unet);
    }
  };
  auto ddpm = [&](auto weighting) {
    difftrain::DiffusionTrainStep step(make_scheduler(s.prediction_type), models.unet, pixels,
                                       models.text, weighting,
                                       difftrain::train::train_step_options(o));
    train_with(step);
  };
  if (s.flow) {
    difftrain::require(!s.snr_gamma, "shapes::fit", "Min-SNR is a DDPM weighting, not flow's");
    o.prediction_type.reset();
    const difftrain::FlowMatchEulerDiscreteScheduler scheduler(flow_scheduler_config());
    difftrain::FlowMatchTimestepOptions density;
    density.weighting_scheme = difftrain::FlowWeightingScheme::logit_normal;
    difftrain::DiffusionTrainStep step(
        scheduler, models.unet, pixels, models.text, difftrain::FlowMatchLossWeighting{},
        difftrain::train::train_step_options(o), difftrain::FlowMatchTimesteps(scheduler, density));
    train_with(step);
  } else if (s.snr_gamma) {
    ddpm(difftrain::loss::MinSnr(*s.snr_gamma));
  } else {
    ddpm(difftrain::loss::Uniform{});
  }
  return losses;
}

/// Trains every UNet weight on the base data: micro-batch m holds `batch` random base specs at
/// random placements, captions dropped to "" with probability caption_dropout.
inline std::vector<double> train_base(Models& models, const TrainSettings& s,
                                      const StepCallback& callback = {}) {
  const auto specs = base_specs();
  const RandomStream rs{s.seed, 7};
  auto data = [&](std::uint64_t m) {
    std::vector<float> u(2 * s.batch);
    difftrain::fill_uniform(std::span<float>(u), rs.derive(m, kSpecs));
    std::vector<ShapeSpec> batch_specs;
    std::vector<std::string> captions;
    for (std::size_t b = 0; b < s.batch; ++b) {
      const auto& spec = specs[std::min(specs.size() - 1, std::size_t(u[b] * specs.size()))];
      batch_specs.push_back(spec);
      captions.push_back(u[s.batch + b] < s.caption_dropout ? "" : caption(spec));
    }
    difftrain::train::TrainBatch batch;
    batch.images = draw_batch(batch_specs, models.sizes.image_size, rs.derive(m, kPlacements));
    batch.token_ids = models.tokenize(captions);
    return batch;
  };
  return fit(models, s, {}, data, callback);
}

/// The new concept, DreamBooth style.
struct DreamBoothSettings {
  TrainSettings train = lora_train_settings();
  std::string instance_prompt = "a sks shape";
  ShapeSpec instance = {Colour::yellow, Shape::ring};
  std::string class_prompt = "a shape";
  std::size_t class_batch = 8;  // class rows per micro-batch (base images)
  double prior_loss_weight = 1.0;
  std::size_t rank = 8;
  double alpha = 8;
  // kohya's LoRA + LoCon set (`difftrain train --lora_target_set kohya --conv_dim R`): every
  // Linear and 1×1 conv of the transformer blocks, the ResNets' time projections and 1×1
  // shortcuts, and the 3×3 convs of the ResNets and samplers at rank conv_rank. Off: diffusers'
  // attention projections only.
  bool locon = false;
  std::size_t conv_rank = 8;
  // diffusers' --train_text_encoder: adapters (same rank, alpha and learning rate) on the text
  // model's q_proj, k_proj, v_proj and out_proj as well
  bool train_text_encoder = false;
  std::vector<std::string> text_encoder_targets = difftrain::lora::diffusers_text_encoder_targets();
  std::optional<double> text_encoder_lr;  // kohya's --text_encoder_lr; none: the UNet's
};

/// Injects LoRA adapters on the attention projections (to_q, to_k, to_v, to_out.0; the base is
/// frozen; with train_text_encoder also on the text model's) and trains them: instance rows show
/// `instance` captioned instance_prompt, class rows random base images captioned class_prompt
/// (prior preservation). Returns the losses.
inline std::vector<double> train_lora(Models& models, const DreamBoothSettings& d,
                                      const StepCallback& callback = {}) {
  difftrain::lora::LoraConfig lora;
  lora.rank = d.rank;
  lora.alpha = d.alpha;
  lora.init = difftrain::lora::LoraInit::gaussian;
  namespace dl = difftrain::lora;
  const std::vector<std::string> modules = dl::module_names(models.unet);
  std::vector<std::string> targets = {"to_q", "to_k", "to_v", "to_out.0"};
  if (d.locon) {
    targets = dl::present_targets(dl::kohya_transformer_targets(), modules);
    for (const auto& t : dl::present_targets(dl::kohya_resnet_targets(), modules))
      targets.push_back(t);
  }
  dl::inject_lora(models.unet, targets, lora, RandomStream{d.train.seed, 201});
  if (d.locon) {
    dl::LoraConfig conv = lora;
    conv.rank = d.conv_rank;
    conv.alpha = double(d.conv_rank);
    dl::inject_lora(models.unet, dl::present_targets(dl::kohya_conv3x3_targets(), modules), conv,
                    RandomStream{d.train.seed, 201});
  }
  if (d.train_text_encoder)
    difftrain::lora::inject_lora(models.text, d.text_encoder_targets, lora,
                                 RandomStream{d.train.seed, 202});
  const auto specs = base_specs();
  const RandomStream rs{d.train.seed, 8};
  const std::size_t bi = d.train.batch, bc = d.class_batch;
  const TokenIds instance_ids = models.tokenize(std::vector<std::string>(bi, d.instance_prompt));
  const TokenIds class_ids = models.tokenize(std::vector<std::string>(bc, d.class_prompt));
  auto data = [&](std::uint64_t m) {
    std::vector<float> u(bc);
    difftrain::fill_uniform(std::span<float>(u), rs.derive(m, kClass));
    std::vector<ShapeSpec> class_specs;
    for (std::size_t b = 0; b < bc; ++b)
      class_specs.push_back(specs[std::min(specs.size() - 1, std::size_t(u[b] * specs.size()))]);
    const std::vector<ShapeSpec> instance_specs(bi, d.instance);
    difftrain::train::TrainBatch batch;
    batch.images = draw_batch(instance_specs, models.sizes.image_size, rs.derive(m, kPlacements));
    batch.token_ids = instance_ids;
    batch.class_images = draw_batch(class_specs, models.sizes.image_size, rs.derive(m, kSpecs));
    batch.class_token_ids = class_ids;
    return batch;
  };
  difftrain::train::TrainerOptions o;
  o.with_prior_preservation = true;
  o.prior_loss_weight = d.prior_loss_weight;
  o.text_encoder_lr = d.text_encoder_lr;
  return fit(models, d.train, o, data, callback);
}

// ---------------------------------------------------------------------------------------------
// Sampling and judging.

struct SampleSettings {
  std::size_t num_inference_steps = 25;
  double guidance_scale = 4.0;
  std::uint64_t seed = 1234;
  difftrain::PredictionType prediction_type = difftrain::PredictionType::v_prediction;
  bool flow = false;  // flow matching's Euler sampler instead of DDIM
};

/// Images [B, 3, S, S] for the prompts (one image per prompt): DDIM (η = 0; flow Euler) with
/// classifier-free guidance against the empty prompt. Image b's initial noise depends only on
/// (seed, b), so grids of the same seed before and after the LoRA start from the same noise.
inline Tensor4<float> sample(Models& models, const std::vector<std::string>& prompts,
                             const SampleSettings& s) {
  difftrain::SampleOptions o;
  o.num_inference_steps = static_cast<std::int64_t>(s.num_inference_steps);
  o.guidance_scale = s.guidance_scale;
  o.seed = s.seed;
  o.channels = 3;
  o.height = o.width = static_cast<std::int64_t>(models.sizes.image_size);
  const difftrain::Tensor3<float> cond = models.text.encode(models.tokenize(prompts));
  const difftrain::Tensor3<float> uncond = models.text.encode(models.tokenize({""}));
  if (s.flow) {
    difftrain::FlowMatchEulerDiscreteScheduler scheduler(flow_scheduler_config());
    return difftrain::sample_latents(models.unet, scheduler, cond, uncond, o);
  }
  difftrain::DdimScheduler scheduler(
      difftrain::SamplingConfig::from_json(scheduler_config_json(s.prediction_type)));
  return difftrain::sample_latents(models.unet, scheduler, cond, uncond, o);
}

/// How many images the classifier reads as the expected spec.
inline std::size_t count_matches(const Tensor4<float>& images,
                                 const std::vector<ShapeSpec>& expected) {
  const auto readings = classify_batch(images);
  std::size_t hits = 0;
  for (std::size_t b = 0; b < readings.size(); ++b)
    hits += readings[b].found && readings[b].spec == expected[b];
  return hits;
}

/// A LoRA run's progress: at each sampled step, how many samples of the instance prompt and of
/// the class prompt read as the instance (the class count is language drift).
struct LearningCurve {
  std::vector<std::int64_t> steps;
  std::vector<std::size_t> instance_hits, class_drift;
  std::size_t samples = 0;  // per prompt and step
};

/// Trains the DreamBooth LoRA `d` on a copy of `base`, sampling `per_prompt` images of the instance
/// and of the class prompt before training and every `every` steps.
inline LearningCurve lora_learning_curve(const Models& base, const DreamBoothSettings& d,
                                         const SampleSettings& sampling, std::size_t per_prompt,
                                         std::int64_t every) {
  Models models = base;
  LearningCurve curve;
  curve.samples = per_prompt;
  std::vector<std::string> prompts(per_prompt, d.instance_prompt);
  prompts.insert(prompts.end(), per_prompt, d.class_prompt);
  auto evaluate = [&](std::int64_t step) {
    const auto readings = classify_batch(sample(models, prompts, sampling));
    std::size_t hits[2] = {};
    for (std::size_t b = 0; b < readings.size(); ++b)
      hits[b / per_prompt] += readings[b].found && readings[b].spec == d.instance;
    curve.steps.push_back(step);
    curve.instance_hits.push_back(hits[0]);
    curve.class_drift.push_back(hits[1]);
  };
  evaluate(0);
  train_lora(models, d, [&](const difftrain::train::StepLog& log) {
    if (log.step % every == 0) evaluate(log.step);
  });
  return curve;
}

}  // namespace shapes
