// AutoencoderKL against diffusers (golden vae_tiny, computed in float64), legacy attention names,
// the banded conv against the naive reference, per-sample vs batch encoding, VaeEncoder.
#include <catch2/catch.hpp>
#include <map>
#include <string>
#include <xtensor/xarray.hpp>
#include <xtensor/xview.hpp>

#include "difftrain/concepts.hpp"
#include "difftrain/core/random.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/vae/vae_encoder.hpp"
#include "difftrain/models/vae/vae_load.hpp"
#include "difftrain/nn/conv2d.hpp"
#include "support/tensor_match.hpp"
#include "vae/vae_test_support.hpp"

using namespace difftrain;
using Catch::Matchers::Contains;
using difftrain::test::data_path;
using difftrain::test::relative_max_error;
using difftrain::test::vae_tiny;

namespace {
constexpr double kForwardTolerance = 1e-4;

io::SafetensorsFile open_data(const std::string& name) {
  return io::SafetensorsFile::open(data_path("vae_tiny/" + name));
}

// every tensor of the weight file, as xarrays
std::map<std::string, xt::xarray<float>> tiny_state() {
  const auto file = open_data("diffusion_pytorch_model.safetensors");
  std::map<std::string, xt::xarray<float>> state;
  for (const auto& name : file.names()) {
    const auto& info = file.info(name);
    xt::xarray<float> value = xt::xarray<float>::from_shape(info.shape);
    file.read_into(name, std::span<float>(value.data(), value.size()));
    state.emplace(name, std::move(value));
  }
  return state;
}
}  // namespace

TEST_CASE("AutoencoderKL encoder matches diffusers on vae_tiny", "[vae][golden]") {
  const auto& vae = vae_tiny();
  const auto inputs = open_data("inputs.safetensors");
  const auto expected = open_data("expected.safetensors");
  const Tensor4<float> image = inputs.read_tensor<float, 4>("image");
  const Tensor4<float> noise = inputs.read_tensor<float, 4>("noise");

  const auto posterior = vae.encode(image);
  const Tensor4<float> latents = vae.scale_latents(posterior.sample(noise));
  const std::map<std::string, const Tensor4<float>*> got = {
      {"mean", &posterior.mean}, {"logvar", &posterior.logvar}, {"latents", &latents}};
  for (const auto& [name, tensor] : got) {
    const Tensor4<float> ref = expected.read_tensor<float, 4>(name);
    REQUIRE(tensor->shape() == ref.shape());
    const double error = relative_max_error(*tensor, ref);
    INFO(name << ": error " << error);
    CHECK(error <= kForwardTolerance);
  }
}

TEST_CASE("AutoencoderKL decoder matches diffusers on vae_tiny", "[vae][golden]") {
  const auto& vae = vae_tiny();
  const Tensor4<float> latents =
      open_data("decode_inputs.safetensors").read_tensor<float, 4>("latents");
  const Tensor4<float> ref =
      open_data("decode_expected.safetensors").read_tensor<float, 4>("image");
  const Tensor4<float> image = vae.decode_latents(latents);
  REQUIRE(image.shape() == ref.shape());
  const double error = relative_max_error(image, ref);
  INFO("image: error " << error);
  CHECK(error <= kForwardTolerance);
}

TEST_CASE("AutoencoderKL encodes a batch as it encodes each sample", "[vae]") {
  const auto& vae = vae_tiny();
  const Tensor4<float> image = open_data("inputs.safetensors").read_tensor<float, 4>("image");
  const Tensor4<float> batch = vae.encode_moments(image);
  for (std::size_t b = 0; b < image.shape()[0]; ++b) {
    const Tensor4<float> one = xt::view(image, xt::range(b, b + 1));
    const Tensor4<float> single = vae.encode_moments(one);
    const Tensor4<float> slice = xt::view(batch, xt::range(b, b + 1));
    REQUIRE_CLOSE(single, slice, 0.0, 0.0);
  }
  // and a tiny band budget (one output row per band) changes nothing beyond rounding
  auto copy = models::load_vae<float>(data_path("vae_tiny"));
  copy.set_max_band_elements(1);
  // (GEMMs of other widths round differently: compare at the scale of the whole tensor)
  CHECK(relative_max_error(copy.encode_moments(image), batch) <= 1e-5);
}

TEST_CASE("conv2d_banded equals the naive convolution", "[vae][conv]") {
  const RandomStream rs{7, 1};
  struct Case {
    nn::Conv2dConfig config;
    std::array<std::size_t, 4> shape;
    std::size_t band;
  };
  const std::vector<Case> cases = {
      {{3, 5, 3, 1, nn::Padding2d::same(1), true}, {2, 3, 9, 7}, 1},
      {{4, 6, 3, 2, nn::Padding2d{0, 1, 0, 1}, true}, {2, 4, 9, 8}, 50},  // VAE downsample
      {{4, 6, 3, 2, nn::Padding2d{0, 1, 0, 1}, true}, {1, 4, 8, 8}, 1 << 20},
      {{2, 3, 1, 1, nn::Padding2d{}, false}, {2, 2, 4, 5}, 1},
  };
  std::uint64_t offset = 0;
  for (const auto& c : cases) {
    nn::Conv2d<float> conv(c.config);
    auto fill = [&](auto& t) {
      fill_normal(std::span<float>(t.data(), t.size()), rs, offset);
      offset += t.size() + 64;
    };
    fill(conv.weight.value);
    if (c.config.bias) fill(conv.bias.value);
    Tensor4<float> x(c.shape);
    fill(x);
    models::ConvWorkspace<float> ws;
    ws.max_band_elements = c.band;
    const Tensor4<float> got = models::conv2d_banded(conv, x, ws);
    const Tensor4<float> ref = nn::reference::conv2d(x, conv);
    REQUIRE(got.shape() == ref.shape());
    REQUIRE_CLOSE(got, ref, 1e-5, 1e-5);
  }
}

TEST_CASE("Legacy attention names and 1x1-conv attention weights load the same model",
          "[vae][load]") {
  const auto& vae = vae_tiny();
  auto state = tiny_state();
  std::map<std::string, xt::xarray<float>> legacy;
  const std::map<std::string, std::string> renames = {
      {"to_q", "query"}, {"to_k", "key"}, {"to_v", "value"}, {"to_out.0", "proj_attn"}};
  std::size_t renamed = 0;
  for (auto& [name, value] : state) {
    std::string key = name;
    for (const auto& [now, old] : renames) {
      const std::string needle = ".attentions.0." + now + ".";
      const auto at = key.find(needle);
      if (at == std::string::npos) continue;
      key.replace(at, needle.size(), ".attentions.0." + old + ".");
      ++renamed;
      // the encoder's weights as original SD checkpoints store them: 1×1 convs [C, C, 1, 1]
      if (key.starts_with("encoder.") && key.ends_with(".weight"))
        value.reshape(std::vector<std::size_t>{value.shape()[0], value.shape()[1], 1, 1});
    }
    legacy.emplace(key, value);
  }
  REQUIRE(renamed == 16);  // 2 mid blocks × 4 projections × (weight, bias)
  REQUIRE(legacy.count("encoder.mid_block.attentions.0.query.weight"));
  REQUIRE(legacy.at("encoder.mid_block.attentions.0.proj_attn.weight").dimension() == 4);

  models::AutoencoderKL<float> old(vae.config());
  models::load_vae_state_dict(old, legacy);
  const Tensor4<float> image = open_data("inputs.safetensors").read_tensor<float, 4>("image");
  REQUIRE_CLOSE(old.encode_moments(image), vae.encode_moments(image), 0.0, 0.0);
  const Tensor4<float> latents =
      open_data("decode_inputs.safetensors").read_tensor<float, 4>("latents");
  REQUIRE_CLOSE(old.decode_latents(latents), vae.decode_latents(latents), 0.0, 0.0);

  // both spellings of one parameter: an error naming both
  auto both = legacy;
  both.emplace("encoder.mid_block.attentions.0.to_q.weight",
               state.at("encoder.mid_block.attentions.0.to_q.weight"));
  CHECK_ERROR_WITH(models::load_vae_state_dict(old, both),
                   Contains("encoder.mid_block.attentions.0.query.weight") &&
                       Contains("encoder.mid_block.attentions.0.to_q.weight"));
}

TEST_CASE("Loading is strict and names the offending keys", "[vae][load]") {
  const auto& vae = vae_tiny();
  auto state = tiny_state();
  models::AutoencoderKL<float> model(vae.config());
  {
    auto missing = state;
    missing.erase("decoder.up_blocks.0.upsamplers.0.conv.weight");
    missing.emplace("decoder.extra.weight", xt::xarray<float>::from_shape({2}));
    missing["quant_conv.bias"] = xt::xarray<float>::from_shape({7});
    CHECK_ERROR_WITH(models::load_vae_state_dict(model, missing),
                     Contains("missing: decoder.up_blocks.0.upsamplers.0.conv.weight") &&
                         Contains("unexpected: decoder.extra.weight") &&
                         Contains("quant_conv.bias has shape [7], expected [8]"));
  }
  // the model's names are exactly the file's
  std::size_t visited = 0;
  model.for_each_parameter("", [&](const std::string& name, auto& p) {
    ++visited;
    INFO(name);
    REQUIRE(state.count(name));
    CHECK(p.value.size() == state.at(name).size());
    CHECK_FALSE(p.trainable);
  });
  CHECK(visited == state.size());
  CHECK_ERROR_WITH(models::load_vae<float>("/nonexistent_vae"),
                   Contains("/nonexistent_vae") && Contains("config.json"));
}

TEST_CASE("AutoencoderKL rejects bad input shapes", "[vae]") {
  const auto& vae = vae_tiny();
  CHECK_ERROR_WITH(vae.encode(Tensor4<float>(std::array<std::size_t, 4>{1, 4, 32, 32})),
                   Contains("image has shape [1,4,32,32]"));
  CHECK_ERROR_WITH(vae.decode(Tensor4<float>(std::array<std::size_t, 4>{1, 3, 8, 8})),
                   Contains("z has shape [1,3,8,8]"));
  CHECK_THROWS_AS(vae.encode(Tensor4<float>(std::array<std::size_t, 4>{1, 3, 1, 1})), Error);
  CHECK(vae.latent_shape({2, 3, 32, 32}) == std::array<std::size_t, 4>{2, 4, 8, 8});
  CHECK(vae.latent_shape({1, 3, 33, 30}) == std::array<std::size_t, 4>{1, 4, 8, 7});
}

static_assert(LatentEncoder<models::VaeEncoder>);
static_assert(!TextEncoder<models::VaeEncoder>);

TEST_CASE("VaeEncoder samples latents with a per-call noise stream", "[vae][encoder]") {
  const auto& vae = vae_tiny();
  const Tensor4<float> image = open_data("inputs.safetensors").read_tensor<float, 4>("image");
  const RandomStream stream{1234, 5};
  models::VaeEncoder encoder(vae, stream);
  const auto posterior = vae.encode(image);

  const Tensor4<float> first = encoder.encode(image);
  const Tensor4<float> second = encoder.encode(image);
  CHECK(encoder.calls() == 2);
  // the documented rule: call k draws normal numbers 0.. of stream.derive(k, kVaeNoisePurpose)
  for (std::uint64_t k = 0; k < 2; ++k) {
    Tensor4<float> noise(posterior.mean.shape());
    fill_normal(std::span<float>(noise.data(), noise.size()),
                stream.derive(k, models::kVaeNoisePurpose));
    const Tensor4<float> expected =
        0.18215f * (posterior.mean + xt::exp(0.5f * posterior.logvar) * noise);
    REQUIRE_CLOSE(k == 0 ? first : second, expected, 1e-6, 1e-7);
  }
  CHECK(xt::amax(xt::abs(first - second))() > 1e-3);  // fresh noise per call

  // resuming at call 1 repeats the second call
  models::VaeEncoder resumed(vae, stream);
  resumed.set_calls(1);
  REQUIRE_CLOSE(resumed.encode(image), second, 0.0, 0.0);

  models::VaeEncoder mode(vae, stream, models::LatentSampling::mode);
  const Tensor4<float> scaled_mean = 0.18215f * posterior.mean;
  REQUIRE_CLOSE(mode.encode(image), scaled_mean, 1e-6, 0.0);
}

TEST_CASE("AutoencoderKL<double> matches the float64 reference more closely", "[vae][golden]") {
  // the reference was computed in float64 from the F32 weights and inputs: a double model is
  // limited only by the F32 rounding of the stored outputs (~6e-8 relative)
  const auto vae = models::load_vae<double>(data_path("vae_tiny"));
  const auto inputs = open_data("inputs.safetensors");
  const auto expected = open_data("expected.safetensors");
  const auto posterior = vae.encode(inputs.read_tensor<double, 4>("image"));
  const Tensor4<double> latents =
      vae.scale_latents(posterior.sample(inputs.read_tensor<double, 4>("noise")));
  const double mean_error =
      relative_max_error(posterior.mean, expected.read_tensor<double, 4>("mean"));
  const double latents_error =
      relative_max_error(latents, expected.read_tensor<double, 4>("latents"));
  const double image_error = relative_max_error(
      vae.decode_latents(open_data("decode_inputs.safetensors").read_tensor<double, 4>("latents")),
      open_data("decode_expected.safetensors").read_tensor<double, 4>("image"));
  INFO("double: mean " << mean_error << ", latents " << latents_error << ", image " << image_error);
  CHECK(mean_error <= 1e-6);
  CHECK(latents_error <= 1e-6);
  CHECK(image_error <= 1e-6);
}
