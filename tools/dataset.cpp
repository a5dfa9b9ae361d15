// The folder scanners and ImageCaptionDataSource of dataset.hpp.
#include "dataset.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <sstream>
#include <system_error>
#include <tuple>
#include <utility>

#include "difftrain/io/json_file.hpp"
#include "difftrain/io/regular_file.hpp"
#include "difftrain/models/sdxl_conditioning.hpp"

namespace difftrain::tools {

namespace {

namespace fs = std::filesystem;

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

enum class ImageKind { supported, unsupported, other };

// load_image reads these (libwebp the WebP, stb_image the others); the second list are image
// formats that are refused (a clear error beats silently training on fewer images).
ImageKind image_kind(const fs::path& path) {
  const std::string ext = lower(path.extension().string());
  for (const char* e : {".png", ".jpg", ".jpeg", ".webp", ".bmp"})
    if (ext == e) return ImageKind::supported;
  for (const char* e : {".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl"})
    if (ext == e) return ImageKind::unsupported;
  return ImageKind::other;
}

void check_readable_kind(const char* fn, const fs::path& path) {
  const ImageKind kind = image_kind(path);
  require(kind != ImageKind::unsupported, fn, "'", path.string(), "' is a ",
          path.extension().string(),
          " image, which is not supported (PNG, JPEG, WebP and BMP are): convert it");
  require(kind == ImageKind::supported, fn, "'", path.string(),
          "' is not a PNG, JPEG, WebP or BMP image (by its extension)");
}

std::string strip(const std::string& s) {
  const auto first = s.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) return "";
  return s.substr(first, s.find_last_not_of(" \t\r\n") - first + 1);
}

// kohya: the first line of the caption file, stripped (a UTF-8 byte-order mark is dropped).
std::string read_caption(const fs::path& path) {
  // A caption is a line of text: 16 MiB is far beyond any, and refuses a wrong file at once.
  const std::string text =
      io::read_regular_file(path.string(), "scan_image_folder (caption file)", 1u << 24);
  std::string line = text.substr(0, text.find('\n'));
  if (line.rfind("\xEF\xBB\xBF", 0) == 0) line.erase(0, 3);
  return strip(line);
}

void check_folder(const char* fn, const fs::path& dir) {
  std::error_code ec;
  require(fs::is_directory(dir, ec), fn, "'", dir.string(), "' is not a folder");
}

// Regular files directly in `dir` (not recursive), sorted by name for a deterministic order.
std::vector<fs::path> sorted_files(const fs::path& dir) {
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(dir))
    if (entry.is_regular_file()) files.push_back(entry.path());
  std::sort(files.begin(), files.end());
  return files;
}

// Fisher–Yates: for i = n−1 … 1, swap v[i] with v[j], j = uniform_int(rs, i, 0, i + 1).
void shuffle_in_place(std::vector<std::size_t>& v, RandomStream rs) {
  for (std::size_t i = v.size(); i-- > 1;)
    std::swap(v[i], v[std::size_t(uniform_int(rs, i, 0, std::int64_t(i) + 1))]);
}

// The images directly in `dir` (sorted, by extension; an unreadable kind is an Error).
std::vector<fs::path> folder_images(const char* fn, const fs::path& dir) {
  std::vector<fs::path> images;
  for (const fs::path& file : sorted_files(dir)) {
    if (image_kind(file) == ImageKind::other) continue;
    check_readable_kind(fn, file);
    images.push_back(file);
  }
  return images;
}

// kohya: a.png's caption file a<caption_extension>, and its caption if the file exists.
std::pair<fs::path, std::optional<std::string>> sidecar_caption(const fs::path& image,
                                                                const ImageFolderOptions& o) {
  fs::path caption_file = image;
  caption_file.replace_extension(o.caption_extension);
  std::error_code ec;
  if (!fs::is_regular_file(caption_file, ec)) return {caption_file, std::nullopt};
  return {caption_file, read_caption(caption_file)};
}

std::vector<Example> read_metadata_jsonl(const fs::path& dir, const ImageFolderOptions& o) {
  constexpr const char* fn = "scan_image_folder";
  const fs::path file = dir / "metadata.jsonl";
  std::istringstream in(io::read_regular_file(file.string(), fn));
  std::map<std::string, Example> captions;  // file_name → captions, sorted by file_name
  std::string line;
  for (std::size_t number = 1; std::getline(in, line); ++number) {
    if (strip(line).empty()) continue;
    const nlohmann::json row = io::parse_json(line, fn, message(file.string(), " line ", number));
    require(row.is_object() && row.contains("file_name") && row["file_name"].is_string(), fn,
            file.string(), " line ", number, " has no string \"file_name\"");
    const std::string name = row["file_name"].get<std::string>();
    // diffusers' imagefolder reads file_name relative to the folder: a name leaving it is refused.
    const fs::path relative = fs::path(name).lexically_normal();
    require(!name.empty() && relative.is_relative() && *relative.begin() != "..", fn, file.string(),
            " line ", number, " has file_name '", name, "', expected a path inside the folder");
    Example caption;
    const auto column = row.find(o.caption_column);
    if (column != row.end() && column->is_string()) {
      caption.caption = column->get<std::string>();
    } else if (column != row.end() && column->is_array()) {
      // diffusers: random.choice(caption) in training, caption[0] otherwise.
      require(!column->empty(), fn, file.string(), " line ", number, " ('", name,
              "') has an empty list in the caption column \"", o.caption_column, "\"");
      for (const auto& c : *column) {
        require(c.is_string(), fn, file.string(), " line ", number, " ('", name,
                "') has a non-string element in the caption list \"", o.caption_column,
                "\": ", io::json_excerpt(c));
        caption.caption_choices.push_back(c.get<std::string>());
      }
      caption.caption = caption.caption_choices[0];
      if (caption.caption_choices.size() == 1) caption.caption_choices.clear();
    } else {
      require(o.allow_missing_captions, fn, file.string(), " line ", number, " ('", name,
              "') has no string caption column \"", o.caption_column, "\"");
    }
    require(captions.emplace(name, caption).second, fn, file.string(), " line ", number,
            " repeats file_name '", name, "'");
  }
  std::vector<Example> out;
  for (auto& [name, caption] : captions) {
    const fs::path image = dir / name;
    check_readable_kind(fn, image);
    std::error_code ec;
    require(fs::is_regular_file(image, ec), fn, file.string(), " lists '", name,
            "', which does not exist");
    caption.image_path = image.string();
    out.push_back(std::move(caption));
  }
  return out;
}

}  // namespace

std::vector<Example> scan_image_folder(const std::string& folder,
                                       const ImageFolderOptions& options) {
  namespace fs = std::filesystem;
  constexpr const char* fn = "scan_image_folder";
  const fs::path dir(folder);
  check_folder(fn, dir);
  std::vector<Example> out;
  std::error_code ec;
  if (fs::is_regular_file(dir / "metadata.jsonl", ec)) {
    out = read_metadata_jsonl(dir, options);
  } else {
    for (const fs::path& file : folder_images(fn, dir)) {
      const auto [caption_file, caption] = sidecar_caption(file, options);
      require(caption || options.allow_missing_captions, fn, "image '", file.string(),
              "' has no caption file '", caption_file.filename().string(),
              "' (or use a metadata.jsonl, or allow missing captions)");
      out.push_back({file.string(), caption.value_or("")});
    }
  }
  require(!out.empty(), fn, "no PNG, JPEG, WebP or BMP images in '", folder, "'");
  return out;
}

bool is_kohya_folder(const std::string& folder) {
  std::error_code ec;
  const fs::path dir(folder);
  if (!fs::is_directory(dir, ec) || fs::exists(dir / "metadata.jsonl", ec)) return false;
  for (const auto& entry : fs::directory_iterator(dir, ec))
    if (entry.is_directory() && kohya_folder_repeats(entry.path().filename().string()) > 0)
      return true;
  return false;
}

std::size_t kohya_folder_repeats(const std::string& name) {
  const auto underscore = name.find('_');
  if (underscore == 0 || underscore == std::string::npos || underscore > 9) return 0;
  std::size_t n = 0;
  for (std::size_t k = 0; k < underscore; ++k) {
    if (!std::isdigit(static_cast<unsigned char>(name[k]))) return 0;
    n = 10 * n + std::size_t(name[k] - '0');
  }
  return n;
}

std::vector<Example> scan_kohya_folder(const std::string& folder, const ImageFolderOptions& options,
                                       bool is_reg, std::vector<std::string>* ignored) {
  constexpr const char* fn = "scan_kohya_folder";
  const fs::path dir(folder);
  check_folder(fn, dir);
  std::vector<fs::path> subfolders;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.is_directory()) {
      subfolders.push_back(entry.path());
    } else if (entry.is_regular_file()) {
      require(image_kind(entry.path()) == ImageKind::other, fn, "'", entry.path().string(),
              "' is an image directly in '", folder,
              "', whose images belong in \"<repeats>_<name>\" folders (kohya's layout)");
    }
  }
  std::sort(subfolders.begin(), subfolders.end());
  std::vector<Example> out;
  for (const fs::path& sub : subfolders) {
    const std::string name = sub.filename().string();
    const std::size_t repeats = kohya_folder_repeats(name);
    if (repeats == 0) {
      if (ignored) ignored->push_back(sub.string());
      continue;
    }
    for (Example& e : scan_repeat_folder(sub.string(), options, name.substr(name.find('_') + 1),
                                         repeats, is_reg))
      out.push_back(std::move(e));
  }
  require(!out.empty(), fn, "no \"<repeats>_<name>\" image folders in '", folder, "'");
  return out;
}

std::vector<Example> scan_repeat_folder(const std::string& folder,
                                        const ImageFolderOptions& options,
                                        const std::string& class_tokens, std::size_t repeats,
                                        bool is_reg, std::size_t subset) {
  constexpr const char* fn = "scan_repeat_folder";
  check_folder(fn, folder);
  std::vector<Example> out;
  for (const fs::path& file : folder_images(fn, folder)) {
    Example e{file.string(), sidecar_caption(file, options).second.value_or(class_tokens)};
    e.num_repeats = repeats;
    e.is_reg = is_reg;
    e.subset = subset;
    out.push_back(std::move(e));
  }
  require(!out.empty(), fn, "no PNG, JPEG, WebP or BMP images in '", folder, "'");
  return out;
}

std::vector<Example> balance_regularization(const std::vector<Example>& train,
                                            std::vector<Example> reg) {
  std::size_t target = 0;
  for (const Example& e : train) target += e.num_repeats;
  std::vector<Example> used;
  std::size_t n = 0;
  for (Example& e : reg) {  // first pass: whole images with their repeats
    if (n >= target) break;
    n += e.num_repeats;
    used.push_back(std::move(e));
  }
  for (std::size_t k = 0; n < target && !used.empty(); k = (k + 1) % used.size(), ++n)
    used[k].num_repeats += 1;  // then one more repeat each in turn
  return used;
}

std::vector<Example> scan_dreambooth_folder(const std::string& folder, const std::string& prompt) {
  constexpr const char* fn = "scan_dreambooth_folder";
  check_folder(fn, folder);
  std::vector<Example> out;
  for (const fs::path& file : folder_images(fn, folder)) out.push_back({file.string(), prompt});
  require(!out.empty(), fn, "no PNG, JPEG, WebP or BMP images in '", folder, "'");
  return out;
}

ImageCaptionDataSource::ImageCaptionDataSource(std::vector<Example> examples, Tokenize tokenize,
                                               DataSourceOptions options,
                                               std::vector<Example> class_examples)
    : sets_{std::move(examples), std::move(class_examples)},
      tokenize_(std::move(tokenize)),
      options_(options) {
  constexpr const char* fn = "ImageCaptionDataSource";
  require(!sets_[0].empty(), fn, "no training examples");
  require(bool(tokenize_), fn, "no tokenizer function");
  require(options_.resolution > 0, fn, "resolution is ", options_.resolution, ", expected > 0");
  require(options_.train_batch_size > 0, fn, "train_batch_size is 0, expected >= 1");
  require(options_.num_shards >= 1, fn, "num_shards is 0, expected >= 1");
  require(options_.shard_index < options_.num_shards, fn, "shard_index is ", options_.shard_index,
          ", expected < num_shards (", options_.num_shards, ")");
  options_.caption.validate();
  for (const CaptionOptions& c : options_.subset_captions) c.validate();
  require(std::isfinite(options_.reg_loss_weight) && options_.reg_loss_weight >= 0, fn,
          "reg_loss_weight is ", options_.reg_loss_weight, ", expected a finite value >= 0");
  for (std::size_t k = 0; k < sets_[0].size(); ++k) {
    const Example& e = sets_[0][k];
    require(e.num_repeats >= 1, fn, "'", e.image_path, "' has num_repeats 0, expected >= 1");
    require(options_.subset_captions.empty() || e.subset < options_.subset_captions.size(), fn, "'",
            e.image_path, "' has subset ", e.subset, ", expected < ",
            options_.subset_captions.size(), " (the subsets' caption options)");
    first_entry_.push_back(entries_.size());
    entries_.insert(entries_.end(), e.num_repeats, k);
    has_reg_ = has_reg_ || e.is_reg;
  }
  for (int s = 0; s < 2; ++s) {
    cache_[s].resize(options_.cache_images ? sets_[s].size() : 0);
    original_size_[s].resize(sets_[s].size());
  }
  mask_cache_.resize(options_.cache_images && has_masks() ? sets_[0].size() : 0);
  require(!has_masks() || sets_[1].empty(), fn,
          "masked loss with DreamBooth class images is not supported: give regularisation images "
          "as kohya does (--reg_data_dir), with masks of their own");
  require(!(options_.alpha_mask && !options_.mask_dir.empty()), fn,
          "give one mask source: the alpha channel or a mask folder");
  if (options_.buckets) assign_buckets();
}

void ImageCaptionDataSource::assign_buckets() {
  constexpr const char* fn = "ImageCaptionDataSource";
  const BucketOptions& bo = *options_.buckets;
  bo.validate();
  require(sets_[1].empty(), fn,
          "buckets with DreamBooth class images (diffusers' pairing) are not supported: give "
          "regularisation images as kohya does (--reg_data_dir)");
  const std::vector<BucketSize> predefined =
      bo.bucket_no_upscale
          ? std::vector<BucketSize>{}
          : make_bucket_resolutions(bo.resolution_width, bo.resolution_height, bo.min_bucket_reso,
                                    bo.max_bucket_reso, bo.bucket_reso_steps);
  // Each image is decoded once here for its size; with cache_images the resize is kept.
  for (std::size_t k = 0; k < sets_[0].size(); ++k) {
    const Image image = load_image(sets_[0][k].image_path);
    original_size_[0][k] = {image.height, image.width};
    choices_.push_back(select_bucket(bo, predefined, image.width, image.height));
    if (options_.cache_images)
      cache_[0][k] = resize_image(image, choices_[k].resized_width, choices_[k].resized_height,
                                  options_.interpolation);
  }
  for (const BucketChoice& c : choices_) buckets_.push_back(c.bucket);
  std::sort(buckets_.begin(), buckets_.end());
  buckets_.erase(std::unique(buckets_.begin(), buckets_.end()), buckets_.end());
  bucket_rows_.resize(buckets_.size());
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    const BucketSize b = choices_[entries_[i]].bucket;
    bucket_rows_[std::size_t(std::lower_bound(buckets_.begin(), buckets_.end(), b) -
                             buckets_.begin())]
        .push_back(i);
  }
}

std::size_t ImageCaptionDataSource::steps_per_epoch(std::size_t batch_size) const {
  require(batch_size > 0, "steps_per_epoch", "batch_size is 0, expected >= 1");
  if (!options_.buckets) return (num_examples() + batch_size - 1) / batch_size;
  std::size_t steps = 0;
  for (const auto& rows : bucket_rows_) steps += (rows.size() + batch_size - 1) / batch_size;
  return steps;
}

const std::vector<std::vector<std::size_t>>& ImageCaptionDataSource::epoch_batches(
    std::uint64_t epoch) const {
  if (batches_epoch_ == epoch && !batches_.empty()) return batches_;
  const std::size_t b = global_train_batch_size();
  const RandomStream rs = stream().derive(epoch, StreamPurpose::data_permutation);
  batches_.clear();
  for (std::size_t j = 0; j < bucket_rows_.size(); ++j) {
    std::vector<std::size_t> rows = bucket_rows_[j];
    shuffle_in_place(rows, rs.derive(1 + j, 0));
    for (std::size_t first = 0; first < rows.size(); first += b)
      batches_.emplace_back(rows.begin() + std::ptrdiff_t(first),
                            rows.begin() + std::ptrdiff_t(std::min(first + b, rows.size())));
  }
  std::vector<std::size_t> order(batches_.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  shuffle_in_place(order, rs.derive(0, 0));
  std::vector<std::vector<std::size_t>> shuffled;
  for (std::size_t k : order) shuffled.push_back(std::move(batches_[k]));
  batches_ = std::move(shuffled);
  batches_epoch_ = epoch;
  return batches_;
}

std::vector<std::size_t> ImageCaptionDataSource::global_batch_indices(std::uint64_t m) const {
  const std::size_t b = global_train_batch_size(), steps = steps_per_epoch();
  const std::uint64_t epoch = m / steps;
  if (options_.buckets) return epoch_batches(epoch)[std::size_t(m % steps)];
  const std::size_t first = std::size_t(m % steps) * b;
  const std::vector<std::size_t>& perm = order(epoch);
  return {perm.begin() + std::ptrdiff_t(first),
          perm.begin() + std::ptrdiff_t(std::min(first + b, perm.size()))};
}

std::pair<std::size_t, std::size_t> ImageCaptionDataSource::shard_rows(std::uint64_t m) const {
  const std::size_t n = global_batch_size(m), p = options_.num_shards, r = options_.shard_index;
  return {r * n / p, (r + 1) * n / p};
}

std::vector<std::size_t> ImageCaptionDataSource::batch_indices(std::uint64_t m) const {
  std::vector<std::size_t> rows = global_batch_indices(m);
  if (options_.num_shards == 1) return rows;
  const std::size_t n = rows.size(), p = options_.num_shards, r = options_.shard_index;
  return {rows.begin() + std::ptrdiff_t(r * n / p), rows.begin() + std::ptrdiff_t((r + 1) * n / p)};
}

void ImageCaptionDataSource::set_global_rows(train::TrainBatch& batch, std::uint64_t m) const {
  if (options_.num_shards == 1) return;
  const auto [first, last] = shard_rows(m);
  batch.global_rows.clear();
  for (std::size_t j = first; j < last; ++j) batch.global_rows.push_back(j);
  batch.global_batch_size = global_batch_size(m);
}

Image ImageCaptionDataSource::example_image(std::size_t i, std::uint64_t epoch, bool class_set,
                                            models::SdxlSizeConditioning* size) {
  return preprocess(i, epoch, class_set ? 1 : 0, false, size);
}

Image ImageCaptionDataSource::example_mask(std::size_t i, std::uint64_t epoch) {
  require(has_masks(), "example_mask", "the data source has no masks (alpha_mask, mask_dir)");
  return preprocess(i, epoch, 0, true);
}

Image ImageCaptionDataSource::load_mask(std::size_t k) const {
  constexpr const char* fn = "masked loss";
  const fs::path image = sets_[0][k].image_path;
  if (options_.alpha_mask) return load_image_alpha(image.string());
  // kohya: the conditioning image of the same stem, any image extension.
  for (const auto& entry : fs::directory_iterator(options_.mask_dir))
    if (entry.path().stem() == image.stem() && image_kind(entry.path()) != ImageKind::other)
      return load_image(entry.path().string());
  fail(fn, "no mask for '", image.string(), "' in '", options_.mask_dir, "' (expected ",
       image.stem().string(), ".png or another image of that name)");
}

Tensor4<float> ImageCaptionDataSource::masks(const std::vector<std::size_t>& rows,
                                             std::uint64_t epoch) {
  if (rows.empty()) return Tensor4<float>(Tensor4<float>::shape_type{0, 1, 0, 0});
  std::vector<Image> masks;
  for (std::size_t i : rows) masks.push_back(example_mask(i, epoch));
  const std::size_t h = std::size_t(masks.at(0).height), w = std::size_t(masks.at(0).width);
  Tensor4<float> out(Tensor4<float>::shape_type{rows.size(), 1, h, w});
  for (std::size_t j = 0; j < masks.size(); ++j)
    for (std::size_t p = 0; p < h * w; ++p)
      out.data()[j * h * w + p] = masks[j].rgb[3 * p] / 255.0f;
  return out;
}

Image ImageCaptionDataSource::preprocess(std::size_t i, std::uint64_t epoch, int s, bool mask,
                                         models::SdxlSizeConditioning* size) {
  require(!sets_[s].empty(), "example_image", "there are no class examples");
  const std::size_t k = example_index(s, i);
  const RandomStream crop =
      stream().derive(epoch, purpose_id(StreamPurpose::data_crop) + std::uint32_t(s));
  const std::uint64_t crop_seed =
      (std::uint64_t(random_bits(crop, 2 * i)) << 32) | random_bits(crop, 2 * i + 1);
  const bool flip =
      options_.random_flip &&
      (random_bits(stream().derive(epoch, purpose_id(StreamPurpose::data_flip) + std::uint32_t(s)),
                   i) &
       1);
  const Image& resized = resized_image(s, k, mask);
  int left = 0, top = 0, width = options_.resolution, height = options_.resolution;
  if (options_.buckets && s == 0) {
    const BucketChoice& c = choices_[k];
    std::tie(left, top) = bucket_crop_origin(c, !options_.center_crop, crop_seed);
    width = c.bucket.width, height = c.bucket.height;
  } else {
    std::tie(left, top) = crop_origin(resized.width, resized.height, options_.resolution,
                                      options_.center_crop, crop_seed);
  }
  if (size) {  // resized_image has recorded the original size
    const auto [original_height, original_width] = original_size_[s][k];
    size->original_size = {double(original_height), double(original_width)};
    size->crop_top_left = {double(top), double(flip ? resized.width - left - width : left)};
    size->target_size = {double(height), double(width)};
  }
  return crop_image(resized, left, top, width, height, flip);
}

train::TrainBatch ImageCaptionDataSource::operator()(std::uint64_t m) {
  const std::vector<std::size_t> global = global_batch_indices(m);
  const std::vector<std::size_t> rows = batch_indices(m);
  const std::uint64_t epoch = m / steps_per_epoch();
  train::TrainBatch batch;
  const bool sizes = options_.size_conditioning;
  batch.images = make_images(rows, epoch, 0, global.at(0), sizes ? &batch.time_ids : nullptr);
  batch.token_ids = tokenize(rows, epoch, 0);
  if (with_prior_preservation()) {
    batch.class_images =
        make_images(rows, epoch, 1, global.at(0), sizes ? &batch.class_time_ids : nullptr);
    batch.class_token_ids = tokenize(rows, epoch, 1);
  }
  batch.sample_weights = batch_sample_weights(m);
  if (has_masks()) {
    batch.mask = masks(rows, epoch);
    if (rows.empty())  // an empty shard: the images' height and width
      batch.mask = Tensor4<float>(
          Tensor4<float>::shape_type{0, 1, batch.images.shape()[2], batch.images.shape()[3]});
  }
  set_global_rows(batch, m);
  return batch;
}

std::vector<float> ImageCaptionDataSource::batch_sample_weights(std::uint64_t m) const {
  if (!has_reg_) return {};
  const std::vector<std::size_t> rows = batch_indices(m);
  std::vector<float> weights;
  for (std::size_t i : rows)
    weights.push_back(sets_[0][example_index(0, i)].is_reg ? options_.reg_loss_weight : 1.0f);
  if (with_prior_preservation()) weights.resize(2 * rows.size(), 1.0f);
  return weights;
}

TokenIds ImageCaptionDataSource::batch_token_ids(std::uint64_t m, bool class_set) {
  require(!class_set || with_prior_preservation(), "batch_token_ids",
          "there are no class examples");
  return tokenize(batch_indices(m), m / steps_per_epoch(), class_set ? 1 : 0);
}

const std::vector<std::size_t>& ImageCaptionDataSource::order(std::uint64_t epoch) const {
  if (perm_epoch_ == epoch && !perm_.empty()) return perm_;
  if (options_.buckets) {  // the epoch's micro-batches one after the other
    perm_.clear();
    for (const auto& batch : epoch_batches(epoch))
      perm_.insert(perm_.end(), batch.begin(), batch.end());
    perm_epoch_ = epoch;
    return perm_;
  }
  perm_.resize(num_examples());
  std::iota(perm_.begin(), perm_.end(), std::size_t{0});
  const RandomStream rs = stream().derive(epoch, StreamPurpose::data_permutation);
  shuffle_in_place(perm_, rs);
  perm_epoch_ = epoch;
  return perm_;
}

const Image& ImageCaptionDataSource::resized_image(int s, std::size_t k, bool mask) {
  auto load = [&] {
    const Image image = mask ? load_mask(k) : load_image(sets_[s][k].image_path);
    if (mask) {
      const Image reference = load_image(sets_[s][k].image_path);  // sizes must agree
      require(image.width == reference.width && image.height == reference.height, "masked loss",
              "the mask of '", sets_[s][k].image_path, "' is ", image.width, "x", image.height,
              ", expected the image's ", reference.width, "x", reference.height);
    } else {
      original_size_[s][k] = {image.height, image.width};  // as decoded: SDXL's original_size
    }
    if (options_.buckets && s == 0)
      return resize_image(image, choices_[k].resized_width, choices_[k].resized_height,
                          options_.interpolation);
    const auto [w, h] = shorter_side_size(image.width, image.height, options_.resolution);
    return resize_image(image, w, h, options_.interpolation);
  };
  if (!options_.cache_images) {
    scratch_ = load();
    return scratch_;
  }
  std::optional<Image>& cached = mask ? mask_cache_.at(k) : cache_[s][k];
  if (!cached) cached = load();
  return *cached;
}

Tensor4<float> ImageCaptionDataSource::make_images(const std::vector<std::size_t>& rows,
                                                   std::uint64_t epoch, int s,
                                                   std::size_t bucket_row,
                                                   std::optional<Tensor<float, 2>>* time_ids) {
  std::size_t w = std::size_t(options_.resolution), h = w;
  if (options_.buckets && s == 0) {  // one bucket per micro-batch
    const BucketSize b = choices_[example_index(0, bucket_row)].bucket;
    w = std::size_t(b.width), h = std::size_t(b.height);
  }
  Tensor4<float> images(Tensor4<float>::shape_type{rows.size(), 3, h, w});
  std::vector<models::SdxlSizeConditioning> sizes(time_ids ? rows.size() : 0);
  for (std::size_t j = 0; j < rows.size(); ++j)
    xt::view(images, j, xt::all(), xt::all(), xt::all()) =
        image_to_tensor(example_image(rows[j], epoch, s == 1, time_ids ? &sizes[j] : nullptr));
  if (time_ids) *time_ids = models::sdxl_time_ids(sizes);
  return images;
}

std::string ImageCaptionDataSource::example_caption(std::size_t i, std::uint64_t epoch,
                                                    bool class_set) const {
  const int s = class_set ? 1 : 0;
  require(!sets_[s].empty(), "example_caption", "there are no class examples");
  const Example& example = sets_[s][example_index(s, i)];
  const std::vector<std::string>& choices = example.caption_choices;
  const std::string& caption =
      choices.empty()
          ? example.caption
          : choices[std::size_t(uniform_int(
                stream().derive(epoch, purpose_id(StreamPurpose::data_caption) + std::uint32_t(s)),
                i, 0, std::int64_t(choices.size())))];
  const CaptionOptions& edit = options_.subset_captions.empty()
                                   ? options_.caption
                                   : options_.subset_captions.at(example.subset);
  if (edit.is_identity()) return caption;
  const RandomStream rs =
      stream()
          .derive(epoch, purpose_id(StreamPurpose::data_caption_edit) + std::uint32_t(s))
          .derive(i, 0);
  return process_caption(caption, edit, epoch, rs);
}

TokenIds ImageCaptionDataSource::tokenize(const std::vector<std::size_t>& rows, std::uint64_t epoch,
                                          int s) const {
  std::vector<std::string> captions;
  for (std::size_t i : rows) captions.push_back(example_caption(i, epoch, s == 1));
  TokenIds token_ids = tokenize_(captions);
  require(token_ids.dimension() == 2 && token_ids.shape()[0] == rows.size(),
          "ImageCaptionDataSource", "the tokenizer returned token ids of shape ",
          shape_string(token_ids.shape()), " for ", rows.size(), " captions");
  return token_ids;
}

}  // namespace difftrain::tools
