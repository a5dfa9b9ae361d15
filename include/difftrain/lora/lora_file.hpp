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
// One file may hold parts for several components (LoraComponent: the UNet and the text
// encoders), each under its own prefix: kohya lora_unet_ / lora_te_ (SD 1.x/2.x) / lora_te1_,
// lora_te2_ (SDXL); PEFT unet. / text_encoder. / text_encoder_2., one lora_adapter_metadata with
// every part's config under its prefix. Reading one component skips the other components' keys.
// rsLoRA (scale alpha/√r): PEFT files say use_rslora; kohya readers always apply alpha/r, so a
// kohya file stores alpha·√r, the alpha that gives the trained scale.
//   legacy diffusers (read only): ….processor.to_q_lora.down.weight, ….lora.down.weight,
//     ….lora_linear_layer.down.weight, to_out_lora → to_out.0.
// Internally adapters are keyed by the diffusers module path ("down_blocks.0.…attn1.to_q").
// kohya names cannot be split back at "_" (to_q, proj_in contain one): they are matched against
// the model's own module list.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>
#include <xtensor/xarray.hpp>

#include "difftrain/core/choice.hpp"
#include "difftrain/core/error.hpp"
#include "difftrain/core/warning.hpp"
#include "difftrain/io/json_file.hpp"
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

/// A component of the pipeline a LoRA file can hold a part for, by its two key prefixes:
/// PEFT / diffusers "<peft>.<module>.lora_A.weight" (and "<peft>.r", … in lora_adapter_metadata),
/// kohya "<kohya>_<module with "." → "_">.lora_down.weight".
struct LoraComponent {
  std::string peft;   // unet, text_encoder, text_encoder_2
  std::string kohya;  // lora_unet, lora_te, lora_te1, lora_te2
  // module → its kohya name where it is not the module path with "." → "_" (SDXL's UNet: kohya
  // names it by the original SGM blocks, models/unet/lora_names.hpp). Read: both are accepted.
  std::map<std::string, std::string> kohya_names = {};
};

/// The UNet.
inline const LoraComponent kLoraUnet{"unet", "lora_unet"};
/// SD 1.x / 2.x: the one text encoder (kohya lora_te_).
inline const LoraComponent kLoraTextEncoder{"text_encoder", "lora_te"};
/// SDXL: the first text encoder, CLIPTextModel (kohya lora_te1_, PEFT text_encoder.) …
inline const LoraComponent kLoraSdxlTextEncoder1{"text_encoder", "lora_te1"};
/// … and the second, CLIPTextModelWithProjection (kohya lora_te2_, PEFT text_encoder_2.).
inline const LoraComponent kLoraSdxlTextEncoder2{"text_encoder_2", "lora_te2"};

/// Every known component: reading one component skips the keys under another one's prefix.
inline const std::array<LoraComponent, 4> kLoraComponents{
    kLoraUnet, kLoraTextEncoder, kLoraSdxlTextEncoder1, kLoraSdxlTextEncoder2};

/// One component's adapters, to save with others into one file. `all_modules` (the component's
/// module names) lets PEFT metadata name the shortest target suffixes.
struct LoraPart {
  LoraComponent component;
  LoraState state;
  std::vector<std::string> all_modules;
};

struct LoraSaveOptions {
  std::string component = "unet";               // PEFT key prefix (one-component save_lora)
  std::string kohya_prefix = "lora_unet";       // kohya key prefix (one-component save_lora)
  std::string base_model_version = "sd_v1";     // ss_base_model_version
  std::map<std::string, std::string> metadata;  // extra metadata (training settings, …)
};

namespace lora_file_detail {
inline std::string underscored(std::string name) {
  std::replace(name.begin(), name.end(), '.', '_');
  return name;
}

// the kohya name of `module` below the component's prefix
inline std::string kohya_stem(const LoraComponent& c, const std::string& module) {
  const auto it = c.kohya_names.find(module);
  return it != c.kohya_names.end() ? it->second : underscored(module);
}

inline bool starts_with(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
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

namespace lora_file_detail {
// One part to write: pointers into the caller's component, adapters and module names.
struct PartView {
  const LoraComponent* component;
  const LoraState* state;
  const std::vector<std::string>* all_modules;
};

inline void save_parts(const std::string& path, std::span<const PartView> parts, LoraFormat format,
                       const LoraSaveOptions& options) {
  constexpr const char* fn = "save_lora";
  const bool kohya = format == LoraFormat::kohya;
  require(!parts.empty(), fn, "no adapters to save to '", path, "'");
  std::set<std::string> prefixes;
  for (const PartView& part : parts) {
    const LoraComponent& c = *part.component;
    const std::string& prefix = kohya ? c.kohya : c.peft;
    require(!part.state->empty(), fn, "no adapters to save to '", path, "'",
            parts.size() > 1 ? " for the part " + prefix : "");
    require(parts.size() == 1 || !prefix.empty(), fn, "'", path, "': a part of a file with ",
            parts.size(), " parts has an empty ", kohya ? "kohya" : "PEFT",
            " prefix, expected one per component");
    require(prefixes.insert(prefix).second, fn, "'", path, "': two parts have the ",
            kohya ? "kohya" : "PEFT", " prefix '", prefix, "', expected one part per component");
  }
  std::vector<io::TensorToWrite> tensors;
  std::map<std::string, std::string> metadata = options.metadata;
  if (kohya) {
    // kohya readers apply alpha/r: rsLoRA adapters store alpha·√r (plain_alpha).
    std::set<std::size_t> ranks;
    std::set<double> alphas;
    for (const PartView& part : parts) {
      for (const auto& [name, w] : *part.state) {
        const std::string key = part.component->kohya + "_" + kohya_stem(*part.component, name);
        tensors.push_back(io::TensorToWrite::from_tensor(key + ".lora_down.weight", w.down));
        tensors.push_back(io::TensorToWrite::from_tensor(key + ".lora_up.weight", w.up));
        xt::xarray<float> alpha_tensor = xt::xarray<float>::from_shape(std::vector<std::size_t>{});
        alpha_tensor() = static_cast<float>(w.plain_alpha());
        tensors.push_back(io::TensorToWrite::from_tensor(key + ".alpha", alpha_tensor));
        ranks.insert(w.rank());
        alphas.insert(w.plain_alpha());
      }
    }
    metadata.emplace("ss_network_module", "networks.lora");
    metadata.emplace("ss_network_dim", std::to_string(*ranks.begin()));
    metadata.emplace("ss_network_alpha", format_number(*alphas.begin()));
    metadata.emplace("ss_base_model_version", options.base_model_version);
    add_kohya_hashes(tensors, metadata);  // sshs_*: kohya's, over the tensors and ss_* keys
  } else {
    // One JSON object: each part's LoraConfig under "<component>." (diffusers' _save_lora_weights
    // packs every component's metadata with _pack_dict_with_prefix).
    nlohmann::json prefixed = nlohmann::json::object();
    for (const PartView& part : parts) {
      const LoraState& state = *part.state;
      const std::string& component = part.component->peft;
      // A PEFT config has one use_rslora: kept when every adapter of the part uses rsLoRA, else
      // the part is written plain (alpha·√r).
      bool rslora = true;
      for (const auto& [name, w] : state) rslora = rslora && w.use_rslora;
      auto file_alpha = [&](const LoraModuleWeights& w) {
        return rslora ? w.alpha : w.plain_alpha();
      };
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
      nlohmann::json rank_pattern = nlohmann::json::object(),
                     alpha_pattern = nlohmann::json::object();
      for (const auto& [name, w] : state) {
        const std::string key = component.empty() ? name : component + "." + name;
        tensors.push_back(io::TensorToWrite::from_tensor(key + ".lora_A.weight", w.down));
        tensors.push_back(io::TensorToWrite::from_tensor(key + ".lora_B.weight", w.up));
        if (w.rank() != rank) rank_pattern[name] = w.rank();
        if (file_alpha(w) != alpha) alpha_pattern[name] = file_alpha(w);
      }
      const std::vector<std::string>& all_modules = *part.all_modules;
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
      for (const auto& [key, value] : config.items())
        prefixed[component.empty() ? key : component + "." + key] = value;
    }
    metadata.emplace("lora_adapter_metadata", prefixed.dump(2));
    metadata.emplace("format", "pt");
  }
  io::save_safetensors(path, tensors, metadata);
}

// The known component whose prefix starts `key`: kohya "<kohya>_…" (kohya = true) or PEFT
// "<peft>.…". Whole prefixes with their separator: "text_encoder." does not start
// "text_encoder_2.…", nor "lora_te_" "lora_te1_…".
struct KeyOwner {
  const LoraComponent* component = nullptr;
  bool kohya = false;
};

inline std::optional<KeyOwner> known_owner(std::string_view key) {
  for (const LoraComponent& c : kLoraComponents) {
    if (starts_with(key, c.kohya + "_")) return KeyOwner{&c, true};
    if (starts_with(key, c.peft + ".")) return KeyOwner{&c, false};
  }
  return std::nullopt;
}
}  // namespace lora_file_detail

/// Writes the parts (each component's adapters under its prefix) into one file, atomically
/// (io::save_safetensors). kohya: "<kohya>_<module>.…" tensors; ss_network_dim / ss_network_alpha
/// the smallest rank / alpha over all parts; sshs_* hashes over all tensors. PEFT:
/// "<peft>.<module>.lora_A.weight" and one `lora_adapter_metadata` holding each part's LoraConfig
/// under "<peft>." ("unet.r", "text_encoder.r", …), as diffusers' save_lora_weights writes it.
/// `options.component` / `kohya_prefix` are not used (each part names its component). Each part
/// needs adapters and its own prefix.
inline void save_lora(const std::string& path, const std::vector<LoraPart>& parts,
                      LoraFormat format, const LoraSaveOptions& options = {}) {
  std::vector<lora_file_detail::PartView> views;
  for (const LoraPart& part : parts)
    views.push_back({&part.component, &part.state, &part.all_modules});
  lora_file_detail::save_parts(path, views, format, options);
}

/// Writes `state` as one component (PEFT prefix options.component, kohya options.kohya_prefix).
/// `all_modules` (the model's module names) lets PEFT metadata name the shortest target suffixes.
inline void save_lora(const std::string& path, const LoraState& state, LoraFormat format,
                      const LoraSaveOptions& options = {},
                      const std::vector<std::string>& all_modules = {}) {
  const LoraComponent component{options.component, options.kohya_prefix};
  const lora_file_detail::PartView part{&component, &state, &all_modules};
  lora_file_detail::save_parts(path, std::span(&part, 1), format, options);
}

/// Reads the part of `component` from a LoRA file in any of the supported conventions; its
/// module names are `modules`. Keys of another known component (kLoraComponents: lora_unet_,
/// lora_te_, lora_te1_, lora_te2_, unet., text_encoder., text_encoder_2.) are skipped, so a file
/// without a part for `component` gives an empty state (lora_file_components says which parts a
/// file has). Every other tensor must belong to one of the modules: an unknown key is an Error
/// naming it.
inline LoraState read_lora(const std::string& path, const std::vector<std::string>& modules,
                           const LoraComponent& component = kLoraUnet) {
  using namespace lora_file_detail;
  constexpr const char* fn = "read_lora";
  const io::SafetensorsFile file = io::SafetensorsFile::open(path);
  std::map<std::string, std::string> by_underscored;
  const std::set<std::string> known(modules.begin(), modules.end());
  for (const auto& m : modules) {
    by_underscored.emplace(underscored(m), m);
    by_underscored.emplace(kohya_stem(component, m), m);
  }
  const std::string kohya = component.kohya + "_";
  const std::string peft = component.peft + ".";

  // PEFT alpha: lora_adapter_metadata ("<peft>."-prefixed keys, else plain); default alpha = r.
  std::optional<double> peft_alpha;
  bool use_rslora = false;
  nlohmann::json alpha_pattern = nlohmann::json::object();
  if (auto it = file.metadata().find("lora_adapter_metadata"); it != file.metadata().end()) {
    const nlohmann::json meta =
        io::parse_json(it->second, fn, "'" + path + "': lora_adapter_metadata");
    require(meta.is_object(), fn, "'", path,
            "' has lora_adapter_metadata that is not a JSON object: ", io::json_excerpt(meta));
    // A value of the wrong type is an error, not a silent default: "lora_alpha": "8" would
    // otherwise scale every adapter by r/8.
    auto field = [&](const std::string& name, bool (nlohmann::json::*is)() const noexcept,
                     const char* expected) -> const nlohmann::json* {
      const nlohmann::json* found = nullptr;
      for (const std::string& key : {name, peft + name}) {
        if (!meta.contains(key) || meta[key].is_null()) continue;
        require((meta[key].*is)(), fn, "'", path, "': lora_adapter_metadata \"", key, "\" is ",
                io::json_excerpt(meta[key]), ", expected ", expected);
        found = &meta[key];
      }
      return found;
    };
    if (const auto* v = field("lora_alpha", &nlohmann::json::is_number, "a number")) {
      peft_alpha = v->get<double>();
      require(std::isfinite(*peft_alpha), fn, "'", path, "': lora_alpha ", *peft_alpha,
              " is not finite");
    }
    if (const auto* v = field("alpha_pattern", &nlohmann::json::is_object, "an object")) {
      alpha_pattern = *v;
      for (const auto& [module, alpha] : alpha_pattern.items())
        require(alpha.is_number() && std::isfinite(alpha.get<double>()), fn, "'", path,
                "': alpha_pattern \"", module, "\" is ", io::json_excerpt(alpha),
                ", expected a finite number");
    }
    if (const auto* v = field("use_rslora", &nlohmann::json::is_boolean, "true or false"))
      use_rslora = v->get<bool>();
  }

  require(file.size() > 0, fn, "'", path, "' holds no tensors, expected LoRA weights");

  struct Partial {
    std::optional<xt::xarray<float>> down, up;
    std::optional<double> alpha;
    std::map<std::string, std::string> keys;  // part → the key it was read from
  };
  std::map<std::string, Partial> parts;
  std::vector<std::string> unknown;
  for (const std::string& key : file.names()) {
    std::string module, part;  // part: down, up, alpha
    std::string_view k = key;
    if (starts_with(k, kohya)) {
      const auto dot = k.find('.');
      const std::string stem(k.substr(kohya.size(), dot - kohya.size()));
      const std::string_view rest = dot == std::string_view::npos ? "" : k.substr(dot);
      if (rest == ".lora_down.weight") part = "down";
      if (rest == ".lora_up.weight") part = "up";
      if (rest == ".alpha") part = "alpha";
      if (auto it = by_underscored.find(stem); it != by_underscored.end()) module = it->second;
    } else if (!starts_with(k, peft) && known_owner(k)) {
      continue;  // another component's part
    } else {
      std::string s(k);
      for (const std::string& prefix : {peft, std::string("base_model.model.")})
        if (starts_with(s, prefix)) s = s.substr(prefix.size());
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
    // kohya and PEFT names (or two legacy spellings) for one module: refuse rather than let the
    // later key win.
    const auto [first, inserted] = p.keys.emplace(part, key);
    require(inserted, fn, "'", path, "' has two tensors for the ", part, " of module ", module,
            ": '", first->second, "' and '", key, "'");
    const std::vector<std::size_t> shape = file.info(key).shape;
    xt::xarray<float> t = xt::xarray<float>::from_shape(shape);
    file.read_into<float>(key, std::span<float>(t.data(), t.size()));
    const auto bad = std::find_if(t.begin(), t.end(), [](float v) { return !std::isfinite(v); });
    if (bad != t.end())
      fail(fn, "'", path, "': tensor '", key, "' holds ", *bad, " at element ", bad - t.begin(),
           ", expected finite weights");
    if (part == "alpha") {
      require(t.size() == 1, fn, "'", key, "' in '", path, "' has ", t.size(),
              " elements, expected a scalar alpha");
      p.alpha = *t.begin();
    } else {
      (part == "down" ? p.down : p.up) = std::move(t);
    }
  }
  if (!unknown.empty()) {
    std::string list;
    for (std::size_t i = 0; i < unknown.size() && i < 8; ++i) list += (i ? ", " : "") + unknown[i];
    fail(fn, "'", path, "' has ", unknown.size(), " keys that name no module of the model: ", list,
         " (reading the part ", component.peft, " / ", component.kohya, "_)");
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

/// read_lora for the component with PEFT prefix `component` and kohya prefix `kohya_prefix`.
inline LoraState read_lora(const std::string& path, const std::vector<std::string>& modules,
                           std::string_view component,
                           std::string_view kohya_prefix = "lora_unet") {
  return read_lora(path, modules, LoraComponent{std::string(component), std::string(kohya_prefix)});
}

/// The known components (kLoraComponents) a LoRA file has parts for, by their PEFT names
/// ("unet", "text_encoder", "text_encoder_2"), found from the kohya or PEFT key prefixes. Keys
/// under no known prefix (e.g. "base_model.model.…") are not counted.
inline std::set<std::string> lora_file_components(const std::string& path) {
  const io::SafetensorsFile file = io::SafetensorsFile::open(path);
  std::set<std::string> components;
  for (const std::string& key : file.names())
    if (const auto owner = lora_file_detail::known_owner(key))
      components.insert(owner->component->peft);
  return components;
}

/// Throws an Error naming the file, the component and its first key when the file has a part for
/// a known component the model does not have: a kohya key needs a component of `available` with
/// its kohya prefix (lora_te1_ is not lora_te_), a PEFT key one with its PEFT prefix.
inline void require_lora_components(const std::string& path,
                                    const std::vector<LoraComponent>& available) {
  const io::SafetensorsFile file = io::SafetensorsFile::open(path);
  for (const std::string& key : file.names()) {
    const auto owner = lora_file_detail::known_owner(key);
    if (!owner) continue;
    const LoraComponent& c = *owner->component;
    const bool present = std::any_of(available.begin(), available.end(), [&](const auto& a) {
      return owner->kohya ? a.kohya == c.kohya : a.peft == c.peft;
    });
    if (present) continue;
    std::string have;
    for (const LoraComponent& a : available)
      have += (have.empty() ? "" : ", ") + a.peft + " (" + a.kohya + "_)";
    fail("require_lora_components", "'", path, "' has a LoRA part for ", c.peft,
         owner->kohya ? " (kohya prefix " + c.kohya + "_)"
                      : std::string(" (PEFT prefix ") + c.peft + ".)",
         ", first key ", key, ", but the model has no such component (it has ",
         have.empty() ? "none" : have, ")");
  }
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
