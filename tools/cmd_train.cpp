// The `train` command (cmd_train.hpp): LoRA / DreamBooth fine-tuning of a model folder.
#include "cmd_train.hpp"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <array>
#include <bit>
#include <charconv>
#include <chrono>
#include <cmath>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <type_traits>
#include <utility>

#include "cmd_sample.hpp"
#include "config_file.hpp"
#include "dataset.hpp"
#include "dataset_config.hpp"
#include "difftrain/lora/kohya_metadata.hpp"
#include "difftrain/lora/lora_file.hpp"
#include "difftrain/models/sdxl_conditioning.hpp"
#include "difftrain/models/unet/lora_names.hpp"
#include "difftrain/models/vae/vae_encoder.hpp"
#include "difftrain/pipeline/pipeline.hpp"
#include "difftrain/schedule/sample.hpp"
#include "difftrain/train/trainer.hpp"
#include "image_io.hpp"
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
  // A data-parallel shard: each row samples with its global row's noise (VaeEncoder).
  Tensor4<float> encode(const Tensor4<float>& images, std::span<const std::uint64_t> global_rows) {
    return vae ? vae->encode(images, global_rows) : images;
  }
};
static_assert(LatentEncoder<FolderLatentEncoder>);

/// kohya's F.interpolate(mask, size=latent, mode="area") for a factor f: the mean of each f×f
/// block of mask [B,1,H,W] (H, W multiples of f).
Tensor4<float> area_downsample(const Tensor4<float>& mask, std::size_t f) {
  const auto& s = mask.shape();
  require(s[2] % f == 0 && s[3] % f == 0, "masked loss", "mask ", s[2], "x", s[3],
          " is not a multiple of the VAE factor ", f);
  if (f == 1) return mask;
  const std::size_t h = s[2] / f, w = s[3] / f;
  Tensor4<float> out(Tensor4<float>::shape_type{s[0], s[1], h, w});
  for (std::size_t b = 0; b < s[0] * s[1]; ++b)
    for (std::size_t y = 0; y < h; ++y)
      for (std::size_t x = 0; x < w; ++x) {
        double sum = 0;
        for (std::size_t dy = 0; dy < f; ++dy)
          for (std::size_t dx = 0; dx < f; ++dx)
            sum += mask.data()[(b * s[2] + y * f + dy) * s[3] + x * f + dx];
        out.data()[(b * h + y) * w + x] = float(sum / double(f * f));
      }
  return out;
}

/// Micro-batches whose images are replaced by VAE latents computed once per example
/// (--cache_latents, as diffusers' DreamBooth script does: the posterior of each example's first
/// preprocessing is kept and sampled anew every micro-batch, deterministic in m; SDXL's time ids
/// are that preprocessing's).
class CachedLatentSource {
 public:
  /// With `disk` (--cache_latents_to_disk) the posteriors are also kept there, keyed by the
  /// VAE's input pixels and weights (vae_digest).
  CachedLatentSource(ImageCaptionDataSource& data, const models::AutoencoderKL<float>& vae,
                     std::uint64_t seed, std::optional<DiskCache> disk = std::nullopt)
      : data_(data), vae_(vae), stream_{seed, 0x6c6174}, disk_(std::move(disk)) {
    if (disk_) vae_digest_ = vae_digest(vae);
  }
  const std::optional<DiskCache>& disk() const { return disk_; }

  train::TrainBatch operator()(std::uint64_t m) {
    train::TrainBatch batch;
    const std::vector<std::size_t> rows = data_.batch_indices(m);
    const bool sizes = data_.options().size_conditioning;
    batch.images = latents(rows, false, m);
    batch.token_ids = data_.batch_token_ids(m, false);
    if (sizes) batch.time_ids = time_ids(rows, false);
    if (data_.with_prior_preservation()) {
      batch.class_images = latents(rows, true, m);
      batch.class_token_ids = data_.batch_token_ids(m, true);
      if (sizes) batch.class_time_ids = time_ids(rows, true);
    }
    batch.sample_weights = data_.batch_sample_weights(m);
    data_.set_global_rows(batch, m);
    if (data_.has_masks() && !rows.empty()) {  // the masks of the cached crops, on the latent grid
      std::vector<std::size_t> first;
      for (std::size_t i : rows) first.push_back(data_.first_index_of(data_.example_of(i)));
      const Tensor4<float> mask = data_.masks(first, 0);
      batch.mask = area_downsample(mask, mask.shape()[2] / batch.images.shape()[2]);
    }
    return batch;
  }

 private:
  // The cached preprocessing of one example: its posterior and SDXL size conditioning.
  struct Entry {
    models::DiagonalGaussian<float> posterior;
    models::SdxlSizeConditioning size;
  };

  // The time ids of the rows' cached preprocessings (latents(rows, class_set, m) cached them).
  Tensor<float, 2> time_ids(const std::vector<std::size_t>& rows, bool class_set) const {
    std::vector<models::SdxlSizeConditioning> sizes;
    for (std::size_t i : rows)
      sizes.push_back(cache_[class_set ? 1 : 0].at(data_.example_of(i, class_set)).size);
    return models::sdxl_time_ids(sizes);
  }

  // Row r draws with the stream of its row in the global micro-batch (data-parallel shards).
  Tensor4<float> latents(const std::vector<std::size_t>& rows, bool class_set, std::uint64_t m) {
    auto& cache = cache_[class_set ? 1 : 0];
    const std::size_t first_row = data_.shard_rows(m).first;
    std::vector<Tensor4<float>> per_row;
    for (std::size_t r = 0; r < rows.size(); ++r) {
      // One entry per image (not per repeat or pairing), of its first dataset index's epoch-0
      // preprocessing, so that a resumed run caches the same.
      const std::size_t k = data_.example_of(rows[r], class_set);
      auto it = cache.find(k);
      if (it == cache.end()) {
        models::SdxlSizeConditioning size;
        const Tensor3<float> image = image_to_tensor(
            data_.example_image(data_.first_index_of(k, class_set), 0, class_set, &size));
        Tensor4<float> batch1(
            std::array<std::size_t, 4>{1, image.shape()[0], image.shape()[1], image.shape()[2]});
        std::copy(image.begin(), image.end(), batch1.begin());
        const Example& e = class_set ? data_.class_examples()[k] : data_.examples()[k];
        it = cache.emplace(k, Entry{encode(batch1, e.image_path), size}).first;
      }
      const RandomStream rs =
          stream_.derive(m, purpose_id(class_set ? StreamPurpose::latent_sample_class
                                                 : StreamPurpose::latent_sample_instance) +
                                4u * std::uint32_t(first_row + r));
      per_row.push_back(vae_.scale_latents(it->second.posterior.sample(rs)));
    }
    if (per_row.empty()) return Tensor4<float>(std::array<std::size_t, 4>{0, 0, 0, 0});
    const auto& s = per_row.front().shape();
    Tensor4<float> out(std::array<std::size_t, 4>{per_row.size(), s[1], s[2], s[3]});
    for (std::size_t r = 0; r < per_row.size(); ++r)
      std::copy(per_row[r].begin(), per_row[r].end(),
                out.begin() + std::ptrdiff_t(r * per_row[r].size()));
    return out;
  }

  // The posterior of one image [1,3,H,W]: from the disk cache when it holds it, else the VAE's.
  models::DiagonalGaussian<float> encode(const Tensor4<float>& image, const std::string& path) {
    if (!disk_) return vae_.encode(image);
    const std::string key = CacheKey(kLatentsKind)
                                .add(vae_digest_)
                                .add(image.shape()[2])
                                .add(image.shape()[3])
                                .add(std::span<const float>(image.data(), image.size()))
                                .hex();
    if (auto entry = disk_->load(key); entry && entry->size() == 2) {
      models::DiagonalGaussian<float> g;
      for (const CacheTensor& t : *entry) {
        Tensor4<float>& to = t.name == "mean" ? g.mean : g.logvar;
        std::array<std::size_t, 4> shape{};
        if (t.shape.size() == 4) std::copy(t.shape.begin(), t.shape.end(), shape.begin());
        to = Tensor4<float>(shape);
        std::copy(t.values.begin(), t.values.end(), to.begin());
      }
      if (g.mean.shape() == g.logvar.shape() && g.mean.shape() == vae_.latent_shape(image.shape()))
        return g;
    }
    models::DiagonalGaussian<float> g = vae_.encode(image);
    auto tensor = [](const char* name, const Tensor4<float>& t) {
      return CacheTensor{name, {t.shape().begin(), t.shape().end()}, {t.begin(), t.end()}};
    };
    disk_->store(key, {tensor("mean", g.mean), tensor("logvar", g.logvar)}, {{"image", path}});
    return g;
  }

  // The VAE's part of a key: the encoder's weights and the options that change its output.
  static std::string vae_digest(const models::AutoencoderKL<float>& vae) {
    const auto& c = vae.config();
    return CacheKey("vae")
        .add(parameter_digest(vae, {"encoder.", "quant_conv."}))
        .add(c.norm_num_groups)
        .add(c.mid_block_add_attention)
        .add(c.use_quant_conv)
        .hex();
  }

  static constexpr const char* kLatentsKind = "latents";
  ImageCaptionDataSource& data_;
  const models::AutoencoderKL<float>& vae_;
  RandomStream stream_;
  std::map<std::size_t, Entry> cache_[2];
  std::optional<DiskCache> disk_;
  std::string vae_digest_;
};

// The cache key part of a text encoder: its weights and the options that change its output.
void add_config(CacheKey& key, const models::ClipTextConfig& c) {
  key.add(c.num_attention_heads)
      .add(to_string(c.hidden_act))
      .add(std::bit_cast<std::uint64_t>(c.layer_norm_eps));
}
std::string encoder_digest(const models::ClipTextEncoder& encoder) {
  CacheKey key("text_encoder");
  key.add(parameter_digest(encoder));
  add_config(key, encoder.model().config());
  return key.add(encoder.options().clip_skip).hex();
}
std::string encoder_digest(const models::SdxlTextEncoders& encoders) {
  CacheKey key("sdxl_text_encoders");
  key.add(parameter_digest(encoders));
  add_config(key, std::as_const(encoders).text_encoder().config());
  add_config(key, std::as_const(encoders).text_encoder_2().config());
  return key.add(encoders.clip_skip()).hex();
}

/// The run's text encoder E (SD's ClipTextEncoder, SDXL's SdxlTextEncoders), with kohya's
/// --cache_text_encoder_outputs: the outputs of each caption (token-id row: its context, and for
/// SDXL its pooled embedding) are computed once, a row at a time so that they do not depend on the
/// batch they came in, and kept in memory; with `disk` (--cache_text_encoder_outputs_to_disk) also
/// there, keyed by the token ids, the encoders' weights and clip_skip. Without caching it passes
/// through.
template <class E>
class CachingTextEncoder {
 public:
  using input_type = TokenIds;
  using output_type = Tensor3<float>;
  static constexpr bool kPooled = PooledTextEncoder<E>;

  CachingTextEncoder(E& encoder, bool cache, std::optional<DiskCache> disk = std::nullopt)
      : encoder_(encoder), cache_(cache || disk), disk_(std::move(disk)) {
    if (cache_) digest_ = encoder_digest(encoder);
  }
  const std::optional<DiskCache>& disk() const { return disk_; }

  Tensor3<float> encode(const TokenIds& ids) {
    if (!cache_) return encoder_.encode(ids);
    const std::size_t B = ids.shape()[0], L = ids.shape()[1];
    std::vector<const Outputs*> rows;
    for (std::size_t b = 0; b < B; ++b) {
      const TokenIds row = xt::view(ids, xt::range(b, b + 1), xt::all());
      const std::string key = CacheKey(kKind)
                                  .add(digest_)
                                  .add(std::span<const std::int64_t>(row.data(), row.size()))
                                  .hex();
      auto it = memory_.find(key);
      if (it == memory_.end()) it = memory_.emplace(key, compute(row, key)).first;
      rows.push_back(&it->second);
    }
    // context rows [L', D] (SDXL: L' = L / 2, the ids being both tokenizers' side by side)
    const std::size_t D = rows[0]->shape[2], Lc = rows[0]->shape[1];
    Tensor3<float> out(std::array<std::size_t, 3>{B, Lc, D});
    for (std::size_t b = 0; b < B; ++b)
      std::copy(rows[b]->context.begin(), rows[b]->context.end(),
                out.begin() + std::ptrdiff_t(b * Lc * D));
    if constexpr (kPooled) {
      const std::size_t P = rows[0]->pooled.size();
      pooled_ = Tensor<float, 2>(std::array<std::size_t, 2>{B, P});
      for (std::size_t b = 0; b < B; ++b)
        std::copy(rows[b]->pooled.begin(), rows[b]->pooled.end(),
                  pooled_.begin() + std::ptrdiff_t(b * P));
    }
    (void)L;
    return out;
  }
  /// SDXL: the pooled embeddings of the last encode.
  const Tensor<float, 2>& pooled_prompt_embeds() const requires kPooled {
    return cache_ ? pooled_ : encoder_.pooled_prompt_embeds();
  }
  Tensor3<float> encode_train(const TokenIds& ids) { return encoder_.encode_train(ids); }
  void backward(const Tensor3<float>& grad_context) { encoder_.backward(grad_context); }
  void backward(const Tensor3<float>& grad_context,
                const Tensor<float, 2>& grad_pooled) requires kPooled {
    encoder_.backward(grad_context, grad_pooled);
  }
  bool is_training() const { return encoder_.is_training(); }

 private:
  struct Outputs {
    std::vector<std::size_t> shape;  // the context's [1, L, D]
    std::vector<float> context, pooled;
  };

  Outputs compute(const TokenIds& row, const std::string& key) {
    if (disk_)
      if (auto entry = disk_->load(key);
          entry && entry->size() == (kPooled ? 2 : 1) && entry->front().name == "context" &&
          entry->front().shape.size() == 3 &&
          entry->front().shape[1] * (kPooled ? 2 : 1) == row.shape()[1] &&
          (!kPooled || entry->back().name == "pooled"))
        return {entry->front().shape, std::move(entry->front().values),
                kPooled ? std::move(entry->back().values) : std::vector<float>{}};
    const Tensor3<float> context = encoder_.encode(row);
    Outputs out{
        {context.shape().begin(), context.shape().end()}, {context.begin(), context.end()}, {}};
    std::vector<CacheTensor> tensors{{"context", out.shape, out.context}};
    if constexpr (kPooled) {
      const Tensor<float, 2>& pooled = encoder_.pooled_prompt_embeds();
      out.pooled.assign(pooled.begin(), pooled.end());
      tensors.push_back({"pooled", {pooled.shape().begin(), pooled.shape().end()}, out.pooled});
    }
    if (disk_) disk_->store(key, tensors);
    return out;
  }

  static constexpr const char* kKind = "text_encoder_outputs";
  E& encoder_;
  bool cache_;
  std::optional<DiskCache> disk_;
  std::string digest_;
  std::map<std::string, Outputs> memory_;
  Tensor<float, 2> pooled_;
};
static_assert(TrainableTextEncoder<CachingTextEncoder<models::ClipTextEncoder>> &&
              !PooledTextEncoder<CachingTextEncoder<models::ClipTextEncoder>>);
static_assert(PooledTextEncoder<CachingTextEncoder<models::SdxlTextEncoders>>);

namespace fs = std::filesystem;
constexpr const char* fn = "train";

// Seconds since the epoch (Python's time.time()), for kohya's ss_training_*_at keys.
double unix_time_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

/// Checks the flags that depend on each other; returns the LoRA file format.
lora::LoraFormat check_options(const TrainCommandOptions& o) {
  require(!o.pretrained_model_name_or_path.empty(), fn,
          "--pretrained_model_name_or_path is required (a diffusers model folder)");
  const bool dreambooth = !o.instance_data_dir.empty();
  require(int(dreambooth) + int(!o.train_data_dir.empty()) + int(!o.dataset_subsets.empty()) == 1,
          fn,
          "give exactly one of --train_data_dir (captioned images), --instance_data_dir "
          "(DreamBooth) and --dataset_config (kohya's dataset TOML)");
  if (dreambooth)
    require(!o.instance_prompt.empty(), fn, "--instance_data_dir needs --instance_prompt");
  (void)nn::parse_mixed_precision(o.mixed_precision);
  require(o.reg_data_dir.empty() || !o.trainer.with_prior_preservation, fn,
          "--reg_data_dir (kohya's regularisation images) and --with_prior_preservation "
          "(diffusers' class images) are two forms of the same thing: give one");
  if (o.trainer.with_prior_preservation)
    require(dreambooth && !o.class_data_dir.empty() && !o.class_prompt.empty(), fn,
            "--with_prior_preservation needs --instance_data_dir, --class_data_dir and "
            "--class_prompt");
  require(o.trainer.train_batch_size >= 1, fn, "--train_batch_size is ", o.trainer.train_batch_size,
          ", expected >= 1");
  require(o.num_train_epochs >= 1 || o.max_train_steps >= 1, fn, "--num_train_epochs is ",
          o.num_train_epochs, ", expected >= 1");
  require(o.max_train_steps >= 0, fn, "--max_train_steps is ", o.max_train_steps,
          ", expected >= 1 (or 0: --num_train_epochs × steps per epoch)");
  // Values a Python script would take but that mean nothing here: refused, naming the flag.
  auto non_negative = [](const char* flag, double value, const char* zero_means) {
    require(std::isfinite(value) && value >= 0, fn, flag, " is ", value,
            ", expected a finite value >= 0 (0: ", zero_means, ")");
  };
  non_negative("--lora_alpha", o.lora_alpha, "= rank");
  non_negative("--snr_gamma", o.snr_gamma, "off");
  non_negative("--p2_gamma", o.p2_gamma, "off");
  non_negative("--v_pred_like_loss", o.v_pred_like_loss, "off");
  non_negative("--unet_lr", o.unet_lr, "the learning rate");
  require(o.checkpoints_total_limit >= 0, fn, "--checkpoints_total_limit is ",
          o.checkpoints_total_limit, ", expected >= 0 (0: keep all)");
  // A rank beyond the adapted layer's width adds nothing (the product B·A has at most that rank);
  // SD's widest layer is 5120 wide. The bound keeps a typo from allocating terabytes.
  constexpr std::size_t kMaxRank = 8192;
  require(o.rank >= 1 && o.rank <= kMaxRank, fn, "--rank is ", o.rank, ", expected 1 to ",
          kMaxRank);
  require(o.conv_dim <= kMaxRank, fn, "--conv_dim is ", o.conv_dim, ", expected at most ",
          kMaxRank);
  constexpr int kMaxResolution = 16384;
  require(o.resolution >= 8 && o.resolution <= kMaxResolution, fn, "--resolution is ", o.resolution,
          ", expected 8 to ", kMaxResolution);
  // The LoRA is written into --output_dir: a name with a folder in it would leave it.
  require(!o.output_name.empty() && o.output_name != "." && o.output_name != ".." &&
              o.output_name.find('/') == std::string::npos,
          fn, "--output_name is '", o.output_name,
          "', expected a file name without a folder (the LoRA is written into --output_dir)");
  require(o.validation_epochs >= 1, fn, "--validation_epochs is ", o.validation_epochs,
          ", expected >= 1");
  require(o.num_validation_images >= 1, fn, "--num_validation_images is ", o.num_validation_images,
          ", expected >= 1");
  require(!o.trainer.output_dir.empty(), fn, "--output_dir is empty");
  require(o.num_class_images >= 1, fn, "--num_class_images is ", o.num_class_images,
          ", expected >= 1");
  require(o.sample_batch_size >= 1, fn, "--sample_batch_size is ", o.sample_batch_size,
          ", expected >= 1");
  if (o.full_finetune) {
    std::error_code ec;
    require(!fs::equivalent(o.pretrained_model_name_or_path, o.trainer.output_dir, ec), fn,
            "--full_finetune writes a model folder to --output_dir, which is the base model's "
            "folder '",
            o.pretrained_model_name_or_path, "': give another one");
  }
  require(
      !(o.network_train_unet_only && (o.train_text_encoder || o.network_train_text_encoder_only)),
      fn, "--network_train_unet_only contradicts ",
      o.train_text_encoder ? "--train_text_encoder" : "--network_train_text_encoder_only");
  require(!(o.full_finetune && (o.train_text_encoder || o.network_train_text_encoder_only)), fn,
          "--full_finetune trains the UNet's weights only; --train_text_encoder and "
          "--network_train_text_encoder_only need a LoRA run");
  require(std::isfinite(o.text_encoder_lr) && o.text_encoder_lr >= 0, fn, "--text_encoder_lr is ",
          o.text_encoder_lr, ", expected a finite value >= 0 (0: the learning rate)");
  if (o.cache_text_encoder_outputs || o.cache_text_encoder_outputs_to_disk) {
    require(!o.train_text_encoder && !o.network_train_text_encoder_only, fn,
            "--cache_text_encoder_outputs needs a frozen text encoder: it contradicts ",
            o.train_text_encoder ? "--train_text_encoder" : "--network_train_text_encoder_only");
    // kohya's rule: captions that change every step would make every entry new.
    std::vector<const CaptionOptions*> captions{&o.caption};
    for (const DatasetSubset& d : o.dataset_subsets) captions.push_back(&d.caption);
    for (const CaptionOptions* c : captions)
      require(!c->shuffle_caption && c->caption_tag_dropout_rate == 0, fn,
              "--cache_text_encoder_outputs needs fixed captions: --shuffle_caption and "
              "--caption_tag_dropout_rate make a new caption every step");
  }
  require(o.save_model_as == "safetensors", fn, "--save_model_as is '", o.save_model_as,
          "', expected safetensors (ckpt and pt files are not written)");
  return lora::parse_lora_format(o.save_format);
}

/// The image folders of the examples, in order, with kohya's counts (ss_dataset_dirs): the
/// folder's repeats (its "N_", 1 otherwise) and images; a reg folder's images may have balanced
/// repeats, kohya records the folder's.
struct DatasetDir {
  std::string path;
  bool is_reg = false;
  std::int64_t n_repeats = 1, img_count = 0, total = 0;  // total: Σ num_repeats as trained
};
std::vector<DatasetDir> dataset_dirs(const std::vector<Example>& examples,
                                     const std::vector<DatasetSubset>& subsets) {
  std::vector<DatasetDir> dirs;
  for (const Example& e : examples) {
    const std::string dir = fs::path(e.image_path).parent_path().string();
    if (dirs.empty() || dirs.back().path != dir || dirs.back().is_reg != e.is_reg) {
      const std::size_t n = subsets.empty()
                                ? kohya_folder_repeats(fs::path(dir).filename().string())
                                : subsets.at(e.subset).num_repeats;
      dirs.push_back(
          {dir, e.is_reg, std::int64_t(e.is_reg ? std::max<std::size_t>(n, 1) : e.num_repeats)});
    }
    dirs.back().img_count += 1;
    dirs.back().total += std::int64_t(e.num_repeats);
  }
  return dirs;
}

/// The captioned images (or the DreamBooth instance and class images) as micro-batches.
ImageCaptionDataSource make_data_source(const TrainCommandOptions& o,
                                        const pipeline::ModelFolder& model, std::FILE* log,
                                        const train::Collective* collective) {
  Tokenize tokenize = [&model](const std::vector<std::string>& captions) {
    return model.tokenize(captions);
  };
  DataSourceOptions data_options;
  data_options.resolution = o.resolution;
  data_options.center_crop = o.center_crop;
  data_options.random_flip = o.random_flip;
  data_options.interpolation =
      parse_choice("--image_interpolation_mode", o.image_interpolation_mode, kInterpolations);
  data_options.train_batch_size = std::size_t(o.trainer.train_batch_size);
  if (collective) {  // --train_batch_size per process, as with accelerate
    data_options.num_shards = std::size_t(collective->size());
    data_options.shard_index = std::size_t(collective->rank());
  }
  data_options.seed = o.trainer.seed;
  data_options.cache_images = true;
  data_options.caption = o.caption;
  data_options.reg_loss_weight = float(o.trainer.prior_loss_weight);
  data_options.alpha_mask = o.alpha_mask;
  data_options.size_conditioning = model.is_sdxl();
  if (o.masked_loss && !o.alpha_mask) {
    require(!o.conditioning_data_dir.empty(), fn,
            "--masked_loss needs masks: --conditioning_data_dir (same-named mask images) or "
            "--alpha_mask (the images' alpha channel)");
    data_options.mask_dir = o.conditioning_data_dir;
  }
  if (o.enable_bucket) {
    data_options.buckets = o.buckets;
    data_options.buckets->resolution_width = data_options.buckets->resolution_height = o.resolution;
  }
  ImageFolderOptions folder_options;
  folder_options.caption_column = o.caption_column;
  folder_options.caption_extension = o.caption_extension;
  std::vector<std::string> ignored;
  std::vector<Example> examples, reg;
  if (!o.dataset_subsets.empty()) {  // kohya's dataset config
    for (std::size_t k = 0; k < o.dataset_subsets.size(); ++k) {
      const DatasetSubset& s = o.dataset_subsets[k];
      ImageFolderOptions subset_folder = folder_options;
      subset_folder.caption_extension = s.caption_extension;
      for (Example& e : scan_repeat_folder(s.image_dir, subset_folder, s.class_tokens,
                                           s.num_repeats, s.is_reg, k))
        (s.is_reg ? reg : examples).push_back(std::move(e));
      data_options.subset_captions.push_back(s.caption);
    }
  } else if (!o.instance_data_dir.empty()) {
    examples = scan_dreambooth_folder(o.instance_data_dir, o.instance_prompt);
  } else if (is_kohya_folder(o.train_data_dir)) {
    examples = scan_kohya_folder(o.train_data_dir, folder_options, false, &ignored);
  } else {
    examples = scan_image_folder(o.train_data_dir, folder_options);
  }
  if (!o.reg_data_dir.empty())
    for (Example& e : scan_kohya_folder(o.reg_data_dir, folder_options, true, &ignored))
      reg.push_back(std::move(e));
  // Images that cannot be decoded are left out with a message (kohya's behaviour for unreadable
  // files), or stop the run with --strict_images. Each is decoded once here for that.
  auto readable = [&](std::vector<Example>& list) {
    std::erase_if(list, [&](const Example& e) {
      const std::string problem = image_problem(e.image_path);
      if (problem.empty()) return false;
      require(!o.strict_images, fn, problem, " (--strict_images)");
      if (log) std::fprintf(log, "difftrain train: skipped, %s\n", problem.c_str());
      return true;
    });
  };
  readable(examples);
  readable(reg);
  require(reg.empty() || !examples.empty(), fn, "there are regularisation images only");
  for (Example& e : balance_regularization(examples, std::move(reg)))
    examples.push_back(std::move(e));
  if (log) {
    for (const std::string& dir : ignored)
      std::fprintf(log, "difftrain train: ignoring '%s' (no \"<repeats>_\" in its name)\n",
                   dir.c_str());
    for (const DatasetDir& d : dataset_dirs(examples, o.dataset_subsets))
      std::fprintf(log, "difftrain train: %s'%s': %lld images x %lld repeats, %lld per epoch\n",
                   d.is_reg ? "regularisation " : "", d.path.c_str(),
                   static_cast<long long>(d.img_count), static_cast<long long>(d.n_repeats),
                   static_cast<long long>(d.total));
  }
  std::vector<Example> class_examples;
  if (o.trainer.with_prior_preservation) {
    class_examples = scan_dreambooth_folder(o.class_data_dir, o.class_prompt);
    readable(class_examples);
    if (class_examples.size() > std::size_t(o.num_class_images))  // diffusers: the first N
      class_examples.resize(std::size_t(o.num_class_images));
  }
  ImageCaptionDataSource data(std::move(examples), tokenize, data_options,
                              std::move(class_examples));
  if (log && o.enable_bucket) {
    std::fprintf(log, "difftrain train: buckets (width x height: images with repeats)");
    for (std::size_t j = 0; j < data.buckets().size(); ++j)
      std::fprintf(log, "%s %dx%d: %zu", j ? "," : "", data.buckets()[j].width,
                   data.buckets()[j].height, data.bucket_rows()[j].size());
    std::fprintf(log, "\n");
  }
  return data;
}

std::vector<std::pair<std::string, std::string>> key_values(const std::vector<std::string>& args) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const std::string& a : args) {
    const auto eq = a.find('=');
    out.emplace_back(a.substr(0, eq), eq == std::string::npos ? "" : a.substr(eq + 1));
  }
  return out;
}

/// The run as kohya's train_network.py describes it in a LoRA file (ss_* and modelspec.* keys;
/// kohya_metadata.hpp formats them).
std::map<std::string, std::string> lora_metadata(const TrainCommandOptions& o,
                                                 const train::TrainerOptions& t,
                                                 const pipeline::ModelFolder& model,
                                                 std::int64_t steps,
                                                 const ImageCaptionDataSource& data,
                                                 std::int64_t micro_per_epoch, double started_at) {
  lora::KohyaRunInfo r;
  const auto& unet = model.unet.config();
  r.base = model.is_sdxl()                            ? lora::KohyaBaseModel::sdxl
           : unet.cross_attention_dim.front() == 1024 ? lora::KohyaBaseModel::sd_v2
                                                      : lora::KohyaBaseModel::sd_v1;
  r.v_parameterization = t.prediction_type.value_or(model.scheduler.train.prediction_type) ==
                         PredictionType::v_prediction;
  r.sd_model_name = fs::path(o.pretrained_model_name_or_path).filename().string();
  r.resolution_width = r.resolution_height = o.resolution;
  r.network_dim = std::int64_t(o.rank);
  r.network_alpha = o.lora_alpha > 0 ? o.lora_alpha : double(o.rank);
  if (o.network_dropout > 0) r.network_dropout = o.network_dropout;
  if (o.use_rslora) *r.network_alpha *= std::sqrt(double(o.rank));  // the file's plain alpha
  if (o.conv_dim > 0) {
    r.network_args.emplace_back("conv_dim", std::to_string(o.conv_dim));
    r.network_args.emplace_back("conv_alpha", lora::python_float(o.conv_alpha));
  }
  for (auto& kv : key_values(o.network_args)) r.network_args.push_back(kv);
  const train::OptimizerName opt = train::parse_optimizer_name(t.optimizer);
  r.optimizer = train::kohya_optimizer_class(opt.name);
  r.optimizer_args =
      opt.name == "adamw"
          ? lora::torch_adamw_args(t.adam_beta1, t.adam_beta2, t.adam_weight_decay, t.adam_epsilon)
          : key_values(t.optimizer_args);
  r.learning_rate = t.learning_rate;
  if (o.unet_lr > 0) r.unet_lr = o.unet_lr;
  if (o.text_encoder_lr > 0) r.text_encoder_lr = o.text_encoder_lr;
  r.lr_scheduler = t.lr_scheduler;
  r.lr_warmup_steps = o.lr_warmup_steps;
  r.max_grad_norm = t.max_grad_norm;
  r.gradient_checkpointing = t.gradient_checkpointing;
  r.mixed_precision = o.mixed_precision;
  r.max_train_steps = t.max_train_steps;
  const std::int64_t updates_per_epoch =
      (micro_per_epoch + t.gradient_accumulation_steps - 1) / t.gradient_accumulation_steps;
  r.num_epochs = (t.max_train_steps + updates_per_epoch - 1) / updates_per_epoch;
  r.num_batches_per_epoch = micro_per_epoch;
  r.train_batch_size = t.train_batch_size;
  r.gradient_accumulation_steps = t.gradient_accumulation_steps;
  r.steps = steps;
  r.epoch = steps / std::max<std::int64_t>(1, updates_per_epoch);
  r.seed = t.seed;
  r.cache_latents = o.cache_latents || o.cache_latents_to_disk;
  r.prior_loss_weight = t.prior_loss_weight;
  if (o.snr_gamma > 0) r.min_snr_gamma = o.snr_gamma;
  r.debiased_estimation = t.weighting.debiased_estimation_loss;
  if (t.noise.noise_offset != 0) r.noise_offset = lora::decimal_double(t.noise.noise_offset);
  r.noise_offset_random_strength = t.noise.noise_offset_random_strength;
  if (t.noise.adaptive_noise_scale != 0)
    r.adaptive_noise_scale = lora::decimal_double(t.noise.adaptive_noise_scale);
  if (t.noise.multires_noise_iterations > 0)
    r.multires_noise_iterations = std::int64_t(t.noise.multires_noise_iterations);
  r.multires_noise_discount = lora::decimal_double(t.noise.multires_noise_discount);
  if (t.noise.input_perturbation != 0)
    r.ip_noise_gamma = lora::decimal_double(t.noise.input_perturbation);
  r.ip_noise_gamma_random_strength = t.noise.input_perturbation_random_strength;
  r.zero_terminal_snr = o.zero_terminal_snr;
  if (model.scheduler.flow) {  // a flow-matching run (run_train sets the scheduler for it)
    r.flow.emplace();
    r.flow->timestep_sampling = o.timestep_sampling;
    r.flow->weighting_scheme = o.weighting_scheme;
    r.flow->logit_mean = o.flow.logit_mean;
    r.flow->logit_std = o.flow.logit_std;
    r.flow->mode_scale = o.flow.mode_scale;
    r.flow->sigmoid_scale = o.flow.sigmoid_scale;
    r.flow->discrete_flow_shift = o.flow.discrete_flow_shift;
  }
  r.loss_type = t.loss_type;
  r.huber_schedule = t.huber_schedule;
  r.huber_c = t.huber_c;
  r.huber_scale = t.huber_scale;
  if (o.min_timestep >= 0) r.min_timestep = o.min_timestep;
  if (o.max_timestep >= 0) r.max_timestep = o.max_timestep;
  if (o.clip_skip > 0) r.clip_skip = std::int64_t(o.clip_skip);
  for (const DatasetDir& d : dataset_dirs(data.examples(), o.dataset_subsets)) {
    const std::string name = fs::path(d.path).filename().string();
    (d.is_reg ? r.reg_dataset_dirs : r.dataset_dirs).push_back({name, d.n_repeats, d.img_count});
    (d.is_reg ? r.num_reg_images : r.num_train_images) +=
        d.is_reg ? d.n_repeats * d.img_count : d.total;  // kohya: the folder's repeats
  }
  if (data.with_prior_preservation()) {
    for (const DatasetDir& d : dataset_dirs(data.class_examples(), {}))
      r.reg_dataset_dirs.push_back({fs::path(d.path).filename().string(), 1, d.img_count});
    r.num_reg_images = std::int64_t(data.class_examples().size());
  }
  r.flip_aug = o.random_flip;
  r.shuffle_caption = o.caption.shuffle_caption;
  r.keep_tokens = o.caption.keep_tokens;
  r.caption_dropout_rate = o.caption.caption_dropout_rate;
  r.caption_dropout_every_n_epochs = o.caption.caption_dropout_every_n_epochs;
  r.caption_tag_dropout_rate = o.caption.caption_tag_dropout_rate;
  if (o.enable_bucket) {
    r.enable_bucket = true;
    r.bucket_no_upscale = o.buckets.bucket_no_upscale;
    r.min_bucket_reso = o.buckets.min_bucket_reso;
    r.max_bucket_reso = o.buckets.max_bucket_reso;
    // kohya numbers a bucket by its place among all of the run's buckets: the predefined ones,
    // or without them (no upscale) the ones made.
    const BucketOptions& b = *data.options().buckets;
    const std::vector<BucketSize> all =
        b.bucket_no_upscale ? data.buckets()
                            : make_bucket_resolutions(o.resolution, o.resolution, b.min_bucket_reso,
                                                      b.max_bucket_reso, b.bucket_reso_steps);
    for (std::size_t j = 0; j < data.buckets().size(); ++j) {
      const BucketSize size = data.buckets()[j];
      const auto index = std::lower_bound(all.begin(), all.end(), size) - all.begin();
      r.buckets.push_back({std::int64_t(index), size.width, size.height,
                           std::int64_t(data.bucket_rows()[j].size())});
    }
    double error = 0;
    for (std::size_t k = 0; k < data.examples().size(); ++k)
      error += std::abs(data.bucket_choice(k).ar_error);
    r.mean_img_ar_error = error / double(data.examples().size());
  }
  r.random_crop = !o.center_crop;
  r.output_name = o.output_name;
  r.training_comment = "difftrain train";
  r.session_id = std::int64_t(std::random_device{}());
  r.training_started_at = started_at;
  r.saved_at = unix_time_now();
  return lora::kohya_metadata(r);
}

/// validation/step-<n>.png: a grid of the validation prompt, DDIM (flow Euler for flow matching)
/// with classifier-free guidance, LoRA dropout off while sampling.
fs::path save_validation_grid(const TrainCommandOptions& o, pipeline::ModelFolder& model,
                              std::int64_t step_number) {
  auto set_training = [&model](bool on) {
    lora::set_lora_training(model.unet, on);
    lora::set_lora_training(model.text_encoder, on);
    if (model.text_encoder_2) lora::set_lora_training(*model.text_encoder_2, on);
  };
  set_training(false);
  SampleOptions so;
  so.num_inference_steps = o.validation_inference_steps;
  so.guidance_scale = o.validation_guidance_scale;
  so.seed = o.trainer.seed;
  const auto size = std::size_t(o.resolution);
  const Tensor4<float> images = pipeline::generate_images(
      model, {o.validation_prompt}, "", std::size_t(o.num_validation_images),
      pipeline::default_sampler(model.scheduler), size, size, so);
  fs::create_directories(fs::path(o.trainer.output_dir) / "validation");
  const fs::path path = fs::path(o.trainer.output_dir) / "validation" /
                        ("step-" + std::to_string(step_number) + ".png");
  save_png_grid(path.string(), images,
                std::size_t(std::ceil(std::sqrt(double(o.num_validation_images)))));
  set_training(true);
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
  t.max_train_steps = o.max_train_steps;
  if (o.max_train_steps == 0)
    require(!__builtin_mul_overflow(o.num_train_epochs, updates_per_epoch, &t.max_train_steps), fn,
            "--num_train_epochs ", o.num_train_epochs, " × ", updates_per_epoch,
            " steps per epoch is more steps than can be counted: give fewer epochs");
  if (o.snr_gamma > 0) t.weighting.snr_gamma = o.snr_gamma;
  if (o.p2_gamma > 0) t.weighting.p2_gamma = o.p2_gamma;
  if (o.v_pred_like_loss > 0) t.weighting.v_pred_like_loss = o.v_pred_like_loss;
  if (o.unet_lr > 0) t.learning_rate = o.unet_lr;
  if (o.text_encoder_lr > 0) t.text_encoder_lr = o.text_encoder_lr;
  // kohya: a warm-up below 1 is a ratio of the training steps (truncated), else a step count.
  require(std::isfinite(o.lr_warmup_steps) && o.lr_warmup_steps >= 0 &&
              (o.lr_warmup_steps < 1 || o.lr_warmup_steps == std::floor(o.lr_warmup_steps)),
          fn, "--lr_warmup_steps is ", o.lr_warmup_steps,
          ", expected a whole number of steps or a ratio in [0, 1)");
  t.lr_warmup_steps = o.lr_warmup_steps < 1
                          ? std::int64_t(o.lr_warmup_steps * double(t.max_train_steps))
                          : std::int64_t(o.lr_warmup_steps);
  if (!o.prediction_type.empty()) t.prediction_type = parse_prediction_type(o.prediction_type);
  if (o.v_parameterization) {
    require(!t.prediction_type || *t.prediction_type == PredictionType::v_prediction, fn,
            "--v_parameterization contradicts --prediction_type ", o.prediction_type);
    t.prediction_type = PredictionType::v_prediction;
  }
  if (o.min_timestep >= 0) t.min_timestep = o.min_timestep;
  if (o.max_timestep >= 0) t.max_timestep = o.max_timestep;
  if (o.checkpoints_total_limit > 0) t.checkpoints_total_limit = o.checkpoints_total_limit;
  t.non_finite = parse_choice("--on_nonfinite", o.on_nonfinite, train::kNonFinitePolicies);
  return t;
}

namespace {

// --lora_target_set: diffusers' --lora_target_modules, or kohya's networks.lora targets.
enum class LoraTargetSet { attention, kohya };
constexpr std::array<Choice<LoraTargetSet>, 2> kLoraTargetSets{{
    {"attention", LoraTargetSet::attention},
    {"kohya", LoraTargetSet::kohya},
}};
bool kohya_targets(const TrainCommandOptions& o) {
  return parse_choice("--lora_target_set", o.lora_target_set, kLoraTargetSets) ==
         LoraTargetSet::kohya;
}

// kohya's --network_args that difftrain has ("key=value"), applied over the flags.
struct NetworkArgs {
  std::size_t conv_dim;
  double conv_alpha, rank_dropout, module_dropout;
};
NetworkArgs network_args(const TrainCommandOptions& o) {
  NetworkArgs a{o.conv_dim, o.conv_alpha, o.rank_dropout, o.module_dropout};
  for (const std::string& arg : o.network_args) {
    const auto eq = arg.find('=');
    require(eq != std::string::npos, fn, "--network_args '", arg, "': expected key=value");
    const std::string key = arg.substr(0, eq), value = arg.substr(eq + 1);
    double v = 0;
    const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), v);
    require(ec == std::errc{} && end == value.data() + value.size() && std::isfinite(v), fn,
            "--network_args '", arg, "': the value is not a number");
    if (key == "conv_dim") {
      require(v >= 0 && v == std::floor(v), fn, "--network_args conv_dim is ", value,
              ", expected a whole number >= 0");
      a.conv_dim = std::size_t(v);
    } else if (key == "conv_alpha") {
      a.conv_alpha = v;
    } else if (key == "rank_dropout") {
      a.rank_dropout = v;
    } else if (key == "module_dropout") {
      a.module_dropout = v;
    } else {
      fail(fn, "--network_args key '", key,
           "' is not supported (supported: conv_dim, conv_alpha, rank_dropout, module_dropout)");
    }
  }
  return a;
}

}  // namespace

lora::LoraConfig lora_config(const TrainCommandOptions& o) {
  const NetworkArgs args = network_args(o);
  lora::LoraConfig c;
  c.rank = o.rank;
  c.alpha = o.lora_alpha > 0 ? o.lora_alpha : double(o.rank);
  c.init = parse_choice("--init_lora_weights", o.init_lora_weights, lora::kLoraInits);
  c.use_rslora = o.use_rslora;
  c.dropout = o.lora_dropout;
  c.network_dropout = o.network_dropout;
  c.rank_dropout = args.rank_dropout;
  c.module_dropout = args.module_dropout;
  c.validate("difftrain train: LoRA options");
  return c;
}

std::vector<std::string> inject_adapters(models::UNet2DConditionModel<float>& unet,
                                         const TrainCommandOptions& o) {
  const lora::LoraConfig config = lora_config(o);
  const NetworkArgs args = network_args(o);
  const std::vector<std::string> modules = lora::module_names(unet);
  std::vector<std::string> targets =
      kohya_targets(o) ? lora::present_targets(lora::kohya_transformer_targets(), modules)
                       : o.lora_target_modules;
  std::vector<std::string> conv_targets;
  if (args.conv_dim > 0) {
    for (const auto& t : lora::present_targets(lora::kohya_resnet_targets(), modules))
      targets.push_back(t);
    conv_targets = lora::present_targets(lora::kohya_conv3x3_targets(), modules);
  }
  const RandomStream rs{o.trainer.seed, 0x6c6f7261};
  std::vector<std::string> adapted = lora::inject_lora(unet, targets, config, rs);
  if (!conv_targets.empty()) {
    lora::LoraConfig conv = config;
    conv.rank = args.conv_dim;
    conv.alpha = args.conv_alpha;
    conv.validate("difftrain train: --conv_dim / --conv_alpha");
    for (auto& name : lora::inject_lora(unet, conv_targets, conv, rs))
      adapted.push_back(std::move(name));
  }
  return adapted;
}

std::vector<std::string> inject_text_encoder_adapters(models::ClipTextEncoder& text_encoder,
                                                      const TrainCommandOptions& o,
                                                      std::uint64_t encoder_index) {
  if (!o.train_text_encoder && !o.network_train_text_encoder_only) return {};
  const std::vector<std::string> targets = kohya_targets(o)
                                               ? lora::kohya_text_encoder_targets()
                                               : lora::diffusers_text_encoder_targets();
  return lora::inject_lora(text_encoder, targets, lora_config(o),
                           RandomStream{o.trainer.seed, 0x6c6f7465 + encoder_index});
}

fs::path save_finetuned_folder(const fs::path& base, models::UNet2DConditionModel<float>& unet,
                               const fs::path& output_dir) {
  // diffusers' train_text_to_image.py saves the whole pipeline: the base folder's other
  // components as they were, the UNet's weights as trained (one F32 file, whatever the base's
  // sharding or variants were).
  const fs::path unet_dir = output_dir / "unet";
  for (const auto& entry : fs::directory_iterator(base)) {
    const fs::path to = output_dir / entry.path().filename();
    if (entry.path().filename() == "unet") continue;
    if (entry.is_directory())
      fs::copy(entry.path(), to,
               fs::copy_options::recursive | fs::copy_options::overwrite_existing);
    else if (entry.is_regular_file())
      fs::copy_file(entry.path(), to, fs::copy_options::overwrite_existing);
  }
  fs::create_directories(unet_dir);
  for (const auto& entry : fs::directory_iterator(unet_dir))
    if (entry.is_regular_file() && entry.path().filename() != "config.json")
      fs::remove(entry.path());
  fs::copy_file(base / "unet" / "config.json", unet_dir / "config.json",
                fs::copy_options::overwrite_existing);
  const fs::path weights = unet_dir / "diffusion_pytorch_model.safetensors";
  pipeline::save_model_weights(unet, weights);
  return weights;
}

std::size_t generate_class_images(const TrainCommandOptions& o, pipeline::ModelFolder& model) {
  if (!o.trainer.with_prior_preservation) return 0;
  const fs::path dir = o.class_data_dir;
  std::size_t have = 0;
  if (fs::is_directory(dir)) {
    try {
      have = scan_dreambooth_folder(dir.string(), o.class_prompt).size();
    } catch (const Error&) {  // no images yet; a bad image is reported by the scan that follows
    }
  }
  const auto wanted = std::size_t(o.num_class_images);
  if (have >= wanted) return 0;
  fs::create_directories(dir);
  SampleOptions so;
  so.num_inference_steps = 50;  // StableDiffusionPipeline's defaults, as diffusers calls it
  so.guidance_scale = 7.5;
  const auto size = std::size_t(o.resolution);
  std::size_t written = 0;
  for (std::size_t batch = 0; have + written < wanted; ++batch) {
    const std::size_t n = std::min(std::size_t(o.sample_batch_size), wanted - have - written);
    so.seed = o.trainer.seed + batch;
    const Tensor4<float> images = pipeline::generate_images(
        model, {o.class_prompt}, "", n, pipeline::default_sampler(model.scheduler), size, size, so);
    for (std::size_t i = 0; i < n; ++i, ++written) {
      const fs::path path = dir / (std::to_string(have + written) + "-generated.png");
      require(!fs::exists(path), fn, "cannot write the class image '", path.string(),
              "': the file exists");
      const Tensor3<float> image = xt::view(images, i);
      save_png(path.string(), tensor_to_image(image));
    }
  }
  return written;
}

namespace {

// Whether the run trains with flow matching: --objective, else the model's scheduler config.
// A DDPM run needs a DDPM scheduler config; the flags of the other objective are refused.
bool flow_objective(const TrainCommandOptions& o, const SamplingConfig& scheduler) {
  require(o.objective.empty() || o.objective == "ddpm" || o.objective == "flow", fn,
          "--objective is '", o.objective, "', expected ddpm or flow");
  const bool flow = o.objective.empty() ? scheduler.flow.has_value() : o.objective == "flow";
  if (!flow) {
    require(!scheduler.flow, fn,
            "--objective ddpm: the model's scheduler is FlowMatchEulerDiscreteScheduler, which "
            "has no DDPM noise schedule (use --objective flow)");
    const FlowMatchTimestepOptions d;
    const FlowMatchTimestepOptions& f = o.flow;
    require(o.timestep_sampling == "sigma" && o.weighting_scheme == "none" &&
                f.logit_mean == d.logit_mean && f.logit_std == d.logit_std &&
                f.mode_scale == d.mode_scale && f.sigmoid_scale == d.sigmoid_scale &&
                f.discrete_flow_shift == d.discrete_flow_shift &&
                f.noising_weight == d.noising_weight && f.noising_bias == d.noising_bias &&
                f.timestep_shift == d.timestep_shift &&
                f.min_noising_strength == d.min_noising_strength &&
                f.max_noising_strength == d.max_noising_strength,
            fn,
            "flow-matching flags (--timestep_sampling, --weighting_scheme, --logit_mean, ...) "
            "were given to a DDPM run: add --objective flow");
    return false;
  }
  const auto refuse = [](bool given, const char* flag) {
    require(!given, fn, flag,
            " belongs to DDPM training (an SNR weighting, prediction type or integer-timestep "
            "range); flow matching's are --timestep_sampling and --weighting_scheme");
  };
  refuse(o.snr_gamma > 0, "--snr_gamma");
  refuse(o.p2_gamma > 0, "--p2_gamma");
  refuse(o.v_pred_like_loss > 0, "--v_pred_like_loss");
  refuse(o.trainer.weighting.debiased_estimation_loss, "--debiased_estimation_loss");
  refuse(o.trainer.weighting.scale_v_pred_loss_like_noise_pred,
         "--scale_v_pred_loss_like_noise_pred");
  refuse(!o.prediction_type.empty(), "--prediction_type");
  refuse(o.v_parameterization, "--v_parameterization");
  refuse(o.min_timestep >= 0 || o.max_timestep >= 0, "--min_timestep / --max_timestep");
  refuse(o.trainer.timestep_bias_strategy != "none", "--timestep_bias_strategy");
  refuse(o.zero_terminal_snr, "--zero_terminal_snr");
  return true;
}

// The flow-matching σ density of the flags.
FlowMatchTimestepOptions flow_timestep_options(const TrainCommandOptions& o) {
  FlowMatchTimestepOptions f = o.flow;
  f.timestep_sampling = parse_flow_timestep_sampling(o.timestep_sampling);
  f.weighting_scheme = parse_flow_weighting_scheme(o.weighting_scheme);
  return f;
}

}  // namespace

TrainRunResult run_train(const TrainCommandOptions& o, std::FILE* log, const TrainStepHook& on_step,
                         train::Collective* collective) {
  if (!o.dataset_config.empty() && o.dataset_subsets.empty()) {  // the run the config describes
    TrainCommandOptions resolved = o;
    resolved.dataset_subsets = read_dataset_config(o.dataset_config, resolved);
    return run_train(resolved, log, on_step, collective);
  }
  // Data parallelism: every rank trains; rank 0 alone prints, draws and writes files.
  const bool writer = !collective || collective->rank() == 0;
  if (!writer) log = nullptr;
  // Pyramid noise is normalised over the whole micro-batch, which no rank holds.
  require(!collective || collective->size() == 1 || o.trainer.noise.multires_noise_iterations == 0,
          fn, "--multires_noise_iterations with ", collective ? collective->size() : 1,
          " ranks: pyramid noise is normalised over the whole micro-batch, which no rank holds; "
          "train it in one process");
  set_threads(fn, o.threads);
  const lora::LoraFormat format = check_options(o);

  pipeline::ModelFolderOptions folder_options;
  folder_options.clip_skip = o.clip_skip > 1 ? o.clip_skip - 1 : 0;  // kohya's count → diffusers'
  require(!o.full_finetune || !fs::is_regular_file(o.pretrained_model_name_or_path), fn,
          "--full_finetune writes a diffusers folder from the base folder's other components; '",
          o.pretrained_model_name_or_path,
          "' is a single file (convert it to a diffusers folder first, or train a LoRA)");
  pipeline::ModelFolder model = [&] {
    // frozen while loading (no gradient per weight); --full_finetune unfreezes the UNet below
    const nn::FrozenConstruction frozen;
    return load_model(o.pretrained_model_name_or_path, o.single_file, folder_options);
  }();
  if (o.zero_terminal_snr) model.scheduler.train.rescale_betas_zero_snr = true;
  const bool flow = flow_objective(o, model.scheduler);
  if (writer)
    if (const std::size_t n = generate_class_images(o, model); n > 0 && log)
      std::fprintf(log, "difftrain train: drew %zu class images into %s\n", n,
                   o.class_data_dir.c_str());
  if (collective) collective->barrier();  // the class images are there for every rank
  if (flow && !model.scheduler.flow) {  // a DDPM model trained for flow matching: kohya's scheduler
    FlowMatchEulerDiscreteSchedulerConfig config;
    config.num_train_timesteps = model.scheduler.train.num_train_timesteps;
    config.shift = o.flow.discrete_flow_shift;
    config.validate("--discrete_flow_shift");
    model.scheduler.flow = config;  // validation samples with it; --full_finetune saves it
  }
  ImageCaptionDataSource data = make_data_source(o, model, log, collective);
  (void)model.latent_shape(std::size_t(o.resolution), std::size_t(o.resolution));

  if (o.full_finetune)
    nn::set_trainable<float>(model.unet, true);
  else if (!o.network_train_text_encoder_only)
    inject_adapters(model.unet, o);
  if (nn::parse_mixed_precision(o.mixed_precision)) nn::store_frozen_weights_bf16(model.unet);
  const bool text_encoder_adapted = !inject_text_encoder_adapters(model.text_encoder, o).empty();
  if (model.text_encoder_2) inject_text_encoder_adapters(*model.text_encoder_2, o, 1);

  const std::int64_t micro_per_epoch = std::int64_t(data.steps_per_epoch());
  const train::TrainerOptions t = trainer_options(o, micro_per_epoch);
  FolderLatentEncoder latent_encoder;
  std::optional<CachedLatentSource> cached;
  const fs::path cache_dir =
      o.disk_cache_dir.empty() ? fs::path(t.output_dir) / "cache" : fs::path(o.disk_cache_dir);
  auto disk_cache = [&](bool on, const char* kind) {
    return on ? std::optional<DiskCache>(std::in_place, cache_dir, kind, log) : std::nullopt;
  };
  if (model.vae) {
    if (o.cache_latents || o.cache_latents_to_disk)
      cached.emplace(data, *model.vae, t.seed, disk_cache(o.cache_latents_to_disk, "latents"));
    else
      latent_encoder.vae.emplace(*model.vae, RandomStream{t.seed, 0x766165});
  }
  // The text-encoder cache's disk part (set below), for the report.
  const std::optional<DiskCache>* text_encoder_disk = nullptr;
  // The loop, for the step of either objective and text encoder (`text`: SD's ClipTextEncoder
  // or SDXL's two encoders).
  auto train_with = [&](auto& step, auto& text) -> TrainRunResult {
    // The trained parameters: the UNet's under their own names, the text encoder's (if any are
    // trainable) under "text_encoder." (checkpoints, EMA, --text_encoder_lr; SDXL's second
    // encoder under "text_encoder.text_encoder_2.").
    nn::ModulePair<models::UNet2DConditionModel<float>, std::remove_reference_t<decltype(text)>>
        trained{model.unet, text, "text_encoder"};
    train::Trainer trainer(step, trained, t);
    if (collective) trainer.set_collective(collective);

    {
      std::error_code ec;
      fs::create_directories(t.output_dir, ec);
      require(!ec && fs::is_directory(t.output_dir), fn, "cannot create --output_dir '",
              t.output_dir, "': ", ec ? ec.message() : std::string("it is not a folder"));
    }
    // Checkpoint housekeeping is logged: leftovers of a killed run recovered or removed (now, not
    // at the first save), which checkpoint "latest" took and what it skipped.
    const train::CheckpointLog checkpoint_log = [log](const std::string& line) {
      if (log) std::fprintf(log, "difftrain train: %s\n", line.c_str());
    };
    trainer.set_checkpoint_log(checkpoint_log);
    if (writer) train::recover_checkpoints(t.output_dir, checkpoint_log);
    if (collective) collective->barrier();  // before any rank reads a checkpoint
    const std::string& from = t.resume_from_checkpoint;
    if (!from.empty() &&
        !(from == "latest" && train::list_checkpoints(t.output_dir, checkpoint_log).empty())) {
      trainer.resume(from);
      if (latent_encoder.vae) latent_encoder.vae->set_calls(trainer.micro_batch_index());
    }

    TrainRunResult result;
    result.max_train_steps = t.max_train_steps;
    auto validate = [&](std::int64_t step_number) {
      if (o.validation_prompt.empty() || !writer) return;
      trainer.eval_weights();  // schedule-free: sample with the evaluation weights
      result.validation_images.push_back(save_validation_grid(o, model, step_number));
      trainer.train_weights();
    };
    // The result: the LoRA file, or with --full_finetune the model folder with the trained UNet.
    const double started_at = unix_time_now();
    auto save_result = [&] {
      trainer.eval_weights();  // schedule-free: the evaluation weights are the result
      if (train::EmaModel* ema = trainer.ema()) ema->copy_to();  // the EMA weights are the result
      if (!writer) return fs::path();
      if (o.full_finetune) {
        const fs::path unet_file =
            save_finetuned_folder(o.pretrained_model_name_or_path, model.unet, t.output_dir);
        if (flow)  // the folder samples as it was trained (a DDPM base trained for flow matching)
          io::write_json_file(fs::path(t.output_dir) / "scheduler" / "scheduler_config.json",
                              model.scheduler.flow->to_json());
        return unet_file;
      }
      lora::LoraSaveOptions so;
      so.metadata =
          lora_metadata(o, t, model, trainer.global_step(), data, micro_per_epoch, started_at);
      const fs::path path = fs::path(t.output_dir) / (o.output_name + ".safetensors");
      std::vector<lora::LoraPart> parts;  // one file: the UNet's part, the text encoder's
      if (!o.network_train_text_encoder_only)
        parts.push_back({models::unet_lora_component(model.unet), lora::collect_lora(model.unet),
                         lora::module_names(model.unet)});
      if (text_encoder_adapted) {
        parts.push_back({model.is_sdxl() ? lora::kLoraSdxlTextEncoder1 : lora::kLoraTextEncoder,
                         lora::collect_lora(model.text_encoder),
                         lora::module_names(model.text_encoder)});
        if (model.text_encoder_2)
          parts.push_back({lora::kLoraSdxlTextEncoder2, lora::collect_lora(*model.text_encoder_2),
                           lora::module_names(*model.text_encoder_2)});
      }
      lora::save_lora(path.string(), parts, format, so);
      return path;
    };

    // The masks (--masked_loss) on the latent grid.
    // The VAE samples micro-batch m's latents with its stream m (encode's call count), also on a
    // rank whose shard of a micro-batch was empty and did not encode.
    auto masked = [&data, &latent_encoder, f = model.vae_scale_factor()](std::uint64_t m) {
      if (latent_encoder.vae) latent_encoder.vae->set_calls(m);
      train::TrainBatch batch = data(m);
      if (batch.mask) batch.mask = area_downsample(*batch.mask, f);
      return batch;
    };

    // The loop: log, checkpoint every checkpointing_steps, validate every validation_epochs.
    ProgressReporter progress(log, o.plain_log);
    // What the disk caches did, in the result and the log.
    auto report_caches = [&] {
      auto report = [&](const std::optional<DiskCache>& disk, DiskCache::Counts& counts) {
        if (!disk) return;
        counts = disk->counts();
        progress.message(message("difftrain train: ", disk->kind(), " cache '",
                                 disk->dir().string(), "': ", counts.loaded, " read, ",
                                 counts.stored, " computed and written, ", counts.damaged,
                                 " damaged"));
      };
      if (cached) report(cached->disk(), result.latent_cache);
      report(*text_encoder_disk, result.text_encoder_cache);
    };
    CsvLog csv =
        writer ? CsvLog(fs::path(t.output_dir) / "training_log.csv", trainer.global_step() > 0)
               : CsvLog();
    InterruptGuard interrupt;
    progress.message(message("difftrain train: ", data.num_examples(), " examples, ",
                             micro_per_epoch, " micro-batches of ", t.train_batch_size,
                             " per epoch, ", t.max_train_steps, " steps from step ",
                             trainer.global_step()));
    std::int64_t epochs_done = std::int64_t(trainer.micro_batch_index()) / micro_per_epoch;
    while (trainer.global_step() < t.max_train_steps) {
      const train::StepLog s = cached ? trainer.train_step(*cached) : trainer.train_step(masked);
      csv.write(s.step, s.loss, s.lr, s.grad_norm, s.skipped);
      if (s.skipped)
        progress.message(message("difftrain train: step ", s.step,
                                 " skipped: its loss or gradient is not finite, the weights were "
                                 "not updated (",
                                 s.skipped_steps,
                                 " skipped so far; --on_nonfinite stop ends the run)"));
      progress.update({s.step, t.max_train_steps, s.loss, s.lr, s.it_per_s});
      if (t.checkpointing_steps > 0 && s.step % t.checkpointing_steps == 0)
        trainer.save_checkpoint();
      const std::int64_t epochs = std::int64_t(trainer.micro_batch_index()) / micro_per_epoch;
      if (epochs > epochs_done) {
        epochs_done = epochs;
        if (epochs % o.validation_epochs == 0 && s.step < t.max_train_steps) validate(s.step);
      }
      if (on_step) on_step(s);
      bool interrupted = interrupt.interrupted();
      if (collective) {  // every rank stops at the same step (mpirun forwards Ctrl-C to all)
        double any = interrupted ? 1 : 0;
        collective->allreduce_sum(std::span<double>(&any, 1));
        interrupted = any > 0;
      }
      if (interrupted) {
        const fs::path where = trainer.save_checkpoint();
        result.lora_file = save_result();
        progress.message(message("interrupted at step ", s.step, ": saved ", where.string(),
                                 " and ", result.lora_file.string()));
        result.interrupted = true;
        result.global_step = trainer.global_step();
        report_caches();
        if (collective) collective->barrier();  // rank 0's files are written when any returns
        return result;
      }
    }
    result.lora_file = save_result();
    validate(trainer.global_step());
    result.global_step = trainer.global_step();
    report_caches();
    progress.message("saved " + result.lora_file.string());
    if (collective) collective->barrier();
    return result;
  };
  // The step of the run's objective with text encoder `encoder`, trained as module `text`.
  auto train_objective = [&](auto& encoder, auto& text) {
    if (flow) {
      const FlowMatchEulerDiscreteScheduler scheduler(*model.scheduler.flow);
      const FlowMatchTimestepOptions density = flow_timestep_options(o);
      DiffusionTrainStep step(scheduler, model.unet, latent_encoder, encoder,
                              FlowMatchLossWeighting{density.weighting_scheme},
                              train::train_step_options(t), FlowMatchTimesteps(scheduler, density));
      return train_with(step, text);
    }
    auto step = train::make_train_step(DdpmScheduler(model.scheduler.train), model.unet,
                                       latent_encoder, encoder, t);
    return train_with(step, text);
  };
  // The run's text encoder: `text`, with --cache_text_encoder_outputs.
  auto train_text = [&](auto& text) {
    CachingTextEncoder<std::remove_reference_t<decltype(text)>> encoder(
        text, o.cache_text_encoder_outputs,
        disk_cache(o.cache_text_encoder_outputs_to_disk, "text_encoder_outputs"));
    text_encoder_disk = &encoder.disk();
    return train_objective(encoder, text);
  };
  if (model.is_sdxl()) {
    models::SdxlTextEncoders encoders = model.sdxl_text_encoders();
    return train_text(encoders);
  }
  return train_text(model.text_encoder);
}

void add_train_options(CLI::App& cmd, TrainCommandOptions& o) {
  cmd.add_option("--config,--config_file", o.config,
                 "JSON or kohya TOML file with the flags as keys (the command line wins)");
  cmd.add_option("--pretrained_model_name_or_path", o.pretrained_model_name_or_path,
                 "diffusers model folder (unet/, text_encoder/, tokenizer/, scheduler/, vae/; "
                 "SDXL: also text_encoder_2/, tokenizer_2/) or an original single-file checkpoint "
                 "(SD 1.x, 2.x, SDXL)");
  add_single_file_options(cmd, o.single_file);
  cmd.add_option("--train_data_dir", o.train_data_dir,
                 "images with .txt captions or a metadata.jsonl");
  cmd.add_option("--caption_column", o.caption_column, "metadata.jsonl caption key");
  cmd.add_option("--caption_extension", o.caption_extension, "caption file extension");
  cmd.add_flag(
      "--enable_bucket", o.enable_bucket,
      "aspect-ratio buckets of about resolution² pixels; a batch holds one bucket (kohya)");
  cmd.add_option("--min_bucket_reso", o.buckets.min_bucket_reso, "smallest bucket side (kohya)");
  cmd.add_option("--max_bucket_reso", o.buckets.max_bucket_reso, "largest bucket side (kohya)");
  cmd.add_option("--bucket_reso_steps", o.buckets.bucket_reso_steps,
                 "bucket sides are multiples of this (kohya; default 64)");
  cmd.add_flag("--bucket_no_upscale", o.buckets.bucket_no_upscale,
               "buckets from the image sizes, shrinking large images only (kohya)");
  CaptionOptions::for_each(
      o.caption, [&cmd](std::string name, std::string alias, auto& value, const char* help) {
        name = "--" + name + (alias.empty() ? "" : ",--" + alias);
        if constexpr (std::is_same_v<std::decay_t<decltype(value)>, bool>)
          cmd.add_flag(name, value, help);
        else
          cmd.add_option(name, value, help);
      });
  cmd.add_option("--instance_data_dir", o.instance_data_dir, "DreamBooth instance images");
  cmd.add_option("--instance_prompt", o.instance_prompt, "DreamBooth instance prompt");
  cmd.add_option("--class_data_dir", o.class_data_dir, "DreamBooth class images");
  cmd.add_option("--class_prompt", o.class_prompt, "DreamBooth class prompt");
  cmd.add_option("--num_class_images", o.num_class_images,
                 "prior preservation: class images used; missing ones are generated (default 100)");
  cmd.add_option("--sample_batch_size", o.sample_batch_size,
                 "images per batch when generating class images");
  cmd.add_option("--dataset_config", o.dataset_config,
                 "kohya's dataset TOML: [general], one [[datasets]] and its [[datasets.subsets]] "
                 "(image_dir, num_repeats, is_reg, class_tokens, caption options, ...)");
  cmd.add_flag("--strict_images", o.strict_images,
               "an image that cannot be read stops the run (default: it is skipped with a "
               "message)");
  cmd.add_flag("--masked_loss", o.masked_loss,
               "weight the loss by a mask per image: --conditioning_data_dir or --alpha_mask "
               "(kohya)");
  cmd.add_flag("--alpha_mask", o.alpha_mask,
               "the images' alpha channel is the loss mask (kohya; enables the masked loss)");
  cmd.add_option("--conditioning_data_dir", o.conditioning_data_dir,
                 "masks for --masked_loss: an image of the same name per training image, white = "
                 "trained (kohya)");
  cmd.add_option("--reg_data_dir", o.reg_data_dir,
                 "kohya: regularisation images in \"<repeats>_<name>\" folders, balanced to the "
                 "training images' count, loss × --prior_loss_weight");
  cmd.add_flag("--with_prior_preservation", o.trainer.with_prior_preservation,
               "add the class images' loss × prior_loss_weight");
  cmd.add_option("--prior_loss_weight", o.trainer.prior_loss_weight, "λ of the prior loss");
  cmd.add_option("--resolution", o.resolution, "training image size");
  cmd.add_flag("--center_crop", o.center_crop, "center crop (default: random crop)");
  cmd.add_flag("--random_flip", o.random_flip, "random horizontal flips");
  cmd.add_option("--image_interpolation_mode", o.image_interpolation_mode,
                 "resize filter, as PIL: bilinear (default, diffusers v0.26), lanczos (newer "
                 "diffusers' default), bicubic, box, hamming, nearest, nearest_exact");
  cmd.add_flag("--cache_latents", o.cache_latents, "encode each image with the VAE once");
  cmd.add_flag("--cache_latents_to_disk", o.cache_latents_to_disk,
               "--cache_latents, kept in --disk_cache_dir for later runs (kohya)");
  cmd.add_flag("--cache_text_encoder_outputs", o.cache_text_encoder_outputs,
               "encode each caption with the text encoder once (kohya; needs fixed captions: no "
               "--shuffle_caption or --caption_tag_dropout_rate)");
  cmd.add_flag("--cache_text_encoder_outputs_to_disk", o.cache_text_encoder_outputs_to_disk,
               "--cache_text_encoder_outputs, kept in --disk_cache_dir for later runs (kohya)");
  cmd.add_option("--disk_cache_dir", o.disk_cache_dir,
                 "folder of the disk caches, entries named by a hash of all they depend on "
                 "(default: <output_dir>/cache)");
  cmd.add_option("--clip_skip", o.clip_skip,
                 "kohya's count: 2 uses the text encoder's penultimate layer (0, 1: the last)");
  cmd.add_flag("--zero_terminal_snr", o.zero_terminal_snr,
               "rescale the betas to zero terminal SNR (kohya; scheduler rescale_betas_zero_snr)");
  cmd.add_option("--rank,--network_dim", o.rank, "LoRA rank");
  cmd.add_option("--lora_alpha,--network_alpha", o.lora_alpha, "LoRA alpha (default: = rank)");
  cmd.add_flag("--use_rslora", o.use_rslora, "rsLoRA: scale alpha/√rank (PEFT)");
  cmd.add_option("--lora_dropout", o.lora_dropout, "dropout on the adapters' input (PEFT)");
  cmd.add_option("--network_dropout", o.network_dropout,
                 "dropout on the adapters' rank activations A·x (kohya)");
  cmd.add_option("--rank_dropout", o.rank_dropout, "dropout of LoRA ranks (kohya)");
  cmd.add_option("--module_dropout", o.module_dropout,
                 "probability of skipping an adapter in a forward (kohya)");
  cmd.add_option("--init_lora_weights", o.init_lora_weights,
                 "LoRA A init: gaussian (default, diffusers' scripts) or kaiming_uniform (kohya)");
  cmd.add_option("--lora_target_modules", o.lora_target_modules,
                 "module names to adapt (default to_q to_k to_v to_out.0)");
  cmd.add_option("--lora_target_set", o.lora_target_set,
                 "attention (--lora_target_modules, diffusers) or kohya (every Linear and 1×1 "
                 "conv of the transformer blocks, as kohya's networks.lora)");
  cmd.add_option("--conv_dim", o.conv_dim,
                 "kohya LoCon: rank of the ResNet and sampler 3×3 convs (their Linear and 1×1 "
                 "convs take --rank; 0: off)");
  cmd.add_option("--conv_alpha", o.conv_alpha, "kohya LoCon: alpha of the 3×3 convs (default 1)");
  cmd.add_option("--network_args", o.network_args,
                 "kohya key=value network arguments: conv_dim, conv_alpha, rank_dropout, "
                 "module_dropout");
  cmd.add_option("--save_format", o.save_format, "kohya (default) or peft");
  cmd.add_flag("--full_finetune", o.full_finetune,
               "train every UNet weight (diffusers' train_text_to_image.py) and write a model "
               "folder to --output_dir instead of a LoRA");
  cmd.add_option("--output_name", o.output_name, "LoRA file name without .safetensors");
  cmd.add_option("--save_model_as", o.save_model_as,
                 "file type of the LoRA (kohya): safetensors, the only one written");
  cmd.add_option("--train_batch_size", o.trainer.train_batch_size, "micro-batch size");
  cmd.add_option("--gradient_accumulation_steps", o.trainer.gradient_accumulation_steps,
                 "micro-batches per optimizer step");
  cmd.add_option("--max_train_steps", o.max_train_steps,
                 "optimizer steps (default: num_train_epochs × steps per epoch)");
  cmd.add_option("--num_train_epochs", o.num_train_epochs, "epochs when no max_train_steps");
  cmd.add_option("--learning_rate", o.trainer.learning_rate, "learning rate");
  cmd.add_option("--optimizer_type,--optimizer", o.trainer.optimizer,
                 "adamw (default), sgd, lion, adafactor, prodigy, adamw_schedulefree (kohya's "
                 "spellings too: AdamW, SGDNesterov, Lion, Adafactor, Prodigy, AdamWScheduleFree)");
  cmd.add_option("--optimizer_args", o.trainer.optimizer_args,
                 "kohya key=value optimizer arguments, e.g. relative_step=False betas=0.9,0.99");
  cmd.add_option("--unet_lr", o.unet_lr,
                 "learning rate of the UNet's adapters (kohya; 0: the "
                 "learning rate)");
  cmd.add_option("--text_encoder_lr", o.text_encoder_lr,
                 "learning rate of the text encoder's adapters (kohya; 0: the learning rate)");
  cmd.add_flag("--train_text_encoder", o.train_text_encoder,
               "train a LoRA on the text encoder too (diffusers)");
  cmd.add_flag("--network_train_unet_only", o.network_train_unet_only,
               "train the UNet's adapters only (kohya; the default without --train_text_encoder)");
  cmd.add_flag("--network_train_text_encoder_only", o.network_train_text_encoder_only,
               "train the text encoder's adapters only (kohya)");
  cmd.add_flag("--scale_lr", o.trainer.scale_lr, "lr × accumulation × batch size");
  cmd.add_option("--lr_scheduler", o.trainer.lr_scheduler,
                 "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, "
                 "polynomial");
  cmd.add_option("--lr_warmup_steps", o.lr_warmup_steps,
                 "warm-up steps, or below 1 a ratio of the training steps (kohya)");
  cmd.add_option("--lr_num_cycles", o.trainer.lr_num_cycles,
                 "cosine_with_restarts: number of cycles (default 1)");
  cmd.add_option("--lr_power", o.trainer.lr_power, "polynomial: power");
  cmd.add_option("--loraplus_lr_ratio", o.trainer.loraplus_lr_ratio,
                 "LoRA+: learning rate of the up (B) matrices × ratio (kohya)");
  cmd.add_flag("--use_ema", o.trainer.use_ema,
               "keep an EMA of the trained weights (EMAModel defaults) and save it");
  cmd.add_option("--max_grad_norm", o.trainer.max_grad_norm, "gradient clipping norm (<= 0: off)");
  cmd.add_option("--mixed_precision", o.mixed_precision,
                 "no (fp32, default) or bf16: the UNet's frozen weights stored in bf16");
  cmd.add_flag("--gradient_checkpointing", o.trainer.gradient_checkpointing,
               "recompute the UNet's block activations in backward: less memory, same gradients");
  cmd.add_option("--snr_gamma,--min_snr_gamma", o.snr_gamma, "Min-SNR-γ weighting (0: off)");
  cmd.add_option("--p2_gamma", o.p2_gamma, "P2 loss weighting strength (0: off)");
  cmd.add_option("--v_pred_like_loss", o.v_pred_like_loss,
                 "add λ × a v-prediction-like loss (kohya; 0: off)");
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
  cmd.add_option("--objective", o.objective,
                 "ddpm or flow (flow matching: x_t = (1 − σ)·x0 + σ·eps, target eps − x0); "
                 "default: flow for a FlowMatchEulerDiscreteScheduler model, ddpm otherwise");
  cmd.add_option("--timestep_sampling", o.timestep_sampling,
                 "flow: σ density, kohya's sigma (default: the scheduler's sigmas at "
                 "--weighting_scheme's u), uniform, sigmoid, shift, flux_shift, or OneTrainer's "
                 "inverted_parabola, heavy_tail");
  cmd.add_option("--weighting_scheme", o.weighting_scheme,
                 "flow: none (default), sigma_sqrt, logit_normal, mode or cosmap (diffusers; "
                 "logit_normal and mode pick u, sigma_sqrt and cosmap weigh the loss)");
  cmd.add_option("--logit_mean", o.flow.logit_mean, "flow, logit_normal: mean (default 0)");
  cmd.add_option("--logit_std", o.flow.logit_std, "flow, logit_normal: std (default 1)");
  cmd.add_option("--mode_scale", o.flow.mode_scale, "flow, mode: scale (default 1.29)");
  cmd.add_option("--sigmoid_scale", o.flow.sigmoid_scale,
                 "flow, sigmoid / shift / flux_shift: scale of the normal (kohya; default 1)");
  cmd.add_option("--discrete_flow_shift", o.flow.discrete_flow_shift,
                 "flow: the shift of --timestep_sampling shift, and of the scheduler made for a "
                 "DDPM model folder (kohya; default 3)");
  cmd.add_option("--noising_weight", o.flow.noising_weight,
                 "flow, inverted_parabola / heavy_tail: OneTrainer's noising_weight");
  cmd.add_option("--noising_bias", o.flow.noising_bias,
                 "flow, inverted_parabola: OneTrainer's noising_bias");
  cmd.add_option("--timestep_shift", o.flow.timestep_shift,
                 "flow, inverted_parabola / heavy_tail: OneTrainer's timestep_shift");
  cmd.add_option("--min_noising_strength", o.flow.min_noising_strength,
                 "flow, inverted_parabola / heavy_tail: OneTrainer's min_noising_strength");
  cmd.add_option("--max_noising_strength", o.flow.max_noising_strength,
                 "flow, inverted_parabola / heavy_tail: OneTrainer's max_noising_strength");
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
  cmd.add_option("--seed", o.trainer.seed, "seed of every random draw (0 to 2^64 − 1)")
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("--output_dir", o.trainer.output_dir, "where the LoRA, checkpoints and logs go");
  cmd.add_option("--checkpointing_steps", o.trainer.checkpointing_steps,
                 "save a checkpoint every N steps (0: never)");
  cmd.add_option("--on_nonfinite", o.on_nonfinite,
                 "a step whose loss or gradient is NaN/Inf: skip (default; the weights are not "
                 "updated, the console says so) or stop (an error naming the step)");
  cmd.add_option("--checkpoints_total_limit", o.checkpoints_total_limit,
                 "keep the last N checkpoints (0: all)");
  cmd.add_option("--resume_from_checkpoint", o.trainer.resume_from_checkpoint,
                 "\"latest\" or a checkpoint folder");
  cmd.add_option("--validation_prompt", o.validation_prompt, "prompt of the validation grids");
  cmd.add_option("--num_validation_images", o.num_validation_images, "images per grid");
  cmd.add_option("--validation_epochs", o.validation_epochs, "validate every N epochs");
  cmd.add_option("--validation_inference_steps", o.validation_inference_steps,
                 "sampler steps of the validation images (DDIM; flow Euler for flow matching)");
  cmd.add_option("--validation_guidance_scale", o.validation_guidance_scale,
                 "classifier-free guidance of the validation images");
  add_threads_option(cmd, o.threads);
  cmd.add_flag("--plain_log", o.plain_log, "log lines instead of a progress bar");
}

void apply_dreambooth_defaults(const CLI::App& cmd, TrainCommandOptions& o) {
  if (o.instance_data_dir.empty()) return;
  auto unset = [&](const std::string& flag) { return cmd.get_option(flag)->count() == 0; };
  if (unset("--train_batch_size")) o.trainer.train_batch_size = 4;
  if (unset("--learning_rate")) o.trainer.learning_rate = 5e-4;
  if (unset("--num_train_epochs")) o.num_train_epochs = 1;
  if (unset("--validation_epochs")) o.validation_epochs = 50;
  if (unset("--output_dir")) o.trainer.output_dir = "lora-dreambooth-model";
}

void add_train_command(CLI::App& app, int& exit_code, train::Collective* collective) {
  auto o = std::make_shared<TrainCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "train", "LoRA / DreamBooth fine-tuning of a diffusers model folder (diffusers' flags)");
  add_train_options(*cmd, *o);
  cmd->callback([cmd, o, &exit_code, collective] {
    bool interrupted = false;
    exit_code = run_command("train", [&] {
      if (!o->config.empty()) apply_config_file(*cmd, o->config);
      apply_dreambooth_defaults(*cmd, *o);
      interrupted = run_train(*o, stderr, {}, collective).interrupted;
    });
    if (exit_code == 0 && interrupted) exit_code = 130;
  });
}

}  // namespace difftrain::tools
