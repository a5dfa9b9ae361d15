#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<target>/): small valid files
(copied from tests/data where one is small enough, else made here) and the failure kinds of
issue #19 (truncated files, huge header lengths, deeply nested JSON, NaN, wrong dtypes, paths
with ../, huge sizes, wrong types). Python 3 standard library only; deterministic. Run from
anywhere: python3 tests/fuzz/make_corpus.py. Files found by fuzzing (crash-*, regression
seeds) are kept: only the files named here are (re)written. The images of corpus/image were
made once with stb_image_write and libwebp (see corpus/image/README)."""

import json
import math
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DATA = os.path.join(ROOT, "tests", "data")
SEP = b"\n--8<--\n"  # fuzz_support.hpp kFileSeparator


def out(target, name, data):
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def data_file(*parts):
    with open(os.path.join(DATA, *parts), "rb") as f:
        return f.read()


def nested(depth, leaf="1"):
    return '{"a":' + "[" * depth + leaf + "]" * depth + "}"


# --- safetensors -------------------------------------------------------------------------------

DTYPES = {"F64": "d", "F32": "f", "F16": "e", "I64": "q", "I32": "i", "I16": "h", "I8": "b",
          "U8": "B", "BOOL": "?"}


def encode(dtype, values):
    if dtype == "BF16":
        return b"".join(struct.pack("<f", v)[2:] for v in values)
    if dtype in ("F8_E4M3", "F8_E5M2"):
        return bytes(int(v) & 0xFF for v in values)
    return struct.pack("<%d%s" % (len(values), DTYPES[dtype]), *values)


def safetensors(tensors, metadata=None, header_extra=None, pad=0):
    """tensors: [(name, dtype, shape, values)] -> bytes of a safetensors file."""
    header, body = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, values in tensors:
        raw = encode(dtype, values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    if header_extra:
        header.update(header_extra)
    text = json.dumps(header, separators=(",", ":")).encode() + b" " * pad
    return struct.pack("<Q", len(text)) + text + body


def raw_safetensors(header_text, body=b""):
    if isinstance(header_text, str):
        header_text = header_text.encode()
    return struct.pack("<Q", len(header_text)) + header_text + body


def safetensors_corpus():
    t = "safetensors"
    out(t, "valid_f32", safetensors([("a", "F32", [2, 3], [0.5, -1, 2, 3, 4, 5]),
                                     ("b", "F32", [], [7.0])], {"format": "pt"}))
    for dtype in ["F64", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3",
                  "F8_E5M2"]:
        values = [1, 0, 1, 1] if dtype == "BOOL" else [1, 2, 3, 100]
        out(t, "dtype_" + dtype.lower(), safetensors([("x", dtype, [2, 2], values)]))
    out(t, "nan_inf", safetensors([("x", "F32", [4], [math.nan, math.inf, -math.inf, 1e-45])]))
    out(t, "f16_nan", raw_safetensors('{"x":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}',
                                      b"\x00\x7e\x00\x7c"))
    out(t, "padded_header", safetensors([("x", "F32", [1], [1.0])], pad=7))
    out(t, "empty_file", b"")
    out(t, "seven_bytes", b"\x10\x00\x00\x00\x00\x00\x00")
    out(t, "header_length_only", struct.pack("<Q", 0))
    out(t, "huge_header_length", struct.pack("<Q", 0xFFFFFFFFFFFFFFFF) + b"{}")
    out(t, "header_longer_than_file", struct.pack("<Q", 1 << 40) + b'{"x":1}')
    full = safetensors([("a", "F32", [4, 4], [float(i) for i in range(16)])])
    out(t, "truncated_data", full[:-9])
    out(t, "truncated_header", full[:20])
    out(t, "offsets_past_end", raw_safetensors('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,800]}}', b"\0" * 8))
    out(t, "offsets_reversed", raw_safetensors('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}', b"\0" * 4))
    out(t, "offsets_overlap", raw_safetensors(
        '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', b"\0" * 12))
    out(t, "offsets_gap", raw_safetensors('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8))
    out(t, "offsets_huge", raw_safetensors(
        '{"a":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551612,18446744073709551616]}}'))
    out(t, "shape_overflow", raw_safetensors(
        '{"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}', b"\0" * 4))
    out(t, "shape_mismatch", raw_safetensors('{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"\0" * 8))
    out(t, "shape_negative", raw_safetensors('{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', b"\0" * 4))
    out(t, "shape_float", raw_safetensors('{"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}', b"\0" * 4))
    out(t, "shape_zero", raw_safetensors('{"a":{"dtype":"F32","shape":[0,5],"data_offsets":[0,0]}}'))
    out(t, "dtype_unknown", raw_safetensors('{"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4))
    out(t, "dtype_number", raw_safetensors('{"a":{"dtype":7,"shape":[1],"data_offsets":[0,4]}}', b"\0" * 4))
    out(t, "dtype_complex", raw_safetensors('{"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}', b"\0" * 8))
    out(t, "missing_fields", raw_safetensors('{"a":{"dtype":"F32"}}'))
    out(t, "extra_fields", raw_safetensors('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}', b"\0" * 4))
    out(t, "header_not_object", raw_safetensors("[1,2,3]"))
    out(t, "header_invalid_json", raw_safetensors('{"a":{"dtype":"F32",'))
    out(t, "header_trailing", raw_safetensors('{}{}'))
    out(t, "header_nul", raw_safetensors('{"a\u0000b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4))
    out(t, "header_invalid_utf8", raw_safetensors(b'{"\xff\xfe":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4))
    out(t, "header_duplicate_key", raw_safetensors(
        '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4))
    out(t, "metadata_not_strings", raw_safetensors('{"__metadata__":{"a":1,"b":[1]}}'))
    out(t, "metadata_not_object", raw_safetensors('{"__metadata__":"x"}'))
    out(t, "metadata_as_tensor", raw_safetensors('{"__metadata__":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4))
    out(t, "deeply_nested", raw_safetensors(nested(3000)))
    out(t, "deeply_nested_metadata", raw_safetensors('{"__metadata__":' + nested(500) + "}"))
    out(t, "many_tensors", safetensors([("t%d" % i, "F32", [1], [float(i)]) for i in range(200)]))
    out(t, "long_name", safetensors([("n" * 5000, "U8", [1], [1])]))
    out(t, "name_with_dotdot", safetensors([("../../etc/passwd", "U8", [1], [1])]))


# --- configs -----------------------------------------------------------------------------------

def model_config_corpus():
    t = "model_config"
    out(t, "unet_tiny", data_file("unet_tiny", "config.json"))
    out(t, "unet_small_norms", data_file("unet_small_norms", "config.json"))
    out(t, "vae_tiny", data_file("vae_tiny", "config.json"))
    out(t, "clip_tiny", data_file("clip_tiny", "config.json"))
    out(t, "clip_tiny_grad", data_file("clip_tiny_grad", "config.json"))
    scheduler = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.26.3",
                 "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon",
                 "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
                 "trained_betas": None, "rescale_betas_zero_snr": False}
    out(t, "scheduler", json.dumps(scheduler, indent=2))
    out(t, "scheduler_euler", json.dumps(dict(scheduler, _class_name="EulerDiscreteScheduler",
                                              prediction_type="v_prediction",
                                              timestep_spacing="trailing",
                                              rescale_betas_zero_snr=True)))
    out(t, "scheduler_trained_betas", json.dumps({"num_train_timesteps": 4,
                                                   "trained_betas": [0.1, 0.2, 0.3, 0.4]}))
    out(t, "scheduler_trained_betas_bad", '{"num_train_timesteps":3,"trained_betas":[0.1,2,-1]}')
    out(t, "scheduler_huge_timesteps", '{"num_train_timesteps":1000000000}')
    out(t, "scheduler_timesteps_float", '{"num_train_timesteps":1000.0}')
    out(t, "scheduler_timesteps_overflow", '{"num_train_timesteps":18446744073709551616}')
    out(t, "scheduler_betas_inverted", '{"beta_start":0.9,"beta_end":0.0001,"beta_schedule":"linear"}')
    unet = json.loads(data_file("unet_tiny", "config.json"))
    for name, key, value in [
        ("unet_block_out_1e8", "block_out_channels", [100000000, 100000000]),
        ("unet_block_out_1e30", "block_out_channels", [1e30, 32]),
        ("unet_block_out_negative", "block_out_channels", [-32, 64]),
        ("unet_block_out_empty", "block_out_channels", []),
        ("unet_layers_1e6", "layers_per_block", 1000000),
        ("unet_layers_per_block_list", "layers_per_block", [1, 2, 3, 4, 5]),
        ("unet_heads_zero", "attention_head_dim", 0),
        ("unet_sample_size_string", "sample_size", "64"),
        ("unet_norm_groups_odd", "norm_num_groups", 7),
        ("unet_cross_attention_huge", "cross_attention_dim", 9223372036854775807),
        ("unet_transformer_layers", "transformer_layers_per_block", [1, 1000000]),
        ("unet_down_block_unknown", "down_block_types", ["CrossAttnDownBlock2D", "Nope"]),
        ("unet_inf", "norm_eps", 1e400),
    ]:
        out(t, name, json.dumps(dict(unet, **{key: value})))
    vae = json.loads(data_file("vae_tiny", "config.json"))
    out(t, "vae_scaling_negative", json.dumps(dict(vae, scaling_factor=-1)))
    out(t, "vae_latent_1e9", json.dumps(dict(vae, latent_channels=1000000000)))
    out(t, "vae_block_out_1e30", json.dumps(dict(vae, block_out_channels=[1e30, 1, 1])))
    clip = json.loads(data_file("clip_tiny", "config.json"))
    out(t, "clip_max_positions_1e9", json.dumps(dict(clip, max_position_embeddings=1000000000)))
    out(t, "clip_vocab_zero", json.dumps(dict(clip, vocab_size=0)))
    out(t, "clip_hidden_act_unknown", json.dumps(dict(clip, hidden_act="swish9")))
    out(t, "clip_nested_text_config", json.dumps({"text_config": clip, "architectures": ["CLIPModel"]}))
    out(t, "nan_literal", '{"block_out_channels":[NaN],"beta_start":NaN}')
    out(t, "empty", "")
    out(t, "null", "null")
    out(t, "array", "[1,2,3]")
    out(t, "string", '"config"')
    out(t, "truncated", data_file("unet_tiny", "config.json")[:300])
    out(t, "deeply_nested", nested(3000))
    out(t, "deeply_nested_value", json.dumps(dict(unet)).replace('"sample_size": 32', '"sample_size": ' + "[" * 200 + "]" * 200))
    out(t, "invalid_utf8", b'{"sample_size":"\xff\xfe"}')
    out(t, "bom", b"\xef\xbb\xbf" + data_file("vae_tiny", "config.json"))
    out(t, "long_string", '{"_class_name":"' + "x" * 20000 + '"}')


def trainer_config_corpus():
    t = "trainer_config"
    out(t, "config_json", json.dumps({
        "pretrained_model_name_or_path": "models/sd15", "train_data_dir": "data",
        "output_dir": "out", "resolution": 512, "train_batch_size": 1, "learning_rate": 1e-4,
        "max_train_steps": 1000, "rank": 8, "lora_alpha": 8, "mixed_precision": None,
        "checkpointing_steps": 500, "seed": 42, "lr_scheduler": "constant",
        "validation_prompt": "a photo of sks dog", "target_modules": ["to_q", "to_k"]}, indent=2))
    out(t, "kohya_toml", """[model_arguments]
pretrained_model_name_or_path = "models/sd15"
v2 = false

[optimizer_arguments]
learning_rate = 1e-4
lr_scheduler = "cosine_with_restarts"
optimizer_type = "AdamW8bit"

[training_arguments]
output_dir = "out"
max_train_steps = 1600
train_batch_size = 1
seed = 42
mixed_precision = "fp16"
save_every_n_steps = 400

[network_arguments]
network_dim = 16
network_alpha = 8.0
network_args = [ "conv_dim=4", "conv_alpha=1" ]
""")
    out(t, "dataset_toml", """[general]
enable_bucket = true
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 2
min_bucket_reso = 256
max_bucket_reso = 1024

  [[datasets.subsets]]
  image_dir = "data/sks"
  class_tokens = "sks dog"
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = "data/reg"
  is_reg = true
  num_repeats = 1
  flip_aug = false
""")
    out(t, "dataset_toml_wh", '[[datasets]]\nresolution = [768, 768]\n[[datasets.subsets]]\nimage_dir = "x"\n')
    out(t, "dataset_toml_nonsquare", '[[datasets]]\nresolution = [768, 512]\n[[datasets.subsets]]\nimage_dir = "x"\n')
    out(t, "dataset_toml_two", '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n[[datasets]]\n')
    out(t, "dataset_toml_dotdot", '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "../../../etc"\nnum_repeats = -3\n')
    out(t, "dataset_toml_huge", '[[datasets]]\nresolution = 9223372036854775807\nbatch_size = -1\n[[datasets.subsets]]\nimage_dir = "x"\nnum_repeats = 9223372036854775807\n')
    out(t, "dataset_toml_types", '[[datasets]]\nresolution = "512"\n[[datasets.subsets]]\nimage_dir = 5\nflip_aug = "yes"\n')
    out(t, "toml_nan_inf", "learning_rate = nan\nmax_grad_norm = inf\nlr_warmup_steps = -inf\n")
    out(t, "toml_dates", "seed = 1979-05-27T07:32:00Z\nt = 07:32:00\n")
    out(t, "toml_deep_arrays", "a = " + "[" * 1000 + "]" * 1000 + "\n")
    out(t, "toml_deep_tables", "a = " + "{b = " * 500 + "1" + "}" * 500 + "\n")
    out(t, "toml_dotted_keys", "a.b.c.d.e.f = 1\n[x.y.z]\nw = 2\n")
    out(t, "toml_invalid", "[section\nkey = = 1\n")
    out(t, "toml_multiline", 'prompt = """\nline\n"""\nliteral = \'\'\'raw\\n\'\'\'\n')
    out(t, "toml_unicode_escape", 'k = "\\uD800\\U0010FFFF\\U00110000"\n')
    out(t, "json_nested_array", '{"target_modules":[["to_q"]],"rank":[8]}')
    out(t, "json_nan_string", '{"learning_rate":"nan","rank":1e400,"seed":-1}')
    out(t, "json_huge_int", '{"max_train_steps":18446744073709551616,"num_train_epochs":9223372036854775807}')
    out(t, "json_not_object", "[1,2]")
    out(t, "json_dotdot", '{"output_dir":"../../..","output_name":"../x"}')
    out(t, "deeply_nested", nested(3000))
    out(t, "empty", "")
    out(t, "invalid_utf8", b'{"k":"\xc3\x28"}\nk = "\xc3\x28"\n')


# --- LoRA --------------------------------------------------------------------------------------

UNET_BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0.attn1."
TE_LAYER = "text_model.encoder.layers.0."
PEFT_META = json.dumps({"lora_alpha": 8, "r": 2, "peft_type": "LORA", "use_rslora": False,
                        "target_modules": ["to_q", "to_k"], "alpha_pattern": {}})


def lora_pair(down_name, up_name, rank=2, dim=4, dtype="F32"):
    down = [0.1 * (i + 1) for i in range(rank * dim)]
    up = [0.01 * (i + 1) for i in range(dim * rank)]
    return [(down_name, dtype, [rank, dim], down), (up_name, dtype, [dim, rank], up)]


def kohya(module):
    return "lora_unet_" + module.replace(".", "_")


def lora_corpus():
    t = "lora"
    kohya_meta = {"ss_network_module": "networks.lora", "ss_network_dim": "2",
                  "ss_network_alpha": "1.0", "ss_base_model_version": "sd_v1"}
    tensors = []
    for proj in ["to_q", "to_k", "to_v", "to_out.0"]:
        k = kohya(UNET_BLOCK + proj)
        tensors += lora_pair(k + ".lora_down.weight", k + ".lora_up.weight")
        tensors.append((k + ".alpha", "F32", [], [1.0]))
    out(t, "kohya", safetensors(tensors, kohya_meta))
    conv = kohya("down_blocks.0.resnets.0.conv1")
    out(t, "kohya_conv", safetensors([
        (conv + ".lora_down.weight", "F32", [2, 4, 3, 3], [0.01] * 72),
        (conv + ".lora_up.weight", "F32", [4, 2, 1, 1], [0.02] * 8),
        (conv + ".alpha", "F32", [], [2.0])], kohya_meta))
    tensors = []
    for proj in ["to_q", "to_k"]:
        p = "unet." + UNET_BLOCK + proj
        tensors += lora_pair(p + ".lora_A.weight", p + ".lora_B.weight")
    out(t, "peft", safetensors(tensors, {"format": "pt", "lora_adapter_metadata": PEFT_META}))
    out(t, "peft_no_alpha", safetensors(tensors, {"format": "pt"}))
    out(t, "peft_alpha_string", safetensors(tensors, {"lora_adapter_metadata": '{"lora_alpha":"8"}'}))
    out(t, "peft_metadata_not_object", safetensors(tensors, {"lora_adapter_metadata": "[8]"}))
    out(t, "peft_metadata_invalid", safetensors(tensors, {"lora_adapter_metadata": '{"lora_alpha":'}))
    out(t, "peft_metadata_nested", safetensors(tensors, {"lora_adapter_metadata": nested(2000)}))
    out(t, "peft_alpha_pattern", safetensors(tensors, {"lora_adapter_metadata": json.dumps(
        {"lora_alpha": 4, "use_rslora": True, "alpha_pattern": {UNET_BLOCK + "to_q": 16}})}))
    out(t, "peft_bf16", safetensors(lora_pair("unet." + UNET_BLOCK + "to_v.lora_A.weight",
                                              "unet." + UNET_BLOCK + "to_v.lora_B.weight", dtype="BF16")))
    out(t, "peft_default_names", safetensors(lora_pair(
        "base_model.model." + UNET_BLOCK + "to_q.lora_A.default.weight",
        "base_model.model." + UNET_BLOCK + "to_q.lora_B.default.weight")))
    legacy = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor."
    out(t, "legacy_processor", safetensors(
        lora_pair(legacy + "to_q_lora.down.weight", legacy + "to_q_lora.up.weight") +
        lora_pair(legacy + "to_out_lora.down.weight", legacy + "to_out_lora.up.weight")))
    out(t, "legacy_linear_layer", safetensors(lora_pair(
        "unet." + UNET_BLOCK + "to_k.lora_linear_layer.down.weight",
        "unet." + UNET_BLOCK + "to_k.lora_linear_layer.up.weight")))
    te = []
    for m in ["self_attn.q_proj", "mlp.fc1"]:
        k = "lora_te_" + (TE_LAYER + m).replace(".", "_")
        te += lora_pair(k + ".lora_down.weight", k + ".lora_up.weight")
        te.append((k + ".alpha", "F16", [], [4.0]))
    p = "text_encoder." + TE_LAYER + "self_attn.k_proj"
    te += lora_pair(p + ".lora_A.weight", p + ".lora_B.weight")
    k = kohya(UNET_BLOCK + "to_q")
    out(t, "unet_and_text_encoder", safetensors(
        te + lora_pair(k + ".lora_down.weight", k + ".lora_up.weight"), kohya_meta))
    out(t, "sdxl_parts", safetensors(lora_pair(
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight")))
    # Refusals.
    k = kohya(UNET_BLOCK + "to_q")
    p = "unet." + UNET_BLOCK + "to_q"
    pair = lora_pair(k + ".lora_down.weight", k + ".lora_up.weight")
    out(t, "nan_weights", safetensors([(pair[0][0], "F32", [2, 4], [math.nan] * 8), pair[1],
                                       (k + ".alpha", "F32", [], [math.inf])]))
    out(t, "alpha_not_scalar", safetensors(pair + [(k + ".alpha", "F32", [2], [1.0, 2.0])]))
    out(t, "alpha_zero", safetensors(pair + [(k + ".alpha", "F32", [], [0.0])]))
    out(t, "alpha_negative", safetensors(pair + [(k + ".alpha", "F32", [], [-5.0])]))
    out(t, "half_adapter", safetensors(pair[:1]))
    out(t, "only_alpha", safetensors([(k + ".alpha", "F32", [], [1.0])]))
    out(t, "rank_mismatch", safetensors([pair[0], (pair[1][0], "F32", [4, 3], [0.0] * 12)]))
    out(t, "one_dimensional", safetensors([(pair[0][0], "F32", [8], [0.0] * 8),
                                           (pair[1][0], "F32", [8], [0.0] * 8)]))
    out(t, "zero_rank", safetensors([(pair[0][0], "F32", [0, 4], []), (pair[1][0], "F32", [4, 0], [])]))
    out(t, "int_dtype", safetensors([(pair[0][0], "I64", [2, 4], [1] * 8), (pair[1][0], "BOOL", [4, 2], [1] * 8)]))
    out(t, "kohya_and_peft_same_module", safetensors(pair + lora_pair(p + ".lora_A.weight", p + ".lora_B.weight")))
    out(t, "unknown_key", safetensors(pair + [("lora_unet_nowhere.lora_down.weight", "F32", [1], [0.0])]))
    out(t, "unknown_module_dotdot", safetensors(lora_pair("unet.../../x.lora_A.weight", "unet.../../x.lora_B.weight")))
    out(t, "empty_header", raw_safetensors("{}"))
    out(t, "only_metadata", safetensors([], kohya_meta))
    out(t, "truncated", safetensors(pair, kohya_meta)[:-5])
    out(t, "huge_header_length", struct.pack("<Q", 1 << 62) + b"{}")


# --- tokenizer ---------------------------------------------------------------------------------

def tokenizer_corpus():
    t = "tokenizer"
    vocab = data_file("tokenizer_tiny", "vocab.json")
    merges = data_file("tokenizer_tiny", "merges.txt")
    config = data_file("tokenizer_tiny", "tokenizer_config.json")
    out(t, "tiny", vocab + SEP + merges + SEP + config)
    out(t, "tiny_with_text", vocab + SEP + merges + SEP + config + SEP +
        "A photo of <|startoftext|>sks dog's 4k ÜBER café, 東京 😀  \t\n tokens!!".encode())
    out(t, "tiny_no_config", vocab + SEP + merges)
    small_vocab = {"a": 0, "b": 1, "ab": 2, "a</w>": 3, "b</w>": 4, "ab</w>": 5,
                   "<|startoftext|>": 6, "<|endoftext|>": 7}
    v = json.dumps(small_vocab).encode()
    m = b"#version: 0.2\na b\na b</w>\n"
    out(t, "small", v + SEP + m + SEP + b"{}" + SEP + b"ab ba abab a")
    out(t, "special_tokens_objects", v + SEP + m + SEP + json.dumps(
        {"bos_token": {"content": "<|startoftext|>", "lstrip": False}, "eos_token": "<|endoftext|>",
         "pad_token": "!", "model_max_length": 1000000000}).encode())
    out(t, "merges_three_fields", v + SEP + b"#version: 0.2\na b c\n")
    out(t, "merges_one_field", v + SEP + b"#version: 0.2\nab\n")
    out(t, "merges_empty", v + SEP + b"")
    out(t, "merges_crlf", v + SEP + b"#version: 0.2\r\na b\r\nab </w>\r\n")
    out(t, "merges_unknown_symbols", v + SEP + b"#version: 0.2\nx y\nxy z\n\xff \xfe\n" + SEP + b"{}" + SEP + b"xyz")
    out(t, "vocab_negative_id", b'{"a":-1,"<|endoftext|>":0,"<|startoftext|>":1}' + SEP + m)
    out(t, "vocab_huge_id", b'{"a":9223372036854775807,"<|endoftext|>":18446744073709551615,"<|startoftext|>":1}' + SEP + m)
    out(t, "vocab_string_id", b'{"a":"0","<|endoftext|>":1.5,"<|startoftext|>":true}' + SEP + m)
    out(t, "vocab_not_object", b'["a","b"]' + SEP + m)
    out(t, "vocab_missing_eos", b'{"a":0,"<|startoftext|>":1}' + SEP + m)
    out(t, "vocab_duplicate_ids", b'{"a":0,"b":0,"<|endoftext|>":0,"<|startoftext|>":0}' + SEP + m + SEP + b"{}" + SEP + b"ab")
    out(t, "vocab_deeply_nested", nested(3000).encode() + SEP + m)
    out(t, "vocab_invalid_utf8", b'{"\xff":0,"<|endoftext|>":1,"<|startoftext|>":2}' + SEP + m)
    out(t, "vocab_empty", b"" + SEP + m)
    out(t, "config_not_object", v + SEP + m + SEP + b"7")
    out(t, "config_token_number", v + SEP + m + SEP + b'{"eos_token":5,"model_max_length":-1}')
    out(t, "config_deeply_nested", v + SEP + m + SEP + nested(3000).encode())
    out(t, "text_invalid_utf8", v + SEP + m + SEP + b"{}" + SEP + b"a\xff\xfeb \xc3\x28 \xed\xa0\x80")
    out(t, "text_long_word", v + SEP + m + SEP + b"{}" + SEP + b"ab" * 3000)


# --- checkpoint --------------------------------------------------------------------------------

def checkpoint_corpus():
    t = "checkpoint"
    manifest = json.dumps({
        "format": "difftrain.checkpoint", "version": 1, "global_step": 7, "scheduler_step": 7,
        "optimizer_step": 7, "micro_batch_index": 0, "skipped_steps": 0,
        "ema_optimization_step": 0, "optimizer": "adamw", "seed": 0,
        "gradient_accumulation_steps": 1, "micro_batches_per_epoch": 4,
        "lr_scheduler": "constant", "learning_rate": 0.0001, "use_ema": False}, indent=2).encode()
    model = safetensors([("lora.down", "F32", [2, 4], [0.1] * 8), ("lora.up", "F32", [4, 2], [0.0] * 8)],
                        {"format": "pt"})
    optimizer = safetensors([("exp_avg.lora.down", "F32", [2, 4], [0.0] * 8),
                             ("exp_avg_sq.lora.down", "F32", [2, 4], [0.0] * 8),
                             ("step", "F32", [], [7.0])], {"format": "pt"})
    ema = safetensors([("lora.down", "F32", [2, 4], [0.1] * 8)])
    out(t, "valid", manifest + SEP + model + SEP + optimizer + SEP + ema)
    out(t, "manifest_only", manifest)
    out(t, "manifest_empty", b"" + SEP + model)
    out(t, "manifest_not_object", b"[7]" + SEP + model)
    out(t, "manifest_invalid", b'{"global_step": 7,' + SEP + model)
    out(t, "manifest_deeply_nested", nested(3000).encode() + SEP + model)
    out(t, "manifest_huge_numbers", b'{"global_step":9223372036854775807,"learning_rate":1e400,"seed":-1}' + SEP + model)
    out(t, "manifest_wrong_types", b'{"global_step":"7","use_ema":"yes","optimizer":["adamw"]}' + SEP + model)
    out(t, "tensors_truncated", manifest + SEP + model[:-6])
    out(t, "tensors_nan", manifest + SEP + safetensors([("w", "F32", [3], [math.nan, math.inf, -1.0])]) +
        SEP + safetensors([("exp_avg_sq.w", "F32", [3], [-1.0, math.nan, 0.0])]))
    out(t, "tensors_f16", manifest + SEP + safetensors([("w", "F16", [2], [1.0, 2.0])]))
    out(t, "tensors_huge_header_length", manifest + SEP + struct.pack("<Q", 1 << 60) + b"{}")
    out(t, "tensors_empty_file", manifest + SEP + b"" + SEP + optimizer)
    out(t, "tensors_not_safetensors", manifest + SEP + b"PK\x03\x04 a zip, not safetensors")


# --- images ------------------------------------------------------------------------------------

def png(width, height, color_type, bit_depth, rows, extra_chunks=(), interlace=0):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, interlace)
    body = b"".join(chunk(k, v) for k, v in extra_chunks)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + body +
            chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def exif_tiff(orientation, big_endian=False):
    e = ">" if big_endian else "<"
    return ((b"MM" if big_endian else b"II") + struct.pack(e + "HI", 42, 8) +
            struct.pack(e + "H", 1) + struct.pack(e + "HHIHH", 0x0112, 3, 1, orientation, 0) +
            struct.pack(e + "I", 0))


def riff_chunk(kind, body):
    return kind + struct.pack("<I", len(body)) + body + (b"\0" if len(body) % 2 else b"")


def image_corpus():
    """The base images (rgb.png, rgb.jpg, lossy.webp, ...: 6x4 pixels, made with stb_image_write
    and libwebp's WebPEncode*) are files of corpus/image; the rest is made from them here."""
    t = "image"
    folder = os.path.join(HERE, "corpus", t)
    def base(name):
        with open(os.path.join(folder, name), "rb") as f:
            return f.read()
    rgb16 = b"".join(b"\0" + bytes((x * 40) % 256 for x in range(2 * 3 * 3)) for _ in range(3))
    out(t, "rgb16.png", png(3, 3, 2, 16, rgb16))
    out(t, "palette.png", png(2, 2, 3, 8, b"\0\0\1\0\2\0",
                              [(b"PLTE", b"\xff\0\0\0\xff\0\0\0\xff"), (b"tRNS", b"\x80")]))
    out(t, "palette_index_out_of_range.png", png(2, 1, 3, 8, b"\0\x07\xff", [(b"PLTE", b"\0\0\0")]))
    out(t, "grey_alpha_1bit.png", png(9, 2, 0, 1, b"\0\xaa\x80\0\x55\x00"))
    out(t, "interlaced.png", png(3, 3, 2, 8, b"".join(b"\0" + bytes((i * 20 + k) % 256 for k in range(9)) for i in range(15)), interlace=1))
    out(t, "bomb_header.png", png(30000, 30000, 2, 8, b"\0" * 16))
    out(t, "big_under_limit.png", png(4000, 4000, 0, 8, b"\0" * 64))
    out(t, "zero_width.png", png(0, 5, 2, 8, b"\0"))
    out(t, "wrong_crc.png", base("rgb.png")[:20] + b"\0\0\0\0" + base("rgb.png")[24:])
    out(t, "truncated.png", base("rgb.png")[:60])
    out(t, "truncated.jpg", base("rgb.jpg")[:300])
    jpg = base("rgb.jpg")
    for orientation, endian in [(6, False), (3, True), (8, False), (0, False), (99, True)]:
        payload = b"Exif\0\0" + exif_tiff(orientation, endian)
        app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
        out(t, "exif_%d%s.jpg" % (orientation, "_be" if endian else ""), jpg[:2] + app1 + jpg[2:])
    bad = b"Exif\0\0II*\0\xff\xff\xff\x7f"
    out(t, "exif_bad_offset.jpg", jpg[:2] + b"\xff\xe1" + struct.pack(">H", len(bad) + 2) + bad + jpg[2:])
    out(t, "app1_length_past_end.jpg", jpg[:2] + b"\xff\xe1\xff\xffExif\0\0II*\0")
    lossy = base("lossy.webp")
    vp8 = lossy[12:]
    exif = exif_tiff(6)
    vp8x = riff_chunk(b"VP8X", struct.pack("<B3x", 0x08) + struct.pack("<I", 5)[:3] + struct.pack("<I", 3)[:3])
    body = b"WEBP" + vp8x + vp8 + riff_chunk(b"EXIF", exif)
    out(t, "exif_6.webp", b"RIFF" + struct.pack("<I", len(body)) + body)
    animated = b"WEBP" + riff_chunk(b"VP8X", struct.pack("<B3x", 0x02) + b"\x05\0\0\x03\0\0") + \
        riff_chunk(b"ANIM", b"\0" * 6)
    out(t, "animated_flag.webp", b"RIFF" + struct.pack("<I", len(animated)) + animated)
    out(t, "riff_size_huge.webp", b"RIFF\xff\xff\xff\xffWEBP" + vp8)
    out(t, "truncated.webp", lossy[:40])
    out(t, "tiny.gif", b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00"
                       b"\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
    out(t, "tiny.ppm", b"P6\n2 1\n255\n\xff\0\0\0\xff\0")
    out(t, "huge.ppm", b"P6\n100000 100000\n255\n\0")
    out(t, "bmp_huge_header", base("rgb.bmp")[:18] + struct.pack("<ii", 70000, -70000) + base("rgb.bmp")[26:])
    out(t, "text.png", "not an image, a caption\n")
    out(t, "empty.jpg", b"")


def main():
    safetensors_corpus()
    model_config_corpus()
    trainer_config_corpus()
    lora_corpus()
    tokenizer_corpus()
    checkpoint_corpus()
    image_corpus()


if __name__ == "__main__":
    main()
