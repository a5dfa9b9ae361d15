#pragma once
// Loading a diffusers UNet folder: config.json + diffusion_pytorch_model.safetensors, or the
// sharded form diffusion_pytorch_model.safetensors.index.json ({"weight_map": {name: file}}).
//
// Strict (nn::load_state_dict): every parameter must be present with its shape and no tensor may
// be left over; all missing, unexpected and misshapen names are listed in one Error. F32, F16,
// BF16 (any floating or integer dtype, see io/safetensors.hpp) are converted to T.
// Tensors are read from the memory-mapped files one at a time straight into a reused buffer
// (io::SafetensorsSource), so loading needs no second copy of the weights.
//
// Also an original single-file checkpoint (model.diffusion_model.* names, e.g.
// v1-5-pruned-emaonly.safetensors) with a config: load_unet_single_file (names: ldm_names.hpp).

#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/io/state_dict.hpp"
#include "difftrain/models/ldm_names.hpp"
#include "difftrain/models/unet/unet2d_condition.hpp"
#include "difftrain/models/unet/unet_config.hpp"
#include "difftrain/nn/parameter.hpp"

namespace difftrain::models {

// The safetensors state path shared by every model (io/state_dict.hpp), also under models::.
using io::diffusers_weight_files;
using io::open_safetensors_state;
using io::SafetensorsSource;

/// Copies the tensors of safetensors files into a model (strict; one Error lists every problem).
template <class T, nn::Module M>
void load_safetensors(M& model, const std::vector<std::string>& paths,
                      std::string_view what = "load_safetensors") {
  nn::load_state_dict<T>(model, open_safetensors_state<T>(paths), what);
}

/// A UNet2DConditionModel from a diffusers folder (config.json + weights).
template <class T = float>
UNet2DConditionModel<T> load_unet(const std::string& folder) {
  const auto config =
      UNet2DConditionConfig::from_file((std::filesystem::path(folder) / "config.json").string());
  UNet2DConditionModel<T> model(config);
  load_safetensors<T>(model, diffusers_weight_files(folder), "load_unet('" + folder + "')");
  return model;
}

/// A UNet2DConditionModel of `config` from an original single-file checkpoint: its
/// model.diffusion_model.* tensors, strictly (errors in the file's names); the file's other
/// tensors (VAE, text encoder, model_ema.*, alphas_cumprod, ...) are ignored.
template <class T = float>
UNet2DConditionModel<T> load_unet_single_file(const std::string& path,
                                              const UNet2DConditionConfig& config) {
  UNet2DConditionModel<T> model(config);
  load_single_file_component<T>(
      model, path, kLdmUnetPrefix,
      [&](const std::string& name) {
        return std::string(kLdmUnetPrefix) + ldm_unet_name(config, name);
      },
      keep_prefixed(kLdmUnetPrefix), "load_unet_single_file('" + path + "')");
  return model;
}

#ifdef DIFFTRAIN_EXTERN_TEMPLATES
extern template UNet2DConditionModel<float> load_unet<float>(const std::string&);
extern template UNet2DConditionModel<double> load_unet<double>(const std::string&);
extern template UNet2DConditionModel<float> load_unet_single_file<float>(
    const std::string&, const UNet2DConditionConfig&);
extern template UNet2DConditionModel<double> load_unet_single_file<double>(
    const std::string&, const UNet2DConditionConfig&);
#endif

}  // namespace difftrain::models
