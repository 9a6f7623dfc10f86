"""Training data: deterministic per (seed, step, sample), identical on every pipeline rank.

A step's global batch is the samples [step * G, (step + 1) * G); data-parallel rank d takes the
d-th contiguous slice and cuts it into m microbatches. Any rank can therefore build any microbatch
(the vocabulary-parallel methods need tokens and labels on every stage), every layout sees the
same sequences in the same step, and the data position to save and restore is just the step.

- `synthetic`: each sequence follows one of a few fixed random permutations of the vocabulary
  (next = perm[current]) with a little noise, so a small GPT learns it within tens of steps.
- `memmap`: flat uint16/uint32 token files (nanoGPT / Megatron style .bin), windows of seq_len + 1
  tokens at offsets drawn from a generator seeded by (seed, step).
- evaluation (`EvalWindows`, data.eval_path): window i is tokens[i*S : i*S + S + 1], in file order,
  so another tool can recompute the eval loss; `EvalBatches` serves them a training batch at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from vptrain.config import RunConfig, microbatches
from vptrain.data_meta import concrete_dtype
from vptrain.validate import resolve_data_files
from vptrain.vocab.shard import IGNORE_INDEX

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


class EvalWindows:
    """The first `count` windows of one token file, in file order: window i = tokens[i*S : i*S + S + 1]
    (consecutive windows share one token: the last target of one is the first input of the next)."""

    def __init__(self, path: str, dtype: str, seq_len: int, count: int):
        self.seq_len, self.count = seq_len, count
        self.tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        if len(self.tokens) < count * seq_len + 1:
            raise ValueError(f"data.eval_path: {path} holds {len(self.tokens)} tokens; eval.sequences={count} windows "
                             f"of model.seq_len={seq_len} need {count * seq_len + 1}; lower eval.sequences")

    def samples(self, first: int, count: int) -> np.ndarray:
        if first < 0 or first + count > self.count:
            raise IndexError(f"eval windows [{first}, {first + count}) outside [0, {self.count})")
        s = self.seq_len
        flat = np.asarray(self.tokens[first * s : (first + count) * s + 1], dtype=np.int64)
        # Row r starts at token r*S and ends one past the next row's start.
        rows = np.lib.stride_tricks.sliding_window_view(flat, s + 1)[::s]
        return np.ascontiguousarray(rows)


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
            self.source = MemmapTokens(files, concrete_dtype(cfg), cfg.model.seq_len, cfg.train.seed)

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


class EvalBatches:
    """The eval windows a training batch at a time: batch k is windows [k*G, (k+1)*G), G =
    train.global_batch_size, cut over data-parallel ranks and microbatches as a training step's is.
    The last batch is filled up with padding windows whose targets are all IGNORE_INDEX; as
    eval.sequences is a multiple of train.micro_batch_size, a microbatch is all windows or all
    padding (vptrain/evaluate.py weighs the batches by the windows they hold)."""

    def __init__(self, cfg: RunConfig):
        t = cfg.train
        self.global_batch, self.micro_batch, self.dp = t.global_batch_size, t.micro_batch_size, cfg.layout.dp
        self.num_micro, self.seq_len, self.sequences = microbatches(cfg), cfg.model.seq_len, cfg.eval.sequences
        path = os.path.expanduser(cfg.data.eval_path or "")
        self.windows = EvalWindows(path, concrete_dtype(cfg), self.seq_len, self.sequences)
        self.steps = -(-self.sequences // self.global_batch)

    def microbatches(self, step: int, dp_rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        per_rank = self.global_batch // self.dp
        first = step * self.global_batch + dp_rank * per_rank
        real = min(max(self.sequences - first, 0), per_rank)
        windows = torch.zeros((per_rank, self.seq_len + 1), dtype=torch.int64)  # padding inputs: token 0
        if real:
            windows[:real] = torch.from_numpy(self.windows.samples(first, real))
        inputs, labels = windows[:, :-1], windows[:, 1:].clone()
        labels[real:] = IGNORE_INDEX
        b = self.micro_batch
        return [(inputs[j * b : (j + 1) * b].contiguous(), labels[j * b : (j + 1) * b].contiguous())
                for j in range(self.num_micro)]


def write_token_file(path: str, tokens: np.ndarray, dtype: str = "uint16") -> str:
    """Write a flat token file in the memmap format (used by prepare-data and tests)."""
    arr = np.asarray(tokens).astype(np.dtype(dtype))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    arr.tofile(tmp)
    os.replace(tmp, path)
    return path
