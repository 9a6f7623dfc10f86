"""A checkpoint resumed in another layout (train.resume=PATH into a new run directory) continues the
uninterrupted run: the per-step losses, and the parameters at the end, as the equivalence tests
hold them (tests/distributed/_tolerances.py). One chain of runs covers the directions:

    A  pp=2 × vocab-2 (V=501 padded to 502 rows), 4 steps: the uninterrupted run, saves steps 2 and 4
    B  pp=3 × vocab-1 (501 rows, no padding) from A's step 2           -> steps 3-4
    C  pp=1 (the single-process trainer) from A's step 2, stops at 3  -> step 3
    D  pp=2 × V-Half × vocab-2 with ZeRO-1 (DeepSpeed's optimizer) from C's step 3 -> step 4
"""

from __future__ import annotations

import json

import pytest
import torch
from _tolerances import ADAMW_EPS, RTOL, adamw_atol
from conftest import run_cli, train_run

from vptrain.checkpoint_global import global_params
from vptrain.config import OptimConfig

pytestmark = pytest.mark.distributed

STEPS = 4
VOCAB = 501
RUN = ("logger=none", "model=gpt-tiny", f"model.vocab_size={VOCAB}", "train.global_batch_size=4",
       f"train.steps={STEPS}", f"optim.eps={ADAMW_EPS}")
PP2_VOCAB2 = ("layout.pp=2", "method=vocab-2")


def assert_losses_continue(resumed: list[float], full: list[float], *, start: int, saved: list[float]) -> None:
    """Steps before `start` are the checkpoint's record (`saved`); the ones after it equal the
    uninterrupted run's."""
    assert resumed[:start] == saved[:start], "the checkpoint's losses come with it"
    assert len(resumed) > start, "the resumed run took no step"
    for step in range(start, len(resumed)):
        assert abs(resumed[step] - full[step]) <= RTOL * abs(full[step]), (step, resumed, full)


def assert_params_equal(got_dir, want_dir) -> None:
    """Global parameters of two final checkpoints, real vocabulary rows only (the padding differs)."""
    got, want = global_params(str(got_dir)), global_params(str(want_dir))
    assert got.keys() == want.keys()
    atol = adamw_atol(OptimConfig(eps=ADAMW_EPS), STEPS)
    for name, value in want.items():
        a, b = got[name], value
        if name in ("0.wte", "6.weight"):
            assert not a[VOCAB:].any() and not b[VOCAB:].any(), f"{name}: padding rows must stay zero"
            a, b = a[:VOCAB], b[:VOCAB]
        torch.testing.assert_close(a, b, rtol=RTOL, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def test_a_checkpoint_continues_in_other_layouts(tmp_path):
    full = train_run(tmp_path / "A", *RUN, *PP2_VOCAB2, "train.checkpoint_every=2")["losses"]
    a_ckpts = tmp_path / "A" / "checkpoints"
    meta = json.loads((a_ckpts / "step_00000002" / "meta.json").read_text())
    assert (meta["vocab_rows"], meta["model"]["vocab_size"], meta["pp"]) == (502, VOCAB, 2), "what wrote it"

    b = train_run(tmp_path / "B", *RUN, "layout.pp=3", "method=vocab-1", f"train.resume={a_ckpts / 'step_00000002'}")
    assert_losses_continue(b["losses"], full, start=2, saved=full)
    assert_params_equal(tmp_path / "B" / "checkpoints" / "step_00000004", a_ckpts / "step_00000004")

    proc = run_cli("train", f"hydra.run.dir={tmp_path / 'C'}", *RUN, "layout.pp=1", "method=baseline",
                   f"train.resume={a_ckpts / 'step_00000002'}", "train.stop_at_step=3", check=True)
    assert f"resumed from {a_ckpts / 'step_00000002'} at step 2" in proc.stdout, proc.stdout[-2000:]
    c = json.loads((tmp_path / "C" / "summary.json").read_text())
    assert_losses_continue(c["losses"], full, start=2, saved=full)

    c_ckpt = tmp_path / "C" / "checkpoints" / "step_00000003"
    d = train_run(tmp_path / "D", *RUN, *PP2_VOCAB2, "schedule=vhalf", "optim.zero_stage=1",
                  f"train.resume={c_ckpt}")
    assert_losses_continue(d["losses"], full, start=3, saved=c["losses"])
    assert_params_equal(tmp_path / "D" / "checkpoints" / "step_00000004", a_ckpts / "step_00000004")
