"""Which Hugging Face tensor each of our global parameters is (vptrain/engine/param_names.py).

Llama (LlamaForCausalLM) uses the names of vptrain/models/llama.py under `model.layers.{i}`; GPT-2
(GPT2LMHeadModel) renames the projections and stores them as Conv1D, (in, out), the transpose of our
nn.Linear weight:

    ours ({i+1}.*)     GPT-2 (transformer.h.{i}.*)
    attn.qkv           attn.c_attn      (q, k, v concatenated in the same order)
    attn.proj          attn.c_proj
    mlp.fc             mlp.c_fc
    mlp.proj           mlp.c_proj
    ln_1, ln_2         ln_1, ln_2
"""

from __future__ import annotations

from dataclasses import dataclass

HF_ARCH = {"llama": "llama", "gpt": "gpt2"}  # our model.arch -> HF model_type
GPT2_RENAMES = {"attn.qkv.": "attn.c_attn.", "attn.proj.": "attn.c_proj.", "mlp.fc.": "mlp.c_fc.",
                "mlp.proj.": "mlp.c_proj."}
GPT2_CONV1D = tuple(f"{new}weight" for new in GPT2_RENAMES.values())


@dataclass(frozen=True)
class HFTensor:
    """One tensor of a HF checkpoint, as one of our global parameters sees it."""

    name: str
    transpose: bool = False  # stored (in, out): GPT-2's Conv1D
    vocab_table: bool = False  # one row per token id: our padded rows beyond vocab_size are not in HF


def hf_tensor(arch: str, global_name: str, num_layers: int) -> HFTensor:
    """The HF tensor holding our global parameter `global_name` (`0.wte`, `3.mlp.fc.weight`, ...)."""
    index, _, rest = global_name.partition(".")
    if not index.isdigit() or not rest:
        raise KeyError(f"'{global_name}' is not a global parameter name")
    i = int(index)
    llama = arch == "llama"
    if arch not in HF_ARCH:
        raise KeyError(f"model.arch={arch} has no Hugging Face mapping")
    if i == 0 and rest == "wte":
        return HFTensor("model.embed_tokens.weight" if llama else "transformer.wte.weight", vocab_table=True)
    if i == 0 and rest == "pos.wpe" and not llama:
        return HFTensor("transformer.wpe.weight")
    if 1 <= i <= num_layers:
        if llama:
            return HFTensor(f"model.layers.{i - 1}.{rest}")
        for ours, theirs in GPT2_RENAMES.items():
            if rest.startswith(ours):
                rest = theirs + rest[len(ours):]
                break
        return HFTensor(f"transformer.h.{i - 1}.{rest}", transpose=rest in GPT2_CONV1D)
    if i == num_layers + 1:
        return HFTensor(f"model.{rest}" if llama else f"transformer.{rest}")
    if i == num_layers + 2 and rest == "weight":
        return HFTensor("lm_head.weight", vocab_table=True)
    raise KeyError(f"'{global_name}' has no Hugging Face counterpart for model.arch={arch}")
