"""The config.json `vptrain export-hf` writes: our ModelConfig (meta.json's `model`) in Hugging
Face's words, LlamaConfig or GPT2Config, readable by transformers 4.x and 5.x. vptrain/hf/shape.py
reads the same keys back."""

from __future__ import annotations

from vptrain.config import DEFAULT_ROPE_THETA, default_intermediate_size


def llama_config(model: dict) -> dict:
    hidden, heads = int(model["hidden_size"]), int(model["num_heads"])
    theta = float(model.get("rope_theta") or DEFAULT_ROPE_THETA)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(model["vocab_size"]),
        "hidden_size": hidden,
        "intermediate_size": int(model.get("intermediate_size") or default_intermediate_size(hidden)),
        "num_hidden_layers": int(model["num_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(model.get("num_kv_heads") or heads),
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": int(model.get("max_position_embeddings") or model["seq_len"]),
        "rms_norm_eps": float(model.get("norm_eps", 1e-5)),
        "rope_theta": theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},  # 5.x
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": bool(model.get("tie_embeddings")),
        "initializer_range": float(model.get("init_std", 0.02)),
        "bos_token_id": None,
        "eos_token_id": None,
        "dtype": "float32",
    }


def gpt2_config(model: dict, *, positions: int) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": int(model["vocab_size"]),
        "n_embd": int(model["hidden_size"]),
        "n_layer": int(model["num_layers"]),
        "n_head": int(model["num_heads"]),
        "n_positions": positions,
        "n_inner": None,  # 4 * n_embd, as ours
        "activation_function": "gelu",  # exact erf gelu (F.gelu), not GPT-2's original tanh gelu_new
        "layer_norm_epsilon": float(model.get("norm_eps", 1e-5)),
        "tie_word_embeddings": bool(model.get("tie_embeddings")),
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": float(model.get("init_std", 0.02)),
        "bos_token_id": None,
        "eos_token_id": None,
        "dtype": "float32",
    }


def hf_config(model: dict, *, positions: int | None) -> dict:
    """config.json for meta.json's `model`; `positions` the rows of the GPT's position table."""
    arch = model.get("arch", "gpt")
    if arch == "llama":
        return llama_config(model)
    if arch == "gpt":
        if positions is None:
            raise ValueError("the GPT checkpoint has no position table (0.pos.wpe); cannot export as GPT-2")
        return gpt2_config(model, positions=positions)
    raise ValueError(f"model.arch={arch} has no Hugging Face counterpart; export-hf writes llama and gpt (GPT-2)")
