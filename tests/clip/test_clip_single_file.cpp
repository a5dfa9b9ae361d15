// ClipTextModel from an original single-file checkpoint: cond_stage_model.transformer.* with
// transformers' names below the prefix (with or without the "text_model." level of older
// transformers versions), built here from the golden clip_tiny weights next to the other
// components' tensors and a position_ids buffer; loads strictly and reproduces the golden output.

#include <catch2/catch.hpp>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "clip/clip_test_support.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/clip/clip.hpp"
#include "support/tensor_match.hpp"

using namespace difftrain;
using Catch::Matchers::Contains;

namespace {

// clip_tiny's tensors below `prefix` (with `text_model.` dropped when !keep_text_model), the
// buffer position_ids, and tensors of the other components; `skip` is left out.
void write_single_file(const std::string& path, const std::string& prefix, bool keep_text_model,
                       const std::string& skip = "") {
  const auto file = io::SafetensorsFile::open(test::clip_golden("model.safetensors"));
  std::vector<std::vector<float>> values;  // kept alive until the file is written
  values.reserve(file.names().size() + 2);
  std::vector<io::TensorToWrite> list;
  for (const auto& name : file.names()) {
    if (name == skip || name == "text_model.embeddings.position_ids") continue;
    std::string key = name;
    if (!keep_text_model && key.starts_with("text_model.")) key = key.substr(11);
    values.push_back(file.read<float>(name));
    list.push_back(io::TensorToWrite::from_span(prefix + key, std::span<const float>(values.back()),
                                                file.info(name).shape, io::Dtype::F32));
  }
  std::vector<std::int64_t> position_ids(77);
  std::iota(position_ids.begin(), position_ids.end(), 0);
  list.push_back(io::TensorToWrite::from_span(
      prefix + (keep_text_model ? "text_model." : "") + "embeddings.position_ids",
      std::span<const std::int64_t>(position_ids), {1, 77}));
  values.push_back(std::vector<float>(6, 0.25f));
  list.push_back(io::TensorToWrite::from_span("model.diffusion_model.out.2.bias",
                                              std::span<const float>(values.back()), {6}));
  values.push_back(std::vector<float>(1, 0.5f));
  list.push_back(io::TensorToWrite::from_span("first_stage_model.quant_conv.bias",
                                              std::span<const float>(values.back()), {1}));
  io::save_safetensors(path, list);
}

}  // namespace

TEST_CASE("load_clip_text_model_single_file: cond_stage_model.transformer.* of a single file",
          "[clip][ldm][load]") {
  test::TempDir dir("clip_single_file");
  const auto config = models::ClipTextConfig::from_file(test::clip_golden("config.json"));
  const TokenIds ids = io::SafetensorsFile::open(test::clip_golden("inputs.safetensors"))
                           .read_tensor<std::int64_t, 2>("input_ids");
  const auto expected = io::SafetensorsFile::open(test::clip_golden("expected.safetensors"));
  for (const bool keep_text_model : {true, false}) {
    INFO("names with text_model.: " << keep_text_model);
    const std::string path = dir.file("ldm.safetensors");
    write_single_file(path, "cond_stage_model.transformer.", keep_text_model);
    auto model = models::load_clip_text_model_single_file<float>(path, config);
    const auto out = model.forward(ids);
    const double error = test::golden_error(out.last_hidden_state,
                                            expected.read_tensor<float, 3>("last_hidden_state"));
    INFO("last_hidden_state error " << error);
    CHECK(error <= 1e-4);
  }
  // a missing tensor, named as the file spells it
  const std::string path = dir.file("broken.safetensors");
  write_single_file(path, "cond_stage_model.transformer.", true,
                    "text_model.encoder.layers.1.mlp.fc2.bias");
  CHECK_THROWS_WITH(
      models::load_clip_text_model_single_file<float>(path, config),
      Contains("broken.safetensors") &&
          Contains(
              "1 missing: cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias"));
  // SD 2.x files keep OpenCLIP's names (cond_stage_model.model.*): not this component
  write_single_file(path, "cond_stage_model.model.", true);
  CHECK_THROWS_WITH(models::load_clip_text_model_single_file<float>(path, config),
                    Contains("has no tensor named cond_stage_model.transformer.*"));
}
