"""Read an offline W&B run file (`run-<id>.wandb`) back into records, without the network.

wandb 0.31 offline writes no JSON summary: the run is one LevelDB-style log of protobuf
`Record`s (a 7-byte file header, 32 KiB blocks, 7-byte record headers: crc32c u32, length u16,
type u8 = full/first/middle/last). Reading it also shows the run would sync.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from dataclasses import dataclass, field

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


@dataclass
class OfflineRun:
    run_id: str = ""
    group: str = ""
    name: str = ""
    job_type: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    exit_code: int | None = None
    tags: list[str] = field(default_factory=list)
    console: str = ""  # the captured console output (W&B's Logs tab)
    stats: list[dict] = field(default_factory=list)  # system metric samples


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_run(path: str) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    run = OfflineRun()
    for payload in _payloads(data):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.run_id, run.group, run.name, run.job_type = r.run_id, r.run_group, r.display_name, r.job_type
            run.tags = list(r.tags)
            for item in r.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            for item in rec.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind in ("output", "output_raw"):
            run.console += getattr(rec, kind).line
        elif kind == "stats":
            run.stats.append({i.key: json.loads(i.value_json) for i in rec.stats.item})
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    return run


def find_run_files(run_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "wandb", "*run-*", "run-*.wandb")))
