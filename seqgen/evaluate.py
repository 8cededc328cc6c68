"""Per-domain evaluation of a trained run.

Text     held-out bits per byte (sliding windows), beside general-purpose compressors on the same
         held-out text: bz2 -9 and xz -9 given all the training text as context, gzip -9 alone.
Images   held-out bits per dimension.  For class-conditional image runs, a small CNN classifier trained
         once on the real training split (cached) scores samples: conditional accuracy (does the
         classifier see the requested class?), and the Frechet distance between the classifier's
         penultimate features of samples and of held-out real images ("FD-digits", the FID recipe of
         Heusel et al., 2017, with a domain classifier in place of Inception).
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
class DigitClassifier(nn.Module):
    """Two conv layers, then a 128-d feature layer (the Frechet-distance features), then logits."""

    def __init__(self, channels: int, num_classes: int, feat: int = 128):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
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


def train_classifier(splits: RawSplits, epochs: int = 40, seed: int = 0) -> DigitClassifier:
    """Fit on the real training split with small random shifts (a few seconds on a CPU)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = _nchw(splits.train)
    y = torch.as_tensor(splits.train_labels, dtype=torch.long)
    clf = DigitClassifier(x.shape[1], splits.num_classes)
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
    path = data_dir() / "classifiers" / f"{splits.info.get('name', 'data')}_{splits.fingerprint()}.safetensors"
    clf = DigitClassifier(channels, splits.num_classes)
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
def evaluate_run(run_dir: str | Path, device=None, ema: bool = True, samples_per_class: int | None = None,
                 cfg_scale: float | None = None, compressors: bool | None = None, best: bool = True,
                 dynamic: bool | None = None, dynamic_lr: float | None = None) -> dict:
    from .task import load_run

    device = torch.device(device or "cpu")
    task = load_run(run_dir, device=device, ema=ema, best=best)
    if task.cfg.task != "generative":
        return task.evaluate_run(device=device)
    cfg = task.cfg
    e = cfg.eval
    res: dict = {"run": str(run_dir), "name": cfg.name, "checkpoint": f"{task.checkpoint.parent.name}/{task.checkpoint.name}",
                 "parameters": sum(p.numel() for p in task.model.parameters())}
    t0 = time.time()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        res.update(task.evaluate_nll(batch_size=256, stride=e.stride, device=device))
    res["nll_seconds"] = time.time() - t0
    if task.is_text:
        if dynamic if dynamic is not None else e.dynamic:
            res["dynamic"] = dynamic_evaluation(task, device, lr=dynamic_lr)
        if compressors if compressors is not None else e.compressors:
            res["compressors_bits_per_byte"] = compressor_bits_per_byte(task.splits.train, task.splits.heldout)
        return res
    if task.label is None:
        return res
    clf = digit_classifier(task.splits)
    pred, real_feats = classify(clf, task.splits.heldout)
    res["classifier_heldout_accuracy"] = float((pred == task.splits.heldout_labels).mean())
    per = samples_per_class or e.samples_per_class
    C = task.label.config.num_classes
    labels = np.repeat(np.arange(C), per)
    # reference: real training images (a random subset as large as the sample set) against held-out
    pick = np.random.default_rng(e.seed).permutation(len(task.splits.train))[:len(labels)]
    ref = np.asarray(task.splits.train)[np.sort(pick)]
    res["fd_real_train_vs_heldout"] = frechet_distance(classify(clf, ref)[1], real_feats)
    for tag, scale in (("temperature_1", 1.0), ("guided", cfg_scale or e.cfg_scale)):
        g = torch.Generator(device=device)
        g.manual_seed(e.seed)
        t0 = time.time()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            images, _ = task.generate(n=len(labels), labels=labels, generator=g, temperature=e.temperature,
                                      cfg_scale=scale, cfg_schedule=e.cfg_schedule, batch_size=cfg.sample.batch_size)
        secs = time.time() - t0
        p, f = classify(clf, images)
        res[tag] = {"cfg_scale": scale, "temperature": e.temperature, "samples": len(labels),
                    "conditional_accuracy": float((p == labels).mean()),
                    "fd_vs_heldout": frechet_distance(f, real_feats), "seconds": secs}
    return res


def dynamic_evaluation(task, device, lr: float | None = None) -> dict:
    """Dynamic evaluation of a text run: the learning rate (``lr``, or the best of eval.dynamic_lrs on the
    validation split -- never on the held-out split) then scores the held-out split."""
    e = task.cfg.eval
    lrs = [lr] if lr is not None else list(e.dynamic_lrs)
    if not lrs:
        raise SeqgenError("eval.dynamic_lrs is empty")
    segment = e.dynamic_segment or e.stride or max(1, task.context // 2)
    out: dict = {"optimizer": e.dynamic_optimizer, "segment": segment}
    kw = dict(segment=segment, optimizer=e.dynamic_optimizer, device=device, autocast=device.type == "cuda")
    t0 = time.time()
    if len(lrs) > 1:
        if not task.has_val:
            raise SeqgenError("choosing the dynamic-evaluation learning rate needs a validation split "
                              "(train.val_fraction > 0); or give one rate: `seqgen eval RUN --dynamic_lr 0.01`")
        static = task.evaluate_nll(split="val", stride=segment, device=device)
        by_lr = {f"{lr:g}": task.evaluate_dynamic(lr=lr, split="val", **kw)["bits_per_byte"] for lr in lrs}
        out["val_static_bits_per_byte"] = static["bits_per_byte"]
        out["val_bits_per_byte_by_lr"] = by_lr
        lr = min(lrs, key=lambda r: by_lr[f"{r:g}"])
    else:  # one given rate
        lr = lrs[0]
    out["lr"] = lr
    out["static_bits_per_byte"] = task.evaluate_nll(stride=segment, device=device)["bits_per_byte"]
    out.update(task.evaluate_dynamic(lr=lr, split="heldout", **kw))
    out["seconds"] = time.time() - t0
    return out


def format_table(res: dict) -> str:
    rows = [("run", res.get("name", "")), ("checkpoint", res.get("checkpoint", "")),
            ("parameters", f"{res.get('parameters', 0) / 1e6:.3f}M")]
    for k in ("bits_per_dim", "bits_per_byte", "heldout_nll", "classifier_heldout_accuracy",
              "fd_real_train_vs_heldout", "recon_mse", "recon_psnr", "mean_image_mse", "codebook_usage",
              "code_perplexity"):
        if k in res:
            rows.append((k, f"{res[k]:.4f}"))
    for tag in ("temperature_1", "guided"):
        if tag in res:
            r = res[tag]
            rows.append((f"{tag} (cfg {r['cfg_scale']:g})",
                         f"accuracy {r['conditional_accuracy']:.3f}  FD {r['fd_vs_heldout']:.2f}  ({r['seconds']:.1f}s)"))
    if "dynamic" in res:
        d = res["dynamic"]
        rows.append((f"bits_per_byte, dynamic eval ({d['optimizer']} lr {d['lr']:g}, segment {d['segment']})",
                     f"{d['bits_per_byte']:.4f}  (static at this stride {d['static_bits_per_byte']:.4f}; "
                     f"{d['seconds']:.0f}s)"))
    for name, v in res.get("compressors_bits_per_byte", {}).items():
        rows.append((name, f"{v:.4f} bits/byte"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
