"""The training loop, on Lightning Fabric.

Fabric owns devices, precision (``auto``: ``bf16-mixed`` on GPU; on CPU only where bf16 is native and
faster, else ``32-true``: ``seqgen.precision``) and strategy
(single device, DDP, FSDP).  The loop adds: gradient accumulation, AdamW with linear warmup and cosine
decay, gradient clipping, an optional EMA of the weights, periodic held-out evaluation, a progress bar,
CSV logs (and TensorBoard when installed), and atomic checkpoints.

Determinism and resume.  Every random draw is a function of (seed, step, rank): the batch samplers'
state is two integers, the paradigm's generator and the dropout RNG are re-seeded at every step.  So a
run killed after a checkpoint and resumed with ``--resume`` continues the very same loss curve.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (BEST_DIR, CheckpointError, config_differences, latest_checkpoint, load_weights, read_config,
                         read_train_state, read_weights, save_checkpoint)
from .config import RunConfig
from .data import step_generator
from .types import SeqgenError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- optimizer
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices of linear layers; not norms, biases or embedding tables."""
    decay, no_decay = [], []
    emb_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in emb_params else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def compile_works(device: torch.device, report=print) -> bool:
    """Whether ``torch.compile`` can build kernels here: on CPU, Inductor needs a working C++ compiler.
    A tiny function is compiled and run once (a few seconds); where that fails, training goes on eagerly
    and says why (a config with ``train.compile: true`` still trains on a laptop without a compiler)."""
    try:
        f = torch.compile(lambda x: torch.sin(x) * 2 + 1, dynamic=False)
        x = torch.linspace(0, 1, 8, device=device)
        ok = torch.allclose(f(x), torch.sin(x) * 2 + 1)
    except Exception as err:  # noqa: BLE001 - any failure to build means: do not compile
        report(f"train.compile: torch.compile does not work on {device.type} here ({type(err).__name__}: "
               f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else 'no message'}); training uncompiled")
        return False
    if not ok:
        report(f"train.compile: a compiled probe disagreed with eager on {device.type}; training uncompiled")
    return ok


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to 1, then cosine decay to min_ratio at ``total`` steps."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def lr_time(step: int, progress: float, warmup: int, min_ratio: float) -> float:
    """LR multiplier for a wall-clock schedule: warmup over steps, cosine over the time fraction."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class EMA:
    """Exponential moving average of the weights (kept in float32 on the model's device)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short warmup so early averages are not stale
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    def copy_to(self, model: nn.Module) -> None:
        own = model.state_dict()
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in self.shadow.items()})


# ---------------------------------------------------------------------------------- logging
class CSVLog:
    """metrics.csv with a fixed column set that grows as new metrics appear.  On resume, rows after
    the resumed step are dropped, so the file holds one curve."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        self.rows: list[dict] = []
        if resume_step is not None and path.exists():
            with open(path) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self._write()

    def log(self, row: dict) -> None:
        self.rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._write()

    def _write(self) -> None:
        cols = ["step"] + sorted({k for r in self.rows for k in r} - {"step"})
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)


def _tensorboard(run_dir: Path):
    try:
        from lightning_fabric.loggers import TensorBoardLogger

        return TensorBoardLogger(root_dir=str(run_dir), name="tensorboard", version=0)
    except Exception:  # tensorboard not installed
        return None


# ---------------------------------------------------------------------------------- fabric
def make_fabric(cfg: RunConfig):
    try:
        from lightning_fabric import Fabric
    except ImportError:  # the `lightning` distribution ships the same Fabric as lightning.fabric
        from lightning.fabric import Fabric

    t = cfg.train
    accelerator = t.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    from .precision import resolve_precision

    precision, reason = resolve_precision(t.precision, accelerator)
    if t.precision == "auto" and accelerator == "cpu":
        # processes launched from here (CPU DDP) inherit the decision instead of probing on their own
        os.environ.setdefault("SEQGEN_CPU_BF16", "1" if "bf16" in precision else "0")
    log.info("precision: %s (%s)", precision, reason)
    fabric = Fabric(accelerator=accelerator, devices=t.devices, strategy=t.strategy, precision=precision,
                    num_nodes=t.num_nodes)
    fabric.print(f"precision: {precision} ({reason})")
    fabric.seqgen_precision = precision
    return fabric


def _full_state(fabric, module: nn.Module) -> dict:
    """The whole model's state dict on CPU, also under sharded strategies (FSDP)."""
    if fabric.world_size > 1 and "fsdp" in type(fabric.strategy).__name__.lower():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    ckpt = latest_checkpoint(run_dir) if run_dir.exists() else None
    if resume:
        return
    if ckpt is not None or (run_dir / "logs" / "metrics.csv").exists():
        if not overwrite:
            raise SeqgenError(f"run folder {run_dir} already holds a run; pass --resume to continue it, "
                              "--overwrite to start again, or --out to choose another folder")
        shutil.rmtree(run_dir)


# ---------------------------------------------------------------------------------- the loop
def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress_bar: bool = True, stop_after: int | None = None, heldout: bool = True) -> dict:
    """Train ``cfg`` into ``run_dir``.  ``stop_after`` ends the process's loop early at that step (after
    checkpointing), as a kill would: tests use it to check that resuming lands on the same curve.
    ``heldout=False`` skips the final held-out evaluation (scripts that choose a config on the
    validation split must not read the held-out split at all)."""
    from .task import Objective, build_task

    run_dir = Path(run_dir)
    t = cfg.train
    if t.schedule not in ("steps", "time"):
        raise SeqgenError(f"train.schedule must be steps or time, got {t.schedule!r}")
    if t.schedule == "time" and t.time_limit <= 0:
        raise SeqgenError("train.schedule: time needs train.time_limit > 0 (seconds)")
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")
    fabric = make_fabric(cfg)
    fabric.launch()
    if t.threads:
        torch.set_num_threads(t.threads)
    elif fabric.device.type == "cpu" and fabric.world_size > 1:
        # share the cores between the processes on this node instead of oversubscribing them
        local = max(1, fabric.world_size // max(1, t.num_nodes))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if fabric.is_global_zero:
        prepare_run_dir(run_dir, resume, overwrite)
        run_dir.mkdir(parents=True, exist_ok=True)
    fabric.barrier()

    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        log.warning("--resume: %s has no checkpoint; starting from step 0", run_dir)
    if ckpt is not None:
        saved = read_config(ckpt)
        diff = config_differences(saved, cfg.to_dict())
        if diff:
            raise CheckpointError(f"cannot resume {run_dir}: its checkpoint was written for a different config: "
                                  + "; ".join(diff[:6]))

    torch.manual_seed(cfg.seed)
    task = build_task(cfg, run_dir)
    model = task.model
    if ckpt is not None:
        load_weights(model, ckpt / "model.safetensors")
    n_params = sum(p.numel() for p in model.parameters())
    objective = Objective(model)
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                            fused=fabric.device.type == "cuda" or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.warmup_steps, t.steps, t.min_lr_ratio))
    if t.compile and compile_works(fabric.device, fabric.print):
        objective = torch.compile(objective)
    objective, opt = fabric.setup(objective, opt)
    sampler = task.train_sampler(t.batch_size, cfg.seed, fabric.global_rank, fabric.world_size)
    ema = EMA(model, t.ema) if t.ema > 0 else None
    step = 0
    if ckpt is not None:
        state = read_train_state(ckpt)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"][fabric.global_rank] if isinstance(state["sampler"], list)
                                else state["sampler"])
        step = int(state["step"])
        if ema is not None:
            ema.load_state_dict(read_weights(ckpt / "ema.safetensors"))
        log.info("resumed %s at step %d", run_dir, step)

    logger = tb = None
    if fabric.is_global_zero:
        (run_dir / "logs").mkdir(exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        logger = CSVLog(run_dir / "logs" / "metrics.csv", resume_step=step)
        tb = _tensorboard(run_dir)
    summary = {"run_dir": str(run_dir), "parameters": n_params, "device": str(fabric.device),
               "precision": fabric.seqgen_precision, "world_size": fabric.world_size,
               "global_rank": fabric.global_rank}
    fabric.print(f"seqgen: {cfg.name}: {n_params / 1e6:.3f}M parameters on {fabric.device} "
                 f"({fabric.world_size} process{'es' if fabric.world_size > 1 else ''})")

    def checkpoint(at: int) -> None:
        # every rank takes part in gathering (sharded strategies), rank 0 writes
        model_state = _full_state(fabric, model)
        samplers = fabric.all_gather(torch.tensor(list(sampler.state_dict().values()))) if fabric.world_size > 1 else None
        if fabric.is_global_zero:
            keys = list(sampler.state_dict())
            sampler_state = ([dict(zip(keys, map(int, row))) for row in samplers.reshape(fabric.world_size, -1)]
                             if samplers is not None else sampler.state_dict())
            save_checkpoint(run_dir, at, model_state, cfg.to_dict(),
                            {"step": at, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                             "sampler": sampler_state, "train_seconds": time.time() - t0 + elapsed_before},
                            ema_state=None if ema is None else ema.state_dict(), keep=t.keep_checkpoints)
        fabric.barrier()

    def evaluate(max_batches: int, split: str = "heldout", weights: dict | None = None) -> dict:
        """Score ``split`` with the EMA weights (or ``weights``), restoring the training weights after.
        Keys are prefixed for the log: eval_* for the held-out split, val_* for the validation split."""
        if not fabric.is_global_zero:
            return {}
        swap = weights is not None or ema is not None
        if swap:
            backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if weights is not None:
                model.load_state_dict(weights)
            else:
                ema.copy_to(model)
        with torch.autocast(fabric.device.type, dtype=torch.bfloat16, enabled="bf16" in fabric.seqgen_precision):
            res = task.heldout_metrics(model, batch_size=max(t.batch_size, 64), max_batches=max_batches,
                                       device=fabric.device, split=split)
        if swap:
            model.load_state_dict(backup)
        if split == "val":
            return {(k if k.startswith("val_") else f"val_{k}"): v for k, v in res.items()}
        return {f"eval_{k}": v for k, v in res.items()}

    best_ckpt = latest_checkpoint(run_dir, BEST_DIR) if (t.keep_best and ckpt is not None) else None
    best = {"step": -1, "val_nll": math.inf}
    if best_ckpt is not None:
        saved_best = read_train_state(best_ckpt)
        best = {"step": int(saved_best["step"]), "val_nll": float(saved_best["val_nll"])}

    def track_best(at: int, res: dict) -> None:
        """train.keep_best: keep the evaluated weights when they beat the best validation NLL so far."""
        if not (t.keep_best and fabric.is_global_zero) or res.get("val_nll", math.inf) >= best["val_nll"]:
            return
        best.update(step=at, val_nll=res["val_nll"])
        weights = ema.state_dict() if ema is not None else model.state_dict()
        save_checkpoint(run_dir, at, weights, cfg.to_dict(), {"step": at, "val_nll": res["val_nll"], **{
            k: v for k, v in res.items() if isinstance(v, float)}}, keep=1, kind=BEST_DIR)

    elapsed_before = float(state.get("train_seconds", 0.0)) if ckpt is not None else 0.0
    bar = None
    if progress_bar and fabric.is_global_zero:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.steps, initial=step, desc=cfg.name, dynamic_ncols=True, mininterval=1.0)
    t0 = time.time()
    seen_tokens, last_log_t, last_log_tokens = 0, t0, 0
    last_metrics: dict = {}
    model.train()
    while step < t.steps:
        g = step_generator(cfg.seed, step, fabric.global_rank)
        torch.manual_seed(cfg.seed * 7919 + step * 31 + fabric.global_rank)  # dropout
        if t.schedule == "time":
            # a wall-clock budget: progress is the fraction of time used; the LR follows it
            progress = min(1.0, (time.time() - t0 + elapsed_before) / t.time_limit)
            scale = lr_time(step, progress, t.warmup_steps, t.min_lr_ratio)
            for group, base in zip(opt.param_groups, sched.base_lrs):
                group["lr"] = base * scale
        else:
            progress = step / max(1, t.steps)
        loss_sum = 0.0
        micro_batches = [task.make_batch(sampler.next(), generator=g, progress=progress).to(fabric.device)
                         for _ in range(t.grad_accum)]
        # gradient accumulation: each head's token mean is over the whole step's tokens of its domain (the
        # micro-batches of a mixture hold different shares of each domain), so the step is one large batch
        # (a model without per-domain heads, like a tokenizer, averages its micro-batch means)
        denominators, share = None, 1.0 / t.grad_accum
        if t.grad_accum > 1 and hasattr(model, "target_counts"):
            denominators, share = {}, 1.0
            for b in micro_batches:
                for name, n in model.target_counts(b).items():
                    denominators[name] = denominators.get(name, 0) + n
        for micro, batch in enumerate(micro_batches):
            with fabric.no_backward_sync(objective, enabled=micro < t.grad_accum - 1):
                loss, metrics = objective(batch) if denominators is None else objective(batch, denominators)
                fabric.backward(loss * share)
            loss_sum += float(loss.detach()) * share
            seen_tokens += task.count_tokens(batch) * fabric.world_size
        if not math.isfinite(loss_sum):
            raise SeqgenError(f"training diverged: loss is {loss_sum} at step {step}; lower train.lr or raise warmup")
        gnorm = fabric.clip_gradients(objective, opt, max_norm=t.grad_clip) if t.grad_clip > 0 else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        if t.schedule == "steps":
            sched.step()
        step += 1
        if ema is not None:
            ema.update(model, step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}", refresh=False)
        if step % t.log_every == 0 or step == t.steps:
            now = time.time()
            row = {"step": step, "train_loss": loss_sum, "lr": opt.param_groups[0]["lr"],
                   "tokens_per_s": (seen_tokens - last_log_tokens) / max(now - last_log_t, 1e-9),
                   "elapsed_s": now - t0}
            if gnorm is not None:
                row["grad_norm"] = float(gnorm)
            last_log_t, last_log_tokens = now, seen_tokens
            if logger is not None:
                logger.log(row)
                if tb is not None:
                    tb.log_metrics({k: v for k, v in row.items() if k != "step"}, step)
            last_metrics.update(row)
        timed_out = t.time_limit > 0 and time.time() - t0 + elapsed_before > t.time_limit
        final = step == t.steps or timed_out or (stop_after is not None and step >= stop_after)
        if t.eval_every and step % t.eval_every == 0 and not final:
            res = evaluate(t.eval_batches, "val" if task.has_val else "heldout")
            track_best(step, res)
            if logger is not None and res:
                logger.log({"step": step, **res})
                msg = f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float))
                if bar is not None:
                    bar.write(msg)
                else:
                    fabric.print(msg)
        if final or step % t.ckpt_every == 0:
            checkpoint(step)
        if timed_out:
            fabric.print(f"time limit of {t.time_limit:.0f}s reached at step {step}")
        if final:
            break
    if bar is not None:
        bar.close()
    train_time = time.time() - t0
    summary.update({"steps": step, "train_seconds": train_time, "train_loss": last_metrics.get("train_loss"),
                    "tokens_per_s": seen_tokens / max(train_time, 1e-9)})
    if stop_after is None or step >= t.steps:
        res = {}
        if task.has_val:
            res.update(evaluate(t.eval_batches, "val"))
            track_best(step, res)
        if t.keep_best and fabric.is_global_zero and best["step"] >= 0:
            # the held-out score of the weights `seqgen eval` and `seqgen sample` will use
            summary.update(best_step=best["step"], best_val_nll=best["val_nll"])
            best_weights = read_weights(latest_checkpoint(run_dir, BEST_DIR) / "model.safetensors")
            if heldout:
                res.update(evaluate(0, "heldout", weights=best_weights))
        elif heldout:
            res.update(evaluate(0))
        summary.update({k.removeprefix("eval_"): v for k, v in res.items()})
        if logger is not None and res:
            logger.log({"step": step, **res})
    if fabric.world_size > 1:
        summary["replicas_identical"] = replicas_identical(fabric, model)
    if fabric.is_global_zero:
        (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        fabric.print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}))
    if tb is not None:
        tb.finalize("success")
    return summary


def replicas_identical(fabric, model: nn.Module) -> bool:
    """All ranks hold bit-identical parameters (DDP keeps replicas in sync)."""
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    digest = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, device=flat.device).float()
                                       .remainder(97)).sum(), flat.abs().max()])
    everyone = fabric.all_gather(digest)  # (world, 3)
    return bool((everyone == everyone[0]).all())
