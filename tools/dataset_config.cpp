// read_dataset_config of dataset_config.hpp.
#include "dataset_config.hpp"

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <set>
#include <type_traits>

#include "difftrain/core/error.hpp"
#include "toml_file.hpp"

namespace difftrain::tools {

namespace {

constexpr const char* fn = "--dataset_config";

// The subset keys: these and CaptionOptions' members.
const std::set<std::string, std::less<>> kSubsetKeys = [] {
  std::set<std::string, std::less<>> keys = {"image_dir",         "num_repeats", "is_reg",
                                             "class_tokens",      "flip_aug",    "random_crop",
                                             "caption_extension", "color_aug"};
  CaptionOptions c;
  CaptionOptions::for_each(
      c, [&](const char* name, const char*, auto&, const char*) { keys.insert(name); });
  return keys;
}();
const std::set<std::string, std::less<>> kDatasetKeys = {
    "resolution",      "batch_size",        "enable_bucket",    "min_bucket_reso",
    "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale"};

// The tables a value is looked up in, most specific first.
struct Layers {
  const std::string& path;
  std::initializer_list<const toml::table*> tables;

  const toml::node* find(std::string_view key) const {
    for (const toml::table* t : tables)
      if (t)
        if (const toml::node* n = t->get(key)) return n;
    return nullptr;
  }
  // The value of `key` as T (toml++ converts integers to floats), or `fallback` when absent.
  template <class T>
  T get(std::string_view key, T fallback) const {
    const toml::node* n = find(key);
    if (!n) return fallback;
    const std::optional<T> v = n->value<T>();
    require(v.has_value(), fn, path, ": '", key, "' has the wrong type (",
            n->type() == toml::node_type::string ? "a string" : "not what it expects", ")");
    return *v;
  }
};

void check_keys(const std::string& path, const toml::table& table, const char* where,
                std::initializer_list<const std::set<std::string, std::less<>>*> allowed,
                std::string_view also = "") {
  for (const auto& [key, value] : table) {
    bool known = key.str() == also && !also.empty();
    for (const auto* set : allowed) known = known || set->count(key.str()) > 0;
    require(known, fn, path, ": unknown key '", key.str(), "' in ", where);
  }
}

const toml::table* table_of(const std::string& path, const toml::node* n, const char* what) {
  if (!n) return nullptr;
  require(n->is_table(), fn, path, ": ", what, " must be a table");
  return n->as_table();
}

}  // namespace

std::vector<DatasetSubset> read_dataset_config(const std::string& path, TrainCommandOptions& o) {
  const toml::table root = parse_toml_file(path, fn);
  for (const auto& [key, value] : root)
    require(key.str() == "general" || key.str() == "datasets", fn, path, ": unknown key '",
            key.str(), "' at the top level (expected [general] and [[datasets]])");
  const toml::table* general = table_of(path, root.get("general"), "[general]");
  if (general) check_keys(path, *general, "[general]", {&kSubsetKeys, &kDatasetKeys});
  const toml::array* datasets = root.get_as<toml::array>("datasets");
  require(datasets && datasets->size() == 1 && datasets->get(0)->is_table(), fn, path,
          ": expected one [[datasets]] table, found ", datasets ? datasets->size() : 0,
          " (several datasets with their own resolutions are not supported)");
  const toml::table& dataset = *datasets->get(0)->as_table();
  check_keys(path, dataset, "[[datasets]]", {&kSubsetKeys, &kDatasetKeys}, "subsets");

  const Layers d{path, {&dataset, general}};
  if (const toml::node* r = d.find("resolution")) {
    std::optional<std::int64_t> side = r->value<std::int64_t>();
    if (const toml::array* wh = r->as_array()) {
      require(wh->size() == 2 && wh->get(0)->value<std::int64_t>() &&
                  wh->get(0)->value<std::int64_t>() == wh->get(1)->value<std::int64_t>(),
              fn, path,
              ": resolution must be an integer or [w, h] with w = h (non-square "
              "resolutions are not supported)");
      side = wh->get(0)->value<std::int64_t>();
    }
    require(side && *side > 0, fn, path, ": resolution must be a positive integer or [w, h]");
    o.resolution = int(*side);
  }
  o.trainer.train_batch_size = d.get<std::int64_t>("batch_size", o.trainer.train_batch_size);
  o.enable_bucket = d.get<bool>("enable_bucket", o.enable_bucket);
  o.buckets.min_bucket_reso =
      int(d.get<std::int64_t>("min_bucket_reso", o.buckets.min_bucket_reso));
  o.buckets.max_bucket_reso =
      int(d.get<std::int64_t>("max_bucket_reso", o.buckets.max_bucket_reso));
  o.buckets.bucket_reso_steps =
      int(d.get<std::int64_t>("bucket_reso_steps", o.buckets.bucket_reso_steps));
  o.buckets.bucket_no_upscale = d.get<bool>("bucket_no_upscale", o.buckets.bucket_no_upscale);

  const toml::array* subsets = dataset.get_as<toml::array>("subsets");
  require(subsets && !subsets->empty(), fn, path, ": the dataset has no [[datasets.subsets]]");
  std::optional<bool> flip, random_crop;
  std::vector<DatasetSubset> out;
  for (const toml::node& node : *subsets) {
    const toml::table* s = node.as_table();
    require(s != nullptr, fn, path, ": [[datasets.subsets]] entries must be tables");
    check_keys(path, *s, "[[datasets.subsets]]", {&kSubsetKeys});
    const Layers l{path, {s, &dataset, general}};
    DatasetSubset sub;
    sub.image_dir = l.get<std::string>("image_dir", "");
    require(!sub.image_dir.empty(), fn, path, ": a subset has no image_dir");
    const std::int64_t repeats = l.get<std::int64_t>("num_repeats", 1);
    require(repeats >= 1, fn, path, ": num_repeats of '", sub.image_dir, "' is ", repeats,
            ", expected >= 1");
    sub.num_repeats = std::size_t(repeats);
    sub.is_reg = l.get<bool>("is_reg", false);
    sub.class_tokens = l.get<std::string>("class_tokens", "");
    sub.caption_extension = l.get<std::string>("caption_extension", o.caption_extension);
    sub.caption = o.caption;  // then each key the config gives
    CaptionOptions::for_each(sub.caption,
                             [&](const char* name, const char*, auto& value, const char*) {
                               value = l.get<std::decay_t<decltype(value)>>(name, value);
                             });
    sub.caption.validate();
    require(!l.get<bool>("color_aug", false), fn, path, ": color_aug is not supported");
    const bool f = l.get<bool>("flip_aug", o.random_flip);
    const bool rc = l.get<bool>("random_crop", !o.center_crop);
    require((!flip || *flip == f) && (!random_crop || *random_crop == rc), fn, path,
            ": flip_aug and random_crop must be the same for every subset (they apply to the "
            "whole run)");
    flip = f, random_crop = rc;
    out.push_back(std::move(sub));
  }
  o.random_flip = *flip;
  o.center_crop = !*random_crop;
  return out;
}

}  // namespace difftrain::tools
