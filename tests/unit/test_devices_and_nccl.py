"""How a rank picks its CUDA device and how its process groups are configured: pure functions,
checked without a GPU (the CUDA path of train.resolve_device and init_process_group uses them)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from vptrain.config import RunConfig
from vptrain.launch.env import cuda_device_index, nccl_environment
from vptrain.train import process_group_spec


@pytest.mark.parametrize(("local_rank", "visible", "index"), [
    (0, 8, 0), (5, 8, 5), (7, 8, 7),  # torchrun / vptrain's launcher / srun without binding
    (0, 1, 0), (3, 1, 0), (7, 1, 0),  # Slurm per-task binding: one visible GPU, SLURM_LOCALID > 0
])
def test_device_index_follows_the_local_rank_or_the_one_bound_gpu(local_rank, visible, index):
    assert cuda_device_index(local_rank, visible) == index


def test_a_local_rank_beyond_the_visible_gpus_is_an_error_not_a_shared_gpu():
    with pytest.raises(ValueError, match=r"LOCAL_RANK=4 but this process sees only 4 CUDA devices"):
        cuda_device_index(4, 4)
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        cuda_device_index(0, 0)
    with pytest.raises(ValueError, match="LOCAL_RANK=-1"):
        cuda_device_index(-1, 2)


def test_nccl_gets_async_error_handling_and_the_collective_timeout():
    cfg = RunConfig()
    cfg.train.collective_timeout_s = 42.0
    spec = process_group_spec(cfg, "cuda", environ={})
    assert spec.backend == "nccl"
    assert spec.timeout == timedelta(seconds=42)
    # The watchdog ends a rank whose collective outlives the timeout; blocking wait stays off (it
    # would make every wait() a host sync).
    assert spec.env == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert "TORCH_NCCL_BLOCKING_WAIT" not in spec.env


def test_a_users_own_nccl_setting_wins():
    assert nccl_environment({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}) == {}


def test_gloo_sets_no_nccl_variables():
    spec = process_group_spec(RunConfig(), "cpu", environ={})
    assert spec.backend == "gloo" and spec.env == {}
    assert spec.timeout == timedelta(seconds=RunConfig().train.collective_timeout_s)
