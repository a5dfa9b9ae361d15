// The `text-encode` and `tokenize` commands (cmd_text.hpp).
#include "cmd_text.hpp"

#include <CLI/CLI.hpp>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "difftrain/core/error.hpp"
#include "difftrain/io/safetensors.hpp"
#include "difftrain/models/clip/clip_text_model.hpp"
#include "difftrain/models/clip_tokenizer.hpp"
#include "tool_common.hpp"

namespace difftrain::tools {

namespace {

/// Runs the text model of `model_dir` on the `input_ids` of `inputs_path`, writing every output.
void text_encode(const std::string& model_dir, const std::string& inputs_path,
                 const std::string& out_path) {
  auto model = models::load_clip_text_model<float>(model_dir);
  const auto inputs = io::SafetensorsFile::open(inputs_path);
  const TokenIds ids = inputs.read_tensor<std::int64_t, 2>("input_ids");
  const auto out = model.forward(ids);
  std::vector<io::TensorToWrite> tensors;
  tensors.push_back(io::TensorToWrite::from_tensor("last_hidden_state", out.last_hidden_state));
  tensors.push_back(io::TensorToWrite::from_tensor("pooler_output", out.pooler_output));
  for (std::size_t i = 0; i < out.hidden_states.size(); ++i)
    tensors.push_back(
        io::TensorToWrite::from_tensor("hidden_states." + std::to_string(i), out.hidden_states[i]));
  io::save_safetensors(out_path, tensors,
                       {{"generator", "difftrain text-encode"}, {"model", model_dir}});
}

/// The prompts of a text file: one per '\n'-terminated line (an unterminated last line counts).
std::vector<std::string> read_prompt_lines(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  require(in.good(), "tokenize", "cannot open '", path, "'");
  const std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  require(!in.bad(), "tokenize", "cannot read '", path, "'");
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
    std::string model, inputs, out, tokenizer, prompts;
  };
  auto options = std::make_shared<Options>();

  CLI::App* encode = app.add_subcommand(
      "text-encode", "Run a CLIP text model (transformers CLIPTextModel folder) on input_ids");
  encode->add_option("--model", options->model, "folder with config.json + model.safetensors")
      ->required();
  encode->add_option("--inputs", options->inputs, "safetensors file with input_ids [B,L]")
      ->required();
  encode
      ->add_option("--out", options->out,
                   "safetensors file for last_hidden_state, pooler_output, hidden_states.<i>")
      ->required();
  encode->callback([options, &exit_code] {
    exit_code = run_command("text-encode",
                            [&] { text_encode(options->model, options->inputs, options->out); });
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
