"""`vptrain export-hf RUN_DIR OUT_DIR [--step N]`: a run's checkpoint as a Hugging Face model.

The checkpoint's shards (any pp, dp, method, schedule, precision) are assembled into the
single-process model's parameters (vptrain/checkpoint_global.py), renamed to the HF layout
(vptrain/hf/names.py), the padded vocabulary rows dropped, and written with a config.json as
LlamaForCausalLM (model.arch=llama) or GPT2LMHeadModel (model.arch=gpt), plus the tokenizer the
run's data was prepared with. OUT_DIR appears complete or not at all (written beside it, renamed)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterable

import torch

from vptrain.checkpoint import CheckpointError, is_complete, read_meta, sync_dir
from vptrain.hf.config_json import hf_config
from vptrain.hf.load import INDEX, SINGLE
from vptrain.hf.names import HFTensor, hf_tensor
from vptrain.hf.shape import hf_directory

EXIT_BAD_INPUT = 2
MAX_SHARD_BYTES = 5 * 2**30  # save_pretrained's 5 GB shards
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every other vptrain command
        raise ValueError(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(prog="vptrain export-hf", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory (its checkpoints/) or one checkpoint directory")
    parser.add_argument("out_dir", help="the Hugging Face model directory to create")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint of step N (default: latest)")
    return parser.parse_args(argv)


def find_checkpoint(run_dir: str, step: int | None) -> str:
    """The checkpoint directory to export: RUN_DIR itself when it is one, else RUN_DIR/checkpoints'
    step N or the one `latest` names."""
    if os.path.isfile(os.path.join(run_dir, "meta.json")) and step is None:
        return run_dir
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        raise ValueError(f"{run_dir} has no checkpoints/ directory (train with train.checkpoint_at_end=true or "
                         "train.checkpoint_every=K)")
    complete = sorted(d for d in os.listdir(root) if d.startswith("step_") and is_complete(os.path.join(root, d)))
    if step is not None:
        name = f"step_{step:08d}"
        if name not in complete:
            have = ", ".join(str(int(d[len("step_"):])) for d in complete) or "none"
            raise ValueError(f"--step {step}: {root} has no complete checkpoint {name} (complete steps: {have})")
        return os.path.join(root, name)
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        if named in complete:
            return os.path.join(root, named)
    if not complete:
        raise ValueError(f"{root} holds no complete checkpoint")
    print(f"vptrain export-hf: {pointer} does not name a complete checkpoint; exporting the newest, {complete[-1]}",
          file=sys.stderr)
    return os.path.join(root, complete[-1])


def hf_layout(names: list[str], model: dict) -> list[tuple[str, HFTensor]]:
    """(our global name, its HF tensor) for every tensor the export writes, in checkpoint order; a
    tied output layer is the embedding, which HF ties on load."""
    arch, layers = model.get("arch", "gpt"), int(model["num_layers"])
    out = []
    for name in names:
        t = hf_tensor(arch, name, layers)
        if not (model.get("tie_embeddings") and t.name == "lm_head.weight"):
            out.append((name, t))
    _check_complete([t.name for _, t in out], arch, layers, tied=bool(model.get("tie_embeddings")))
    return out


def to_hf(value: torch.Tensor, t: HFTensor, vocab_size: int) -> torch.Tensor:
    """One of our tensors as HF stores it: a table without its padding rows, Conv1D transposed, fp32."""
    value = value[:vocab_size] if t.vocab_table else value
    value = value.t() if t.transpose else value
    return value.detach().to(torch.float32).contiguous().clone()


def hf_state(params: dict[str, torch.Tensor], model: dict) -> dict[str, torch.Tensor]:
    """Our global parameters (padded tables) -> HF tensors (tables cut to vocab_size, Conv1D transposed)."""
    return {t.name: to_hf(params[name], t, int(model["vocab_size"])) for name, t in hf_layout(list(params), model)}


def _check_complete(tensors: list[str], arch: str, layers: int, *, tied: bool) -> None:
    required = [hf_tensor(arch, "0.wte", layers).name]
    required += [hf_tensor(arch, f"{layers + 1}.{'norm' if arch == 'llama' else 'ln_f'}.weight", layers).name]
    if not tied:
        required.append("lm_head.weight")
    prefix = "model.layers" if arch == "llama" else "transformer.h"
    required += [f"{prefix}.{i}." for i in range(layers)]
    missing = [r for r in required if not any(n == r or (r.endswith(".") and n.startswith(r)) for n in tensors)]
    if missing:
        raise ValueError(f"the checkpoint lacks what the Hugging Face model needs: {', '.join(missing[:5])}")


def tokenizer_sources(meta: dict) -> list[str]:
    """Tokenizer files to ship: the ones beside the run's data (prepare-data's tokenizer.json), else
    the imported Hugging Face checkpoint's."""
    data_path = (meta.get("data") or {}).get("path")
    if data_path:
        folder = data_path if os.path.isdir(data_path) else os.path.dirname(data_path)
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            return [os.path.join(folder, "tokenizer.json")]
    source = hf_directory((meta.get("model") or {}).get("init_from"))
    if source and os.path.isdir(source):
        return [os.path.join(source, f) for f in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(source, f))]
    return []


def write_hf_model(out_dir: str, tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], config: dict,
                   tokenizer: list[str], *, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Safetensors + config.json (+ tokenizer files) into OUT_DIR, atomically. `tensors` may be a
    stream of (name, tensor): shards of at most `max_shard_bytes` are written as they fill, so the
    whole model is never held at once (model.safetensors, or model-0000k-of-0000n.safetensors and
    model.safetensors.index.json, as save_pretrained writes)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"{out_dir} already exists and is not empty; choose a new OUT_DIR or remove it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write_shards(tmp, tensors.items() if isinstance(tensors, dict) else tensors, max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        for path in tokenizer:
            shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
        names = {os.path.basename(p) for p in tokenizer}
        if "tokenizer.json" in names and "tokenizer_config.json" not in names:
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:  # AutoTokenizer needs the class
                json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, f)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above): rename needs it gone or empty
        os.replace(tmp, out_dir)
        sync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_shards(tmp: str, items: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    files: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        save_file(shard, os.path.join(tmp, f".shard{len(files)}"), metadata={"format": "pt"})
        files.append(list(shard))
        shard.clear()

    for name, value in items:
        nbytes = value.numel() * value.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = value
        size += nbytes
    if shard or not files:
        flush()
    if len(files) == 1:
        os.replace(os.path.join(tmp, ".shard0"), os.path.join(tmp, SINGLE))
        return
    weight_map, total = {}, 0
    for k, names in enumerate(files):
        final = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(os.path.join(tmp, f".shard{k}"), os.path.join(tmp, final))
        weight_map.update({n: final for n in names})
        total += os.path.getsize(os.path.join(tmp, final))
    with open(os.path.join(tmp, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def export(run_dir: str, out_dir: str, *, step: int | None = None,
           max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Export a run's checkpoint; returns the checkpoint directory it read. Tensors are assembled
    one at a time from the memory-mapped rank files (vptrain/checkpoint_global.py)."""
    from vptrain.checkpoint_global import open_checkpoint

    path = find_checkpoint(run_dir, step)
    meta = read_meta(path)
    if meta is None or not isinstance(meta.get("model"), dict):
        raise ValueError(f"{path}/meta.json does not record the model (written by an older vptrain); cannot export")
    model, vocab = meta["model"], int(meta["model"]["vocab_size"])
    view = open_checkpoint(path)
    layout = hf_layout(view.names(), model)
    positions = view.tensor("0.pos.wpe").shape[0] if "0.pos.wpe" in view.names() else None
    config = hf_config(model, positions=positions)
    stream = ((t.name, to_hf(view.tensor(name, rows=(0, vocab) if t.vocab_table else None), t, vocab))
              for name, t in layout)
    write_hf_model(out_dir, stream, config, tokenizer_sources(meta), max_shard_bytes=max_shard_bytes)
    return path


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
        path = export(args.run_dir, args.out_dir, step=args.step)
    except (ValueError, KeyError, CheckpointError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"vptrain export-hf: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"vptrain export-hf: {path} -> {os.path.abspath(args.out_dir)}")
    return 0
