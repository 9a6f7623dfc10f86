"""Read one rank's parameters out of a Hugging Face checkpoint (safetensors, single or sharded).

Every read is a safetensors slice: a vocabulary shard reads only its rows of the embedding and
output tables (the file is memory-mapped; nothing else of the table is touched), a stage reads only
its own layers. What each rank read is returned, so a run can record it."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vptrain.engine.param_names import GlobalSlice
from vptrain.hf.names import hf_tensor

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


class HFCheckpointError(ValueError):
    """A checkpoint that does not fit the model config.json describes: the message names the tensor."""


@dataclass(frozen=True)
class Read:
    tensor: str
    rows: tuple[int, int]  # rows [start, end) of dim 0 read from the file

    def to_list(self) -> list:
        return [self.tensor, list(self.rows)]


class SafetensorsFiles(contextlib.AbstractContextManager):
    """The tensors of DIR: `model.safetensors`, or the files `model.safetensors.index.json` maps."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        self.directory = directory
        self._open = safe_open
        self._handles: dict[str, object] = {}
        index = os.path.join(directory, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                self.where = dict(json.load(f)["weight_map"])
        elif os.path.isfile(os.path.join(directory, SINGLE)):
            self.where = {name: SINGLE for name in self._handle(SINGLE).keys()}
        else:
            raise HFCheckpointError(f"model.init_from: {directory} holds neither {SINGLE} nor {INDEX} "
                                    "(only safetensors checkpoints are read; save with safe_serialization)")

    def _handle(self, file: str):
        if file not in self._handles:
            path = os.path.join(self.directory, file)
            if not os.path.isfile(path):
                raise HFCheckpointError(f"model.init_from: {path} is missing ({INDEX} names it)")
            self._handles[file] = self._open(path, framework="pt", device="cpu")
        return self._handles[file]

    def __exit__(self, *exc) -> None:
        self._handles.clear()  # safe_open handles unmap when dropped

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def slice(self, name: str):
        return self._handle(self.where[name]).get_slice(name)


def _read_table_rows(files: SafetensorsFiles, name: str, rows: tuple[int, int], *, vocab_size: int,
                     hidden: int, reads: list[Read]) -> torch.Tensor:
    """Rows [start, end) of a padded (V_rows, hidden) table: the file's rows up to vocab_size, zeros
    for our padding rows."""
    start, end = rows
    out = torch.zeros(end - start, hidden)
    stop = min(end, vocab_size)
    if start < stop:
        out[: stop - start] = files.slice(name)[start:stop].float()
        reads.append(Read(name, (start, stop)))
    return out


def rank_values(directory: str, module: torch.nn.Module, slices: dict[str, GlobalSlice], *, arch: str, num_layers: int,
                vocab_size: int, reads: list[Read]) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, its fp32 value from the checkpoint in DIR) for each of this rank's parameters,
    one tensor at a time; appends what it read to `reads`. A missing or mis-shaped tensor raises
    HFCheckpointError."""
    with SafetensorsFiles(directory) as files:
        for local, param in module.named_parameters():
            where = slices[local]
            t = hf_tensor(arch, where.name, num_layers)
            if t.name not in files:
                hint = " (config.json says tie_word_embeddings=false)" if t.name == "lm_head.weight" else ""
                raise HFCheckpointError(f"model.init_from: {directory} has no tensor {t.name}{hint}; it holds "
                                        f"our {where.name}")
            stored = list(files.slice(t.name).get_shape())
            if t.vocab_table:
                want = [vocab_size, param.shape[-1]]
            else:
                want = list(param.shape[::-1]) if t.transpose else list(param.shape)
            if stored != want:
                raise HFCheckpointError(f"model.init_from: tensor {t.name} in {directory} has shape {stored}; "
                                        f"config.json describes {want}")
            if t.vocab_table:
                rows = where.rows if where.rows is not None else (0, param.shape[0])
                value = _read_table_rows(files, t.name, rows, vocab_size=vocab_size, hidden=want[1], reads=reads)
            else:
                value = files.slice(t.name)[:].float()
                reads.append(Read(t.name, (0, stored[0] if stored else 1)))
                value = value.t() if t.transpose else value
            yield param, value


def read_rank_parameters(directory: str, module: torch.nn.Module, slices: dict[str, GlobalSlice], *, arch: str,
                         num_layers: int, vocab_size: int) -> list[Read]:
    """Copy this rank's parameters from the checkpoint in DIR into `module` (in place, cast to each
    parameter's dtype); returns the reads."""
    reads: list[Read] = []
    for param, value in rank_values(directory, module, slices, arch=arch, num_layers=num_layers,
                                    vocab_size=vocab_size, reads=reads):
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
    return reads


def expected_shapes(fields: dict) -> dict[str, list[int]]:
    """Every tensor a checkpoint of model.* `fields` (vptrain/hf/shape.py) must hold, with its shape."""
    h, n, vocab = fields["hidden_size"], fields["num_layers"], fields["vocab_size"]
    if fields["arch"] == "llama":
        hd = h // fields["num_heads"]
        q, kv, inner = fields["num_heads"] * hd, fields["num_kv_heads"] * hd, fields["intermediate_size"]
        layer = {"input_layernorm.weight": [h], "self_attn.q_proj.weight": [q, h], "self_attn.k_proj.weight": [kv, h],
                 "self_attn.v_proj.weight": [kv, h], "self_attn.o_proj.weight": [h, q],
                 "post_attention_layernorm.weight": [h], "mlp.gate_proj.weight": [inner, h],
                 "mlp.up_proj.weight": [inner, h], "mlp.down_proj.weight": [h, inner]}
        out = {"model.embed_tokens.weight": [vocab, h], "model.norm.weight": [h]}
        out.update({f"model.layers.{i}.{k}": v for i in range(n) for k, v in layer.items()})
    else:
        layer = {"ln_1.weight": [h], "ln_1.bias": [h], "attn.c_attn.weight": [h, 3 * h], "attn.c_attn.bias": [3 * h],
                 "attn.c_proj.weight": [h, h], "attn.c_proj.bias": [h], "ln_2.weight": [h], "ln_2.bias": [h],
                 "mlp.c_fc.weight": [h, 4 * h], "mlp.c_fc.bias": [4 * h], "mlp.c_proj.weight": [4 * h, h],
                 "mlp.c_proj.bias": [h]}
        out = {"transformer.wte.weight": [vocab, h], "transformer.wpe.weight": [fields["max_position_embeddings"], h],
               "transformer.ln_f.weight": [h], "transformer.ln_f.bias": [h]}
        out.update({f"transformer.h.{i}.{k}": v for i in range(n) for k, v in layer.items()})
    if not fields["tie_embeddings"]:
        out["lm_head.weight"] = [vocab, h]
    return out


def check_checkpoint(directory: str, fields: dict) -> None:
    """Before launch: every tensor the model needs is in DIR with the shape config.json implies
    (safetensors headers only; no tensor data is read)."""
    with SafetensorsFiles(directory) as files:
        for name, want in expected_shapes(fields).items():
            if name not in files:
                hint = " (config.json says tie_word_embeddings=false)" if name == "lm_head.weight" else ""
                raise HFCheckpointError(f"model.init_from: {directory} has no tensor {name}{hint}")
            stored = list(files.slice(name).get_shape())
            if stored != want:
                raise HFCheckpointError(f"model.init_from: tensor {name} in {directory} has shape {stored}; "
                                        f"config.json describes {want}")
