// kohya sd-scripts' LoRA metadata: SHA-256 (FIPS 180-2 vectors), the in-memory serialization
// (== the written file), the sshs_* hashes against SHA-256 over the file's own bytes, Python
// str() formatting, and the ss_* / modelspec.* maps of an SD1 ε run and an SD2 v run against
// values written from kohya-ss/sd-scripts' code (train_network.py, library/sai_model_spec.py).
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "difftrain/io/safetensors.hpp"
#include "difftrain/io/sha256.hpp"
#include "difftrain/lora/kohya_metadata.hpp"
#include "support/temp_dir.hpp"

using namespace difftrain;
using Catch::Matchers::Contains;

namespace test_kohya_metadata {

std::vector<std::byte> file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  const std::vector<char> chars((std::istreambuf_iterator<char>(in)),
                                std::istreambuf_iterator<char>());
  std::vector<std::byte> bytes(chars.size());
  std::memcpy(bytes.data(), chars.data(), chars.size());
  return bytes;
}

// SHA-256 of bytes [begin, min(end, size)), fed to the streaming API in odd-sized pieces.
std::string sha256_of_range(const std::vector<std::byte>& bytes, std::size_t begin,
                            std::size_t end) {
  io::Sha256 h;
  end = std::min(end, bytes.size());
  static constexpr std::size_t kPieces[] = {1, 7, 63, 64, 65, 1000, 4093, 65537};
  std::size_t i = 0;
  for (std::size_t at = begin; at < end; ++i) {
    const std::size_t n = std::min(kPieces[i % std::size(kPieces)], end - at);
    h.update(std::span(bytes).subspan(at, n));
    at += n;
  }
  return h.hexdigest();
}

// The header length N in a file's first 8 bytes.
std::size_t header_length(const std::vector<std::byte>& bytes) {
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  return static_cast<std::size_t>(n);
}

// A kohya-like LoRA: per module lora_down [r, in], lora_up [out, r] (F32) and a rank-0 alpha,
// plus an F16 tensor so the dtype-width order matters; `floats` sets the file size.
struct Tensors {
  std::vector<float> down, up, alpha{4.0f};
  std::vector<float> f16_values{0.5f, -1.25f, 3.0f};
  std::vector<io::TensorToWrite> list;
  explicit Tensors(std::size_t floats) {
    down.resize(floats / 2);
    up.resize(floats - floats / 2);
    for (std::size_t i = 0; i < down.size(); ++i) down[i] = 0.001f * float(int(i % 2001) - 1000);
    for (std::size_t i = 0; i < up.size(); ++i) up[i] = 0.002f * float(int(i % 997) - 498);
    list.push_back(io::TensorToWrite::from_span<float>(
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight", down, {down.size()}));
    list.push_back(io::TensorToWrite::from_span<float>(
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight", up, {up.size()}));
    list.push_back(io::TensorToWrite::from_span<float>(
        "lora_unet_mid_block_attentions_0_proj_in.alpha", alpha, {}));
    list.push_back(io::TensorToWrite::from_span<float>("half", f16_values, {3}, io::Dtype::F16));
  }
};

std::map<std::string, std::string> ss_only(const std::map<std::string, std::string>& m) {
  std::map<std::string, std::string> out;
  for (const auto& [k, v] : m)
    if (k.rfind("ss_", 0) == 0) out.emplace(k, v);
  return out;
}

}  // namespace test_kohya_metadata

using namespace test_kohya_metadata;

// ---------------------------------------------------------------------------------------------
// SHA-256

TEST_CASE("Sha256 matches the FIPS 180-2 test vectors") {
  CHECK(io::sha256_hex(std::string_view("")) ==
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(io::sha256_hex(std::string_view("abc")) ==
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(io::sha256_hex(
            std::string_view("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")) ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");

  // One million 'a', streamed in uneven pieces; digest() does not end the stream.
  const std::string a(1'000'000, 'a');
  io::Sha256 h;
  std::size_t at = 0;
  for (std::size_t piece = 1; at < a.size(); piece = piece * 3 % 1021 + 1) {
    const std::size_t n = std::min(piece, a.size() - at);
    h.update(std::string_view(a).substr(at, n));
    at += n;
  }
  const std::string expected = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0";
  CHECK(h.hexdigest() == expected);
  CHECK(h.hexdigest() == expected);
  CHECK(io::sha256_hex(std::string_view(a)) == expected);
  h.update(std::string_view("a"));
  CHECK(h.hexdigest() == io::sha256_hex(std::string_view(a + "a")));

  // Messages around the padding boundaries (55, 56, 63, 64, 65 bytes) agree streamed vs whole.
  for (std::size_t n : {55, 56, 57, 63, 64, 65, 119, 120, 128}) {
    const std::string m(n, 'x');
    io::Sha256 pieces;
    for (char c : m) pieces.update(std::string_view(&c, 1));
    CHECK(pieces.hexdigest() == io::sha256_hex(std::string_view(m)));
  }
}

// ---------------------------------------------------------------------------------------------
// Serialization

TEST_CASE("serialize_safetensors returns the bytes save_safetensors writes") {
  test::TempDir dir;
  const Tensors t(100);
  const std::map<std::string, std::string> metadata = {{"ss_network_dim", "4"},
                                                       {"modelspec.title", "t\xc3\xa9st \"q\""}};
  const std::string path = dir.file("lora.safetensors");
  io::save_safetensors(path, t.list, metadata);
  const std::vector<std::byte> written = file_bytes(path);
  CHECK(io::serialize_safetensors(t.list, metadata) == written);
  CHECK(io::serialize_safetensors({}, {}) == [&] {
    io::save_safetensors(dir.file("empty.safetensors"), {});
    return file_bytes(dir.file("empty.safetensors"));
  }());

  const io::SafetensorsLayout layout = io::plan_safetensors(t.list, metadata);
  CHECK(layout.file_size() == written.size());
  CHECK(layout.header_size() == header_length(written));
  CHECK(layout.header_size() % 8 == 0);
  REQUIRE(layout.order().size() == 4);
  CHECK(layout.order().back()->name == "half");  // F16 after the F32 tensors
  CHECK(layout.order().front()->name == "lora_unet_mid_block_attentions_0_proj_in.alpha");

  // The same validation as save_safetensors, named after the function.
  REQUIRE_THROWS_WITH(io::serialize_safetensors({t.list[0], t.list[0]}),
                      Contains("serialize_safetensors: tensor name") && Contains("appears twice"));
}

// ---------------------------------------------------------------------------------------------
// Hashes

TEST_CASE("kohya hashes equal SHA-256 over the written file's bytes") {
  test::TempDir dir;
  // Sizes: under 1 MiB (empty legacy window), a partial window, past the window.
  CHECK(io::serialize_safetensors(Tensors(1000).list, {}).size() < 0x100000);
  CHECK(io::serialize_safetensors(Tensors(400'000).list, {}).size() > 0x110000);
  const auto partial = io::serialize_safetensors(Tensors(262'400).list, {});
  CHECK(partial.size() > 0x100000);
  CHECK(partial.size() < 0x110000);
  for (std::size_t floats : {std::size_t{1000}, std::size_t{262'400}, std::size_t{400'000}}) {
    CAPTURE(floats);
    const Tensors t(floats);
    std::map<std::string, std::string> metadata = {{"ss_network_dim", "4"},
                                                   {"ss_network_alpha", "4.0"},
                                                   {"modelspec.title", "edited later"},
                                                   {"modelspec.date", "2023-11-14T23:13:20"}};
    const lora::KohyaHashes hashes = lora::kohya_hashes(t.list, metadata);
    lora::add_kohya_hashes(t.list, metadata);
    CHECK(metadata.at("sshs_model_hash") == hashes.model_hash);
    CHECK(metadata.at("sshs_legacy_hash") == hashes.legacy_hash);
    CHECK(hashes.model_hash.size() == 64);
    CHECK(hashes.legacy_hash.size() == 8);

    // The file as saved (all metadata, hashes included): the model hash covers [8 + N, EOF),
    // which other metadata does not change.
    const std::string path = dir.file("full.safetensors");
    io::save_safetensors(path, t.list, metadata);
    const std::vector<std::byte> full = file_bytes(path);
    CHECK(sha256_of_range(full, 8 + header_length(full), full.size()) == hashes.model_hash);

    // The legacy hash is over the serialization with only the ss_ keys (kohya), at
    // [0x100000, 0x110000) of that file.
    const std::string ss_path = dir.file("ss.safetensors");
    io::save_safetensors(ss_path, t.list, ss_only(metadata));
    const std::vector<std::byte> ss = file_bytes(ss_path);
    CHECK(sha256_of_range(ss, 8 + header_length(ss), ss.size()) == hashes.model_hash);
    CHECK(sha256_of_range(ss, 0x100000, 0x110000).substr(0, 8) == hashes.legacy_hash);
    if (ss.size() <= 0x100000) {
      CHECK(hashes.legacy_hash == "e3b0c442");  // sha256(b"")[:8]: BytesIO reads nothing
    } else if (ss.size() < 0x110000) {
      CHECK(hashes.legacy_hash == sha256_of_range(ss, 0x100000, ss.size()).substr(0, 8));
      CHECK(hashes.legacy_hash != "e3b0c442");
    } else {
      CHECK(ss.size() > 0x110000);
    }

    // Editing metadata other than ss_ keys leaves both hashes (kohya hashes the ss_ keys only).
    metadata["modelspec.title"] = "another title, longer than before";
    CHECK(lora::kohya_hashes(t.list, metadata).model_hash == hashes.model_hash);
    CHECK(lora::kohya_hashes(t.list, metadata).legacy_hash == hashes.legacy_hash);
  }
}

// ---------------------------------------------------------------------------------------------
// Python formatting

TEST_CASE("python_float is Python's str(float)") {
  using lora::python_float;
  CHECK(python_float(0.0001) == "0.0001");
  CHECK(python_float(1e-05) == "1e-05");
  CHECK(python_float(1.5e-05) == "1.5e-05");
  CHECK(python_float(2e-06) == "2e-06");
  CHECK(python_float(0.000123) == "0.000123");
  CHECK(python_float(1.0) == "1.0");
  CHECK(python_float(100.0) == "100.0");
  CHECK(python_float(0.1) == "0.1");
  CHECK(python_float(0.3) == "0.3");
  CHECK(python_float(-2.5) == "-2.5");
  CHECK(python_float(1700000000.25) == "1700000000.25");
  CHECK(python_float(1234567890123456.0) == "1234567890123456.0");
  CHECK(python_float(1e16) == "1e+16");
  CHECK(python_float(12345678901234567.0) == "1.2345678901234568e+16");
  CHECK(python_float(1e100) == "1e+100");
  CHECK(python_float(1e-300) == "1e-300");
  CHECK(python_float(1.7976931348623157e308) == "1.7976931348623157e+308");
  CHECK(python_float(5e-324) == "5e-324");
  CHECK(python_float(0.0) == "0.0");
  CHECK(python_float(-0.0) == "-0.0");
  CHECK(python_float(std::numeric_limits<double>::infinity()) == "inf");
  CHECK(python_float(-std::numeric_limits<double>::infinity()) == "-inf");
  CHECK(python_float(std::numeric_limits<double>::quiet_NaN()) == "nan");
  CHECK(python_float(0.1 + 0.2) == "0.30000000000000004");

  // A float flag: 0.1f is 0.10000000149011612 as a double; decimal_double recovers 0.1.
  CHECK(python_float(0.1f) == "0.10000000149011612");
  CHECK(python_float(lora::decimal_double(0.1f)) == "0.1");
  CHECK(python_float(lora::decimal_double(0.3f)) == "0.3");
  CHECK(python_float(lora::decimal_double(1e-5f)) == "1e-05");

  CHECK(lora::python_bool(true) == "True");
  CHECK(lora::python_bool(false) == "False");
  CHECK(lora::python_optional(std::optional<double>()) == "None");
  CHECK(lora::python_optional(std::optional<double>(4)) == "4.0");
  CHECK(lora::python_optional(std::optional<std::int64_t>(4)) == "4");
  CHECK(lora::python_optional(std::optional<std::string>()) == "None");
}

TEST_CASE("python_json_string is json.dumps of a str") {
  using lora::python_json_string;
  CHECK(python_json_string("10_sks dog") == "\"10_sks dog\"");
  CHECK(python_json_string("a\"b\\c") == "\"a\\\"b\\\\c\"");
  CHECK(python_json_string("\n\r\t\b\f") == "\"\\n\\r\\t\\b\\f\"");
  CHECK(python_json_string(std::string("\x01\x1f\x7f", 3)) == "\"\\u0001\\u001f\\u007f\"");
  CHECK(python_json_string("caf\xc3\xa9") == "\"caf\\u00e9\"");           // é
  CHECK(python_json_string("\xe7\x8a\xac") == "\"\\u72ac\"");             // 犬
  CHECK(python_json_string("\xf0\x9f\x98\x80") == "\"\\ud83d\\ude00\"");  // 😀
  REQUIRE_THROWS_WITH(python_json_string("\xff"), Contains("UTF-8"));
  REQUIRE_THROWS_WITH(python_json_string("\xc3"), Contains("UTF-8"));
  REQUIRE_THROWS_WITH(python_json_string("\xc0\xaf"), Contains("overlong"));
  REQUIRE_THROWS_WITH(python_json_string("\xed\xa0\x80"), Contains("invalid"));  // a surrogate
}

TEST_CASE("tag frequency counts caption tags as BaseDataset.set_tag_frequency") {
  lora::KohyaTagFrequency f{"10_sks dog", {}};
  f.add_caption("sks dog, Outdoors,grass");
  f.add_caption(" sks dog ,  , GRASS,");
  f.add_caption("");
  REQUIRE(f.counts.size() == 3);
  CHECK(f.counts[0] == std::pair<std::string, std::int64_t>{"sks dog", 2});
  CHECK(f.counts[1] == std::pair<std::string, std::int64_t>{"outdoors", 1});
  CHECK(f.counts[2] == std::pair<std::string, std::int64_t>{"grass", 2});
}

// ---------------------------------------------------------------------------------------------
// The metadata maps

// An SD 1.5 ε-prediction run from a DreamBooth-style folder "10_sks dog" (1 image × 10 repeats),
// `--network_dim 4 --network_alpha 4 --learning_rate 1e-4 --max_train_steps 100
//  --lr_warmup_steps 500 --seed 42 --cache_latents --min_snr_gamma 5 --noise_offset 0.05
//  --output_name my_lora`.
// Every value below is what train_network.py's `metadata` dict holds after
// `metadata = {k: str(v) ...}`, then save_model's three keys, then get_sai_model_spec.
TEST_CASE("kohya_metadata of an SD1 epsilon run") {
  lora::KohyaRunInfo run;
  run.sd_model_name = "stable-diffusion-v1-5";
  run.network_dim = 4;
  run.network_alpha = 4.0;
  run.learning_rate = 1e-4;
  run.max_train_steps = 100;
  run.lr_warmup_steps = 500;
  run.num_epochs = 10;
  run.num_batches_per_epoch = 10;
  run.steps = 100;
  run.epoch = 10;
  run.seed = 42;
  run.cache_latents = true;
  run.min_snr_gamma = 5.0;
  run.noise_offset = lora::decimal_double(0.05f);
  run.num_train_images = 10;
  run.dataset_dirs = {{"10_sks dog", 10, 1}};
  lora::KohyaTagFrequency tags{"10_sks dog", {}};
  tags.add_caption("sks dog, outdoors");
  run.tag_frequency = {tags};
  run.output_name = "my_lora";
  run.session_id = 123456789;
  run.training_started_at = 1700000000.25;
  run.saved_at = 1700003600.5;
  run.utc_offset_seconds = 0;

  const std::map<std::string, std::string> expected = {
      // train_network.py `metadata = {...}` (its order)
      {"ss_session_id", "123456789"},
      {"ss_training_started_at", "1700000000.25"},  // time.time()
      {"ss_output_name", "my_lora"},
      {"ss_learning_rate", "0.0001"},
      {"ss_text_encoder_lr", "None"},  // --text_encoder_lr not given
      {"ss_unet_lr", "None"},          // --unet_lr not given
      {"ss_num_train_images", "10"},
      {"ss_num_validation_images", "0"},
      {"ss_num_reg_images", "0"},
      {"ss_num_batches_per_epoch", "10"},
      {"ss_num_epochs", "10"},
      {"ss_gradient_checkpointing", "False"},
      {"ss_gradient_accumulation_steps", "1"},
      {"ss_max_train_steps", "100"},
      {"ss_lr_warmup_steps", "500"},
      {"ss_lr_scheduler", "constant"},
      {"ss_network_module", "networks.lora"},
      {"ss_network_dim", "4"},
      {"ss_network_alpha", "4.0"},  // type=float
      {"ss_network_dropout", "None"},
      {"ss_mixed_precision", "no"},
      {"ss_full_fp16", "False"},
      {"ss_v2", "False"},
      {"ss_base_model_version", "sd_v1"},  // get_model_version_str_for_sd1_sd2(False, False)
      {"ss_clip_skip", "None"},
      {"ss_max_token_length", "None"},
      {"ss_cache_latents", "True"},
      {"ss_seed", "42"},
      {"ss_lowram", "False"},
      {"ss_noise_offset", "0.05"},
      {"ss_multires_noise_iterations", "None"},
      {"ss_multires_noise_discount", "0.3"},  // argparse default
      {"ss_adaptive_noise_scale", "None"},
      {"ss_zero_terminal_snr", "False"},
      {"ss_training_comment", "None"},
      {"ss_optimizer", "torch.optim.adamw.AdamW"},  // no --optimizer_args: no "(...)"
      {"ss_max_grad_norm", "1.0"},
      {"ss_caption_dropout_rate", "0.0"},
      {"ss_caption_dropout_every_n_epochs", "0"},
      {"ss_caption_tag_dropout_rate", "0.0"},
      {"ss_face_crop_aug_range", "None"},
      {"ss_prior_loss_weight", "1.0"},
      {"ss_min_snr_gamma", "5.0"},
      {"ss_scale_weight_norms", "None"},
      {"ss_ip_noise_gamma", "None"},
      {"ss_debiased_estimation", "False"},
      {"ss_noise_offset_random_strength", "False"},
      {"ss_ip_noise_gamma_random_strength", "False"},
      {"ss_loss_type", "l2"},
      {"ss_huber_schedule", "snr"},
      {"ss_huber_scale", "1.0"},
      {"ss_huber_c", "0.1"},
      {"ss_fp8_base", "False"},
      {"ss_fp8_base_unet", "False"},
      {"ss_validation_seed", "None"},
      {"ss_validation_split", "0.0"},
      {"ss_max_validation_steps", "None"},
      {"ss_validate_every_n_epochs", "None"},
      {"ss_validate_every_n_steps", "None"},
      {"ss_resize_interpolation", "None"},
      // the train_data_dir branch's metadata.update({...})
      {"ss_batch_size_per_device", "1"},
      {"ss_total_batch_size", "1"},
      {"ss_resolution", "(512, 512)"},  // args.resolution, a tuple after prepare_dataset_args
      {"ss_color_aug", "False"},
      {"ss_flip_aug", "False"},
      {"ss_random_crop", "False"},
      {"ss_shuffle_caption", "False"},
      {"ss_enable_bucket", "False"},
      {"ss_bucket_no_upscale", "False"},
      {"ss_min_bucket_reso", "None"},
      {"ss_max_bucket_reso", "None"},
      {"ss_keep_tokens", "0"},
      {"ss_dataset_dirs", "{\"10_sks dog\": {\"n_repeats\": 10, \"img_count\": 1}}"},
      {"ss_reg_dataset_dirs", "{}"},
      {"ss_tag_frequency", "{\"10_sks dog\": {\"sks dog\": 1, \"outdoors\": 1}}"},
      {"ss_bucket_info", "null"},
      // pretrained_model_name_or_path
      {"ss_sd_model_name", "stable-diffusion-v1-5"},
      // save_model
      {"ss_training_finished_at", "1700003600.5"},
      {"ss_steps", "100"},
      {"ss_epoch", "10"},
      // sai_model_spec.build_metadata (lora=True, sdxl=False)
      {"modelspec.sai_model_spec", "1.0.1"},
      {"modelspec.architecture", "stable-diffusion-v1/lora"},
      {"modelspec.implementation", "diffusers"},
      {"modelspec.title", "my_lora"},  // metadata_title or output_name
      {"modelspec.resolution", "512x512"},
      {"modelspec.date", "2023-11-14T23:13:20"},  // fromtimestamp(int(ts)).isoformat(), UTC
      {"modelspec.prediction_type", "epsilon"},
  };
  const std::map<std::string, std::string> actual = lora::kohya_metadata(run);
  for (const auto& [key, value] : expected) {
    CAPTURE(key);
    REQUIRE(actual.count(key) == 1);
    CHECK(actual.at(key) == value);
  }
  for (const auto& [key, value] : actual) {
    CAPTURE(key);
    CHECK(expected.count(key) == 1);
  }
}

// An SD 2.x 768-v run: `--v2 --v_parameterization --resolution 768 --clip_skip 2
//  --network_dim 8 --network_alpha 1 --network_dropout 0.1 --network_args conv_dim=8
//  conv_alpha=1 --unet_lr 1e-4 --text_encoder_lr 5e-5 --optimizer_args betas=0.9,0.99
//  weight_decay=0.1 --min_timestep 100 --lr_warmup_steps 0.1 --zero_terminal_snr
//  --ip_noise_gamma 0.1 --multires_noise_iterations 6
//  --training_comment "trained with difftrain"`, no output name.
TEST_CASE("kohya_metadata of an SD2 v-prediction run") {
  lora::KohyaRunInfo run;
  run.base = lora::KohyaBaseModel::sd_v2;
  run.v_parameterization = true;
  run.resolution_width = run.resolution_height = 768;
  run.clip_skip = 2;
  run.network_dim = 8;
  run.network_alpha = 1.0;
  run.network_dropout = 0.1;
  run.network_args = {{"conv_dim", "8"}, {"conv_alpha", "1"}};
  run.unet_lr = 1e-4;
  run.text_encoder_lr = 5e-5;
  run.optimizer_args = lora::torch_adamw_args(0.9, 0.99, 0.1, 1e-8);
  run.min_timestep = 100;
  run.lr_warmup_steps = 0.1;
  run.zero_terminal_snr = true;
  run.ip_noise_gamma = 0.1;
  run.multires_noise_iterations = 6;
  run.training_comment = "trained with difftrain";
  run.train_batch_size = 2;
  run.gradient_accumulation_steps = 4;
  run.saved_at = 1700003600.5;
  run.utc_offset_seconds = 9 * 3600;

  const std::map<std::string, std::string> m = lora::kohya_metadata(run);
  CHECK(m.at("ss_v2") == "True");                     // bool(args.v2)
  CHECK(m.at("ss_base_model_version") == "sd_v2_v");  // "sd" + "_v2" + "_v"
  CHECK(m.at("ss_clip_skip") == "2");
  CHECK(m.at("ss_resolution") == "(768, 768)");
  CHECK(m.at("ss_network_dim") == "8");
  CHECK(m.at("ss_network_alpha") == "1.0");
  CHECK(m.at("ss_network_dropout") == "0.1");
  // json.dumps(net_kwargs): the strings from "key=value", then kohya's added "dropout".
  CHECK(m.at("ss_network_args") ==
        "{\"conv_dim\": \"8\", \"conv_alpha\": \"1\", \"dropout\": 0.1}");
  CHECK(m.at("ss_unet_lr") == "0.0001");
  CHECK(m.at("ss_text_encoder_lr") == "5e-05");
  CHECK(m.at("ss_learning_rate") == "2e-06");  // argparse default, unused with both lrs set
  // optimizer_name + "(" + ",".join(f"{k}={v}") + ")"; betas parsed by ast.literal_eval
  CHECK(m.at("ss_lr_warmup_steps") == "0.1");  // int_or_float("0.1"): a ratio stays a float
  CHECK(m.at("ss_optimizer") == "torch.optim.adamw.AdamW(betas=(0.9, 0.99),weight_decay=0.1)");
  CHECK(m.at("ss_zero_terminal_snr") == "True");
  CHECK(m.at("ss_ip_noise_gamma") == "0.1");
  CHECK(m.at("ss_multires_noise_iterations") == "6");
  CHECK(m.at("ss_training_comment") == "trained with difftrain");
  CHECK(m.at("ss_output_name") == "None");
  CHECK(m.at("ss_batch_size_per_device") == "2");
  CHECK(m.at("ss_total_batch_size") == "8");  // batch · processes · accumulation
  CHECK(m.count("ss_sd_model_name") == 0);

  CHECK(m.at("modelspec.architecture") == "stable-diffusion-v2-768-v/lora");
  CHECK(m.at("modelspec.implementation") == "diffusers");
  CHECK(m.at("modelspec.prediction_type") == "v");
  CHECK(m.at("modelspec.resolution") == "768x768");
  CHECK(m.at("modelspec.encoder_layer") == "2");           // f"{clip_skip}"
  CHECK(m.at("modelspec.timestep_range") == "100,1000");   // max_timestep None → 1000
  CHECK(m.at("modelspec.title") == "LoRA@1700003600.5");   // "LoRA" + f"@{timestamp}"
  CHECK(m.at("modelspec.date") == "2023-11-15T08:13:20");  // UTC+9
  CHECK(m.count("modelspec.author") == 0);                 // None fields are not written

  SECTION("v2 without v-parameterization is the 512 architecture") {
    run.v_parameterization = false;
    const auto m512 = lora::kohya_metadata(run);
    CHECK(m512.at("ss_base_model_version") == "sd_v2");
    CHECK(m512.at("modelspec.architecture") == "stable-diffusion-v2-512/lora");
    CHECK(m512.at("modelspec.prediction_type") == "epsilon");
  }
  SECTION("SDXL") {
    run.base = lora::KohyaBaseModel::sdxl;
    run.v_parameterization = false;
    run.title = "my title";
    run.author = "me";
    const auto xl = lora::kohya_metadata(run);
    CHECK(xl.at("ss_v2") == "False");
    CHECK(xl.at("ss_base_model_version") == "sdxl_base_v1-0");
    CHECK(xl.at("modelspec.architecture") == "stable-diffusion-xl-v1-base/lora");
    CHECK(xl.at("modelspec.implementation") == "https://github.com/Stability-AI/generative-models");
    CHECK(xl.at("modelspec.title") == "my title");
    CHECK(xl.at("modelspec.author") == "me");
  }
  SECTION("network args without network_dropout, and an explicit dropout") {
    run.network_dropout.reset();
    CHECK(lora::kohya_metadata(run).at("ss_network_args") ==
          "{\"conv_dim\": \"8\", \"conv_alpha\": \"1\", \"dropout\": null}");
    run.network_args = {{"dropout", "0.2"}};
    CHECK(lora::kohya_metadata(run).at("ss_network_args") == "{\"dropout\": \"0.2\"}");
    run.network_args.clear();
    CHECK(lora::kohya_metadata(run).count("ss_network_args") == 0);
  }
}

TEST_CASE("optimizer args list what differs from torch's defaults") {
  CHECK(lora::torch_adamw_args(0.9, 0.999, 1e-2, 1e-8).empty());
  CHECK(
      lora::torch_adamw_args(0.9, 0.999, 0.0, 1e-6) ==
      std::vector<std::pair<std::string, std::string>>{{"weight_decay", "0.0"}, {"eps", "1e-06"}});
  CHECK(lora::torch_sgd_args(0, false, 0).empty());
  CHECK(lora::torch_sgd_args(0.9, true, 0) == std::vector<std::pair<std::string, std::string>>{
                                                  {"momentum", "0.9"}, {"nesterov", "True"}});
}
