// Fuzz target: a LoRA file (lora::read_lora in kohya, PEFT and legacy diffusers conventions)
// read for a tiny UNet's attention modules, a tiny CLIP text encoder's modules (kohya lora_te_,
// PEFT text_encoder.) and lora_file_components. Refusal is a difftrain::Error; anything else is
// a finding.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "difftrain/lora/lora_file.hpp"
#include "fuzz_support.hpp"

namespace {

// The adapted modules of tests/data/unet_tiny (down_blocks.0, up_blocks.1 and mid_block
// attentions) plus a convolution, and of tests/data/clip_tiny's three encoder layers.
std::vector<std::string> unet_modules() {
  std::vector<std::string> out;
  for (const char* block : {"down_blocks.0.attentions.0", "up_blocks.1.attentions.0",
                            "up_blocks.1.attentions.1", "mid_block.attentions.0"})
    for (const char* attn : {"attn1", "attn2"})
      for (const char* proj : {"to_q", "to_k", "to_v", "to_out.0"})
        out.push_back(std::string(block) + ".transformer_blocks.0." + attn + "." + proj);
  out.push_back("down_blocks.0.resnets.0.conv1");
  out.push_back("down_blocks.0.attentions.0.proj_in");
  return out;
}

std::vector<std::string> text_encoder_modules() {
  std::vector<std::string> out;
  for (int layer = 0; layer < 3; ++layer)
    for (const char* module : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                               "self_attn.out_proj", "mlp.fc1", "mlp.fc2"})
      out.push_back("text_model.encoder.layers." + std::to_string(layer) + "." + module);
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace difftrain;
  static const std::vector<std::string> unet = unet_modules();
  static const std::vector<std::string> text_encoder = text_encoder_modules();
  const fuzz::Scratch& scratch = fuzz::Scratch::get();
  const std::string path = scratch.write("lora.safetensors", fuzz::as_text(data, size));
  fuzz::expect_only_errors([&] { (void)lora::read_lora(path, unet); });
  fuzz::expect_only_errors(
      [&] { (void)lora::read_lora(path, text_encoder, lora::kLoraTextEncoder); });
  fuzz::expect_only_errors([&] { (void)lora::lora_file_components(path); });
  return 0;
}
