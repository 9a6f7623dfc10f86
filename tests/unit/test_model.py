"""The model initialises identically whatever the layout builds."""

from __future__ import annotations

import torch

from vptrain.model import GPT, Block, GPTShape, InputEmbedding, OutputHead, lm_loss, output_weight_rows

SHAPE = GPTShape(vocab_size=300, vocab_rows=304, num_layers=3, hidden_size=32, num_heads=4, seq_len=16,
                 init_std=0.02, seed=5)


def test_layers_built_alone_equal_the_whole_model():
    whole = dict(GPT(SHAPE).named_parameters())
    alone = dict(Block(SHAPE, 2).named_parameters())
    for name, p in alone.items():
        torch.testing.assert_close(p, whole[f"3.{name}"], rtol=0, atol=0)
    torch.testing.assert_close(InputEmbedding(SHAPE).wte, whole["0.wte"], rtol=0, atol=0)


def test_a_vocab_shard_is_the_slice_of_the_full_table_and_padding_is_zero():
    full = OutputHead(SHAPE).weight.detach()
    for start, end in [(0, 76), (76, 152), (152, 228), (228, 304), (100, 290)]:
        torch.testing.assert_close(output_weight_rows(SHAPE, start, end), full[start:end], rtol=0, atol=0)
    assert torch.count_nonzero(full[300:]) == 0 and torch.count_nonzero(full[:300]) > 0


def test_seed_changes_weights_and_distinct_layers_differ():
    other = GPTShape(**{**SHAPE.__dict__, "seed": 6})
    assert not torch.equal(Block(SHAPE, 0).mlp.fc.weight, Block(other, 0).mlp.fc.weight)
    assert not torch.equal(Block(SHAPE, 0).mlp.fc.weight, Block(SHAPE, 1).mlp.fc.weight)


def test_forward_is_causal_and_padded_rows_never_enter_the_loss():
    model = GPT(SHAPE)
    x = torch.randint(0, 300, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 300)
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 300
    torch.testing.assert_close(model(x2)[:, :10], logits[:, :10])  # future tokens do not leak back
    loss = lm_loss(logits, x)
    loss.backward()
    head = model[-1].weight.grad
    assert torch.count_nonzero(head[300:]) == 0


def test_tied_model_shares_one_tensor():
    tied = GPT(GPTShape(**{**SHAPE.__dict__, "tie_embeddings": True}))
    assert tied[-1].weight is tied[0].wte
