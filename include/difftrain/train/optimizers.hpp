#pragma once
// The optimizers a run chooses by name (TrainerOptions::optimizer; kohya's --optimizer_type),
// and their extra hyperparameters as kohya's --optimizer_args "key=value" strings.
//
//   name                 class              reference
//   adamw                AdamW              torch.optim.AdamW
//   sgd                  Sgd                torch.optim.SGD (momentum, nesterov)
//   lion                 Lion               lion-pytorch
//   adafactor            Adafactor          transformers.optimization.Adafactor
//   prodigy              Prodigy            prodigyopt.Prodigy
//   adamw_schedulefree   ScheduleFreeAdamW  schedulefree.AdamWScheduleFree
//
// kohya's spellings are accepted case-insensitively (AdamW, Lion, Adafactor, Prodigy,
// AdamWScheduleFree, SGDNesterov = sgd with nesterov).

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <cmath>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/train/adafactor.hpp"
#include "difftrain/train/lion.hpp"
#include "difftrain/train/optimizer.hpp"
#include "difftrain/train/prodigy.hpp"
#include "difftrain/train/schedule_free_adamw.hpp"

namespace difftrain::train {

/// One of the optimizers above, chosen at run time (make_optimizer): a std::variant (index(),
/// std::get, std::visit work on it) that is itself an Optimizer, each call going to the
/// alternative held. eval() / train() are no-ops for the optimizers without them.
class AnyOptimizer : public std::variant<AdamW, Sgd, Lion, Adafactor, Prodigy, ScheduleFreeAdamW> {
 public:
  using Base = AnyOptimizer::variant;
  using Base::Base;

  void step(double lr_scale = 1.0) {
    std::visit([&](auto& o) { o.step(lr_scale); }, base());
  }
  void zero_grad() {
    std::visit([](auto& o) { o.zero_grad(); }, base());
  }
  std::int64_t step_count() const {
    return std::visit([](const auto& o) { return o.step_count(); }, base());
  }
  const std::vector<ParamGroup>& param_groups() const {
    return std::visit(
        [](const auto& o) -> const std::vector<ParamGroup>& { return o.param_groups(); }, base());
  }
  std::map<std::string, xt::xarray<float>> state_dict() const {
    return std::visit([](const auto& o) { return o.state_dict(); }, base());
  }
  void load_state_dict(const std::map<std::string, xt::xarray<float>>& state,
                       std::int64_t step_count) {
    std::visit([&](auto& o) { o.load_state_dict(state, step_count); }, base());
  }
  std::string_view name() const {
    return std::visit([](const auto& o) { return std::string_view(o.kName); }, base());
  }
  void eval() {
    std::visit(
        [](auto& o) {
          if constexpr (requires { o.eval(); }) o.eval();
        },
        base());
  }
  void train() {
    std::visit(
        [](auto& o) {
          if constexpr (requires { o.train(); }) o.train();
        },
        base());
  }

 private:
  Base& base() { return *this; }
  const Base& base() const { return *this; }
};
static_assert(Optimizer<AnyOptimizer>);
static_assert(Optimizer<Lion> && Optimizer<Adafactor> && Optimizer<Prodigy> &&
              Optimizer<ScheduleFreeAdamW>);

/// Calls visit.template operator()<O>() for each optimizer class O of AnyOptimizer.
template <class Visitor>
void for_each_optimizer_type(Visitor&& visit) {
  [&]<class... O>(std::variant<O...>*) {
    (visit.template operator()<O>(), ...);
  }(static_cast<AnyOptimizer::Base*>(nullptr));
}

/// The optimizer class kohya's metadata names (ss_optimizer) for a canonical name.
inline std::string kohya_optimizer_class(std::string_view name) {
  std::string found;
  for_each_optimizer_type([&]<class O>() {
    if (name == O::kName) found = O::kKohyaClass;
  });
  require(!found.empty(), "kohya_optimizer_class", "unknown optimizer '", name, "'");
  return found;
}

/// A chosen optimizer: its canonical name and whether kohya's name implied nesterov.
struct OptimizerName {
  std::string name;
  bool nesterov = false;
};

/// Our names and kohya's --optimizer_type spellings (case-insensitive) → the canonical name.
inline OptimizerName parse_optimizer_name(std::string_view given) {
  std::string lower(given);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return char(std::tolower(c)); });
  if (lower == "sgdnesterov") return {"sgd", true};
  if (lower == "adamwschedulefree") return {"adamw_schedulefree", false};
  std::optional<OptimizerName> found;
  for_each_optimizer_type([&]<class O>() {
    if (lower == O::kName) found = OptimizerName{std::string(O::kName), false};
  });
  if (found) return *found;
  fail("optimizer", "optimizer is '", given,
       "', expected adamw, sgd, lion, adafactor, prodigy or adamw_schedulefree (or kohya's "
       "AdamW, SGDNesterov, Lion, Adafactor, Prodigy, AdamWScheduleFree)");
}

/// kohya's --optimizer_args: "key=value" with Python literals (True/False, numbers, a pair as
/// "0.9,0.99" or "(0.9, 0.99)"). Every key must be read by the chosen optimizer (check_used).
class OptimizerArgs {
 public:
  OptimizerArgs(const std::vector<std::string>& args, std::string optimizer)
      : optimizer_(std::move(optimizer)) {
    for (const std::string& a : args) {
      const auto eq = a.find('=');
      require(eq != std::string::npos && eq > 0, "optimizer_args", "'", a, "': expected key=value");
      const std::string key = trim(a.substr(0, eq));
      require(values_.emplace(key, trim(a.substr(eq + 1))).second, "optimizer_args", "key '", key,
              "' is given twice");
    }
  }

  double number(const std::string& key, double fallback) {
    const std::string* v = find(key);
    return v ? parse_number(key, *v) : fallback;
  }
  std::optional<double> optional_number(const std::string& key, std::optional<double> fallback) {
    const std::string* v = find(key);
    if (!v) return fallback;
    if (*v == "None") return std::nullopt;
    return parse_number(key, *v);
  }
  bool boolean(const std::string& key, bool fallback) {
    const std::string* v = find(key);
    if (!v) return fallback;
    if (*v == "True" || *v == "true") return true;
    if (*v == "False" || *v == "false") return false;
    fail("optimizer_args", key, "=", *v, ": expected True or False");
  }
  std::array<double, 2> pair(const std::string& key, std::array<double, 2> fallback) {
    const std::string* v = find(key);
    if (!v) return fallback;
    std::string s = *v;
    if (s.size() >= 2 && (s.front() == '(' || s.front() == '[')) s = s.substr(1, s.size() - 2);
    const auto comma = s.find(',');
    require(comma != std::string::npos, "optimizer_args", key, "=", *v,
            ": expected two numbers, e.g. (0.9, 0.99)");
    return {parse_number(key, trim(s.substr(0, comma))),
            parse_number(key, trim(s.substr(comma + 1)))};
  }

  /// Throws for keys the optimizer did not read (a typo must not train with a default).
  void check_used() const {
    for (const auto& [key, value] : values_)
      require(used_.count(key) > 0, "optimizer_args", "key '", key, "' is not an argument of ",
              optimizer_);
  }

 private:
  static std::string trim(std::string s) {
    const auto b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
    return b == std::string::npos ? "" : s.substr(b, e - b + 1);
  }
  const std::string* find(const std::string& key) {
    auto it = values_.find(key);
    if (it == values_.end()) return nullptr;
    used_.insert(key);
    return &it->second;
  }
  static double parse_number(const std::string& key, const std::string& v) {
    double x = 0;
    const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
    require(ec == std::errc{} && end == v.data() + v.size(), "optimizer_args", key, "=", v,
            ": not a number");
    return x;
  }

  std::string optimizer_;
  std::map<std::string, std::string> values_;
  std::set<std::string> used_;
};

/// The optimizer `name` (canonical or kohya's) over `groups` (their lr set; their other
/// hyperparameters are overwritten here): AdamW and SGD take `hyper`'s betas/eps/weight decay/
/// momentum unless --optimizer_args give them; the others take theirs from the args with their
/// references' defaults.
inline AnyOptimizer make_optimizer(std::string_view name, std::vector<ParamGroup> groups,
                                   const ParamGroup& hyper, const std::vector<std::string>& args) {
  const OptimizerName chosen = parse_optimizer_name(name);
  OptimizerArgs a(args, chosen.name);
  auto set_groups = [&](auto&& f) {
    for (ParamGroup& g : groups) f(g);
  };
  AnyOptimizer out{std::in_place_type<Sgd>, std::vector<ParamGroup>{}};
  if (chosen.name == AdamW::kName) {
    const auto betas = a.pair("betas", hyper.betas);
    const double eps = a.number("eps", hyper.eps),
                 wd = a.number("weight_decay", hyper.weight_decay);
    set_groups([&](ParamGroup& g) {
      g.betas = betas;
      g.eps = eps;
      g.weight_decay = wd;
    });
    a.check_used();
    out.emplace<AdamW>(std::move(groups));
  } else if (chosen.name == Sgd::kName) {
    const double momentum = a.number("momentum", hyper.momentum);
    const bool nesterov = a.boolean("nesterov", hyper.nesterov || chosen.nesterov);
    const double wd = a.number("weight_decay", hyper.weight_decay);
    set_groups([&](ParamGroup& g) {
      g.momentum = momentum;
      g.nesterov = nesterov;
      g.weight_decay = wd;
    });
    a.check_used();
    out.emplace<Sgd>(std::move(groups));
  } else if (chosen.name == Lion::kName) {
    LionOptions o;
    o.betas = a.pair("betas", o.betas);
    const double wd = a.number("weight_decay", 0.0);  // lion-pytorch's default
    set_groups([&](ParamGroup& g) { g.weight_decay = wd; });
    a.check_used();
    out.emplace<Lion>(std::move(groups), o);
  } else if (chosen.name == Adafactor::kName) {
    AdafactorOptions o;
    const auto eps = a.pair("eps", {o.eps1, o.eps2});
    o.eps1 = eps[0];
    o.eps2 = eps[1];
    o.clip_threshold = a.number("clip_threshold", o.clip_threshold);
    o.decay_rate = a.number("decay_rate", o.decay_rate);
    o.beta1 = a.optional_number("beta1", o.beta1);
    o.weight_decay = a.number("weight_decay", o.weight_decay);
    o.scale_parameter = a.boolean("scale_parameter", o.scale_parameter);
    o.relative_step = a.boolean("relative_step", o.relative_step);
    o.warmup_init = a.boolean("warmup_init", o.warmup_init);
    a.check_used();
    out.emplace<Adafactor>(std::move(groups), o);
  } else if (chosen.name == Prodigy::kName) {
    ProdigyOptions o;
    o.betas = a.pair("betas", o.betas);
    o.beta3 = a.optional_number("beta3", o.beta3);
    o.eps = a.number("eps", o.eps);
    o.weight_decay = a.number("weight_decay", o.weight_decay);
    o.decouple = a.boolean("decouple", o.decouple);
    o.use_bias_correction = a.boolean("use_bias_correction", o.use_bias_correction);
    o.safeguard_warmup = a.boolean("safeguard_warmup", o.safeguard_warmup);
    o.d0 = a.number("d0", o.d0);
    o.d_coef = a.number("d_coef", o.d_coef);
    o.growth_rate = a.number("growth_rate", o.growth_rate);
    a.check_used();
    out.emplace<Prodigy>(std::move(groups), o);
  } else {
    ScheduleFreeAdamWOptions o;
    o.betas = a.pair("betas", o.betas);
    o.eps = a.number("eps", o.eps);
    o.weight_decay = a.number("weight_decay", o.weight_decay);
    o.warmup_steps = std::int64_t(a.number("warmup_steps", double(o.warmup_steps)));
    o.r = a.number("r", o.r);
    o.weight_lr_power = a.number("weight_lr_power", o.weight_lr_power);
    a.check_used();
    out.emplace<ScheduleFreeAdamW>(std::move(groups), o);
  }
  return out;
}

/// Schedule-free optimizers keep the weights to evaluate (x) apart from the ones the gradient is
/// taken at (y): eval_weights() before sampling or saving, train_weights() before training on.
/// No-ops for the other optimizers.
inline void eval_weights(AnyOptimizer& optimizer) { optimizer.eval(); }
inline void train_weights(AnyOptimizer& optimizer) { optimizer.train(); }

}  // namespace difftrain::train
