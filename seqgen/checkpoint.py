"""Checkpoints that never execute code when loaded.

    RUN_DIR/checkpoints/step_00001000/
        model.safetensors    weights (safetensors)
        ema.safetensors      EMA weights, when train.ema > 0
        config.json          the resolved run config
        state.pt             optimizer, scheduler, sampler and step: torch.load(weights_only=True)
    RUN_DIR/checkpoints/latest   name of the newest complete checkpoint
RUN_DIR/best/step_00000800/  train.keep_best: the weights with the best validation NLL so far (EMA
                             weights when EMA is on) in model.safetensors, with config.json and a
                             state.pt holding step and score; RUN_DIR/best/latest points at it

A checkpoint is written into a temporary folder, flushed, then renamed into place, and ``latest`` is
replaced atomically after it: a run killed mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from .types import SeqgenError

CKPT_DIR = "checkpoints"
BEST_DIR = "best"
LATEST = "latest"

# sections (and dotted keys) that shape the model or its data: a checkpoint cannot be resumed or loaded
# across changes here
SHAPING = ("task", "seed", "data", "domains", "heads", "mixture", "loss_weights", "backbone", "paradigm",
           "tokenizer", "model", "train.val_fraction", "train.pack")


class CheckpointError(SeqgenError):
    pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - not all file systems allow it
        pass


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, model_state: dict[str, Tensor], config: dict, train_state: dict,
                    ema_state: dict[str, Tensor] | None = None, keep: int = 2, kind: str = CKPT_DIR) -> Path:
    """Write RUN_DIR/<kind>/step_N atomically and point <kind>/latest at it (kind: checkpoints or best)."""
    from safetensors.torch import save_file

    root = Path(run_dir) / kind
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = {"format": "seqgen", "step": str(step)}
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"), meta)
    if ema_state is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, str(tmp / "ema.safetensors"), meta)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(train_state, tmp / "state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic_text(root / LATEST, final.name)
    # prune: keep the newest `keep` complete checkpoints
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in done[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path, kind: str = CKPT_DIR) -> Path | None:
    root = Path(run_dir) / kind
    pointer = root / LATEST
    if pointer.exists():
        p = root / pointer.read_text().strip()
        if p.is_dir():
            return p
    done = sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []
    return done[-1] if done else None


def require_checkpoint(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a run directory")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet (expected {run_dir / CKPT_DIR}/step_*/)")
    return ckpt


def read_config(ckpt: Path) -> dict:
    path = Path(ckpt) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt} has no config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint config {path} is corrupt: {e}") from None


def read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise CheckpointError(f"checkpoint weights {path} are missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint weights {path} are truncated or corrupt ({e}); "
                              "use an earlier checkpoint or retrain") from None


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights, naming every tensor whose name or shape does not match the model."""
    state = read_weights(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sorted(set(own) & set(state)) if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch: " + "; ".join(wrong[:5]) + (" ..." if len(wrong) > 5 else ""))
        if missing:
            parts.append(f"missing from checkpoint: {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"not in model: {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
        raise CheckpointError(f"checkpoint {path} was written for a different model config: " + " | ".join(parts))
    model.load_state_dict(state)


def read_train_state(ckpt: Path) -> dict:
    path = Path(ckpt) / "state.pt"
    if not path.exists():
        raise CheckpointError(f"checkpoint {ckpt} has no state.pt (training state)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors, truncation (EOFError / RuntimeError), bad zip
        raise CheckpointError(f"training state {path} is truncated or corrupt ({type(e).__name__}: {e})") from None


def config_differences(a: dict, b: dict, sections=SHAPING) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, within the given sections or keys."""
    out = []

    def get(d, dotted):
        for part in dotted.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    def walk(x, y, prefix):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else k)
        elif x != y:
            out.append(f"{prefix}: {x!r} -> {y!r}")
    for s in sections:
        walk(get(a, s), get(b, s), s)
    return out
