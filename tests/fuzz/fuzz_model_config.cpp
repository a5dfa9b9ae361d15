// Fuzz target: the model and scheduler config files, each reader given the same file (UNet,
// VAE and CLIP config.json, DDPM scheduler_config.json and the sampling config, then a DDPM
// scheduler built from the DDPM config). Refusal is a difftrain::Error; anything else is a
// finding.
#include <cstddef>
#include <cstdint>
#include <string>

#include "difftrain/models/clip/clip_config.hpp"
#include "difftrain/models/unet/unet_config.hpp"
#include "difftrain/models/vae/vae_config.hpp"
#include "difftrain/schedule/ddpm_scheduler.hpp"
#include "difftrain/schedule/sampling_config.hpp"
#include "fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace difftrain;
  const fuzz::Scratch& scratch = fuzz::Scratch::get();
  const std::string path = scratch.write("config.json", fuzz::as_text(data, size));
  fuzz::expect_only_errors([&] { (void)models::UNet2DConditionConfig::from_file(path); });
  fuzz::expect_only_errors([&] { (void)models::AutoencoderKLConfig::from_file(path); });
  fuzz::expect_only_errors([&] { (void)models::ClipTextConfig::from_file(path); });
  fuzz::expect_only_errors([&] {
    const auto config = DdpmSchedulerConfig::from_file(path);
    const DdpmScheduler scheduler(config);
    (void)scheduler;
  });
  fuzz::expect_only_errors([&] { (void)SamplingConfig::from_file(path); });
  return 0;
}
