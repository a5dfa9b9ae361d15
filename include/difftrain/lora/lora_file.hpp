#pragma once
// LoRA files: save and load adapters in the ecosystem's conventions (REFERENCE-formats.md (b)).
//
//   kohya (sd-scripts, A1111, ComfyUI, stable-diffusion.cpp):
//     <prefix>_<module path with every "." replaced by "_">.lora_down.weight   A [r, in(, k, k)]
//     ….lora_up.weight   B [out, r(, 1, 1)]      ….alpha   rank-0 F32
//     metadata ss_network_module, ss_network_dim, ss_network_alpha, ss_base_model_version
//   PEFT / diffusers:
//     <component>.<module path>.lora_A.weight / .lora_B.weight; alpha in the JSON metadata
//     `lora_adapter_metadata`, keys prefixed by the component as diffusers >= 0.34 writes and
//     reads them ("unet.r", "unet.lora_alpha", "unet.alpha_pattern", "unet.use_rslora", …), and
//     "format": "pt". Also read: unprefixed keys (older diffusers), no tensor prefix,
//     "base_model.model.", ".default" adapter names. No alpha anywhere: alpha = r, with a warning.
// rsLoRA (scale alpha/√r): PEFT files say use_rslora; kohya readers always apply alpha/r, so a
// kohya file stores alpha·√r, the alpha that gives the trained scale.
//   legacy diffusers (read only): ….processor.to_q_lora.down.weight, ….lora.down.weight,
//     ….lora_linear_layer.down.weight, to_out_lora → to_out.0.
// Internally adapters are keyed by the diffusers module path ("down_blocks.0.…attn1.to_q").
// kohya names cannot be split back at "_" (to_q, proj_in contain one): they are matched against
// the model's own module list.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>
#include <xtensor/xarray.hpp>

#include "difftrain/core/choice.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/warning.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/lora/inject.hpp"
#include "difftrain/lora/kohya_metadata.hpp"

namespace difftrain::lora {

enum class LoraFormat : std::uint8_t { kohya, peft };

/// The formats' names ("diffusers" is accepted for peft: diffusers writes PEFT names).
inline constexpr std::array<Choice<LoraFormat>, 2> kLoraFormats{{
    {"kohya", LoraFormat::kohya},
    {"peft", LoraFormat::peft},
}};

inline LoraFormat parse_lora_format(std::string_view name) {
  return parse_choice("lora format", name == "diffusers" ? "peft" : name, kLoraFormats);
}

/// One adapter's weights: down = A, up = B, and its alpha (scale = alpha/r, alpha/√r with rsLoRA).
struct LoraModuleWeights {
  xt::xarray<float> down, up;
  double alpha = 0;
  bool use_rslora = false;
  std::size_t rank() const { return down.dimension() > 0 ? down.shape()[0] : 0; }
  // the alpha giving the same scale under alpha/r: alpha·√r for rsLoRA
  double plain_alpha() const {
    return use_rslora ? alpha * std::sqrt(static_cast<double>(rank())) : alpha;
  }
};

/// module path → weights.
using LoraState = std::map<std::string, LoraModuleWeights>;

struct LoraSaveOptions {
  std::string component = "unet";               // PEFT key prefix; kohya uses lora_<component>
  std::string kohya_prefix = "lora_unet";       // lora_unet, lora_te, lora_te1, …
  std::string base_model_version = "sd_v1";     // ss_base_model_version
  std::map<std::string, std::string> metadata;  // extra metadata (training settings, …)
};

namespace lora_file_detail {
inline std::string underscored(std::string name) {
  std::replace(name.begin(), name.end(), '.', '_');
  return name;
}

inline bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

inline std::string format_number(double v) {
  std::ostringstream out;
  out << v;
  std::string s = out.str();
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

// Distinct short suffixes (PEFT target_modules) that select exactly `adapted` among `all`;
// falls back to the full names when a suffix would also select a module that is not adapted.
inline std::vector<std::string> target_modules(const std::vector<std::string>& adapted,
                                               const std::vector<std::string>& all) {
  std::set<std::string> targets;
  for (const auto& name : adapted) {
    const auto dot = name.rfind('.');
    std::string suffix = dot == std::string::npos ? name : name.substr(dot + 1);
    const bool numeric = !suffix.empty() && std::all_of(suffix.begin(), suffix.end(), ::isdigit);
    if (numeric && dot != std::string::npos) {
      const auto prev = name.rfind('.', dot - 1);
      suffix = name.substr(prev == std::string::npos ? 0 : prev + 1);
    }
    targets.insert(suffix);
  }
  const std::set<std::string> chosen(adapted.begin(), adapted.end());
  for (const auto& name : all)
    for (const auto& t : targets)
      if (matches_target(name, t) && !chosen.count(name)) return adapted;
  return {targets.begin(), targets.end()};
}
}  // namespace lora_file_detail

/// The model's module names (every slot), in visit order.
template <HasLoraSlots M>
std::vector<std::string> module_names(M& model) {
  std::vector<std::string> names;
  model.for_each_slot("", [&](const std::string& name, auto&) { names.push_back(name); });
  return names;
}

/// The weights of every adapter of the model.
template <HasLoraSlots M>
LoraState collect_lora(M& model) {
  LoraState state;
  for_each_adapter(model, [&](const std::string& name, auto& adapter) {
    LoraModuleWeights w;
    w.down = xt::xarray<float>(adapter.lora_A.weight.value);
    w.up = xt::xarray<float>(adapter.lora_B.weight.value);
    const double a = adapter.config().alpha;
    w.alpha = a == 0 ? static_cast<double>(adapter.rank()) : a;
    w.use_rslora = adapter.config().use_rslora;
    state.emplace(name, std::move(w));
  });
  return state;
}

/// Writes `state` in the given format (atomically, through io::save_safetensors).
/// `all_modules` (the model's module names) lets PEFT metadata name the shortest target suffixes.
inline void save_lora(const std::string& path, const LoraState& state, LoraFormat format,
                      const LoraSaveOptions& options = {},
                      const std::vector<std::string>& all_modules = {}) {
  using namespace lora_file_detail;
  require(!state.empty(), "save_lora", "no adapters to save to '", path, "'");
  std::vector<io::TensorToWrite> tensors;
  std::map<std::string, std::string> metadata = options.metadata;
  // A PEFT file has one use_rslora: kept when every adapter uses rsLoRA, else all written plain.
  bool all_rslora = true;
  for (const auto& [name, w] : state) all_rslora = all_rslora && w.use_rslora;
  const bool rslora = format == LoraFormat::peft && all_rslora;
  auto file_alpha = [&](const LoraModuleWeights& w) { return rslora ? w.alpha : w.plain_alpha(); };
  std::set<std::size_t> ranks;
  std::set<double> alphas;
  std::vector<std::string> adapted;
  for (const auto& [name, w] : state) {
    ranks.insert(w.rank());
    alphas.insert(file_alpha(w));
    adapted.push_back(name);
  }
  const std::size_t rank = *ranks.begin();
  const double alpha = *alphas.begin();
  if (format == LoraFormat::kohya) {
    for (const auto& [name, w] : state) {
      const std::string key = options.kohya_prefix + "_" + underscored(name);
      tensors.push_back(io::TensorToWrite::from_tensor(key + ".lora_down.weight", w.down));
      tensors.push_back(io::TensorToWrite::from_tensor(key + ".lora_up.weight", w.up));
      const xt::xarray<float> a = xt::xarray<float>::from_shape(std::vector<std::size_t>{});
      xt::xarray<float> alpha_tensor = a;
      alpha_tensor() = static_cast<float>(file_alpha(w));
      tensors.push_back(io::TensorToWrite::from_tensor(key + ".alpha", alpha_tensor));
    }
    metadata.emplace("ss_network_module", "networks.lora");
    metadata.emplace("ss_network_dim", std::to_string(rank));
    metadata.emplace("ss_network_alpha", format_number(alpha));
    metadata.emplace("ss_base_model_version", options.base_model_version);
    add_kohya_hashes(tensors, metadata);  // sshs_*: kohya's, over the tensors and ss_* keys
  } else {
    nlohmann::json rank_pattern = nlohmann::json::object(),
                   alpha_pattern = nlohmann::json::object();
    for (const auto& [name, w] : state) {
      const std::string key = options.component.empty() ? name : options.component + "." + name;
      tensors.push_back(io::TensorToWrite::from_tensor(key + ".lora_A.weight", w.down));
      tensors.push_back(io::TensorToWrite::from_tensor(key + ".lora_B.weight", w.up));
      if (w.rank() != rank) rank_pattern[name] = w.rank();
      if (file_alpha(w) != alpha) alpha_pattern[name] = file_alpha(w);
    }
    const std::vector<std::string> targets =
        all_modules.empty() ? adapted : target_modules(adapted, all_modules);
    const nlohmann::json config = {{"peft_type", "LORA"},
                                   {"r", rank},
                                   {"lora_alpha", alpha},
                                   {"rank_pattern", rank_pattern},
                                   {"alpha_pattern", alpha_pattern},
                                   {"target_modules", targets},
                                   {"bias", "none"},
                                   {"lora_dropout", 0.0},
                                   {"use_rslora", rslora},
                                   {"use_dora", false},
                                   {"fan_in_fan_out", false}};
    // diffusers >= 0.34 keeps only the keys under "<component>." (and fails without them).
    nlohmann::json prefixed = nlohmann::json::object();
    for (const auto& [key, value] : config.items())
      prefixed[options.component.empty() ? key : options.component + "." + key] = value;
    metadata.emplace("lora_adapter_metadata", prefixed.dump(2));
    metadata.emplace("format", "pt");
  }
  io::save_safetensors(path, tensors, metadata);
}

/// Reads a LoRA file in any of the supported conventions for the component whose module names
/// are `modules` (PEFT prefix `component`, kohya prefix `kohya_prefix`). Every tensor must belong
/// to one of the modules; an unknown key is an Error naming it.
inline LoraState read_lora(const std::string& path, const std::vector<std::string>& modules,
                           std::string_view component = "unet",
                           std::string_view kohya_prefix = "lora_unet") {
  using namespace lora_file_detail;
  constexpr const char* fn = "read_lora";
  const io::SafetensorsFile file = io::SafetensorsFile::open(path);
  std::map<std::string, std::string> by_underscored;
  const std::set<std::string> known(modules.begin(), modules.end());
  for (const auto& m : modules) by_underscored.emplace(underscored(m), m);

  // PEFT alpha: lora_adapter_metadata ("component."-prefixed keys, else plain); default alpha = r.
  std::optional<double> peft_alpha;
  bool use_rslora = false;
  nlohmann::json alpha_pattern = nlohmann::json::object();
  if (auto it = file.metadata().find("lora_adapter_metadata"); it != file.metadata().end()) {
    nlohmann::json meta;
    try {
      meta = nlohmann::json::parse(it->second);
    } catch (const std::exception& e) {
      fail(fn, "'", path, "' has lora_adapter_metadata that is not JSON: ", e.what());
    }
    const std::string prefixed = std::string(component) + ".";
    for (const std::string& key : {std::string("lora_alpha"), prefixed + "lora_alpha"})
      if (meta.contains(key) && meta[key].is_number()) peft_alpha = meta[key].get<double>();
    for (const std::string& key : {std::string("alpha_pattern"), prefixed + "alpha_pattern"})
      if (meta.contains(key) && meta[key].is_object()) alpha_pattern = meta[key];
    for (const std::string& key : {std::string("use_rslora"), prefixed + "use_rslora"})
      if (meta.contains(key) && meta[key].is_boolean()) use_rslora = meta[key].get<bool>();
  }

  struct Partial {
    std::optional<xt::xarray<float>> down, up;
    std::optional<double> alpha;
  };
  std::map<std::string, Partial> parts;
  std::vector<std::string> unknown;
  for (const std::string& key : file.names()) {
    std::string module, part;  // part: down, up, alpha
    std::string_view k = key;
    const std::string kohya = std::string(kohya_prefix) + "_";
    if (k.substr(0, kohya.size()) == kohya) {
      const auto dot = k.find('.');
      const std::string stem(k.substr(kohya.size(), dot - kohya.size()));
      const std::string_view rest = dot == std::string_view::npos ? "" : k.substr(dot);
      if (rest == ".lora_down.weight") part = "down";
      if (rest == ".lora_up.weight") part = "up";
      if (rest == ".alpha") part = "alpha";
      if (auto it = by_underscored.find(stem); it != by_underscored.end()) module = it->second;
    } else {
      std::string s(k);
      for (const std::string& prefix :
           {std::string(component) + ".", std::string("base_model.model.")})
        if (s.rfind(prefix, 0) == 0) s = s.substr(prefix.size());
      // Legacy attention-processor names.
      auto replace = [&](std::string_view from, std::string_view to) {
        for (auto p = s.find(from); p != std::string::npos; p = s.find(from, p + to.size()))
          s.replace(p, from.size(), to);
      };
      replace(".processor.", ".");
      replace("to_out_lora.", "to_out.0.lora.");
      for (const char* proj : {"to_q", "to_k", "to_v"})
        replace(std::string(proj) + "_lora.", std::string(proj) + ".lora.");
      replace(".lora_linear_layer.", ".lora.");
      replace(".lora.down.weight", ".lora_A.weight");
      replace(".lora.up.weight", ".lora_B.weight");
      replace(".lora_A.default.weight", ".lora_A.weight");
      replace(".lora_B.default.weight", ".lora_B.weight");
      for (const auto& [suffix, which] :
           {std::pair{".lora_A.weight", "down"}, std::pair{".lora_B.weight", "up"},
            std::pair{".alpha", "alpha"}}) {
        if (ends_with(s, suffix)) {
          part = which;
          module = s.substr(0, s.size() - std::string_view(suffix).size());
        }
      }
      if (!known.count(module)) module.clear();
    }
    if (module.empty() || part.empty()) {
      unknown.push_back(key);
      continue;
    }
    Partial& p = parts[module];
    if (part == "alpha") {
      const auto v = file.read<float>(key);
      require(v.size() == 1, fn, "'", key, "' in '", path, "' has ", v.size(),
              " elements, expected a scalar alpha");
      p.alpha = v[0];
    } else {
      const std::vector<std::size_t> shape = file.info(key).shape;
      xt::xarray<float> t = xt::xarray<float>::from_shape(shape);
      file.read_into<float>(key, std::span<float>(t.data(), t.size()));
      (part == "down" ? p.down : p.up) = std::move(t);
    }
  }
  if (!unknown.empty()) {
    std::string list;
    for (std::size_t i = 0; i < unknown.size() && i < 8; ++i) list += (i ? ", " : "") + unknown[i];
    fail(fn, "'", path, "' has ", unknown.size(), " keys that name no module of the model: ", list);
  }
  LoraState state;
  std::size_t without_alpha = 0;
  for (auto& [module, p] : parts) {
    require(p.down && p.up, fn, "'", path, "' has ", p.down ? "no up (B)" : "no down (A)",
            " weight for module ", module);
    require(p.down->dimension() >= 2 && p.up->dimension() >= 2 &&
                p.up->shape()[1] == p.down->shape()[0],
            fn, "'", path, "': module ", module, " has down ", shape_string(p.down->shape()),
            " and up ", shape_string(p.up->shape()), ", whose ranks disagree");
    LoraModuleWeights w;
    w.down = std::move(*p.down);
    w.up = std::move(*p.up);
    const double r = static_cast<double>(w.rank());
    if (p.alpha) {
      w.alpha = *p.alpha == 0 ? r : *p.alpha;  // kohya: alpha 0 means alpha = rank
    } else {
      w.use_rslora = use_rslora;
      if (alpha_pattern.contains(module) && alpha_pattern[module].is_number()) {
        w.alpha = alpha_pattern[module].get<double>();
      } else {
        w.alpha = peft_alpha.value_or(r);  // diffusers: no alpha means alpha = r
        without_alpha += peft_alpha ? 0 : 1;
      }
    }
    state.emplace(module, std::move(w));
  }
  if (without_alpha > 0)
    warn(fn, "'", path, "' gives no alpha for ", without_alpha,
         " adapters (no .alpha tensor, no lora_adapter_metadata lora_alpha): using alpha = rank");
  return state;
}

/// Adds adapters to the model for every module of `state` (rank and alpha from the file) and
/// copies the weights in; the base is frozen, the adapters trainable. Returns the modules.
template <HasLoraSlots M>
std::vector<std::string> apply_lora(M& model, const LoraState& state, double multiplier = 1.0) {
  constexpr const char* fn = "apply_lora";
  std::vector<std::string> applied;
  std::set<std::string> seen;
  model.for_each_parameter("", [](const std::string&, auto& p) { p.set_trainable(false); });
  model.for_each_slot("", [&](const std::string& name, auto& slot) {
    const auto it = state.find(name);
    if (it == state.end()) return;
    const LoraModuleWeights& w = it->second;
    LoraConfig config;
    config.rank = w.rank();
    config.alpha = w.alpha;
    config.use_rslora = w.use_rslora;
    config.multiplier = multiplier;
    if (!slot.has_adapter()) slot.inject(config, RandomStream{});
    auto& adapter = slot.adapter();
    require(adapter.rank() == w.rank(), fn, "module ", name, " has an adapter of rank ",
            adapter.rank(), ", the file rank ", w.rank());
    auto copy = [&](auto& param, const xt::xarray<float>& src, const char* what) {
      require(std::equal(src.shape().begin(), src.shape().end(), param.value.shape().begin(),
                         param.value.shape().end()),
              fn, "module ", name, " ", what, " has shape ", shape_string(src.shape()),
              ", expected ", shape_string(param.value.shape()));
      std::copy(src.begin(), src.end(), param.value.begin());
    };
    copy(adapter.lora_A.weight, w.down, "down (A)");
    copy(adapter.lora_B.weight, w.up, "up (B)");
    seen.insert(name);
    applied.push_back(name);
  });
  std::string missing;
  for (const auto& [name, w] : state)
    if (!seen.count(name)) missing += (missing.empty() ? "" : ", ") + name;
  require(missing.empty(), fn, "modules not found in the model: ", missing);
  return applied;
}

}  // namespace difftrain::lora
