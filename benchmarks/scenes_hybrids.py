"""AR / diffusion hybrids in one sequence, side by side with the all-ar MNIST-scenes model.

Each hybrid is ``examples/configs/mnist_scenes.yaml`` with the scene arranged differently:

    showo        examples/configs/mnist_scenes_showo.yaml        captions next-token, scenes masked (MaskGIT, 8 steps)
    transfusion  examples/configs/mnist_scenes_transfusion.yaml  captions next-token, continuous scene latents with a
                                                                 flow head, bidirectional inside the scene (MAR-style
                                                                 decoding, 8 steps)

Protocol: the all-ar file's.  Each config is trained from nothing by ``seqgen train`` (its tokenizer too,
when missing) alone on the machine with the config's threads (all cores) and time budget (720 s), then
scored by ``seqgen eval`` on the held-out scenes (1,000 samples per metric: text->image both digits right
at temperature 1, guided and greedy; image->text exact digit pair).  The all-ar figures are read from an
earlier run of the same protocol on the same kind of CPU (``--reference``, default the round-6 JSONs),
so the table compares like with like; no setting of the hybrids was chosen on held-out scenes.

    python benchmarks/scenes_hybrids.py --out benchmarks/results/mnist_scenes_hybrids.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import print_table  # noqa: E402

HYBRIDS = {"showo": "mnist_scenes_showo.yaml", "transfusion": "mnist_scenes_transfusion.yaml",
           "ar": "mnist_scenes.yaml"}  # ar: the all-ar file again, under the hybrids' protocol
REFERENCE = {"eval": "benchmarks/results/mnist_scenes_epyc_r6_eval.json",
             "train": "benchmarks/results/mnist_scenes_epyc_r6_train_summary.json"}


def row(name: str, ev: dict, train: dict) -> dict:
    t2i, i2t = ev["text_to_image"], ev["image_to_text"]
    scene = t2i.get("scene", {})
    return {"model": name, "parameters": ev.get("parameters"), "train_steps": train.get("steps"),
            "t2i_T1": t2i["temperature_1"]["accuracy"], "t2i_guided": t2i["guided"]["accuracy"],
            "t2i_greedy": t2i.get("greedy", {}).get("accuracy"),
            "t2i_guided_unseen": t2i["guided"].get("accuracy_unseen"),
            "i2t_greedy": i2t["greedy"]["exact"], "i2t_T1": i2t["temperature_1"]["exact"],
            "scene_bits_per_dim": scene.get("bits_per_dim"), "scene_loss_per_token": scene.get("loss_per_token"),
            "caption_bits_per_byte": i2t["caption"]["bits_per_byte"],
            "t2i_seconds_1000": t2i["temperature_1"]["seconds"], "nll_kind": ev.get("nll_kind", "exact")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="showo,transfusion")
    ap.add_argument("--runs", default=str(ROOT / "runs"))
    ap.add_argument("--skip_train", action="store_true", help="score runs that exist")
    ap.add_argument("--skip_eval", action="store_true", help="read RUN/eval.json where it exists")
    ap.add_argument("--run", action="append", default=[], metavar="MODEL=DIR", help="the run folder of a model")
    ap.add_argument("--threads", type=int, default=0,
                    help="train.threads for each run (0: the config's, all cores); the note says which was used")
    ap.add_argument("--note", default="", help="how the runs were made (kept in the JSON)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mnist_scenes_hybrids.json"))
    args = ap.parse_args()
    rows, detail = [], {}
    ref_eval = json.loads((ROOT / REFERENCE["eval"]).read_text())
    ref_train = json.loads((ROOT / REFERENCE["train"]).read_text())
    rows.append(row("all-ar (mnist_scenes.yaml)", ref_eval, ref_train))
    for name in args.models.split(","):
        cfg = ROOT / "examples" / "configs" / HYBRIDS[name]
        run = Path(dict(r.split("=", 1) for r in args.run).get(name, Path(args.runs) / cfg.stem))
        seqgen = [sys.executable, "-m", "seqgen.cli"]
        t0 = time.time()
        if not args.skip_train:
            extra = [f"--train.threads={args.threads}"] if args.threads else []
            subprocess.run(seqgen + ["train", str(cfg), "--no-progress", "--overwrite", *extra, "--out", str(run)],
                           check=True, cwd=ROOT)
        wall = time.time() - t0
        if not (args.skip_eval and (run / "eval.json").exists()):
            subprocess.run(seqgen + ["eval", str(run)], check=True, cwd=ROOT)
        ev = json.loads((run / "eval.json").read_text())
        train = json.loads((run / "train_summary.json").read_text())
        r = row(f"{name} ({cfg.name})", ev, train)
        r["command_seconds"] = None if args.skip_train else wall
        rows.append(r)
        detail[name] = {"eval": ev, "train_summary": train}
    cols = ["model", "train_steps", "t2i_T1", "t2i_guided", "t2i_greedy", "i2t_greedy", "i2t_T1", "scene_bits_per_dim",
            "scene_loss_per_token", "caption_bits_per_byte"]
    print_table(rows, cols)
    import torch

    from common import device_name

    out = {"benchmark": "scenes_hybrids", "device": device_name(torch.device("cpu")), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows, "note": args.note,
           "reference": REFERENCE, "detail": detail}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
