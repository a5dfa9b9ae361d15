#pragma once
// A TextEncoder for the loop tests whose context is all zeros ([B, L, 1]): the tests' denoisers
// ignore it.

#include <cstddef>
#include <xtensor/xbuilder.hpp>

#include "difftrain/concepts.hpp"

namespace difftrain::test {

struct ZeroText {
  using input_type = TokenIds;
  using output_type = Tensor3<float>;
  Tensor3<float> encode(const TokenIds& ids) const {
    return xt::zeros<float>({ids.shape()[0], ids.shape()[1], std::size_t{1}});
  }
};
static_assert(TextEncoder<ZeroText>);

}  // namespace difftrain::test
