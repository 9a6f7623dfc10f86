"""The per-stage summary at the end of a run prints whole when stdout is not a terminal (a log
file, Slurm's output): rich would otherwise fit it to 80 columns and cut headers and numbers."""

from __future__ import annotations

from conftest import validated_config

from vptrain.metrics import RunMetrics

HEADERS = ("stage", "params", "busy ms", "params MiB", "grads MiB", "optim MiB", "peak MiB", "RSS MiB")


def test_the_stage_table_is_not_cut_off_a_terminal(capsys) -> None:
    metrics = RunMetrics(validated_config(), is_logger=True, world_size=4)
    memory = {"params": 123_456_789_012, "grads": 98_765_432_101, "optimizer": 246_913_578_024,
              "peak": 987_654_321_098, "peak_rss": 1_234_567_890_123}
    metrics.last_stages = [{"stage": s, "params": 12_345_678_901, "busy_s": 123.456, "memory": memory}
                           for s in range(4)]
    metrics.peak_by_stage = {s: dict(memory) for s in range(4)}
    metrics.print_stage_table()
    out = capsys.readouterr().out
    assert "…" not in out
    lines = out.splitlines()
    header = next(line for line in lines if "stage" in line and "RSS" in line)
    for name in HEADERS:
        assert name in header, name
    rows = [line for line in lines if "12,345,678,901" in line]
    assert len(rows) == 4 and all(f"{1_234_567_890_123 / 2**20:.1f}" in row for row in rows)
