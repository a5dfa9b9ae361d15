#pragma once
// Weight initialisation of freshly built models and adapters, as PyTorch's layers do it, from the
// counter-based RNG (the values depend on the seed only, not on threads or SIMD width).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>
#include <xtensor/xarray.hpp>

#include "difftrain/core/random.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::nn {

/// w ~ U(−bound, bound), bound = 1/√fan_in (PyTorch kaiming_uniform_ with a = √5).
template <class T>
void kaiming_uniform(xt::xarray<T>& w, std::size_t fan_in, RandomStream rs) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
  std::vector<float> u(w.size());
  fill_uniform(std::span<float>(u), rs);
  for (std::size_t i = 0; i < w.size(); ++i)
    w.data()[i] = static_cast<T>(bound * (2.0 * static_cast<double>(u[i]) - 1.0));
}

/// w ~ N(0, std²).
template <class T>
void normal_init(xt::xarray<T>& w, double std, RandomStream rs) {
  std::vector<float> n(w.size());
  fill_normal(std::span<float>(n), rs);
  for (std::size_t i = 0; i < w.size(); ++i)
    w.data()[i] = static_cast<T>(std * static_cast<double>(n[i]));
}

/// PyTorch's default init of a freshly built model: every "<module>.weight" with ≥ 2 dims
/// (Linear [O, I], Conv2d [O, I, kh, kw]) and that module's bias ~ U(−1/√fan_in, 1/√fan_in),
/// fan_in = I·kh·kw; embedding tables ("…_embedding.weight") ~ N(0, 1); other parameters (norm
/// gains 1, biases 0) keep their construction values. Parameter k (in for_each_parameter order)
/// draws from rs.derive(k, StreamPurpose::parameter_init).
template <class T, Module M>
void init_like_pytorch(M& model, RandomStream rs) {
  auto params = named_parameters<T>(model);
  std::map<std::string, std::size_t> fan_in;  // module prefix → fan_in
  for (const auto& [name, p] : params)
    if (name.ends_with(".weight") && p->value.dimension() >= 2)
      fan_in[name.substr(0, name.size() - 7)] = p->value.size() / p->value.shape()[0];
  std::uint64_t index = 0;
  for (auto& [name, p] : params) {
    const RandomStream stream = rs.derive(index++, StreamPurpose::parameter_init);
    if (name.ends_with("_embedding.weight")) {
      normal_init(p->value, 1.0, stream);
      continue;
    }
    const auto it = fan_in.find(name.substr(0, name.rfind('.')));
    if (it != fan_in.end()) kaiming_uniform(p->value, it->second, stream);
  }
}

}  // namespace difftrain::nn
