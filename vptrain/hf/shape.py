"""model.init_from=hf:DIR: the architecture and shape come from DIR/config.json.

A Llama config.json (LlamaForCausalLM) sets model.arch=llama and the shape; a GPT-2 one (what
`vptrain export-hf` writes for a GPT run) sets model.arch=gpt. Anything that would make the
checkpoint compute a different function from ours (rope scaling, biases, another activation) is
refused here, before launch, naming the config.json key."""

from __future__ import annotations

import dataclasses
import json
import os

from vptrain.config import RunConfig

PREFIX = "hf:"
FROM_HF = ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
           "rope_theta", "norm_eps", "tie_embeddings", "max_position_embeddings")


def hf_directory(init_from: str | None) -> str | None:
    """The directory model.init_from names (absolute), None when unset."""
    if not init_from:
        return None
    if not init_from.startswith(PREFIX) or not init_from[len(PREFIX):]:
        raise ValueError(f"model.init_from: '{init_from}' is not supported; use hf:DIR, DIR a Hugging Face "
                         "checkpoint (config.json + safetensors)")
    return os.path.abspath(os.path.expanduser(init_from[len(PREFIX):]))


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"model.init_from: {path} does not exist; DIR must hold a Hugging Face checkpoint "
                         "(config.json + safetensors)") from None
    except ValueError as err:
        raise ValueError(f"model.init_from: {path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"model.init_from: {path} is not a JSON object")
    return config


def _refused(path: str, key: str, value, why: str) -> ValueError:
    return ValueError(f"model.init_from: {path} has {key}={json.dumps(value)}: {why}")


def _require(config: dict, path: str, key: str):
    if key not in config:
        raise ValueError(f"model.init_from: {path} has no '{key}'")
    return config[key]


def _llama_rope_theta(config: dict, path: str) -> float:
    """transformers 5 writes rope_parameters {rope_type, rope_theta}; 4.x writes rope_theta and
    rope_scaling. Only plain (unscaled) rotary embeddings are ours."""
    if config.get("rope_scaling") is not None:
        raise _refused(path, "rope_scaling", config["rope_scaling"], "scaled rotary embeddings are not supported")
    params = config.get("rope_parameters") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise _refused(path, "rope_parameters.rope_type", kind, "only the default rotary embedding is supported")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def llama_fields(config: dict, path: str) -> dict:
    hidden, heads = int(_require(config, path, "hidden_size")), int(_require(config, path, "num_attention_heads"))
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise _refused(path, "hidden_act", act, "vptrain's llama MLP is SwiGLU (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise _refused(path, key, config[key], "vptrain's llama has no biases")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise _refused(path, "head_dim", head_dim, f"vptrain's head size is hidden_size / num_attention_heads = "
                f"{hidden // heads}")
    return {
        "arch": "llama",
        "vocab_size": int(_require(config, path, "vocab_size")),
        "hidden_size": hidden,
        "num_layers": int(_require(config, path, "num_hidden_layers")),
        "num_heads": heads,
        "num_kv_heads": int(config.get("num_key_value_heads") or heads),
        "intermediate_size": int(_require(config, path, "intermediate_size")),
        "rope_theta": _llama_rope_theta(config, path),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "max_position_embeddings": int(config.get("max_position_embeddings") or 0) or None,
    }


def gpt2_fields(config: dict, path: str) -> dict:
    hidden = int(_require(config, path, "n_embd"))
    act = config.get("activation_function", "gelu_new")
    if act != "gelu":
        raise _refused(path, "activation_function", act, "vptrain's GPT uses the exact (erf) gelu")
    inner = config.get("n_inner")
    if inner is not None and inner != 4 * hidden:
        raise _refused(path, "n_inner", inner, f"vptrain's GPT MLP is 4 * n_embd = {4 * hidden} wide")
    for key, ours in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if key in config and bool(config[key]) != ours:
            raise _refused(path, key, config[key], f"vptrain's GPT attention has {key}={json.dumps(ours)}")
    return {
        "arch": "gpt",
        "vocab_size": int(_require(config, path, "vocab_size")),
        "hidden_size": hidden,
        "num_layers": int(_require(config, path, "n_layer")),
        "num_heads": int(_require(config, path, "n_head")),
        "num_kv_heads": None,
        "intermediate_size": None,
        "rope_theta": None,
        "norm_eps": float(config.get("layer_norm_epsilon", 1e-5)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
        "max_position_embeddings": int(_require(config, path, "n_positions")),
    }


def hf_model_fields(directory: str) -> dict:
    """model.* fields (FROM_HF) that DIR/config.json decides."""
    config = read_hf_config(directory)
    path = os.path.join(directory, "config.json")
    kind = config.get("model_type")
    if kind == "llama":
        return llama_fields(config, path)
    if kind == "gpt2":
        return gpt2_fields(config, path)
    raise _refused(path, "model_type", kind, "vptrain imports Llama (model_type llama) and GPT-2 (gpt2) checkpoints")


def overridden_model_keys(overrides: list[str]) -> list[str]:
    """model.<field> names set on the command line (`model.x=..`, `+model.x=..`, `++model.x=..`)."""
    keys = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key.startswith("model.") and "=" in item:
            keys.append(key[len("model."):])
    return keys


def adopt_hf_shape(cfg: RunConfig, *, overrides: list[str]) -> RunConfig:
    """cfg with model.* taken from the Hugging Face config.json that model.init_from names (cfg
    unchanged when unset). A model.* override that contradicts config.json is a ValueError."""
    directory = hf_directory(cfg.model.init_from)
    if directory is None:
        return cfg
    fields = hf_model_fields(directory)
    given = overridden_model_keys(overrides)
    for key in given:
        if key in fields and getattr(cfg.model, key) != fields[key]:
            raise ValueError(
                f"model.{key}={getattr(cfg.model, key)} contradicts {directory}/config.json, which gives "
                f"{fields[key]}: model.init_from takes the model's shape from the checkpoint; drop model.{key}")
    positions = fields["max_position_embeddings"]
    if positions is not None and cfg.model.seq_len > positions:
        raise ValueError(f"model.seq_len: {cfg.model.seq_len} > max_position_embeddings={positions} of "
                         f"{directory}/config.json; train on sequences of at most {positions} tokens")
    from vptrain.hf.load import check_checkpoint

    check_checkpoint(directory, fields)  # a missing or mis-shaped tensor fails here, not inside a rank
    extra = {"init_from": PREFIX + directory}  # absolute: the ranks may not share the launcher's cwd
    if "name" not in given:
        extra["name"] = os.path.basename(directory.rstrip(os.sep)) or cfg.model.name
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields, **extra))
