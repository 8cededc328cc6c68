"""The ``seqgen`` command.

    seqgen train CONFIG.yaml [--out DIR] [--resume | --overwrite] [--dotted.key=value ...]
    seqgen sample RUN_DIR [--prompt TEXT | --image FILE | --labels 3,7] [--n 100] [--cfg_scale 2] [--out FILE]
    seqgen eval RUN_DIR [--out FILE.json]
    seqgen list [ops]
    seqgen data list | seqgen data get NAME [NAME ...]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .types import SeqgenError

log = logging.getLogger("seqgen")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# ------------------------------------------------------------------------------------------ train
def cmd_train(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="seqgen train", add_help=False,
                                 description="Train from a YAML config; other --dotted.key=value options override it.")
    ap.add_argument("config", nargs="?", help="YAML run config")
    ap.add_argument("--out", help="run folder (default: runs/<name>)")
    ap.add_argument("--resume", action="store_true", help="continue the run in the run folder")
    ap.add_argument("--overwrite", action="store_true", help="delete an existing run in the run folder first")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--no-heldout", action="store_true",
                    help="skip the final held-out evaluation (runs that choose a config on the validation split)")
    ap.add_argument("-h", "--help", action="store_true")
    args, overrides = ap.parse_known_args(argv)
    from .config import RunConfig, build_parser, resolve_config

    if args.help:
        ap.print_help()
        if args.config:
            from .config import DEFAULT_NAMES, TASKS, _load_source

            raw = _load_source(args.config)
            task = raw.get("task", "generative")
            names = {s: (raw.get(s) or {}).get("name") or DEFAULT_NAMES.get(s, "") for s in TASKS[task]}
            print("\nconfig options (override with --section.key=value):")
            build_parser(task, names).print_help()
        return 0
    if not args.config:
        raise SeqgenError("seqgen train needs a CONFIG.yaml (see examples/configs/)")
    cfg = RunConfig.from_dict(resolve_config(args.config, overrides))
    out = Path(args.out or Path("runs") / cfg.name)
    from .train import train

    summary = train(cfg, out, resume=args.resume, overwrite=args.overwrite, progress_bar=not args.no_progress,
                    heldout=not args.no_heldout)
    if summary.get("global_rank", 0) == 0:
        print(f"run folder: {out}")
    return 0


# ------------------------------------------------------------------------------------------ sample
def cmd_sample(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="seqgen sample", description="Draw samples from a trained run into a file.")
    ap.add_argument("run_dir")
    ap.add_argument("--n", type=int, help="number of samples")
    ap.add_argument("--out", help="output file (default: RUN_DIR/samples/samples.png or .txt)")
    ap.add_argument("--entry", help="mixture entry (recipe) to sample from (default: the first, or the one the "
                    "condition you give selects)")
    ap.add_argument("--prompt", help="a text condition (a caption), or the text a stream continues")
    ap.add_argument("--image", help="an image file as the condition (e.g. a scene to caption)")
    ap.add_argument("--labels", help="class ids (comma-separated) as conditions, one sample each")
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top_k", type=int)
    ap.add_argument("--top_p", type=float)
    ap.add_argument("--cfg_scale", type=float, help="classifier-free guidance scale (conditioned entries)")
    ap.add_argument("--cfg_schedule", choices=["constant", "linear"])
    ap.add_argument("--order", choices=["raster", "random"])
    ap.add_argument("--steps", type=int, help="masked / next-scale paradigms: decoding steps per segment")
    ap.add_argument("--length", type=int, help="streams: tokens per sample; variable-length targets: the limit")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights even if EMA weights exist")
    ap.add_argument("--last", action="store_true", help="use the newest checkpoint even if the run kept a best one")
    args = ap.parse_args(argv)
    import torch

    from .task import load_run

    device = _device(args.device)
    task = load_run(args.run_dir, device=device, ema=not args.no_ema, best=not args.last)
    if task.cfg.task != "generative":
        return _sample_tokenizer(task, args, device)
    s = task.cfg.sample
    knobs = {k: getattr(args, k) if getattr(args, k) is not None else getattr(s, k)
             for k in ("temperature", "top_k", "top_p", "cfg_scale", "cfg_schedule", "order", "steps")}
    if not knobs["steps"]:
        knobs["steps"] = None  # the paradigm's default
    entry, conds, nrow, prompt = choose_conditions(task, args, args.n or s.num)
    e = task.entry(entry)
    if not e.cond and knobs["cfg_scale"] != 1.0 and args.cfg_scale is None:
        knobs["cfg_scale"] = 1.0  # the config's default guidance does not apply to an unconditioned entry
    seed = s.seed if args.seed is None else args.seed
    g = torch.Generator(device=device) if device.type != "cpu" else torch.Generator()
    g.manual_seed(seed)
    from tqdm.auto import tqdm

    bar = tqdm(total=1, desc="sampling", unit="sample", dynamic_ncols=True, mininterval=0.5)

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)
    n = len(conds) if conds is not None else (args.n or s.num)
    length = args.length if args.length is not None else (s.length if e.stream else None)
    results = task.generate(entry=e.name, conds=conds, n=n, prompt=prompt, length=length, generator=g,
                            batch_size=s.batch_size, progress=progress, **knobs)
    bar.close()
    suffix = task.adapters[e.target[0]].sample_suffix
    out = Path(args.out or Path(args.run_dir) / "samples" / f"samples{suffix}")
    for path in task.write_samples(e.name, results, out, conds=conds, nrow=nrow, prompt=prompt):
        print(f"wrote {path}")
    if n <= 20:  # short text results are printed too
        for r in results:
            for k in e.target:
                if isinstance(r[k], str):
                    print((prompt or "") + r[k])
    return 0


def choose_conditions(task, args, n: int):
    """Which mixture entry a command line asks for, and its conditions: (entry, conds, nrow, prompt)."""
    entries = task.entries if not args.entry else [task.entry(args.entry)]

    def reads(e, method):
        return [k for k in e.cond if hasattr(task.adapters[k], method)]

    def one(kind: str, method: str):
        found = [(e, reads(e, method)) for e in entries if len(e.cond) == 1 and reads(e, method)]
        if not found:
            have = "; ".join(f"{e.name}: {', '.join(e.cond) or 'no condition'}" for e in task.entries)
            raise SeqgenError(f"this model has no condition that reads {kind}; its entries are ({have})")
        return found[0][0], found[0][1][0]
    if args.image:
        e, k = one("an image file", "read_file")
        item = task.adapters[k].read_file(args.image)
        return e.name, [{k: item}] * n, None, None
    if args.labels:
        e, k = one("class labels", "default_prompts")
        ids = [task.adapters[k].from_prompt(x) for x in args.labels.split(",")]
        return e.name, [{k: y} for y in ids], None, None
    if args.prompt is not None:
        streams = [e for e in entries if e.stream]
        conditioned = [e for e in entries if len(e.cond) == 1 and reads(e, "from_prompt")
                       and not hasattr(task.adapters[e.cond[0]], "default_prompts")]
        if conditioned:
            e, k = conditioned[0], conditioned[0].cond[0]
            return e.name, [{k: task.adapters[k].from_prompt(args.prompt)}] * n, None, None
        if streams:
            return streams[0].name, None, None, args.prompt
        e, k = one("a text prompt", "from_prompt")
        return e.name, [{k: task.adapters[k].from_prompt(args.prompt)}] * n, None, None
    e = entries[0]
    if e.stream:
        return e.name, None, None, task.cfg.sample.prompt
    if not e.cond:
        return e.name, None, None, None
    if len(e.cond) == 1 and hasattr(task.adapters[e.cond[0]], "default_prompts"):
        items, nrow = task.adapters[e.cond[0]].default_prompts(n)
        return e.name, [{e.cond[0]: x} for x in items], nrow, None
    recs = e.records["heldout"]  # conditions of the first n held-out records
    N = len(next(iter(recs.values())))
    return e.name, [{c: recs[e.field_of(c)][i % N] for c in e.cond} for i in range(n)], None, None


def _sample_tokenizer(task, args, device) -> int:
    out = Path(args.out or Path(args.run_dir) / "samples" / "reconstructions.png")
    path = task.write_reconstructions(out, n=args.n or 32, device=device)
    print(f"wrote {path} (top: held-out originals, bottom: reconstructions)")
    return 0


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------------ eval
def cmd_eval(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="seqgen eval", description="Evaluate a run on its held-out split.")
    ap.add_argument("run_dir")
    ap.add_argument("--out", help="JSON file (default: RUN_DIR/eval.json)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--samples", type=int, help="samples per mixture entry for sample-based metrics")
    ap.add_argument("--cfg_scale", type=float)
    ap.add_argument("--no-compressors", action="store_true")
    ap.add_argument("--dynamic", action="store_true",
                    help="text: also report dynamic evaluation (learning rate chosen on the validation split)")
    ap.add_argument("--dynamic_lr", type=float, help="text: dynamic evaluation with this one learning rate "
                    "(no choice on validation; for runs without a validation split)")
    ap.add_argument("--no-ema", action="store_true")
    ap.add_argument("--last", action="store_true", help="use the newest checkpoint even if the run kept a best one")
    args = ap.parse_args(argv)
    from .evaluate import evaluate_run, format_table

    results = evaluate_run(args.run_dir, device=_device(args.device), ema=not args.no_ema,
                           samples=args.samples, cfg_scale=args.cfg_scale,
                           compressors=False if args.no_compressors else None, best=not args.last,
                           dynamic=True if (args.dynamic or args.dynamic_lr is not None) else None,
                           dynamic_lr=args.dynamic_lr)
    out = Path(args.out or Path(args.run_dir) / "eval.json")
    out.write_text(json.dumps(results, indent=2))
    print(format_table(results))
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------------------ list / data
def cmd_list(argv: list[str]) -> int:
    from .ops.attention import available_impls
    from .registry import REGISTRIES

    if not argv or argv[0] != "ops":
        for kind, reg in REGISTRIES.items():
            print(f"{kind:11s} {', '.join(reg.names())}")
    print("attention   " + ", ".join(f"{k}: {v}" for k, v in available_impls().items()))
    return 0


def cmd_data(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="seqgen data", description="List or fetch the sample data sets.")
    sub = ap.add_subparsers(dest="action", required=True)
    sub.add_parser("list")
    g = sub.add_parser("get")
    g.add_argument("names", nargs="+")
    args = ap.parse_args(argv)
    from .datasets import data_dir, fetch_dataset
    from .registry import DATASETS

    if args.action == "list":
        print(f"cache: {data_dir()}")
        for name in DATASETS.names():
            doc = (DATASETS.get(name).__doc__ or "").strip().splitlines()[0]
            print(f"  {name:13s} {doc}")
        return 0
    failed = 0
    for name in args.names:
        try:
            print(fetch_dataset(name))
        except SeqgenError as e:
            print(f"{name}: cannot fetch: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "list": cmd_list, "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    _setup_logging(verbose)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    try:
        return COMMANDS[argv[0]](argv[1:])
    except SeqgenError as e:
        print(f"seqgen {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
