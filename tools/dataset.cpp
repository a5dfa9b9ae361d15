// The folder scanners and ImageCaptionDataSource of dataset.hpp.
#include "dataset.hpp"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <system_error>
#include <utility>

namespace difftrain::tools {

namespace {

namespace fs = std::filesystem;

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

enum class ImageKind { supported, unsupported, other };

// stb_image reads these; the second list are image formats it cannot read (a clear error beats
// silently training on fewer images).
ImageKind image_kind(const fs::path& path) {
  const std::string ext = lower(path.extension().string());
  for (const char* e : {".png", ".jpg", ".jpeg", ".bmp"})
    if (ext == e) return ImageKind::supported;
  for (const char* e : {".webp", ".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl"})
    if (ext == e) return ImageKind::unsupported;
  return ImageKind::other;
}

void check_readable_kind(const char* fn, const fs::path& path) {
  const ImageKind kind = image_kind(path);
  require(kind != ImageKind::unsupported, fn, "'", path.string(), "' is a ",
          path.extension().string(),
          " image, which is not supported (stb_image reads PNG, JPEG and BMP): convert it");
  require(kind == ImageKind::supported, fn, "'", path.string(),
          "' is not a PNG, JPEG or BMP image (by its extension)");
}

std::string strip(const std::string& s) {
  const auto first = s.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) return "";
  return s.substr(first, s.find_last_not_of(" \t\r\n") - first + 1);
}

// kohya: the first line of the caption file, stripped (a UTF-8 byte-order mark is dropped).
std::string read_caption(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  require(bool(in), "scan_image_folder", "cannot read caption file '", path.string(), "'");
  std::string line;
  std::getline(in, line);
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

std::vector<Example> read_metadata_jsonl(const fs::path& dir, const ImageFolderOptions& o) {
  constexpr const char* fn = "scan_image_folder";
  const fs::path file = dir / "metadata.jsonl";
  std::ifstream in(file);
  require(bool(in), fn, "cannot read '", file.string(), "'");
  std::map<std::string, Example> captions;  // file_name → captions, sorted by file_name
  std::string line;
  for (std::size_t number = 1; std::getline(in, line); ++number) {
    if (strip(line).empty()) continue;
    nlohmann::json row;
    try {
      row = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw Error(message(fn, ": ", file.string(), " line ", number, " is not JSON: ", e.what()));
    }
    require(row.is_object() && row.contains("file_name") && row["file_name"].is_string(), fn,
            file.string(), " line ", number, " has no string \"file_name\"");
    const std::string name = row["file_name"].get<std::string>();
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
                "\": ", c.dump());
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
    for (const fs::path& file : sorted_files(dir)) {
      if (image_kind(file) == ImageKind::other) continue;
      check_readable_kind(fn, file);
      fs::path caption_file = file;
      caption_file.replace_extension(options.caption_extension);
      std::string caption;
      if (fs::is_regular_file(caption_file, ec)) {
        caption = read_caption(caption_file);
      } else {
        require(options.allow_missing_captions, fn, "image '", file.string(),
                "' has no caption file '", caption_file.filename().string(),
                "' (or use a metadata.jsonl, or allow missing captions)");
      }
      out.push_back({file.string(), caption});
    }
  }
  require(!out.empty(), fn, "no PNG, JPEG or BMP images in '", folder, "'");
  return out;
}

std::vector<Example> scan_dreambooth_folder(const std::string& folder, const std::string& prompt) {
  constexpr const char* fn = "scan_dreambooth_folder";
  check_folder(fn, folder);
  std::vector<Example> out;
  for (const fs::path& file : sorted_files(folder)) {
    if (image_kind(file) == ImageKind::other) continue;
    check_readable_kind(fn, file);
    out.push_back({file.string(), prompt});
  }
  require(!out.empty(), fn, "no PNG, JPEG or BMP images in '", folder, "'");
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
  for (int s = 0; s < 2; ++s) cache_[s].resize(options_.cache_images ? sets_[s].size() : 0);
}

std::vector<std::size_t> ImageCaptionDataSource::batch_indices(std::uint64_t m) const {
  const std::size_t b = options_.train_batch_size, steps = steps_per_epoch();
  const std::uint64_t epoch = m / steps;
  const std::size_t first = std::size_t(m % steps) * b;
  const std::vector<std::size_t>& perm = order(epoch);
  return {perm.begin() + std::ptrdiff_t(first),
          perm.begin() + std::ptrdiff_t(std::min(first + b, perm.size()))};
}

Image ImageCaptionDataSource::example_image(std::size_t i, std::uint64_t epoch, bool class_set) {
  const int s = class_set ? 1 : 0;
  require(!sets_[s].empty(), "example_image", "there are no class examples");
  const std::size_t k = i % sets_[s].size();
  const RandomStream crop =
      stream().derive(epoch, purpose_id(StreamPurpose::data_crop) + std::uint32_t(s));
  const std::uint64_t crop_seed =
      (std::uint64_t(random_bits(crop, 2 * i)) << 32) | random_bits(crop, 2 * i + 1);
  const bool flip =
      options_.random_flip &&
      (random_bits(stream().derive(epoch, purpose_id(StreamPurpose::data_flip) + std::uint32_t(s)),
                   i) &
       1);
  const Image& resized = resized_image(s, k);
  const auto [left, top] = crop_origin(resized.width, resized.height, options_.resolution,
                                       options_.center_crop, crop_seed);
  return crop_image(resized, left, top, options_.resolution, flip);
}

train::TrainBatch ImageCaptionDataSource::operator()(std::uint64_t m) {
  const std::vector<std::size_t> rows = batch_indices(m);
  const std::uint64_t epoch = m / steps_per_epoch();
  train::TrainBatch batch;
  batch.images = make_images(rows, epoch, 0);
  batch.token_ids = tokenize(rows, epoch, 0);
  if (with_prior_preservation()) {
    batch.class_images = make_images(rows, epoch, 1);
    batch.class_token_ids = tokenize(rows, epoch, 1);
  }
  return batch;
}

TokenIds ImageCaptionDataSource::batch_token_ids(std::uint64_t m, bool class_set) {
  require(!class_set || with_prior_preservation(), "batch_token_ids",
          "there are no class examples");
  return tokenize(batch_indices(m), m / steps_per_epoch(), class_set ? 1 : 0);
}

const std::vector<std::size_t>& ImageCaptionDataSource::order(std::uint64_t epoch) const {
  if (perm_epoch_ == epoch && !perm_.empty()) return perm_;
  perm_.resize(num_examples());
  std::iota(perm_.begin(), perm_.end(), std::size_t{0});
  const RandomStream rs = stream().derive(epoch, StreamPurpose::data_permutation);
  for (std::size_t i = perm_.size(); i-- > 1;)
    std::swap(perm_[i], perm_[std::size_t(uniform_int(rs, i, 0, std::int64_t(i) + 1))]);
  perm_epoch_ = epoch;
  return perm_;
}

const Image& ImageCaptionDataSource::resized_image(int s, std::size_t k) {
  auto load = [&] {
    const Image image = load_image(sets_[s][k].image_path);
    const auto [w, h] = shorter_side_size(image.width, image.height, options_.resolution);
    return resize_image(image, w, h, options_.interpolation);
  };
  if (!options_.cache_images) {
    scratch_ = load();
    return scratch_;
  }
  if (!cache_[s][k]) cache_[s][k] = load();
  return *cache_[s][k];
}

Tensor4<float> ImageCaptionDataSource::make_images(const std::vector<std::size_t>& rows,
                                                   std::uint64_t epoch, int s) {
  const std::size_t r = std::size_t(options_.resolution);
  Tensor4<float> images(Tensor4<float>::shape_type{rows.size(), 3, r, r});
  for (std::size_t j = 0; j < rows.size(); ++j)
    xt::view(images, j, xt::all(), xt::all(), xt::all()) =
        image_to_tensor(example_image(rows[j], epoch, s == 1));
  return images;
}

const std::string& ImageCaptionDataSource::example_caption(std::size_t i, std::uint64_t epoch,
                                                           bool class_set) const {
  const int s = class_set ? 1 : 0;
  require(!sets_[s].empty(), "example_caption", "there are no class examples");
  const Example& example = sets_[s][i % sets_[s].size()];
  const std::vector<std::string>& choices = example.caption_choices;
  if (choices.empty()) return example.caption;
  const RandomStream rs =
      stream().derive(epoch, purpose_id(StreamPurpose::data_caption) + std::uint32_t(s));
  return choices[std::size_t(uniform_int(rs, i, 0, std::int64_t(choices.size())))];
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
