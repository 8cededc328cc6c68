"""Per-domain evaluation of a trained run.

Per mixture entry (a source with its recipe) and per target domain: held-out NLL in bits per raw unit
(bits per byte for text, per dimension for images), and for conditioned entries the same with the
condition replaced by the null condition (how much the condition helps).  Adapters may add reference
figures (text: bz2 -9 and xz -9 given the training text as context, gzip -9 alone).  Sources may score
samples: generated from held-out records' conditions, at temperature 1 and with guidance, then
``source.score(field, records, samples)`` -- a digit classifier's accuracy on the requested labels and
the Frechet distance in its features ("FD-digits", the FID recipe of Heusel et al., 2017, with a domain
classifier in place of Inception), both digits of a scene right, the exact digit pair of a caption.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .datasets import RawSplits, data_dir
from .types import SeqgenError


# ------------------------------------------------------------------------------------------ classifier
POOL_ABOVE = 16
"""images larger than this (in both sides) are max-pooled 2x between the two conv layers: 4x less work
for MNIST's 28x28 (a CPU without AVX-512 trained the unpooled net for over 15 minutes)"""


def _pooled(height: int, width: int) -> bool:
    return min(height, width) > POOL_ABOVE


class DigitClassifier(nn.Module):
    """Two conv layers (max-pooled 2x between them for images above 16x16), then a 128-d feature layer
    (the Frechet-distance features), then logits."""

    def __init__(self, channels: int, num_classes: int, feat: int = 128, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(),
                                  nn.MaxPool2d(2) if pool else nn.Identity(), nn.Conv2d(32, 64, 3, padding=1),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.fc = nn.Linear(64 * 16, feat)
        self.out = nn.Linear(feat, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) in [0, 1] -> (N, feat)."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x):
        return self.out(self.features(x))


def _nchw(images: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    return x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)


def train_classifier(splits: RawSplits, epochs: int | None = None, seed: int = 0) -> DigitClassifier:
    """Fit on the real training split with small random shifts: 40 epochs for small images (seconds on a
    CPU), 24 for pooled ones (MNIST 28x28: two minutes on 2 AVX2 cores, 98.7% held-out)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = _nchw(splits.train)
    y = torch.as_tensor(splits.train_labels, dtype=torch.long)
    pool = _pooled(*x.shape[-2:])
    epochs = epochs or (24 if pool else 40)
    clf = DigitClassifier(x.shape[1], splits.num_classes, pool=pool)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    shift = max(1, x.shape[-1] // 8)
    clf.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            xb = x[idx]
            dx, dy = torch.randint(-shift, shift + 1, (2,), generator=g).tolist()
            xb = torch.roll(xb, (dy, dx), dims=(2, 3))  # digits have empty borders: a roll is a shift
            loss = F.cross_entropy(clf(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return clf.eval()


def digit_classifier(splits: RawSplits) -> DigitClassifier:
    """The classifier for this data set, trained once and cached under the data cache."""
    from safetensors.torch import load_file, save_file

    if splits.train_labels is None or splits.num_classes is None:
        raise SeqgenError("scoring samples needs a labelled image data set")
    x = np.asarray(splits.train)
    channels = 1 if x.ndim == 3 else x.shape[-1]
    pool = _pooled(x.shape[1], x.shape[2])
    arch = "_pool2" if pool else ""  # a different net, a different cache file
    path = data_dir() / "classifiers" / f"{splits.info.get('name', 'data')}_{splits.fingerprint()}{arch}.safetensors"
    clf = DigitClassifier(channels, splits.num_classes, pool=pool)
    if path.exists():
        try:
            clf.load_state_dict(load_file(str(path)))
            return clf.eval()
        except Exception:  # a corrupt cache is rebuilt
            path.unlink()
    clf = train_classifier(splits)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return clf


@torch.no_grad()
def classify(clf: DigitClassifier, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (predicted labels (N,), features (N, 128))."""
    x = _nchw(images)
    preds, feats = [], []
    for i in range(0, len(x), 1024):
        f = clf.features(x[i:i + 1024])
        feats.append(f)
        preds.append(clf.out(f).argmax(-1))
    return torch.cat(preds).numpy(), torch.cat(feats).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fit to two feature sets."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) = sum of sqrt of eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric PSD)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ sb @ root_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_sqrt)


# ------------------------------------------------------------------------------------------ compressors
def compressor_bits_per_byte(train: str, heldout: str) -> dict[str, float]:
    """bz2 -9 and xz -9 with the training text as context (size(train + heldout) - size(train)), and
    gzip -9 on the held-out text alone, in bits per held-out byte."""
    tr, te = train.encode("utf-8"), heldout.encode("utf-8")
    n = len(te)
    bz = (len(bz2.compress(tr + te, 9)) - len(bz2.compress(tr, 9))) * 8 / n
    xz = (len(lzma.compress(tr + te, preset=9)) - len(lzma.compress(tr, preset=9))) * 8 / n
    gz = len(gzip.compress(te, 9)) * 8 / n
    return {"bz2 -9 (train as context)": bz, "xz -9 (train as context)": xz, "gzip -9 (held-out alone)": gz}


# ------------------------------------------------------------------------------------------ the run
def evaluate_run(run_dir: str | Path, device=None, ema: bool = True, samples: int | None = None,
                 cfg_scale: float | None = None, compressors: bool | None = None, best: bool = True,
                 dynamic: bool | None = None, dynamic_lr: float | None = None) -> dict:
    from .task import load_run, take

    device = torch.device(device or "cpu")
    task = load_run(run_dir, device=device, ema=ema, best=best)
    if task.cfg.task != "generative":
        return task.evaluate_run(device=device)
    cfg = task.cfg
    e = cfg.eval
    res: dict = {"run": str(run_dir), "name": cfg.name, "checkpoint": f"{task.checkpoint.parent.name}/{task.checkpoint.name}",
                 "parameters": sum(p.numel() for p in task.model.parameters())}
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    t0 = time.time()
    with torch.autocast(**amp):
        nll = task.evaluate_nll(batch_size=256, stride=e.stride, device=device)
        null = task.evaluate_nll(batch_size=256, stride=e.stride, device=device, null=True)
    res["heldout_nll"], res["heldout_tokens"] = nll["heldout_nll"], nll["heldout_tokens"]
    for k in ("bits_per_dim", "bits_per_byte"):
        if k in nll:
            res[k] = nll[k]
    res["nll_seconds"] = time.time() - t0
    res["nll_kind"] = getattr(task.paradigm, "nll_kind", "exact")
    n_samples = samples or e.samples
    for entry in task.entries:
        out: dict = {"source": entry.source_key, "cond": entry.cond, "target": entry.target}
        for k in entry.target:
            unit = task.adapters[k].unit
            if f"{entry.name}/{k}/loss" in nll:  # a head that defines no likelihood (diffusion / flow)
                d = {"nll": "not defined (the head's loss is a denoising loss)",
                     "loss_per_token": nll[f"{entry.name}/{k}/loss"]}
                if f"{entry.name}/{k}/loss" in null:
                    d["loss_per_token_null_condition"] = null[f"{entry.name}/{k}/loss"]
                out[k] = d
                continue
            d = {f"bits_per_{unit}": nll[f"{entry.name}/{k}/bits_per_{unit}"], "nll_per_token": nll[f"{entry.name}/{k}/nll"]}
            if f"{entry.name}/{k}/bits_per_{unit}" in null:
                d[f"bits_per_{unit}_null_condition"] = null[f"{entry.name}/{k}/bits_per_{unit}"]
            out[k] = d
        if entry.stream:
            a = task.adapters[entry.target[0]]
            f = entry.field_of(entry.target[0])
            if (compressors if compressors is not None else e.compressors) and hasattr(a, "baselines"):
                out["baselines"] = a.baselines(list(entry.records["train"][f]), list(entry.records["heldout"][f]))
        elif hasattr(entry.source, "score") and len(entry.target) == 1:
            out.update(sample_scores(task, entry, n_samples, device, cfg_scale or e.cfg_scale, amp, take))
        res[entry.name] = out
    if dynamic if dynamic is not None else e.dynamic:
        res["dynamic"] = dynamic_evaluation(task, device, lr=dynamic_lr)
    return res


def sample_scores(task, entry, n: int, device, cfg_scale: float, amp: dict, take) -> dict:
    """Generate ``entry``'s target from the conditions of n held-out records (cycled), at temperature 1
    and (conditioned entries) with guidance, and score the samples with the source."""
    e = task.cfg.eval
    recs = entry.records["heldout"]
    N = len(next(iter(recs.values())))
    idx = np.arange(n) % N
    sub = take(recs, idx)
    (k,) = entry.target
    conds = [{c: sub[entry.field_of(c)][i] for c in entry.cond} for i in range(n)] if entry.cond else None
    out: dict = {}
    try:  # a source scores some fields only (a labelled image set: images, not the labels of an image -> label entry)
        entry.source.score(entry.field_of(k), sub, list(sub[entry.field_of(k)]))
    except SeqgenError as err:
        return {"sample_scores": f"not scored: {err}"}
    if hasattr(entry.source, "reference_scores"):
        out["reference"] = entry.source.reference_scores(entry.field_of(k))
    settings = [("temperature_1", 1.0, e.temperature)] + ([("guided", cfg_scale, e.temperature)] if entry.cond else [])
    if e.greedy:
        settings.append(("greedy", 1.0, 0.0))
    for tag, scale, temperature in settings:
        g = torch.Generator(device=device)
        g.manual_seed(e.seed)
        t0 = time.time()
        with torch.autocast(**amp):
            gen = task.generate(entry=entry.name, conds=conds, n=n, generator=g, temperature=temperature,
                                cfg_scale=scale, cfg_schedule=e.cfg_schedule, batch_size=task.cfg.sample.batch_size,
                                steps=e.steps or None)
        secs = time.time() - t0
        scores = entry.source.score(entry.field_of(k), sub, [r[k] for r in gen])
        out[tag] = {"cfg_scale": scale, "temperature": temperature, **scores, "seconds": secs}
    return out


def dynamic_evaluation(task, device, lr: float | None = None) -> dict:
    """Dynamic evaluation of a run's stream: the learning rate (``lr``, or the best of eval.dynamic_lrs on
    the validation split -- never on the held-out split) then scores the held-out split."""
    e = task.cfg.eval
    entry = task.stream_entry()
    u = f"bits_per_{task.adapters[entry.target[0]].unit}"
    lrs = [lr] if lr is not None else list(e.dynamic_lrs)
    if not lrs:
        raise SeqgenError("eval.dynamic_lrs is empty")
    segment = e.dynamic_segment or e.stride or max(1, task.context_of(entry) // 2)
    out: dict = {"entry": entry.name, "unit": u, "optimizer": e.dynamic_optimizer, "segment": segment}
    kw = dict(segment=segment, optimizer=e.dynamic_optimizer, device=device, autocast=device.type == "cuda")
    t0 = time.time()
    static_kw = dict(stride=segment, device=device, entries=[entry.name])
    if len(lrs) > 1:
        if not task.has_val:
            raise SeqgenError("choosing the dynamic-evaluation learning rate needs a validation split "
                              "(train.val_fraction > 0); or give one rate: `seqgen eval RUN --dynamic_lr 0.01`")
        static = task.evaluate_nll(split="val", **static_kw)
        by_lr = {f"{lr:g}": task.evaluate_dynamic(lr=lr, split="val", **kw)[u] for lr in lrs}
        out[f"val_static_{u}"] = static[u]
        out[f"val_{u}_by_lr"] = by_lr
        lr = min(lrs, key=lambda r: by_lr[f"{r:g}"])
    else:  # one given rate
        lr = lrs[0]
    out["lr"] = lr
    out[f"static_{u}"] = task.evaluate_nll(**static_kw)[u]
    out.update(task.evaluate_dynamic(lr=lr, split="heldout", **kw))
    out["seconds"] = time.time() - t0
    return out


def format_table(res: dict) -> str:
    rows = [("run", res.get("name", "")), ("checkpoint", res.get("checkpoint", "")),
            ("parameters", f"{res.get('parameters', 0) / 1e6:.3f}M")]
    for k in ("bits_per_dim", "bits_per_byte", "heldout_nll", "recon_mse", "recon_psnr", "mean_image_mse",
              "codebook_usage", "code_perplexity"):
        if k in res:
            rows.append((k, f"{res[k]:.4f}"))
    if res.get("nll_kind", "exact") != "exact":
        rows.append(("nll is", res["nll_kind"]))
    for name, entry in res.items():
        if not isinstance(entry, dict) or "target" not in entry:
            continue
        for k in entry["target"]:
            for metric, v in entry.get(k, {}).items():
                if metric.startswith(("bits_per", "loss_per")):
                    rows.append((f"{name}: {k} {metric}", f"{v:.4f}"))
        for tag in ("reference", "temperature_1", "guided", "greedy"):
            if tag in entry:
                r = entry[tag]
                shown = "  ".join(f"{m} {v:.3f}" for m, v in r.items()
                                  if isinstance(v, float) and m not in ("cfg_scale", "temperature", "seconds"))
                label = f"{name}: {tag}" + (f" (cfg {r['cfg_scale']:g})" if "cfg_scale" in r else "")
                rows.append((label, shown + (f"  ({r['seconds']:.1f}s)" if "seconds" in r else "")))
        for b, v in entry.get("baselines", {}).items():
            rows.append((f"{name}: {b}", f"{v:.4f} bits/byte"))
    if "dynamic" in res:
        d = res["dynamic"]
        unit = d["unit"]
        rows.append((f"{unit}, dynamic eval ({d['optimizer']} lr {d['lr']:g}, segment {d['segment']})",
                     f"{d[unit]:.4f}  (static at this stride {d['static_' + unit]:.4f}; {d['seconds']:.0f}s)"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
