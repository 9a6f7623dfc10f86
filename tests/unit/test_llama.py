"""model.arch=llama: the model equals an independent computation, HF's LlamaForCausalLM given the
same weights, and initialises identically whatever the layout builds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vptrain.config import RunConfig
from vptrain.model import Llama, build_model, layer_list, lm_loss, token_embedding_rows
from vptrain.models import llama
from vptrain.models.shape import TransformerShape
from vptrain.schedule.costs import ModelShape, layer_flops, parameter_count
from vptrain.validate import validate

REPO = Path(__file__).resolve().parents[2]
SHAPE = TransformerShape(vocab_size=300, vocab_rows=304, num_layers=3, hidden_size=32, num_heads=4, seq_len=16,
                         init_std=0.02, seed=5, arch="llama", num_kv_heads=2, intermediate_size=88,
                         rope_theta=500000.0, norm_eps=1e-5)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding written as 2x2 rotations of the pairs (j, j + hs/2) by t * theta^(-2j/hs),
    one position and one pair at a time (not rotate_half). x: (T, heads, hs)."""
    T, _, hs = x.shape
    out = x.clone()
    for t in range(T):
        for j in range(hs // 2):
            angle = t * theta ** (-2.0 * j / hs)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[t, :, j], x[t, :, j + hs // 2]
            out[t, :, j], out[t, :, j + hs // 2] = a * c - b * s, a * s + b * c
    return out


def _reference_block(block: llama.Block, x: torch.Tensor, shape: TransformerShape) -> torch.Tensor:
    """One layer of one sequence (T, C) with explicit matrices, softmax and causal mask, fp64."""
    T, C = x.shape
    nh, nkv, hs = shape.num_heads, shape.kv_heads, shape.head_dim
    a, m = block.self_attn, block.mlp
    h = _rms(x, block.input_layernorm.weight, shape.norm_eps)
    q = _rotate((h @ a.q_proj.weight.T).view(T, nh, hs), shape.rope_theta)
    k = _rotate((h @ a.k_proj.weight.T).view(T, nkv, hs), shape.rope_theta)
    v = (h @ a.v_proj.weight.T).view(T, nkv, hs)
    heads = []
    for head in range(nh):
        kv = head // (nh // nkv)  # query heads share key/value heads in adjacent groups
        scores = q[:, head] @ k[:, kv].T / math.sqrt(hs)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -math.inf)
        heads.append(torch.softmax(scores, dim=-1) @ v[:, kv])
    x = x + torch.cat(heads, dim=-1) @ a.o_proj.weight.T
    h = _rms(x, block.post_attention_layernorm.weight, shape.norm_eps)
    gate, up = h @ m.gate_proj.weight.T, h @ m.up_proj.weight.T
    return x + (gate * torch.sigmoid(gate) * up) @ m.down_proj.weight.T


@pytest.mark.parametrize("tied", [False, True])
def test_llama_equals_an_independent_computation_in_fp64(tied):
    shape = TransformerShape(**{**SHAPE.__dict__, "tie_embeddings": tied})
    model = Llama(shape).double()
    with torch.no_grad():  # non-trivial norm weights, so a norm that ignores its weight fails
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    ids = torch.randint(0, shape.vocab_size, (2, 11))
    logits = model(ids)
    for b in range(2):
        x = model[0].wte[ids[b]]
        for i in range(shape.num_layers):
            x = _reference_block(model[1 + i], x, shape)
        x = _rms(x, model[shape.num_layers + 1].norm.weight, shape.norm_eps)
        expected = (x @ model[-1].weight.T)[:, : shape.vocab_size]
        torch.testing.assert_close(logits[b], expected, rtol=1e-10, atol=1e-12)
    assert (model[-1].weight is model[0].wte) == tied


def _hf_state_dict(model: Llama, shape: TransformerShape) -> dict[str, torch.Tensor]:
    """Our parameters under HF's names (the mapping llama.py documents); padding rows dropped."""
    L, V = shape.num_layers, shape.vocab_size
    out = {"model.embed_tokens.weight": model[0].wte[:V], "model.norm.weight": model[L + 1].norm.weight,
           "lm_head.weight": model[L + 2].weight[:V]}
    for i in range(L):
        for name, p in model[i + 1].named_parameters():
            out[f"model.layers.{i}.{name}"] = p
    return {k: v.detach().clone() for k, v in out.items()}


@pytest.mark.parametrize("tied", [False, True])
def test_llama_equals_transformers_llama_given_the_same_weights(tied):
    transformers = pytest.importorskip("transformers")
    shape = TransformerShape(**{**SHAPE.__dict__, "tie_embeddings": tied})
    ours = Llama(shape)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn(p.shape))
    config = transformers.LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, max_position_embeddings=shape.seq_len, rms_norm_eps=shape.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta}, tie_word_embeddings=tied,
        attention_bias=False, mlp_bias=False, attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(config).float().eval()
    state = _hf_state_dict(ours, shape)
    if tied:
        del state["lm_head.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set()), (missing, unexpected)
    ids = torch.randint(0, shape.vocab_size, (2, shape.seq_len))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    labels = torch.randint(0, shape.vocab_size, ids.shape)
    torch.testing.assert_close(lm_loss(got, labels), lm_loss(expected, labels), rtol=1e-5, atol=0)


def test_llama_layers_built_alone_equal_the_whole_model_and_layers_differ():
    whole = dict(build_model(SHAPE).named_parameters())
    for index in range(SHAPE.num_layers):
        for name, p in llama.Block(SHAPE, index).named_parameters():
            torch.testing.assert_close(p, whole[f"{index + 1}.{name}"], rtol=0, atol=0)
    torch.testing.assert_close(token_embedding_rows(SHAPE, 100, 290), whole["0.wte"][100:290], rtol=0, atol=0)
    b0, b1 = llama.Block(SHAPE, 0), llama.Block(SHAPE, 1)
    assert not torch.equal(b0.mlp.gate_proj.weight, b1.mlp.gate_proj.weight)
    # Residual projections are scaled down with depth; the others keep init_std.
    assert b0.self_attn.o_proj.weight.std() < 0.6 * b0.self_attn.q_proj.weight.std()
    assert all(p.bias is None for p in b0.modules() if isinstance(p, torch.nn.Linear))


def test_vocab_method_layer_list_keeps_the_indices_and_holds_no_vocabulary():
    """Under a vocab method the tables live outside the list; the first layer holds nothing, so the
    pipeline's parameter names are the single-process model's."""
    pipe = [cls(*args) for cls, args in layer_list(SHAPE, with_vocab=False)]
    assert len(pipe) == SHAPE.num_layers + 2 and not list(pipe[0].parameters())
    names = {f"{i}.{n}" for i, layer in enumerate(pipe) for n, _ in layer.named_parameters()}
    whole = {n for n, _ in build_model(SHAPE).named_parameters()}
    assert names == whole - {"0.wte", f"{SHAPE.num_layers + 2}.weight"}


def test_forward_is_causal():
    model = build_model(SHAPE)
    x = torch.randint(0, SHAPE.vocab_size, (1, 16))
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % SHAPE.vocab_size
    a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_cost_model_counts_the_llama_parameters_it_builds():
    cost = ModelShape(vocab=300, vocab_rows=304, layers=3, hidden=32, seq=16, micro_batch=1, act_bytes=4,
                      arch="llama", kv_dim=SHAPE.kv_heads * SHAPE.head_dim, intermediate=SHAPE.intermediate_size)
    built = sum(p.numel() for p in build_model(SHAPE).parameters())
    assert parameter_count(cost, layers=3, embedding_rows=304, output_rows=304, positions=True,
                           final_norm=True) == built
    block = llama.Block(SHAPE, 0)
    weights = sum(p.numel() for n, p in block.named_parameters() if "norm" not in n)
    assert layer_flops(cost) == 16 * (6 * weights + 12 * 32 * 16)


def _cfg(**model) -> RunConfig:
    cfg = RunConfig(run_dir="/unused")
    cfg.model.arch = "llama"
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


@pytest.mark.parametrize(("model", "key"), [
    ({"num_kv_heads": 3}, "model.num_kv_heads"),  # 4 heads
    ({"hidden_size": 60, "num_heads": 4}, "model.num_heads"),  # head size 15: odd, no rotary pairs
    ({"hidden_size": 66, "num_heads": 4}, "model.num_heads"),  # does not divide
    ({"arch": "mamba"}, "model.arch"),
    ({"arch": "gpt", "num_kv_heads": 2}, "model.num_kv_heads"),
    ({"arch": "gpt", "rope_theta": 1e6}, "model.rope_theta"),
    ({"arch": "gpt", "intermediate_size": 100}, "model.intermediate_size"),
])
def test_llama_config_mistakes_are_refused_naming_the_key(model, key):
    with pytest.raises(ValueError, match=rf"^{key}: "):
        validate(_cfg(**model))


def test_a_valid_llama_config_passes():
    validate(_cfg(num_kv_heads=2, intermediate_size=176, rope_theta=500000.0))


@pytest.mark.parametrize(("preset", "published"), [
    ("llama-3-8b", 8_030_261_248),  # Meta-Llama-3-8B's safetensors, all tensors
    ("llama-3.2-1b", 1_235_814_400),  # Llama-3.2-1B, embedding and output tied
    ("qwen2.5-7b", 7_615_616_512 - 28 * (3584 + 2 * 512)),  # Qwen2.5-7B less its q/k/v biases
])
def test_model_presets_have_the_published_parameter_counts(preset, published):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vptrain.config import register_configs
    from vptrain.resolved import resolve_layout

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dcfg = compose("config", overrides=[f"model={preset}", "layout.pp=1", "method=baseline"])
    dcfg.run_dir = "/unused"
    cfg = OmegaConf.to_object(dcfg)
    validate(cfg)
    shape = resolve_layout(cfg).shape
    count = parameter_count(shape, layers=shape.layers, embedding_rows=shape.vocab_rows,
                            output_rows=shape.vocab_rows, positions=True, final_norm=True)
    assert count == published


def test_mfu_flops_and_cost_model_count_a_llama_layer_alike():
    from vptrain.flops import transformer_layer_flops
    from vptrain.resolved import resolve_layout

    cfg = _cfg(num_kv_heads=2, intermediate_size=176)
    cfg.method.name, cfg.layout.pp = "baseline", 1
    shape = resolve_layout(cfg).shape
    assert transformer_layer_flops(cfg, shape.tokens) == layer_flops(shape)
    assert layer_flops(shape) == shape.tokens * (6 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176) + 12 * 64 * 64)
    cfg.model.arch, cfg.model.num_kv_heads, cfg.model.intermediate_size = "gpt", None, None
    gpt = resolve_layout(cfg).shape
    assert transformer_layer_flops(cfg, gpt.tokens) == layer_flops(gpt) == gpt.tokens * 64 * (72 * 64 + 12 * 64)
