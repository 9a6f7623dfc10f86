"""On 2 gloo processes: every collective of a training step gets tensors on the configured device,
and every process group a run creates times out after train.collective_timeout_s (see
_collectives_on_device.py for how a CPU run shows a tensor NCCL would reject)."""

from __future__ import annotations

import pytest
from _collectives_on_device import TIMEOUT_S, worker
from _spawn import free_port, run_ranks

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(worker, 2, free_port(), str(tmp_path_factory.mktemp("run")))


def test_every_group_of_a_run_times_out_after_the_collective_timeout(ranks):
    for rank, result in enumerate(ranks):
        # The default group, the vocabulary group, DeepSpeed's grid (data/model/pipe/p2p groups).
        assert len(result["timeouts"]) >= 5, (rank, result["timeouts"])
        assert set(result["timeouts"]) == {TIMEOUT_S}, (rank, result["timeouts"])
        # Scoped: a group made after the run gets torch's own default again (gloo: 30 min).
        assert result["outside_timeout"] == 1800.0


def test_collectives_get_tensors_on_the_configured_device(ranks):
    for rank, result in enumerate(ranks):
        sites = result["call_sites"]
        control = sites.pop("control: all_reduce(torch.zeros(1))")
        assert "meta" in control, "the check must catch a tensor made without device="
        assert sites == {name: "" for name in sites}, (rank, sites)
