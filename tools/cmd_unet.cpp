// The `unet` command (cmd_unet.hpp): a UNet forward and backward on safetensors files.
#include "cmd_unet.hpp"

#include <CLI/CLI.hpp>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "difftrain/io/safetensors.hpp"
#include "difftrain/lora/lora_file.hpp"
#include "difftrain/models/unet/load.hpp"
#include "difftrain/models/unet/lora_names.hpp"
#include "difftrain/models/unet/unet2d_condition.hpp"
#include "tool_common.hpp"

namespace difftrain::tools {

namespace {

/// --config: a preset name or a diffusers config.json.
models::UNet2DConditionConfig unet_config_argument(const std::string& config) {
  if (config == "sd15") return models::UNet2DConditionConfig::sd15();
  if (config == "sd21") return models::UNet2DConditionConfig::sd21();
  return models::UNet2DConditionConfig::from_file(config);
}

}  // namespace

void run_unet(const UnetCommandOptions& o) {
  constexpr const char* fn = "unet";
  set_threads("unet", o.threads);
  auto model = o.config.empty()
                   ? models::load_unet<float>(o.model)
                   : models::load_unet_single_file<float>(o.model, unet_config_argument(o.config));
  if (!o.lora.empty()) {
    const auto state =
        lora::read_lora(o.lora, lora::module_names(model), models::unet_lora_component(model));
    lora::apply_lora(model, state, o.lora_scale);
  } else {
    require(o.lora_scale == 1.0, fn, "--lora-scale is given without --lora");
  }
  const auto in = io::SafetensorsFile::open(o.inputs);
  const Tensor4<float> sample = in.read_tensor<float, 4>("sample");
  const Tensor3<float> context = in.read_tensor<float, 3>("encoder_hidden_states");
  require(in.info("timestep").shape.size() == 1, fn, "timestep has shape ",
          shape_string(in.info("timestep").shape), ", expected [B]");
  // SDXL's added_cond_kwargs: both or neither, as the model's config asks
  const bool added = in.contains("text_embeds") || in.contains("time_ids");
  require(added == model.uses_added_conditions(), fn, "'", o.inputs, "' ",
          added ? "has text_embeds/time_ids, but the UNet has no addition_embed_type"
                : "has no text_embeds and time_ids, which the UNet's addition_embed_type "
                  "\"text_time\" (SDXL) needs");
  AddedConditions<float> conditions;
  if (added) {
    require(in.contains("text_embeds") && in.contains("time_ids"), fn, "'", o.inputs,
            "' has only one of text_embeds and time_ids, expected both");
    conditions.text_embeds = in.read_tensor<float, 2>("text_embeds");
    conditions.time_ids = in.read_tensor<float, 2>("time_ids");
  }
  std::vector<float> t;
  if (in.info("timestep").dtype == io::Dtype::I64) {
    // diffusers converts integer timesteps to float32 first
    for (const std::int64_t v : in.read<std::int64_t>("timestep"))
      t.push_back(static_cast<float>(v));
  } else {
    t = in.read<float>("timestep");
  }
  const Tensor4<float> output =
      added ? model.forward(sample, std::span<const float>(t), context, conditions)
            : model.forward(sample, std::span<const float>(t), context);
  std::vector<io::TensorToWrite> out;
  out.push_back(io::TensorToWrite::from_tensor("output", output));
  if (in.contains("grad_output")) {
    const Tensor4<float> grad_output = in.read_tensor<float, 4>("grad_output");
    check_same_shape(fn, "grad_output", grad_output.shape(), output.shape());
    nn::zero_grad<float>(model);
    model.backward(grad_output);
    out.push_back(io::TensorToWrite::from_tensor("grad_sample", model.grad_sample()));
    out.push_back(io::TensorToWrite::from_tensor("grad_encoder_hidden_states",
                                                 model.grad_encoder_hidden_states()));
    if (added)
      out.push_back(io::TensorToWrite::from_tensor("grad_text_embeds", model.grad_text_embeds()));
    model.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>& p) {
      if (p.trainable) out.push_back(io::TensorToWrite::from_tensor("grad." + name, p.grad));
    });
  }
  io::save_safetensors(o.out, out);
}

void add_unet_command(CLI::App& app, int& exit_code) {
  auto o = std::make_shared<UnetCommandOptions>();
  CLI::App* cmd =
      app.add_subcommand("unet", "Run a diffusers UNet forward (and backward) on files");
  cmd->add_option("--model", o->model,
                  "diffusers UNet folder, or with --config a single-file checkpoint")
      ->required();
  cmd->add_option("--config", o->config,
                  "config of a single-file --model: diffusers config.json, sd15 or sd21");
  cmd->add_option("--inputs", o->inputs, "input safetensors file")->required();
  cmd->add_option("--out", o->out, "output safetensors file")->required();
  cmd->add_option("--lora", o->lora, "LoRA file (kohya or PEFT naming)");
  cmd->add_option("--lora-scale", o->lora_scale, "multiplier of the LoRA branch (default 1)");
  add_threads_option(*cmd, o->threads);
  cmd->callback([o, &exit_code] { exit_code = run_command("unet", [&] { run_unet(*o); }); });
}

}  // namespace difftrain::tools
