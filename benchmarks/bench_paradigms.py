"""One comparison of generation paradigms: class-conditional MNIST, the same backbone (a 4-layer,
width-128 Transformer) and the same CPU training time for each, one table.

Variants (configs in ``examples/configs/paradigms/``):

    ar                  raster next-token over 7x7 FSQ codes (1,000 codes)          mnist_ar.yaml
    ar_random           random order (RAR), sampled in raster order                 mnist_rar.yaml
    masked_8, _16       MaskGIT over the same codes, 8 and 16 steps (one model)     mnist_maskgit.yaml
    next_scale          VAR over a residual multi-scale FSQ (1,2,3,4,5,7)          mnist_var.yaml
    masked_diffusion    MAR: 7x7x4 autoencoder latents, masked, flow head           mnist_mar.yaml
    causal_flow         NextStep: the same latents, raster next-token, flow head    mnist_nextstep.yaml
    ar_token_shuffle    Token-Shuffle s=2 on the FSQ codes (8x8 padded, 16 positions) mnist_token_shuffle.yaml

Protocol.  The tokenizers are trained first (their configs, 240 s each).  Every model then trains for
``--time_limit`` seconds with one thread, ``--parallel`` at a time (two processes on a 2-core CPU).  No
hyper-parameter is chosen here: every config is as its file says, guidance scale 2 for all.  Scores
on the held-out split (1,000 MNIST test digits, read once):

* conditional accuracy of the digit classifier (``seqgen.evaluate``) on 1,000 samples, at temperature 1
  and with guidance (scale 2, same seed for every variant), and the Frechet distance in the
  classifier's 128-d features against the held-out images (FD-digits), beside the real-vs-real figure
  (1,000 training digits against the held-out set);
* forward passes of the backbone per image (counted by a hook while sampling), and sampling wall-clock
  for 100 images in one batch of 100 and in batches of one (latency; temperature 1, no guidance), all
  variants timed in one process one after another, best of ``--repeats``, with the precision training
  used (``--precision auto``: bf16 autocast on a CPU with native bf16);
* held-out NLL in bits per pixel where the method defines one: exact for next-token (ar), an upper
  bound for masked (the any-order evidence bound), exact for the multi-scale codes for next_scale (a
  likelihood of all scales, not comparable to one grid's), none for diffusion / flow heads (their
  denoising loss is reported instead).

    python benchmarks/bench_paradigms.py --time_limit 300 --parallel 2 \
        --out benchmarks/results/paradigms_mnist.json
    python benchmarks/bench_paradigms.py --skip_train ...    # score runs that exist
    python benchmarks/bench_paradigms.py --split val --runs runs/paradigms_val --variants masked_8 \
        --set masked_8:--paradigm.choice_temperature=2 --out /tmp/val.json   # choose on validation
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import print_table, write_json  # noqa: E402

CONFIGS = ROOT / "examples" / "configs" / "paradigms"
VARIANTS = [  # (name, config, sampling steps or None)
    ("ar", "mnist_ar.yaml", None),
    ("ar_random", "mnist_rar.yaml", None),
    ("masked_8", "mnist_maskgit.yaml", 8),
    ("masked_16", "mnist_maskgit.yaml", 16),
    ("next_scale", "mnist_var.yaml", None),
    ("masked_diffusion", "mnist_mar.yaml", None),
    ("causal_flow", "mnist_nextstep.yaml", None),
    ("ar_token_shuffle", "mnist_token_shuffle.yaml", None),
]
TOKENIZERS = ["mnist_fsq7.yaml", "mnist_msfsq.yaml", "mnist_ae.yaml"]


def run_parallel(commands: list[list[str]], parallel: int, logs: Path) -> None:
    """Run commands, ``parallel`` at a time, each with one thread; fail loudly on the first error."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < parallel:
            cmd = pending.pop(0)
            log = open(logs / f"{Path(cmd[-1]).name}.log", "w")
            print("running:", " ".join(cmd), flush=True)
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), cmd, log))
        time.sleep(2)
        for item in list(running):
            proc, cmd, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                if proc.returncode != 0:
                    raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log.name}")


def train_all(args) -> None:
    seqgen = [sys.executable, "-m", "seqgen.cli", "train"]
    tok = []
    for cfg in TOKENIZERS:
        name = Path(cfg).stem
        if not (ROOT / "runs" / name / "checkpoints").exists():
            tok.append(seqgen + [str(ROOT / "examples" / "configs" / cfg), "--no-progress", "--train.threads", "1",
                                 "--out", str(ROOT / "runs" / name)])
    run_parallel(tok, args.parallel, Path(args.runs) / "logs")
    models = []
    overrides: dict[str, list[str]] = {}
    for item in args.set:
        variant, _, flag = item.partition(":")
        cfg = next(c for v, c, _ in VARIANTS if v == variant)
        overrides.setdefault(cfg, []).append(flag)
    for cfg in dict.fromkeys(c for _, c, _ in VARIANTS):
        out = Path(args.runs) / Path(cfg).stem
        extra = ["--train.val_fraction=0.1", "--no-heldout"] if args.split == "val" else []
        models.append(seqgen + [str(CONFIGS / cfg), "--no-progress", "--overwrite", "--train.threads", "1",
                                f"--train.time_limit={args.time_limit}", *extra, *overrides.get(cfg, []),
                                "--out", str(out)])
    run_parallel(models, args.parallel, Path(args.runs) / "logs")


class PassCounter:
    """Counts backbone forward calls (one per decoding pass over the batch)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.backbone.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

    def close(self):
        self.handle.remove()


def score_variant(name: str, cfg: str, steps, args, reference: dict, bf16: bool = False) -> dict:
    """Held-out NLL, sample scores and sampling cost of one trained variant.  The model runs under bf16
    autocast when ``bf16`` (as in training); the digit classifier always in float32."""
    from seqgen.task import load_run

    def amp():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    run = Path(args.runs) / Path(cfg).stem
    task = load_run(run)
    entry = task.entries[0]
    model = task.model
    knobs = dict(args.knobs.get(name, {}))
    if "choice_temperature" in knobs:  # sampling-time settings of the paradigm and the head
        task.paradigm.config.choice_temperature = float(knobs["choice_temperature"])
    if "head_steps" in knobs:
        model.heads["image"].config.sample_steps = int(knobs["head_steps"])
    guided_scale = float(knobs.get("cfg_scale", args.cfg_scale))
    guided_temperature = float(knobs.get("guided_temperature", 1.0))
    cfg_schedule = knobs.get("cfg_schedule", "constant")
    res = {"variant": name, "config": f"examples/configs/paradigms/{cfg}", "parameters": model.num_parameters(),
           "paradigm": task.cfg.component("paradigm")[0], "head": task.cfg.heads["image"]["name"],
           "steps": steps, "nll_kind": getattr(task.paradigm, "nll_kind", "exact"), "sampling_knobs": knobs}
    summary = json.loads((run / "train_summary.json").read_text())
    res["train_steps"], res["train_seconds"] = summary.get("steps"), summary.get("train_seconds")
    with amp():
        nll = task.evaluate_nll(batch_size=256, split=args.split)
    key = f"{entry.name}/image"
    if f"{key}/bits_per_dim" in nll:
        res["heldout_bits_per_dim"] = nll[f"{key}/bits_per_dim"]
    else:
        res["heldout_bits_per_dim"] = None
        res["heldout_denoising_loss"] = nll.get(f"{key}/loss")
    recs = entry.records[args.split]
    n = args.samples
    idx = np.arange(n) % len(recs["label"])
    labels = np.asarray(recs["label"])[idx]
    sub = {"label": labels, "image": np.asarray(recs["image"])[idx]}
    conds = [{"label": int(y)} for y in labels]
    for tag, scale, temperature, schedule in (("temperature_1", 1.0, 1.0, "constant"),
                                              ("guided", guided_scale, guided_temperature, cfg_schedule)):
        g = torch.Generator().manual_seed(1234)
        t0 = time.time()
        with amp():
            gen = task.generate(entry=entry.name, conds=conds, generator=g, cfg_scale=scale, batch_size=500,
                                steps=steps, temperature=temperature, cfg_schedule=schedule)
        images = [r["image"] for r in gen]
        if args.split == "heldout":
            scores = entry.source.score("image", sub, images)
            res[f"accuracy_{tag}"] = scores["accuracy"]
            res[f"fd_{tag}"] = scores["fd_vs_heldout"]
        else:  # validation: accuracy and FD against the validation images; nothing held out is read
            from seqgen.evaluate import classify, frechet_distance

            clf = entry.source._classifier()
            pred, feats = classify(clf, np.stack(images))
            res[f"accuracy_{tag}"] = float((pred == labels).mean())
            res[f"fd_{tag}"] = frechet_distance(feats, classify(clf, np.asarray(recs["image"]))[1])
        res[f"seconds_{tag}_{n}"] = time.time() - t0
    res["fd_real_vs_real"] = reference["fd_real_train_vs_heldout"]
    if args.no_timing:
        return res
    # cost: forward passes per image and wall-clock per 100 images (one batch of 100, no guidance)
    conds100 = [{"label": i % 10} for i in range(100)]
    counter = PassCounter(model)
    with amp():
        task.generate(entry=entry.name, conds=conds100, generator=torch.Generator().manual_seed(0), batch_size=100,
                      steps=steps)
    counter.close()
    res["forward_passes_per_image"] = counter.n
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        with amp():
            task.generate(entry=entry.name, conds=conds100, generator=torch.Generator().manual_seed(0), batch_size=100,
                          steps=steps)
        best = min(best, time.perf_counter() - t0)
    res["sample_seconds_per_100"] = best
    t0 = time.perf_counter()  # latency: one image at a time (20 images, scaled to 100)
    with amp():
        task.generate(entry=entry.name, conds=conds100[:20], generator=torch.Generator().manual_seed(0), batch_size=1,
                      steps=steps)
    res["sample_seconds_per_100_batch_1"] = (time.perf_counter() - t0) * 5
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time_limit", type=float, default=300, help="training seconds per model")
    ap.add_argument("--parallel", type=int, default=2, help="models trained at once (one thread each)")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "paradigms"))
    ap.add_argument("--split", default="heldout", choices=["heldout", "val"],
                    help="val: train with train.val_fraction 0.1 and score on that validation split (for choosing "
                         "configs; the held-out digits are never read); heldout: the report")
    ap.add_argument("--set", action="append", default=[], metavar="VARIANT:--section.key=value",
                    help="a config override for one variant's training, e.g. masked_8:--paradigm.choice_temperature=2")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--cfg_scale", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3, help="timed sampling runs per variant (best kept)")
    ap.add_argument("--threads", type=int, default=2, help="threads while scoring and timing")
    ap.add_argument("--precision", default="auto", choices=["auto", "32"],
                    help="sampling precision: auto = what training's precision: auto picks on this CPU (bf16 "
                         "autocast where bf16 is native and faster), 32 = float32")
    ap.add_argument("--knob", action="append", default=[], metavar="VARIANT:key=value",
                    help="a sampling setting for one variant: cfg_scale, guided_temperature, cfg_schedule (of the guided "
                         "set), choice_temperature (masked), head_steps (diffusion head)")
    ap.add_argument("--no_timing", action="store_true", help="skip the sampling-cost measurements")
    ap.add_argument("--variants", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--skip_train", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "paradigms_mnist.json"))
    args = ap.parse_args()
    args.knobs = {}
    for item in args.knob:
        variant, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        args.knobs.setdefault(variant, {})[key] = value
    global VARIANTS
    if args.variants:
        keep = set(args.variants.split(","))
        VARIANTS = [v for v in VARIANTS if v[0] in keep]
    t0 = time.time()
    if not args.skip_train:
        train_all(args)
    torch.set_num_threads(args.threads)
    from seqgen.task import load_run

    first = load_run(Path(args.runs) / Path(VARIANTS[0][1]).stem)
    reference = first.entries[0].source.reference_scores("image") if args.split == "heldout" else \
        {"fd_real_train_vs_heldout": None, "note": "validation mode: no held-out figure is read"}
    from seqgen.precision import resolve_precision

    precision, why = resolve_precision("auto", "cpu") if args.precision == "auto" else ("32-true", "asked for")
    print(f"sampling precision: {precision} ({why})", flush=True)
    rows = []
    for name, cfg, steps in VARIANTS:
        print(f"scoring {name} ...", flush=True)
        rows.append(score_variant(name, cfg, steps, args, reference, bf16="bf16" in precision))
        print_table(rows[-1:], list(rows[-1]))
    ar = next((r for r in rows if r["variant"] == "ar"), None)
    if ar is not None and not args.no_timing:
        for r in rows:
            r["passes_vs_ar"] = ar["forward_passes_per_image"] / r["forward_passes_per_image"]
            r["speedup_vs_ar"] = ar["sample_seconds_per_100"] / r["sample_seconds_per_100"]
            r["speedup_vs_ar_batch_1"] = ar["sample_seconds_per_100_batch_1"] / r["sample_seconds_per_100_batch_1"]
            r["guided_accuracy_minus_ar"] = r["accuracy_guided"] - ar["accuracy_guided"]
    cols = ["variant", "parameters", "train_steps", "accuracy_temperature_1", "accuracy_guided", "fd_guided",
            "fd_real_vs_real", "forward_passes_per_image", "sample_seconds_per_100", "speedup_vs_ar",
            "speedup_vs_ar_batch_1", "heldout_bits_per_dim"]
    print_table(rows, cols)
    write_json(args.out, "bench_paradigms", torch.device("cpu"), rows,
               {"time_limit": args.time_limit, "parallel": args.parallel, "cfg_scale": args.cfg_scale,
                "sampling_precision": precision,
                "samples": args.samples, "reference": reference, "wall_seconds": time.time() - t0,
                "split": args.split, "overrides": args.set, "knobs": args.knob,
                "protocol": "class-conditional MNIST; same backbone; same training seconds, one thread each; "
                            "held-out scores read once; no hyper-parameter chosen on them"})


if __name__ == "__main__":
    main()
