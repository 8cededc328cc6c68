"""Multi-domain runs: DDP ranks share out examples, weighted mixtures of entries (and their resume),
resume refused across seeds, a two-entry run over one source (both directions, scored per entry and
domain), and `seqgen sample` on a text <-> image run (MNIST scenes)."""
import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from seqgen.checkpoint import CheckpointError
from seqgen.cli import main
from seqgen.config import RunConfig
from seqgen.data import ExampleSampler, MixtureSampler
from seqgen.task import GenerativeTask, load_run
from seqgen.train import train

from conftest import tiny_digits_config

DIGITS = {"name": "digits", "heldout": 300}
N_TRAIN, N_HELDOUT = 1797 - 300, 300


def two_way_config(weights=(3.0, 1.0), **over) -> dict:
    """One digits source, two recipes: A [label | image] and B [image | label] (a classifier head)."""
    return tiny_digits_config(
        heads={"image": "categorical", "label": "categorical"},
        mixture=[{"name": "A", "source": DIGITS, "cond": ["label"], "target": ["image"], "weight": weights[0]},
                 {"name": "B", "source": DIGITS, "cond": ["image"], "target": ["label"], "weight": weights[1]}],
        **over)


def first_epoch(draws: list[int], n: int, rank: int, world: int) -> list[int]:
    """The part of a rank's index sequence that belongs to epoch 0 (its share of the permutation)."""
    share = len(range(rank, n, world))
    assert len(draws) >= share, "draw more batches"
    return draws[:share]


# ------------------------------------------------------------------------------ a. DDP shares
@pytest.mark.parametrize("n, world", [(10, 2), (11, 2), (97, 3)])
def test_ranks_draw_disjoint_shares_of_every_epoch(n, world):
    epochs = {0: [], 1: []}
    for rank in range(world):
        s = ExampleSampler(n, batch_size=4, seed=5, rank=rank, world=world)
        share = len(range(rank, n, world))
        drawn = torch.cat([s.next() for _ in range(math.ceil(2 * share / 4) + 1)]).tolist()
        epochs[0].append(drawn[:share])
        epochs[1].append(drawn[share:2 * share])
        assert len(set(drawn[:share])) == share  # no example twice in one epoch
    for e, shares in epochs.items():
        together = [i for s in shares for i in s]
        assert sorted(together) == list(range(n)), e  # disjoint, and together every example once
    assert epochs[0] != epochs[1]  # a fresh permutation each epoch
    # what each rank permuting all N on its own would give: overlapping shares (this test's point)
    old = [torch.randperm(n, generator=torch.Generator().manual_seed(rank))[:n // world].tolist()
           for rank in range(world)]
    assert len({i for s in old for i in s}) < sum(len(s) for s in old)


def test_a_rank_needs_an_example_of_its_own():
    from seqgen.types import SeqgenError

    with pytest.raises(SeqgenError, match="between 3 processes"):
        ExampleSampler(2, 4, rank=0, world=3)
    with pytest.raises(SeqgenError, match="rank 2 outside"):
        ExampleSampler(10, 4, rank=2, world=2)


def test_task_samplers_share_every_entry_between_ranks():
    task = GenerativeTask(RunConfig.from_dict(two_way_config()))
    assert [e.size("train") for e in task.entries] == [N_TRAIN, N_TRAIN]
    per_rank = []
    for rank in range(2):
        s = task.train_sampler(16, seed=0, rank=rank, world=2)
        by_entry = {0: [], 1: []}
        for _ in range(260):  # entry B (weight 1 of 4) gets ~1040 draws: more than its 749 of an epoch
            for e, i in s.next():
                by_entry[e].append(i)
        per_rank.append({e: first_epoch(v, N_TRAIN, rank, 2) for e, v in by_entry.items()})
    for e in (0, 1):
        a, b = per_rank[0][e], per_rank[1][e]
        assert not set(a) & set(b) and sorted(a + b) == list(range(N_TRAIN)), e
    assert per_rank[0][0] != per_rank[0][1]  # each entry shuffles on its own


# ------------------------------------------------------------------------------ b. weights and resume
def test_mixture_draws_entries_by_weight_and_resumes_the_same_draws():
    task = GenerativeTask(RunConfig.from_dict(two_way_config()))
    s = task.train_sampler(32, seed=0)
    batches = [s.next() for _ in range(200)]
    assert all(len(b) == 32 for b in batches)
    share_a = np.mean([e == 0 for b in batches for e, _ in b])
    assert abs(share_a - 0.75) < 0.03, share_a  # 3:1 (a 1:1 mixture gives 0.5)
    even = GenerativeTask(RunConfig.from_dict(two_way_config(weights=(1.0, 1.0)))).train_sampler(32, seed=0)
    share_even = np.mean([e == 0 for _ in range(200) for e, _ in even.next()])
    assert abs(share_even - 0.5) < 0.03, share_even

    state = s.state_dict()
    assert all(isinstance(v, int) for v in state.values())  # the trainer gathers it across ranks as integers
    ahead = [s.next() for _ in range(5)]
    resumed = task.train_sampler(32, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert [resumed.next() for _ in range(5)] == ahead
    fresh = task.train_sampler(32, seed=0)
    assert [fresh.next() for _ in range(5)] != ahead  # the state is what made them equal
    other = task.train_sampler(32, seed=1)
    assert other.next() != batches[0]

    # a mixed draw becomes one batch with both entries' targets: 64 pixels per A draw, one label per B draw
    draw = batches[0]
    n_a = sum(e == 0 for e, _ in draw)
    assert 0 < n_a < 32
    _, m = task.model.loss(task.make_batch(draw, generator=torch.Generator().manual_seed(0)))
    assert int(m["image/count"]) == 64 * n_a and int(m["label/count"]) == 32 - n_a


def test_accumulated_micro_batches_of_a_mixture_give_the_gradient_of_one_large_batch():
    """Gradient accumulation over micro-batches that hold different shares of each domain (24 draws
    mostly of A, then 8 of B): with the step's per-domain token counts as denominators, the summed
    micro-batch losses and gradients equal one large batch's; halving each micro-batch's own token mean
    (what accumulation did before) does not."""
    cfg = RunConfig.from_dict(two_way_config(weights=(1.0, 1.0), paradigm={"name": "ar", "cond_dropout": 0.0}))
    torch.manual_seed(0)
    task = GenerativeTask(cfg)
    model = task.model
    draw = sorted(task.train_sampler(32, seed=0).next())
    parts = [draw[:24], draw[24:]]
    assert {e for e, _ in parts[1]} == {1} and sum(e == 1 for e, _ in parts[0]) > 0

    def make(d):
        return task.make_batch(d, generator=torch.Generator().manual_seed(0))

    def grads(backward) -> tuple[list[torch.Tensor], float]:
        model.zero_grad(set_to_none=True)
        loss = backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None], loss

    def big():
        loss, _ = model.loss(make(draw))
        loss.backward()
        return float(loss.detach())

    batches = [make(d) for d in parts]
    den = {k: sum(model.target_counts(b)[k] for b in batches) for k in ("image", "label")}
    assert den == model.target_counts(make(draw))

    def accumulated():
        total = 0.0
        for b in batches:
            loss, _ = model.loss(b, den)
            loss.backward()
            total += float(loss.detach())
        return total

    def halved():
        total = 0.0
        for b in batches:
            loss, _ = model.loss(b)
            (loss / 2).backward()
            total += float(loss.detach()) / 2
        return total

    g_big, l_big = grads(big)
    g_acc, l_acc = grads(accumulated)
    g_half, l_half = grads(halved)
    assert l_acc == pytest.approx(l_big, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g_acc, g_big))
    assert abs(l_half - l_big) > 1e-2 * l_big
    assert not all(torch.allclose(a, b, rtol=1e-2, atol=1e-5) for a, b in zip(g_half, g_big))


def _curve(run_dir) -> list[tuple[int, float]]:
    import csv

    with open(run_dir / "logs" / "metrics.csv") as f:
        return [(int(r["step"]), float(r["train_loss"])) for r in csv.DictReader(f) if r.get("train_loss")]


def test_stopped_two_entry_run_resumes_on_the_same_curve(tmp_path):
    cfg = RunConfig.from_dict(two_way_config(train={"steps": 12, "ckpt_every": 5}))
    train(cfg, tmp_path / "full", progress_bar=False)
    train(cfg, tmp_path / "part", progress_bar=False, stop_after=5)
    assert _curve(tmp_path / "part")[-1][0] == 5
    train(cfg, tmp_path / "part", progress_bar=False, resume=True)
    full = _curve(tmp_path / "full")
    assert len(full) == 12 and _curve(tmp_path / "part") == full


@pytest.mark.slow
def test_two_process_ddp_two_entry_run_keeps_replicas_identical(tmp_path):
    """Each rank draws its own mixture picks and its own share of every entry; both states are saved."""
    from conftest import run_ddp

    from seqgen.checkpoint import latest_checkpoint, read_train_state

    cfg = two_way_config(train={"steps": 6, "devices": 2, "strategy": "ddp", "accelerator": "cpu"})
    summary, out = run_ddp(cfg, tmp_path)
    assert summary["world_size"] == 2 and summary["replicas_identical"] is True and summary["steps"] == 6
    states = read_train_state(latest_checkpoint(out))["sampler"]
    assert isinstance(states, list) and len(states) == 2
    assert set(states[0]) == {"draws", "0.epoch", "0.cursor", "1.epoch", "1.cursor"}
    assert states[0]["draws"] == states[1]["draws"] == 6
    assert states[0] != states[1]  # different picks per rank: the entries' cursors differ
    # they are the states a rank's sampler reaches after 6 batches
    task = GenerativeTask(RunConfig.from_dict(two_way_config()))
    for rank in range(2):
        s = task.train_sampler(16, seed=0, rank=rank, world=2)
        for _ in range(6):
            s.next()
        assert s.state_dict() == states[rank]


def test_mixture_sampler_rejects_mismatched_weights():
    from seqgen.types import SeqgenError

    with pytest.raises(SeqgenError, match="one weight per entry"):
        MixtureSampler([ExampleSampler(10, 2)], [1.0, 2.0], 2)


# ------------------------------------------------------------------------------ c. seed-checked resume
def test_resume_with_a_different_seed_is_refused(tmp_path):
    cfg = tiny_digits_config(train={"steps": 4})
    train(RunConfig.from_dict(cfg), tmp_path / "r", progress_bar=False)
    with pytest.raises(CheckpointError, match="seed: 0 -> 1"):
        train(RunConfig.from_dict({**cfg, "seed": 1, "train": {**cfg["train"], "steps": 6}}), tmp_path / "r",
              progress_bar=False, resume=True)
    assert train(RunConfig.from_dict({**cfg, "train": {**cfg["train"], "steps": 6}}), tmp_path / "r",
                 progress_bar=False, resume=True)["steps"] == 6


# ------------------------------------------------------------------------------ d. a two-entry run
def test_two_entry_run_scores_every_entry_and_domain(tmp_path, capsys):
    cfg = two_way_config(weights=(1.0, 1.0), train={"steps": 40, "precision": "32-true"}, eval={"samples": 20})
    rc = RunConfig.from_dict(cfg)
    torch.manual_seed(rc.seed)
    before = GenerativeTask(rc).evaluate_nll()
    summary = train(rc, tmp_path / "r", progress_bar=False)
    task = load_run(tmp_path / "r")
    assert task.keys == ["label", "image"] and sorted(task.model.heads) == ["image", "label"]
    res = task.evaluate_nll()
    assert {"A/image/nll", "A/image/bits_per_dim", "B/label/nll", "B/label/bits_per_label"} <= set(res)
    assert "bits_per_dim" not in res and "bits_per_label" not in res  # two scored domains: no plain key
    assert res["heldout_tokens"] == N_HELDOUT * 64 + N_HELDOUT  # every pixel of A, every label of B
    mean = (res["A/image/nll"] * N_HELDOUT * 64 + res["B/label/nll"] * N_HELDOUT) / res["heldout_tokens"]
    assert res["heldout_nll"] == pytest.approx(mean, rel=1e-6)
    assert res["A/image/bits_per_dim"] == pytest.approx(res["A/image/nll"] / math.log(2), rel=1e-6)
    assert res["B/label/bits_per_label"] == pytest.approx(res["B/label/nll"] / math.log(2), rel=1e-6)
    for k, gain in (("A/image/bits_per_dim", 0.5), ("B/label/bits_per_label", 0.05)):
        assert summary[k] == pytest.approx(res[k], rel=1e-5)  # the trainer scored the same weights
        assert res[k] < before[k] - gain, k  # both directions learnt (untrained: 4.25 and 3.49)

    null = task.evaluate_nll(null=True)
    assert null["heldout_tokens"] == res["heldout_tokens"]
    for k in ("A/image/bits_per_dim", "B/label/bits_per_label"):
        assert null[k] != res[k], k  # the null condition really replaced the condition
    only_b = task.evaluate_nll(entries=["B"])
    assert only_b["bits_per_label"] == only_b["B/label/bits_per_label"] == pytest.approx(res["B/label/bits_per_label"])
    assert not any(k.startswith("A/") for k in only_b)

    assert main(["eval", str(tmp_path / "r"), "--device", "cpu"]) == 0
    ev = json.loads((tmp_path / "r" / "eval.json").read_text())
    a, b = ev["A"], ev["B"]
    assert (a["cond"], a["target"], b["cond"], b["target"]) == (["label"], ["image"], ["image"], ["label"])
    assert a["image"]["bits_per_dim"] == pytest.approx(res["A/image/bits_per_dim"], rel=1e-5)
    assert a["image"]["bits_per_dim_null_condition"] == pytest.approx(null["A/image/bits_per_dim"], rel=1e-5)
    assert b["label"]["bits_per_label"] == pytest.approx(res["B/label/bits_per_label"], rel=1e-5)
    assert b["label"]["bits_per_label_null_condition"] == pytest.approx(null["B/label/bits_per_label"], rel=1e-5)
    assert a["temperature_1"]["samples"] == a["guided"]["samples"] == 20  # digits scores generated images
    assert "temperature_1" not in b and "not scored" in b["sample_scores"]  # ... but not generated labels
    out = capsys.readouterr().out
    assert "A: image bits_per_dim" in out and "B: label bits_per_label" in out

    # the command line picks the entry from the condition it is given
    assert main(["sample", str(tmp_path / "r"), "--labels", "3,7", "--out", str(tmp_path / "l.png")]) == 0
    assert Image.open(tmp_path / "l.png").size == (36, 70)  # two 8x8 images, one a row (cells scaled to 32 px)
    png = tmp_path / "digit.png"
    Image.fromarray((task.entry("B").records["heldout"]["image"][0] * 255).astype(np.uint8)).save(png)
    assert main(["sample", str(tmp_path / "r"), "--image", str(png), "--n", "3", "--out", str(tmp_path / "y.txt")]) == 0
    labels = (tmp_path / "y.txt").read_text().split()
    assert len(labels) == 3 and all(0 <= int(y) < 10 for y in labels)
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "r"), "--prompt", "a seven"]) == 2  # no text condition: labels only
    assert "not a class id" in capsys.readouterr().err


# ------------------------------------------------------------------------------ e. text <-> image CLI
@pytest.fixture(scope="module")
def scenes_run(tmp_path_factory):
    """A tiny caption <-> scene run (pixels, 2 levels: 1568 tokens a scene), trained for 2 steps."""
    from seqgen.datasets import MNIST, DataUnavailableError

    try:
        MNIST().fetch()
    except DataUnavailableError as e:
        pytest.skip(f"MNIST is not available ({e}); `seqgen data get mnist` fetches it")
    tmp = tmp_path_factory.mktemp("scenes")
    source = {"name": "mnist_scenes", "train_scenes": 8, "heldout_scenes": 2}
    cfg = {"name": "tiny_scenes", "seed": 0,
           "domains": {"caption": {"adapter": "text", "max_length": 40},
                       "scene": {"adapter": "image", "height": 28, "width": 56, "levels": 2}},
           "heads": {"caption": "categorical", "scene": "categorical"},
           "mixture": [{"name": "text_to_image", "source": source, "cond": ["caption"], "target": ["scene"],
                        "fields": {"scene": "image"}},
                       {"name": "image_to_text", "source": source, "cond": ["scene"], "target": ["caption"],
                        "fields": {"scene": "image"}}],
           "backbone": {"name": "transformer", "dim": 16, "layers": 1, "heads": 2},
           "paradigm": {"name": "ar"},
           "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "eval_every": 0, "log_every": 1,
                     "ckpt_every": 2},
           "sample": {"num": 1}}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp / "run"
    assert main(["train", str(path), "--out", str(run), "--no-progress"]) == 0
    return run


def test_sample_a_scene_from_a_caption(scenes_run, tmp_path, capsys):
    out = tmp_path / "scene.png"
    assert main(["sample", str(scenes_run), "--prompt", "a seven and a two", "--n", "1", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    im = Image.open(out)
    assert im.size == (56 + 4, 28 + 4)  # one 28x56 scene with its 2 px frame
    cell = np.asarray(im.convert("L"))[2:30, 2:58]
    assert set(np.unique(cell).tolist()) <= {0, 255}  # two grey levels


def test_caption_a_scene_file(scenes_run, tmp_path, capsys):
    png = tmp_path / "scene.png"
    scene = load_run(scenes_run).entry("image_to_text").records["heldout"]["image"][0]
    Image.fromarray((scene * 255).astype(np.uint8)).save(png)
    out = tmp_path / "caption.txt"
    assert main(["sample", str(scenes_run), "--image", str(png), "--n", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    text = out.read_text(encoding="utf-8")
    head, caption = text.split("\n", 1)
    assert head == "[scene: <ndarray(28, 56)>]"  # the condition, then the generated caption
    caption = caption[:-1]  # the file ends with a newline
    assert len(caption) <= 40  # text.max_length bytes (an untrained model's bytes need not be UTF-8)
    assert caption + "\n" in printed  # short results are printed too


def test_sample_refuses_a_wrong_image_or_prompt(scenes_run, tmp_path, capsys):
    png = tmp_path / "square.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    assert main(["sample", str(scenes_run), "--image", str(png)]) == 2
    err = capsys.readouterr().err
    assert "28x28" in err and "56x28" in err
    assert main(["sample", str(scenes_run), "--image", str(tmp_path / "missing.png")]) == 2
    assert "cannot read" in capsys.readouterr().err
    # the image-to-text entry has no text condition
    assert main(["sample", str(scenes_run), "--entry", "image_to_text", "--prompt", "a seven and a two"]) == 2
    err = capsys.readouterr().err
    assert "no condition that reads a text prompt" in err and "image_to_text: scene" in err
    assert main(["sample", str(scenes_run), "--entry", "text_to_image", "--image", str(png)]) == 2
    assert "no condition that reads an image file" in capsys.readouterr().err
