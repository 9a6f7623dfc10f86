"""Training data: deterministic per (seed, step, sample), identical on every pipeline rank.

A step's global batch is the samples [step * G, (step + 1) * G); data-parallel rank d takes the
d-th contiguous slice and cuts it into m microbatches. Any rank can therefore build any microbatch
(the vocabulary-parallel methods need tokens and labels on every stage), every layout sees the
same sequences in the same step, and the data position to save and restore is just the step.

- `synthetic`: each sequence follows one of a few fixed random permutations of the vocabulary
  (next = perm[current]) with a little noise, so a small GPT learns it within tens of steps.
- `memmap`: flat uint16/uint32 token files (nanoGPT / Megatron style .bin), windows of seq_len + 1
  tokens at offsets drawn from a generator seeded by (seed, step).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from vptrain.config import RunConfig, microbatches
from vptrain.validate import resolve_data_files

NUM_RULES = 4
NOISE = 0.05


@dataclass(frozen=True)
class BatchSpec:
    global_batch: int
    micro_batch: int
    num_micro: int
    dp: int
    seq_len: int


class SyntheticTokens:
    def __init__(self, vocab_size: int, seq_len: int, seed: int):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        rng = np.random.default_rng([seed, 7])
        self.rules = np.stack([rng.permutation(vocab_size) for _ in range(NUM_RULES)])

    def samples(self, first: int, count: int) -> np.ndarray:
        """Token windows (count, seq_len + 1) for samples [first, first + count)."""
        length = self.seq_len + 1
        rule = np.empty(count, dtype=np.int64)
        tok = np.empty(count, dtype=np.int64)
        noise = np.empty((count, length), dtype=bool)
        jumps = np.empty((count, length), dtype=np.int64)
        for row, sample in enumerate(range(first, first + count)):
            rng = np.random.default_rng([self.seed, 11, sample])  # per sample: layout-independent
            rule[row], tok[row] = rng.integers(NUM_RULES), rng.integers(self.vocab_size)
            noise[row] = rng.random(length) < NOISE
            jumps[row] = rng.integers(self.vocab_size, size=length)
        out = np.empty((count, length), dtype=np.int64)
        for t in range(length):  # the chain is sequential in t, vectorised over samples
            out[:, t] = tok
            tok = np.where(noise[:, t], jumps[:, t], self.rules[rule, tok])
        return out


class MemmapTokens:
    def __init__(self, files: list[str], dtype: str, seq_len: int, seed: int):
        self.seq_len, self.seed = seq_len, seed
        self.arrays = [np.memmap(f, dtype=np.dtype(dtype), mode="r") for f in files]
        # Windows never straddle two files: each file contributes its own valid start offsets.
        self.starts_per_file = np.array([max(0, len(a) - seq_len) for a in self.arrays], dtype=np.int64)
        self.cumulative = np.cumsum(self.starts_per_file)
        if self.cumulative[-1] == 0:
            raise ValueError(f"data.path: no file holds more than model.seq_len={seq_len} tokens")

    def samples(self, first: int, count: int) -> np.ndarray:
        out = np.empty((count, self.seq_len + 1), dtype=np.int64)
        for row, sample in enumerate(range(first, first + count)):
            rng = np.random.default_rng([self.seed, 13, sample])
            pos = int(rng.integers(self.cumulative[-1]))
            idx = int(np.searchsorted(self.cumulative, pos, side="right"))
            offset = pos - (int(self.cumulative[idx - 1]) if idx else 0)
            out[row] = self.arrays[idx][offset : offset + self.seq_len + 1]
        return out


class StepData:
    """Microbatches of (tokens, labels) for one (step, dp rank)."""

    def __init__(self, cfg: RunConfig):
        self.spec = BatchSpec(
            global_batch=cfg.train.global_batch_size,
            micro_batch=cfg.train.micro_batch_size,
            num_micro=microbatches(cfg),
            dp=cfg.layout.dp,
            seq_len=cfg.model.seq_len,
        )
        if cfg.data.name == "synthetic":
            self.source = SyntheticTokens(cfg.model.vocab_size, cfg.model.seq_len, cfg.train.seed)
        else:
            files = resolve_data_files(os.path.expanduser(cfg.data.path or ""))
            self.source = MemmapTokens(files, cfg.data.dtype, cfg.model.seq_len, cfg.train.seed)

    def microbatches(self, step: int, dp_rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        s = self.spec
        per_rank = s.global_batch // s.dp
        first = step * s.global_batch + dp_rank * per_rank
        windows = torch.from_numpy(self.source.samples(first, per_rank))
        out = []
        for j in range(s.num_micro):
            w = windows[j * s.micro_batch : (j + 1) * s.micro_batch]
            out.append((w[:, :-1].contiguous(), w[:, 1:].contiguous()))
        return out


def write_token_file(path: str, tokens: np.ndarray, dtype: str = "uint16") -> str:
    """Write a flat token file in the memmap format (used by prepare-data and tests)."""
    arr = np.asarray(tokens).astype(np.dtype(dtype))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    arr.tofile(tmp)
    os.replace(tmp, path)
    return path
