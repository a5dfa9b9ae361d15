#pragma once
// `difftrain text-encode` and `difftrain tokenize`: the CLIP text side of the library.
//
//   text-encode --model DIR --inputs IN.safetensors --out OUT.safetensors [--lora FILE]
//               [--lora-scale M]
//     DIR: a transformers CLIPTextModel or CLIPTextModelWithProjection folder (config.json +
//     model.safetensors; the class from config.json's architectures, else from the presence of
//     text_projection.weight); IN: `input_ids` [B, L] (integer dtype); OUT: `last_hidden_state`
//     [B, L, D], `pooler_output` [B, D] (CLIPTextModel) or `text_embeds` [B, projection_dim]
//     (CLIPTextModelWithProjection), and `hidden_states.<i>` [B, L, D] for
//     i = 0..num_hidden_layers (0: embeddings; i: after encoder layer i, before
//     final_layer_norm), all F32.
//     --lora: the file's text-encoder part (kohya lora_te_*, PEFT text_encoder.*; UNet entries
//     are ignored) applied with multiplier M.
//     With `grad_output.<X>` tensors in IN (X = last_hidden_state, pooler_output or text_embeds,
//     hidden_states.<i>): the loss Σ_X ⟨grad_output.X, X⟩ is backpropagated and OUT also holds
//     `grad.<param>` for every parameter (transformers names), or with --lora only
//     `grad.<module>.lora_A.weight` / `.lora_B.weight`.
//   tokenize --tokenizer DIR --inputs PROMPTS.txt
//     one prompt per line (UTF-8, lines end with '\n'; an empty line is the empty prompt; a last
//     line without '\n' is a prompt too); prints one JSON array of model_max_length ids per line,
//     in order.
// The definitions are in cmd_text.cpp.

#include <iosfwd>
#include <string>

namespace CLI {
class App;
}  // namespace CLI

namespace difftrain::tools {

/// Prints the input_ids of every prompt of `prompts_path`, one JSON array per line.
void tokenize(const std::string& tokenizer_dir, const std::string& prompts_path, std::ostream& out);

/// Registers `text-encode` and `tokenize` on the tool's app.
void add_text_commands(CLI::App& app, int& exit_code);

}  // namespace difftrain::tools
