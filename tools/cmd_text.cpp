// The `text-encode` and `tokenize` commands (cmd_text.hpp).
#include "cmd_text.hpp"

#include <CLI/CLI.hpp>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <nlohmann/json.hpp>
#include <string_view>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/lora/lora_file.hpp"
#include "difftrain/models/clip/clip_text_model.hpp"
#include "difftrain/models/clip_tokenizer.hpp"
#include "tool_common.hpp"

namespace difftrain::tools {

namespace {

struct TextEncodeOptions {
  std::string model, inputs, out, lora;
  double lora_scale = 1.0;
  int threads = 0;
};

/// The output gradients named `grad_output.<X>` in `inputs` (Error for any other X, and for the
/// pooled output the model's class does not have: pooler_output or text_embeds).
models::ClipTextOutputGrads<float> read_output_grads(const io::SafetensorsFile& inputs,
                                                     const std::string& path,
                                                     const models::ClipTextModel<float>& model) {
  constexpr std::string_view prefix = "grad_output.";
  const std::size_t layers = model.layers.size();
  const bool projection = model.has_projection();
  const char* pooled = projection ? "text_embeds" : "pooler_output";
  models::ClipTextOutputGrads<float> grads;
  for (const std::string& name : inputs.names()) {
    if (!name.starts_with(prefix)) continue;
    const std::string x = name.substr(prefix.size());
    if (x == "last_hidden_state") {
      grads.last_hidden_state = inputs.read_tensor<float, 3>(name);
    } else if (x == "pooler_output" && !projection) {
      grads.pooler_output = inputs.read_tensor<float, 2>(name);
    } else if (x == "text_embeds" && projection) {
      grads.text_embeds = inputs.read_tensor<float, 2>(name);
    } else if (x.starts_with("hidden_states.") &&
               x.find_first_not_of("0123456789", 14) == std::string::npos && x.size() > 14 &&
               x.size() < 20) {
      const std::size_t i = std::stoul(x.substr(14));
      require(i <= layers, "text-encode", "'", path, "' has ", name,
              ", but the model has hidden_states.0 to hidden_states.", layers);
      grads.hidden_states[i] = inputs.read_tensor<float, 3>(name);
    } else if (x == "text_embeds" || x == "pooler_output") {
      fail("text-encode", "'", path, "' has ", name, ", but the model is a ",
           projection ? "CLIPTextModelWithProjection (its pooled output is text_embeds)"
                      : "CLIPTextModel (text_embeds needs a CLIPTextModelWithProjection)");
    } else {
      fail("text-encode", "'", path, "' has ", name,
           ", expected grad_output.last_hidden_state, grad_output.", pooled,
           " or grad_output.hidden_states.<i>");
    }
  }
  return grads;
}

/// Runs the text model of `model_dir` on the `input_ids` of `inputs_path`, writing every output
/// (and, given output gradients, the parameter gradients).
void text_encode(const TextEncodeOptions& o) {
  constexpr const char* fn = "text-encode";
  set_threads(fn, o.threads);
  auto model = models::load_clip_text_model<float>(o.model);
  const auto inputs = io::SafetensorsFile::open(o.inputs);
  const TokenIds ids = inputs.read_tensor<std::int64_t, 2>("input_ids");
  const auto grads = read_output_grads(inputs, o.inputs, model);
  const bool backward = grads.last_hidden_state.size() > 0 || grads.pooler_output.size() > 0 ||
                        grads.text_embeds.size() > 0 || !grads.hidden_states.empty();
  if (!o.lora.empty()) {
    const auto state = lora::read_lora(o.lora, lora::module_names(model), lora::kLoraTextEncoder);
    require(!state.empty(), fn, "'", o.lora, "' has no text-encoder entries");
    lora::apply_lora(model, state, o.lora_scale);  // only the adapters are trainable
  } else {
    require(o.lora_scale == 1.0, fn, "--lora-scale is given without --lora");
    nn::set_trainable<float>(model, backward);
  }
  const auto out = backward ? model.forward_train(ids) : model.forward(ids);
  std::vector<io::TensorToWrite> tensors;
  tensors.push_back(io::TensorToWrite::from_tensor("last_hidden_state", out.last_hidden_state));
  if (model.has_projection()) {  // CLIPTextModelWithProjection: no pooler_output
    tensors.push_back(io::TensorToWrite::from_tensor("text_embeds", out.text_embeds));
  } else {
    tensors.push_back(io::TensorToWrite::from_tensor("pooler_output", out.pooler_output));
  }
  for (std::size_t i = 0; i < out.hidden_states.size(); ++i)
    tensors.push_back(
        io::TensorToWrite::from_tensor("hidden_states." + std::to_string(i), out.hidden_states[i]));
  if (backward) {
    nn::zero_grad<float>(model);
    model.backward(grads);
    model.for_each_parameter("", [&](const std::string& name, nn::Parameter<float>& p) {
      if (p.trainable) tensors.push_back(io::TensorToWrite::from_tensor("grad." + name, p.grad));
    });
  }
  io::save_safetensors(o.out, tensors,
                       {{"generator", "difftrain text-encode"}, {"model", o.model}});
}

/// The prompts of a text file: one per '\n'-terminated line (an unterminated last line counts).
std::vector<std::string> read_prompt_lines(const std::string& path) {
  const std::string text = io::read_regular_file(path, "tokenize");
  std::vector<std::string> lines;
  std::size_t start = 0;
  while (start < text.size()) {
    const std::size_t end = text.find('\n', start);
    if (end == std::string::npos) {
      lines.push_back(text.substr(start));
      break;
    }
    lines.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  return lines;
}

}  // namespace

void tokenize(const std::string& tokenizer_dir, const std::string& prompts_path,
              std::ostream& out) {
  const auto tokenizer = ClipTokenizer::from_folder(tokenizer_dir);
  const auto prompts = read_prompt_lines(prompts_path);
  std::string text;  // everything first: an error on line n prints nothing
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    try {
      text += nlohmann::json(tokenizer.encode(prompts[i], tokenizer.model_max_length()).input_ids)
                  .dump();
    } catch (const Error& e) {
      throw Error(message(e.what(), " (line ", i + 1, " of '", prompts_path, "')"));
    }
    text += '\n';
  }
  out << text << std::flush;
}

void add_text_commands(CLI::App& app, int& exit_code) {
  struct Options {
    std::string tokenizer, prompts;
  };
  auto options = std::make_shared<Options>();
  auto encode_options = std::make_shared<TextEncodeOptions>();

  CLI::App* encode = app.add_subcommand(
      "text-encode",
      "Run a CLIP text model (transformers CLIPTextModel or CLIPTextModelWithProjection folder) "
      "on input_ids, and backward when the inputs hold grad_output.<output> tensors");
  encode
      ->add_option("--model", encode_options->model, "folder with config.json + model.safetensors")
      ->required();
  encode
      ->add_option("--inputs", encode_options->inputs,
                   "safetensors file with input_ids [B,L] (and grad_output.<output>)")
      ->required();
  encode
      ->add_option("--out", encode_options->out,
                   "safetensors file for last_hidden_state, pooler_output (text_embeds for a "
                   "projection model), hidden_states.<i> (and grad.<parameter>)")
      ->required();
  encode->add_option("--lora", encode_options->lora,
                     "LoRA file whose text-encoder part is applied (kohya or PEFT naming)");
  encode->add_option("--lora-scale", encode_options->lora_scale,
                     "multiplier of the LoRA branch (default 1)");
  add_threads_option(*encode, encode_options->threads);
  encode->callback([encode_options, &exit_code] {
    exit_code = run_command("text-encode", [&] { text_encode(*encode_options); });
  });

  CLI::App* tok = app.add_subcommand(
      "tokenize", "Print the CLIP input_ids (one JSON array per line) of one prompt per line");
  tok->add_option("--tokenizer", options->tokenizer,
                  "folder with vocab.json, merges.txt (+ tokenizer_config.json)")
      ->required();
  tok->add_option("--inputs", options->prompts, "UTF-8 text file, one prompt per line")->required();
  tok->callback([options, &exit_code] {
    exit_code =
        run_command("tokenize", [&] { tokenize(options->tokenizer, options->prompts, std::cout); });
  });
}

}  // namespace difftrain::tools
