// Latent cache: write the posterior of a dataset, read it back, resample per epoch.
#include <catch2/catch.hpp>
#include <filesystem>
#include <string>
#include <vector>
#include <xtensor/xview.hpp>

#include "difftrain/core/random.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/vae/latent_cache.hpp"
#include "support/tensor_match.hpp"
#include "vae/vae_test_support.hpp"

using namespace difftrain;
using Catch::Matchers::Contains;
using difftrain::test::data_path;
using difftrain::test::temp_path;
using difftrain::test::vae_tiny;

TEST_CASE("cache_latents round trip", "[vae][cache]") {
  const auto& vae = vae_tiny();
  const Tensor4<float> image = io::SafetensorsFile::open(data_path("vae_tiny/inputs.safetensors"))
                                   .read_tensor<float, 4>("image");
  // a dataset of three images in two batches: the golden pair, then the first image mirrored
  const Tensor4<float> mirrored = xt::view(image, xt::range(0, 1), xt::all(), xt::all(),
                                           xt::range(xt::placeholders::_, xt::placeholders::_, -1));
  const std::vector<Tensor4<float>> batches = {image, mirrored};
  const std::string path = temp_path("cache.safetensors");
  // through the LatentEncoder wrapper (a lazily built view of batches would do as well)
  const models::VaeEncoder encoder(vae, RandomStream{1, 2});
  REQUIRE(models::cache_latents(encoder, batches, path) == 3);

  const models::LatentCache cache = models::load_latent_cache(path);
  std::filesystem::remove(path);
  REQUIRE(cache.size() == 3);
  CHECK(cache.scaling_factor == vae.config().scaling_factor);
  CHECK(cache.shift_factor == vae.config().shift_factor);
  const auto pair = vae.encode(image);
  const auto single = vae.encode(mirrored);
  REQUIRE(cache.mean.shape() == std::array<std::size_t, 4>{3, 4, 8, 8});
  const Tensor4<float> head_mean = xt::view(cache.mean, xt::range(0, 2));
  const Tensor4<float> head_logvar = xt::view(cache.logvar, xt::range(0, 2));
  const Tensor4<float> tail_mean = xt::view(cache.mean, xt::range(2, 3));
  REQUIRE_CLOSE(head_mean, pair.mean, 0.0, 0.0);
  REQUIRE_CLOSE(head_logvar, pair.logvar, 0.0, 0.0);
  REQUIRE_CLOSE(tail_mean, single.mean, 0.0, 0.0);

  // sampling rule: noise of image idx = normal numbers idx·M.. of the stream, in any order
  const RandomStream epoch = RandomStream{99, 0}.derive(3, 1);
  const std::vector<std::size_t> order = {2, 0};
  const Tensor4<float> got = cache.latents(order, epoch);
  const std::size_t M = 4 * 8 * 8;
  for (std::size_t j = 0; j < order.size(); ++j) {
    const std::size_t idx = order[j];
    const Tensor4<float> mean = xt::view(cache.mean, xt::range(idx, idx + 1));
    const Tensor4<float> logvar = xt::view(cache.logvar, xt::range(idx, idx + 1));
    models::DiagonalGaussian<float> posterior{mean, logvar};
    const Tensor4<float> expected = vae.scale_latents(posterior.sample(epoch, idx * M));
    const Tensor4<float> row = xt::view(got, xt::range(j, j + 1));
    REQUIRE_CLOSE(row, expected, 1e-6, 1e-7);
  }
  const Tensor4<float> modes = cache.latents_mode(std::vector<std::size_t>{1});
  const Tensor4<float> mean1 = xt::view(pair.mean, xt::range(1, 2));
  REQUIRE_CLOSE(modes, vae.scale_latents(mean1), 0.0, 0.0);
  CHECK_ERROR_WITH(cache.latents(std::vector<std::size_t>{3}, epoch), Contains("index 3"));
}

TEST_CASE("cache_latents and load_latent_cache reject bad input", "[vae][cache]") {
  const auto& vae = vae_tiny();
  const std::string path = temp_path("bad.safetensors");
  const std::vector<Tensor4<float>> mixed = {
      Tensor4<float>(std::array<std::size_t, 4>{1, 3, 16, 16}),
      Tensor4<float>(std::array<std::size_t, 4>{1, 3, 8, 16})};
  CHECK_ERROR_WITH(models::cache_latents(vae, mixed, path),
                   Contains("batch 1 has shape [1,3,8,16]"));
  CHECK_FALSE(std::filesystem::exists(path));
  // a safetensors file that is not a cache
  CHECK_ERROR_WITH(models::load_latent_cache(data_path("vae_tiny/expected.safetensors")),
                   Contains("format"));
}
