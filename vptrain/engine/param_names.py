"""Which part of the single-process model each of a rank's parameters is.

Every trainer builds the layers of its stage under their global layer index, so a transformer
parameter already has the single-process name (`3.mlp.fc.weight`). The vocabulary tables are the
exception: a vocabulary method holds rows [start, end) of both tables beside the layer list
(`vocab_input`, `vocab_output`), and the GPT's position table sits at index 0 by itself when the
token embedding is sharded. This module is the one place that knows those names, so the
equivalence tests, checkpoints (resharding into another layout), the Hugging Face import and the
export all read the same map.

Global names (L = model.num_layers):
    0.wte            the input embedding, (V_rows, h); `0.pos.wpe` the GPT's position table
    {i+1}.<...>      transformer layer i
    {L+1}.<...>      the final norm
    {L+2}.weight     the output layer, (V_rows, h); absent when tied to 0.wte
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VOCAB_INPUT, VOCAB_OUTPUT = "vocab_input", "vocab_output"


@dataclass(frozen=True)
class GlobalSlice:
    """A local parameter is `name` of the single-process model, or rows [start, end) of it."""

    name: str
    rows: tuple[int, int] | None = None

    @property
    def key(self) -> str:
        """The name the equivalence tests' dumps use: `0.wte[0:256]` for a row shard."""
        return self.name if self.rows is None else f"{self.name}[{self.rows[0]}:{self.rows[1]}]"

    def to_list(self) -> list:
        """Plain data for a checkpoint (weights_only loads accept lists, not dataclasses)."""
        return [self.name, None if self.rows is None else list(self.rows)]

    @staticmethod
    def from_list(item: list) -> GlobalSlice:
        name, rows = item
        return GlobalSlice(name, None if rows is None else (int(rows[0]), int(rows[1])))


def output_table_name(num_layers: int) -> str:
    return f"{num_layers + 2}.weight"


def vocab_table_names(num_layers: int) -> tuple[str, str]:
    """(input embedding, output layer) global names."""
    return "0.wte", output_table_name(num_layers)


def global_slices(
    module: torch.nn.Module,
    *,
    num_layers: int,
    vocab_rows: int,
    shard: tuple[int, int] | None = None,
    position_at_root: bool = False,
) -> dict[str, GlobalSlice]:
    """Local parameter name -> GlobalSlice for every parameter of `module` (in named_parameters
    order, which is the optimizer's). `shard` is the (start, end) rows of `vocab_input` /
    `vocab_output` under a vocabulary method; the tables of the plain placement hold all
    `vocab_rows` rows. `position_at_root`: the GPT's position table is layer 0 itself (`0.wpe`)
    because the token embedding is sharded outside the list."""
    emb, out = vocab_table_names(num_layers)
    result: dict[str, GlobalSlice] = {}
    for name, _ in module.named_parameters():
        if name == VOCAB_INPUT:
            result[name] = GlobalSlice(emb, shard)
        elif name == VOCAB_OUTPUT:
            result[name] = GlobalSlice(out, shard)
        elif position_at_root and name == "0.wpe":
            result[name] = GlobalSlice("0.pos.wpe")
        elif name in (emb, out):
            result[name] = GlobalSlice(name, (0, vocab_rows))
        else:
            result[name] = GlobalSlice(name)
    return result


def named_parameters_global(module: torch.nn.Module, slices: dict[str, GlobalSlice]) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the parameters under their global keys (full tables under their plain
    name, shards as `<table>[start:end]`)."""
    out = {}
    for name, p in module.named_parameters():
        key = slices[name].key if name in (VOCAB_INPUT, VOCAB_OUTPUT) else slices[name].name
        out[key] = p.detach().float().cpu().clone()
    return out
