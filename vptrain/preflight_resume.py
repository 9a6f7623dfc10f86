"""Pre-launch checks of the checkpoint a run resumes from: complete, safe to read, and of a model
this run can continue. Each raises ValueError naming the key (vptrain/preflight.py runs them).

A checkpoint whose meta.json records what wrote it (`model`, `vocab_rows`, `optim`:
checkpoint.written_by) resumes in any layout: pp, dp, method, schedule, precision, ZeRO stage and
vocab.pad_to_multiple_of may differ (vptrain/reshard.py); the model's shape and optim.name may
not. An older checkpoint resumes only in the layout that wrote it."""

from __future__ import annotations

import json
import os
import zipfile

from vptrain.config import DEFAULT_ROPE_THETA, ModelConfig, RunConfig, default_intermediate_size

SHAPE_KEYS = ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
              "tie_embeddings", "norm_eps", "rope_theta", "max_position_embeddings")
"""model.* keys that decide a parameter's shape or meaning: a checkpoint continues only a model of its
shape (with defaults filled in, so `num_kv_heads: null` equals num_heads)."""
LAYOUT_KEYS = ("layout.pp", "layout.dp", "method.name", "schedule.name", "model.vocab_size", "model.hidden_size",
               "model.num_layers", "model.tie_embeddings", "vocab.pad_to_multiple_of", "optim.name", "model.arch",
               "model.num_kv_heads", "model.intermediate_size")
"""What an older checkpoint (no `model` in its meta.json) must share with the run resuming it."""
META_KEYS = {"layout.pp": "pp", "layout.dp": "dp", "method.name": "method", "schedule.name": "schedule",
             "model.vocab_size": "vocab_size", "model.hidden_size": "hidden_size", "model.num_layers": "num_layers"}
"""The same keys as checkpoint meta.json names them (where it records them)."""


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"{key}: {msg}")


# --- resume ---------------------------------------------------------------------------------------


def check_resume(cfg: RunConfig) -> None:
    """The checkpoint a resume would load is complete and of this run's layout. train.resume=auto
    with a `latest` that names no complete checkpoint is refused rather than silently starting over."""
    resume = cfg.train.resume
    if resume == "never":
        return
    from vptrain import checkpoint  # the trainer's own choice of directory (with its fallback rules)

    root = checkpoint.checkpoint_root(cfg)
    if resume == "auto":
        path = checkpoint.resolve_resume(cfg)
        if path is None:
            pointer = os.path.join(root, "latest")
            steps = sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []
            if os.path.exists(pointer) or steps:
                name = _read_text(pointer) if os.path.exists(pointer) else ""
                named_dir = os.path.join(root, name)
                if name and os.path.isdir(named_dir):
                    check_checkpoint(cfg, named_dir)  # says what is wrong with it, when it can tell
                named = repr(_read_text(pointer)) if os.path.exists(pointer) else "nothing (no latest file)"
                complete = [d for d in steps if os.path.isfile(os.path.join(root, d, "meta.json"))]
                what = (f"the newest complete one is {complete[-1]}: resume it with "
                        f"train.resume={os.path.join(root, complete[-1])}" if complete else
                        "no checkpoint there is complete (with its meta.json): remove that directory to start over")
                _fail("train.resume", f"auto: {pointer} names {named}, which is not a complete checkpoint; {what}")
            return
    else:
        path = resume
    check_checkpoint(cfg, path)


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "an unreadable file"


def check_checkpoint(cfg: RunConfig, path: str) -> None:
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        hint = ""
        for pointer in (os.path.join(path, "latest"), os.path.join(path, "checkpoints", "latest")):
            if os.path.isfile(pointer):
                hint = f"; {pointer} names {os.path.join(os.path.dirname(pointer), _read_text(pointer))}"
        hint = hint or "; give a step_* directory from a run directory's checkpoints/"
        _fail("train.resume", f"{path} is not a checkpoint (no meta.json){hint}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        _fail("train.resume", f"{meta_path} is truncated or not a vptrain checkpoint's meta; resume from another "
                              "checkpoint (train.resume=DIR) or remove this one")
    _check_layout(cfg, path, meta)
    world = int(meta.get("world_size", cfg.layout.pp * cfg.layout.dp))
    for rank in range(world):
        _check_rank_file(path, rank)


def _check_layout(cfg: RunConfig, path: str, meta: dict) -> None:
    if isinstance(meta.get("model"), dict) and isinstance(meta.get("vocab_rows"), int):
        _check_model_shape(cfg, path, meta["model"])
        written = (meta.get("optim") or {}).get("name")
        if written is not None and written != cfg.optim.name:
            _fail("optim.name", f"checkpoint {path} holds {written} optimizer state; this run uses "
                                f"optim={cfg.optim.name}. Resume with optim={written} (one optimizer's state does not "
                                "convert to another's), or start a new run")
        return
    _check_old_layout(cfg, path, meta)


def model_shape(model: ModelConfig | dict) -> dict:
    """The shape keys of a model config (or meta.json's `model`), defaults filled in."""
    get = model.get if isinstance(model, dict) else (lambda k, d=None: getattr(model, k, d))
    heads, hidden, arch = get("num_heads"), get("hidden_size"), get("arch", "gpt")
    shape = {k: get(k) for k in SHAPE_KEYS}
    shape["arch"] = arch
    if arch == "gpt":  # a learned position table of max_position_embeddings (default seq_len) rows
        shape["max_position_embeddings"] = get("max_position_embeddings") or get("seq_len")
        for key in ("num_kv_heads", "intermediate_size", "rope_theta"):
            del shape[key]  # llama's keys: a GPT ignores them
    else:  # rotary positions: no table, any training length
        del shape["max_position_embeddings"]
        shape["num_kv_heads"] = get("num_kv_heads") or heads
        shape["intermediate_size"] = get("intermediate_size") or default_intermediate_size(hidden)
        shape["rope_theta"] = DEFAULT_ROPE_THETA if get("rope_theta") is None else get("rope_theta")
    return shape


def _check_model_shape(cfg: RunConfig, path: str, written: dict) -> None:
    saved, ours = model_shape(written), model_shape(cfg.model)
    differ = [k for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
    if differ:
        what = ", ".join(f"model.{k}={saved.get(k)} (this run: {ours.get(k)})" for k in differ)
        fix = " ".join(f"model.{k}={saved.get(k)}" for k in differ)
        _fail(f"model.{differ[0]}", f"checkpoint {path} is of another model shape: {what}. A checkpoint resumes "
                                    f"into any layout, but only into its own model: set {fix} (the checkpoint's "
                                    f"model was {written.get('name')}), or start a new run without train.resume")


def _check_old_layout(cfg: RunConfig, path: str, meta: dict) -> None:
    """Compare what the checkpoint records (meta.json, and the config.yaml of the run that wrote it)."""
    written = {key: meta[short] for key, short in META_KEYS.items() if short in meta}
    run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.yaml")
    if os.path.isfile(run_config):
        try:
            from vptrain.config import load

            saved = {key: _get(load(run_config), key) for key in LAYOUT_KEYS}
            # Only the config of the run that wrote the checkpoint: a later run may have replaced it.
            if all(saved[key] == value for key, value in written.items()):
                written = {**saved, **written}
        except Exception:  # noqa: BLE001 - an unreadable old config: compare what meta.json has
            pass
    differ = [k for k, v in written.items() if v != _get(cfg, k)]
    if differ:
        what = ", ".join(f"{k}={written[k]} (this run: {_get(cfg, k)})" for k in differ)
        shown = [k for k in LAYOUT_KEYS[:6] if k in written]

        def layout(values) -> str:
            return " ".join(f"{k.removesuffix('.name').split('.')[-1]}={values(k)}" for k in shown)

        _fail("train.resume", f"checkpoint {path} has another layout: {what} [checkpoint: {layout(written.get)}; "
                              f"this run: {layout(lambda k: _get(cfg, k))}]; it was written before checkpoints "
                              "recorded what wrote them (its meta.json has no `model`), so it cannot be resharded: "
                              "resume with the checkpoint's layout or use a new hydra.run.dir")


def _get(cfg: object, key: str) -> object:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_rank_file(path: str, rank: int) -> None:
    name = os.path.join(path, f"rank_{rank}.pt")
    if not os.path.isfile(name):
        _fail("train.resume", f"checkpoint {path} has no {os.path.basename(name)}: incomplete; resume from another "
                              "checkpoint or remove this one")
    with open(name, "rb") as f:
        head = f.read(4)
    if not head:
        _fail("train.resume", f"{name} is empty: the checkpoint is incomplete; resume from another one")
    if head == b"PK\x03\x04":  # torch.save's zip format: its directory sits at the end of the file
        try:
            with zipfile.ZipFile(name):
                pass
        except zipfile.BadZipFile:
            _fail("train.resume", f"{name} is truncated: the checkpoint is incomplete; resume from another one")
