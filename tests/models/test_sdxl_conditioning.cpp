// SDXL's conditioning from its two text encoders, checked against transformers' golden outputs
// of each encoder alone: prompt_embeds = [penultimate hidden states of clip_tiny,
// of clip_proj_tiny] along features, pooled = clip_proj_tiny's text_embeds; and the time ids.
#include <catch2/catch.hpp>
#include <string>

#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/models.hpp"
#include "difftrain/models/sdxl_conditioning.hpp"
#include "single_threaded.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using test::data_path;

namespace {
TokenIds ids_of(const std::string& folder) {
  return io::SafetensorsFile::open(data_path(folder + "/inputs.safetensors"))
      .read_tensor<std::int64_t, 2>("input_ids");
}
Tensor3<float> expected3(const std::string& folder, const std::string& name) {
  return io::SafetensorsFile::open(data_path(folder + "/expected.safetensors"))
      .read_tensor<float, 3>(name);
}
}  // namespace

TEST_CASE("SdxlTextEncoders: penultimate states of both encoders, pooled text_embeds",
          "[models][sdxl]") {
  const test::SingleThreaded single_threaded;
  auto te1 = models::load_clip_text_model<float>(data_path("clip_tiny"));
  auto te2 = models::load_clip_text_model<float>(data_path("clip_proj_tiny"));
  auto make = [&](std::size_t clip_skip) { return models::SdxlTextEncoders(te1, te2, clip_skip); };
  const TokenIds ids_1 = ids_of("clip_tiny"), ids_2 = ids_of("clip_proj_tiny");
  for (const std::size_t clip_skip : {0, 1}) {
    INFO("clip_skip " << clip_skip);
    auto encoders = make(clip_skip);
    const models::SdxlPromptEmbeds out = encoders.encode(ids_1, ids_2);
    // 3-layer encoders: hidden_states.2 is the penultimate layer, hidden_states.1 one more back
    const std::string layer = "hidden_states." + std::to_string(2 - clip_skip);
    const Tensor3<float> h1 = expected3("clip_tiny", layer),
                         h2 = expected3("clip_proj_tiny", layer);
    REQUIRE(out.prompt_embeds.shape() == std::array<std::size_t, 3>{2, 77, 64});
    const Tensor3<float> first =
        xt::view(out.prompt_embeds, xt::all(), xt::all(), xt::range(0, 32));
    const Tensor3<float> second =
        xt::view(out.prompt_embeds, xt::all(), xt::all(), xt::range(32, 64));
    REQUIRE_CLOSE(first, h1, 1e-5, 1e-5);
    REQUIRE_CLOSE(second, h2, 1e-5, 1e-5);
    const auto pooled = io::SafetensorsFile::open(data_path("clip_proj_tiny/expected.safetensors"))
                            .read_tensor<float, 2>("text_embeds");
    REQUIRE_CLOSE(out.pooled_prompt_embeds, pooled, 1e-5, 1e-5);
  }
  // the encoders' roles are checked, and the two id tensors must agree in shape
  CHECK_THROWS_WITH(models::SdxlTextEncoders(te2, te1),
                    Catch::Contains("text_encoder is a CLIPTextModelWithProjection"));
  CHECK_THROWS_WITH(make(3), Catch::Contains("clip_skip 3 leaves no layer"));
  auto encoders = make(0);
  const TokenIds short_ids = xt::view(ids_2, xt::all(), xt::range(0, 10));
  CHECK_THROWS_WITH(encoders.encode(ids_1, short_ids), Catch::Contains("[2,10]"));
}

TEST_CASE("sdxl_time_ids: original size, crop top-left, target size per image", "[models][sdxl]") {
  const Tensor<float, 2> ids = models::sdxl_time_ids(
      {{{1024, 768}, {0, 0}, {1024, 1024}}, {{512, 384}, {24, 8}, {128, 128}}});
  REQUIRE(ids.shape() == std::array<std::size_t, 2>{2, 6});
  const Tensor<float, 2> expected = {{1024, 768, 0, 0, 1024, 1024}, {512, 384, 24, 8, 128, 128}};
  REQUIRE_CLOSE(ids, expected, 0.0, 0.0);
}
