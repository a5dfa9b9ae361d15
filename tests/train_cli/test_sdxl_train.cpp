// `difftrain train` and `difftrain sample` on a small SDXL-shaped pipeline folder: the golden
// unet_sdxl_tiny UNet ("text_time" added conditions), vae_tiny, clip_tiny as text_encoder and a
// CLIPTextModelWithProjection as text_encoder_2 (its tokenizer_2 pads with "!" as SDXL's does).
// The LoRA file training writes (kohya SDXL names: SGM UNet blocks, lora_te1_, lora_te2_) is read
// back by `difftrain sample --lora` with the same effect: the sampled grid equals the validation
// grid the trained model drew at the end of training, and the PEFT file of the same run samples
// the same images.

#include <catch2/catch.hpp>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "cmd_sample.hpp"
#include "cmd_train.hpp"
#include "difftrain/io/json_file.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/nn/init.hpp"
#include "difftrain/pipeline/generate_images.hpp"
#include "difftrain/pipeline/model_folder.hpp"
#include "image_io.hpp"
#include "support/temp_dir.hpp"
#include "support/tensor_match.hpp"
#include "support/tiny_pipelines.hpp"

namespace fs = std::filesystem;
using namespace difftrain;
using difftrain::tools::TrainCommandOptions;

namespace {

// The SDXL folder (support/tiny_pipelines.hpp) and a folder of captioned images of several sizes
// (so the time ids differ).
struct SdxlFixture {
  test::TempDir dir;
  fs::path model, data;

  SdxlFixture() {
    model = dir / "sdxl";
    test::write_tiny_sdxl_folder(model);
    data = dir / "data";
    fs::create_directories(data);
    const std::vector<std::pair<int, int>> sizes{{16, 16}, {24, 16}, {16, 20}, {32, 24}};
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      tools::Image image(sizes[i].first, sizes[i].second);
      for (std::size_t p = 0; p < image.rgb.size(); ++p)
        image.rgb[p] = std::uint8_t((p * (37 + 11 * i)) % 251);
      const std::string stem = "img" + std::to_string(i);
      tools::save_png((data / (stem + ".png")).string(), image);
      std::ofstream(data / (stem + ".txt")) << (i % 2 ? "a red circle" : "a blue square") << "\n";
    }
  }

  TrainCommandOptions options(const std::string& out) const {
    TrainCommandOptions o;
    o.pretrained_model_name_or_path = model.string();
    o.train_data_dir = data.string();
    o.trainer.output_dir = dir / out;
    o.resolution = 16;
    o.trainer.train_batch_size = 2;
    o.max_train_steps = 2;
    o.trainer.checkpointing_steps = 0;
    o.lr_warmup_steps = 0;
    o.trainer.learning_rate = 1e-2;
    o.trainer.seed = 5;
    o.plain_log = true;
    return o;
  }
};

std::string file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::size_t count_prefixed(const std::vector<std::string>& names, const std::string& prefix) {
  std::size_t n = 0;
  for (const auto& name : names) n += name.rfind(prefix, 0) == 0;
  return n;
}

}  // namespace

TEST_CASE("difftrain train on an SDXL folder: kohya SDXL LoRA read back with the same effect",
          "[train_cli][sdxl]") {
  SdxlFixture f;
  {  // the folder loads as SDXL: both tokenizers' ids side by side, tokenizer_2 pads with "!"
    auto m = pipeline::load_model_folder(f.model.string());
    REQUIRE(m.is_sdxl());
    const TokenIds ids = m.tokenize({"a red circle"});
    REQUIRE(ids.shape() == std::array<std::size_t, 2>{1, 154});
    CHECK(ids(0, 76) == m.tokenizer.pad_token_id());
    CHECK(ids(0, 153) == 0);  // "!"
  }
  std::map<std::string, fs::path> files;
  for (const std::string format : {"kohya", "peft"}) {
    TrainCommandOptions o = f.options("out_" + format);
    o.train_text_encoder = true;
    o.save_format = format;
    o.validation_prompt = "a red circle";
    o.num_validation_images = 1;
    o.validation_inference_steps = 2;
    o.validation_guidance_scale = 3;
    const auto r = tools::run_train(o, stdout);
    REQUIRE(r.global_step == 2);
    files[format] = r.lora_file;
    const auto file = io::SafetensorsFile::open(r.lora_file.string());
    const std::vector<std::string> names = file.names();
    if (format == "kohya") {
      CHECK(count_prefixed(names, "lora_unet_input_blocks_") > 0);
      CHECK(count_prefixed(names, "lora_unet_middle_block_") > 0);
      CHECK(count_prefixed(names, "lora_unet_output_blocks_") > 0);
      CHECK(count_prefixed(names, "lora_unet_down_blocks_") == 0);  // not diffusers paths
      // both encoders, 4 modules (q, k, v, out) of each layer, down/up/alpha each
      CHECK(count_prefixed(names, "lora_te1_") == 3 * 4 * 3);
      CHECK(count_prefixed(names, "lora_te2_") == 3 * 4 * 3);
      CHECK(count_prefixed(names, "lora_te_") == 0);
      CHECK(file.metadata().at("ss_base_model_version") == "sdxl_base_v1-0");
    } else {
      CHECK(count_prefixed(names, "text_encoder.") == 3 * 4 * 2);
      CHECK(count_prefixed(names, "text_encoder_2.") == 3 * 4 * 2);
    }
    // read back: `difftrain sample --lora` draws the validation grid of the trained model
    tools::SampleCommandOptions s;
    s.model = f.model.string();
    s.lora = r.lora_file.string();
    s.prompts = {o.validation_prompt};
    s.num_inference_steps = o.validation_inference_steps;
    s.guidance_scale = o.validation_guidance_scale;
    s.seed = o.trainer.seed;
    s.height = s.width = 16;
    s.out = f.dir / ("sampled_" + format + ".png");
    tools::run_sample(s);
    REQUIRE(r.validation_images.size() == 1);
    CHECK(file_bytes(s.out) == file_bytes(r.validation_images.back()));
  }

  // the two files have the same effect, and it is not nothing: the UNet's prediction and both
  // encoders' outputs move against the base model's
  auto base = pipeline::load_model_folder(f.model.string());
  auto kohya = pipeline::load_model_folder(f.model.string());
  auto peft = pipeline::load_model_folder(f.model.string());
  kohya.apply_lora(files["kohya"].string());
  peft.apply_lora(files["peft"].string());
  const std::vector<std::string> prompts{"a red circle", "a blue square"};
  const auto e0 = base.encode_sdxl_prompts(prompts);
  const auto ek = kohya.encode_sdxl_prompts(prompts);
  const auto ep = peft.encode_sdxl_prompts(prompts);
  REQUIRE_CLOSE(ek.prompt_embeds, ep.prompt_embeds, 0.0, 0.0);
  REQUIRE_CLOSE(ek.pooled_prompt_embeds, ep.pooled_prompt_embeds, 0.0, 0.0);
  CHECK(xt::amax(xt::abs(ek.prompt_embeds - e0.prompt_embeds))() > 1e-5);
  CHECK(xt::amax(xt::abs(ek.pooled_prompt_embeds - e0.pooled_prompt_embeds))() > 1e-5);
  Tensor4<float> x(std::array<std::size_t, 4>{2, 4, 2, 2});
  fill_normal(std::span<float>(x.data(), x.size()), RandomStream{8, 0});
  const std::vector<std::int64_t> t{10, 500};
  const auto added = pipeline::sdxl_added_conditions(e0.pooled_prompt_embeds, nullptr, 16, 16);
  auto predict = [&](pipeline::ModelFolder& m) {
    return m.unet.forward(x, std::span<const std::int64_t>(t), e0.prompt_embeds, added);
  };
  const Tensor4<float> pk = predict(kohya);
  REQUIRE_CLOSE(pk, predict(peft), 0.0, 0.0);
  CHECK(xt::amax(xt::abs(pk - predict(base)))() > 1e-5);
}

TEST_CASE(
    "difftrain train on an SDXL folder: cached latents and text-encoder outputs; parts that do not "
    "fit",
    "[train_cli][sdxl]") {
  SdxlFixture f;
  {  // --cache_latents gives the time ids of the cached crops
    TrainCommandOptions o = f.options("cached");
    o.cache_latents = true;
    o.random_flip = true;
    const auto r = tools::run_train(o, stdout);
    CHECK(r.global_step == 2);
  }
  {  // --cache_text_encoder_outputs(_to_disk) keeps context and pooled embeddings: the result
     // is the uncached run's, and a second run reads the disk cache
    auto run = [&](const std::string& out, bool cache) {
      TrainCommandOptions o = f.options(out);
      o.cache_text_encoder_outputs_to_disk = cache;
      // SGD: the weights move with the gradients (AdamW's first steps are lr·sign(g), which turns
      // round-off in a near-zero gradient into a full step)
      o.trainer.optimizer = "sgd";
      o.trainer.learning_rate = 0.5;
      o.disk_cache_dir = f.dir / "cache";
      return tools::run_train(o, stdout);
    };
    const auto uncached = run("uncached", false), cached = run("cached_te", true),
               again = run("cached_te_again", true);
    CHECK(cached.text_encoder_cache.stored > 0);
    CHECK(again.text_encoder_cache.loaded == cached.text_encoder_cache.stored);
    CHECK(again.text_encoder_cache.stored == 0);
    const auto a = io::SafetensorsFile::open(uncached.lora_file.string());
    for (const auto& r : {cached, again}) {
      const auto b = io::SafetensorsFile::open(r.lora_file.string());
      REQUIRE(a.names() == b.names());
      for (const auto& name : a.names()) {
        INFO(name);
        const std::vector<float> x = a.read<float>(name), y = b.read<float>(name);
        double worst = 0, scale = 0;
        for (std::size_t i = 0; i < x.size(); ++i) {
          worst = std::max(worst, double(std::abs(x[i] - y[i])));
          scale = std::max(scale, double(std::abs(x[i])));
        }
        CHECK(worst <= 1e-5 * std::max(scale, 1.0));
      }
    }
  }
  // the parts must fit: a UNet without "text_time" beside text_encoder_2, text_encoder_2 alone
  nlohmann::json unet = io::read_json_file("test", f.model / "unet" / "config.json");
  const fs::path sd_unet = f.dir / "sd_unet";
  {
    nlohmann::json sd = unet;
    sd["addition_embed_type"] = nullptr;
    models::UNet2DConditionModel<float> plain(models::UNet2DConditionConfig::from_json(sd));
    fs::create_directories(sd_unet);
    io::write_json_file(sd_unet / "config.json", sd);
    pipeline::save_model_weights(plain, sd_unet / "diffusion_pytorch_model.safetensors");
  }
  fs::rename(f.model / "unet", f.dir / "sdxl_unet");
  fs::rename(sd_unet, f.model / "unet");
  CHECK_THROWS_WITH(pipeline::load_model_folder(f.model.string()),
                    Catch::Contains("addition_embed_type is not \"text_time\""));
  fs::remove_all(f.model / "unet");
  fs::rename(f.dir / "sdxl_unet", f.model / "unet");
  fs::remove_all(f.model / "tokenizer_2");
  CHECK_THROWS_WITH(pipeline::load_model_folder(f.model.string()), Catch::Contains("tokenizer_2"));
  fs::remove_all(f.model / "text_encoder_2");
  CHECK_THROWS_WITH(pipeline::load_model_folder(f.model.string()),
                    Catch::Contains("no text_encoder_2/"));
}

TEST_CASE("difftrain train from an SDXL single file: the folder's run, bit for bit",
          "[train_cli][sdxl]") {
  SdxlFixture f;
  const fs::path file = f.dir / "sdxl.safetensors";
  test::write_tiny_sdxl_file(f.model, file.string());
  TrainCommandOptions from_folder = f.options("folder");
  from_folder.train_text_encoder = true;
  TrainCommandOptions from_file = from_folder;
  from_file.trainer.output_dir = f.dir / "file";
  from_file.pretrained_model_name_or_path = file.string();
  from_file.single_file.single_file_config = f.model.string();  // the configs and tokenizers
  const auto a = tools::run_train(from_folder, stdout), b = tools::run_train(from_file, stdout);
  const auto x = io::SafetensorsFile::open(a.lora_file.string()),
             y = io::SafetensorsFile::open(b.lora_file.string());
  REQUIRE(x.names() == y.names());
  for (const auto& name : x.names()) {
    INFO(name);
    CHECK(x.read<float>(name) == y.read<float>(name));
  }
  CHECK(y.metadata().at("ss_base_model_version") == "sdxl_base_v1-0");
  CHECK(y.metadata().at("ss_sd_model_name") == "sdxl.safetensors");

  // a single file needs a tokenizer (it holds no vocabulary), and --full_finetune a folder
  TrainCommandOptions bare = from_file;
  bare.single_file = {};
  CHECK_THROWS_WITH(tools::run_train(bare, stdout), Catch::Contains("tokenizer"));
  TrainCommandOptions full = from_file;
  full.full_finetune = true;
  full.train_text_encoder = false;
  CHECK_THROWS_WITH(tools::run_train(full, stdout),
                    Catch::Contains("--full_finetune") && Catch::Contains("single file"));

  // difftrain sample takes the file too
  tools::SampleCommandOptions s;
  s.model = file.string();
  s.single_file.single_file_config = f.model.string();
  s.lora = b.lora_file.string();
  s.prompts = {"a red circle"};
  s.num_inference_steps = 2;
  s.height = s.width = 16;
  s.out = f.dir / "from_file.png";
  tools::run_sample(s);
  s.model = f.model.string();
  s.single_file = {};
  s.out = f.dir / "from_folder.png";
  tools::run_sample(s);
  CHECK(file_bytes(f.dir / "from_file.png") == file_bytes(f.dir / "from_folder.png"));
}
