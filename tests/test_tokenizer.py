"""The FSQ patch tokenizer: the quantizer's algebra, the autoencoder's shapes and errors, a tiny training
run through the normal trainer, and its use by the image domain (codes cached on disk)."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from seqgen.config import RunConfig
from seqgen.domains.image import ImageDomain
from seqgen.domains.tokenizers import load_tokenizer
from seqgen.domains.tokenizers.fsq import FSQ, FSQTokenizer
from seqgen.types import SeqgenError

LEVELS = [8, 5, 5, 5]


# ------------------------------------------------------------------------------------------ quantizer
def test_indices_and_codes_round_trip_for_every_code():
    q = FSQ(LEVELS)
    assert q.codebook_size == 1000
    idx = torch.arange(q.codebook_size)
    codes = q.indices_to_codes(idx)  # (1000, 4)
    assert torch.equal(q.codes_to_indices(codes), idx)
    assert (codes >= 0).all() and (codes < torch.tensor(LEVELS)).all()
    # every code is a distinct point of the grid
    assert len({tuple(v) for v in q.indices_to_values(idx).tolist()}) == 1000
    # quantizing a grid point gives back its own index
    zhat = q.indices_to_values(idx)  # (1000, 4) in [-1, 1]
    z = torch.atanh(((zhat * q.half_width) - q.centre) / q.half_l) - q.shift  # invert the bound
    assert torch.equal(q(z)[1], idx)


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [2, 3, 4, 7]])
def test_quantized_values_lie_on_the_grid_and_every_level_is_reached(levels):
    q = FSQ(levels)
    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn(2000, len(levels), generator=g) * 4, torch.full((1, len(levels)), 1e4),
                   torch.full((1, len(levels)), -1e4)])
    zhat, idx = q(z)
    ints = zhat * q.half_width  # the integers -(L // 2) .. (L - 1) // 2
    assert torch.allclose(ints, ints.round(), atol=1e-5)
    lo, hi = -(torch.tensor(levels) // 2), (torch.tensor(levels) - 1) // 2
    assert (ints.round() >= lo).all() and (ints.round() <= hi).all()
    for i, L in enumerate(levels):
        assert len(ints[:, i].round().unique()) == L  # saturating inputs reach both ends, nothing beyond
    assert torch.allclose(q.indices_to_values(idx), zhat)  # indices name the quantized vectors exactly
    assert torch.equal(q(torch.zeros(1, len(levels)))[0], torch.zeros(1, len(levels)))  # bound(0) = 0


def test_straight_through_gradient_is_the_gradient_of_the_bound():
    q = FSQ(LEVELS)
    z = torch.randn(64, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w = torch.randn(64, 4)
    (q(z)[0] * w).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    ((q.bound(z2) / q.half_width) * w).sum().backward()  # rounding treated as identity
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert torch.allclose(z.grad, z2.grad)


def test_bad_levels_are_rejected():
    with pytest.raises(SeqgenError, match="levels"):
        FSQ([8, 1])
    with pytest.raises(SeqgenError, match="levels"):
        FSQ([])


# ------------------------------------------------------------------------------------------ autoencoder
def test_tokenizer_shapes_padding_and_range():
    tk = FSQTokenizer(FSQTokenizer.Config(patch=2, levels=[5, 5, 5], width=8), height=7, width=9, channels=3).eval()
    assert tk.grid == (4, 5) and tk.vocab_size == 125  # 7x9 pads to 8x10
    x = torch.rand(3, 7, 9, 3, generator=torch.Generator().manual_seed(0))
    codes = tk.encode(x)
    assert codes.shape == (3, 4, 5) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 125
    y = tk.decode(codes)
    assert y.shape == (3, 7, 9, 3) and 0 <= float(y.min()) and float(y.max()) <= 1
    recon, idx = tk(x)
    assert torch.equal(idx, codes) and torch.allclose(recon, y, atol=1e-6)
    assert torch.equal(tk.encode(x[:1]), codes[:1])  # a code depends on its own image only



def test_encode_in_slices_equals_one_batch(monkeypatch):
    """FSQTokenizer.encode runs the encoder in slices of ENCODE_SLICE images: the codes are those of one
    batch, for a batch that is not a multiple of the slice, and for an empty one"""
    import seqgen.domains.tokenizers.fsq as fsq

    tk = FSQTokenizer(FSQTokenizer.Config(patch=2, levels=[5, 5, 5], width=8), height=6, width=6).eval()
    x = torch.rand(11, 6, 6, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(fsq, "ENCODE_SLICE", 4)
    sliced = tk.encode(x)
    z = tk.encoder(tk._pad(x.unsqueeze(1))).permute(0, 2, 3, 1)
    assert torch.equal(sliced, tk.quantizer(z)[1])
    assert tk.encode(x[:0]).shape == (0, 3, 3)

def test_tokenizer_rejects_bad_input():
    tk = FSQTokenizer(FSQTokenizer.Config.tiny(), height=8, width=8, channels=1)
    with pytest.raises(SeqgenError, match=r"\(N, 8, 8, 1\)"):
        tk.encode(torch.rand(2, 8, 7, 1))
    with pytest.raises(SeqgenError, match=r"\[0, 1\]"):
        tk.encode(torch.rand(2, 8, 8, 1) * 3)
    with pytest.raises(SeqgenError, match="floats"):
        tk.encode(torch.ones(2, 8, 8, 1, dtype=torch.long))
    with pytest.raises(SeqgenError, match=r"0\.\.124"):
        tk.decode(torch.full((1, 4, 4), 125))
    with pytest.raises(SeqgenError, match=r"\(N, 4, 4\)"):
        tk.decode(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(SeqgenError, match="integer"):
        tk.decode(torch.zeros(1, 4, 4))
    with pytest.raises(SeqgenError, match="power of 2"):
        FSQTokenizer(FSQTokenizer.Config(patch=3), height=8, width=8)


def test_config_section_is_checked():
    base = {"task": "tokenizer", "data": {"name": "digits"}, "tokenizer": {"name": "fsq", "levels": [4, 4]}}
    cfg = RunConfig.from_dict(base)
    assert cfg.component("tokenizer") == ("fsq", {**{k: v for k, v in vars(FSQTokenizer.Config()).items()},
                                                  "levels": [4, 4]})
    with pytest.raises(SeqgenError):
        RunConfig.from_dict({**base, "tokenizer": {"name": "fsq", "patchsize": 4}})


# ------------------------------------------------------------------------------------------ a trained run
def tokenizer_config(steps=80, **train):
    """A tiny tokenizer run on the 8x8 digits (about a second on a CPU; on the CPU even where a GPU is)."""
    return RunConfig.from_dict({
        "name": "tiny_fsq", "seed": 0, "task": "tokenizer",
        "data": {"name": "digits", "heldout": 300},
        "tokenizer": {"name": "fsq", **vars(FSQTokenizer.Config.tiny())},
        "train": {"steps": steps, "batch_size": 32, "lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.0,
                  "eval_every": 0, "log_every": 10, "ckpt_every": 1000, "ema": 0.9, "accelerator": "cpu",
                  "precision": "32-true", **train},  # float32 everywhere: evaluations of the same weights agree
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from seqgen.train import train

    run_dir = tmp_path_factory.mktemp("fsq") / "run"
    summary = train(tokenizer_config(), run_dir, progress_bar=False)
    return run_dir, summary


def heldout_digits() -> np.ndarray:
    from seqgen.datasets import Digits

    return Digits().load().heldout  # (300, 8, 8)


def test_trained_tokenizer_beats_the_mean_image(trained):
    run_dir, summary = trained
    x = heldout_digits()
    per_pixel_variance = float(x.var(axis=0).mean())  # the MSE of predicting the held-out mean image
    assert summary["recon_mse"] < 0.4 * per_pixel_variance, (summary["recon_mse"], per_pixel_variance)
    assert summary["mean_image_mse"] >= per_pixel_variance
    assert summary["recon_psnr"] == pytest.approx(10 * math.log10(1 / summary["recon_mse"]))
    assert 0.1 < summary["codebook_usage"] <= 1 and 1 < summary["code_perplexity"] <= 125
    ckpt = run_dir / "checkpoints" / "step_00000080"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "ema.safetensors").exists()


def test_load_tokenizer_and_the_image_domain(trained):
    run_dir, summary = trained
    tk = load_tokenizer(run_dir)
    assert (tk.height, tk.width, tk.channels, tk.grid, tk.vocab_size) == (8, 8, 1, (4, 4), 125)
    assert not tk.training and not any(p.requires_grad for p in tk.parameters())
    assert next(tk.parameters()).device.type == "cpu"
    dom = ImageDomain(ImageDomain.Config(height=8, width=8, tokenizer=str(run_dir)))
    assert dom.spec.vocab_size == 125 and dom.length == 16 and dom.dims_per_token == 4
    x = heldout_digits()
    seq = dom.encode(x)
    assert seq.ids.shape == (300, 16) and int(seq.ids.max()) < 125
    assert torch.equal(seq.ids.view(300, 4, 4), tk.encode(torch.from_numpy(x).unsqueeze(-1)))  # raster order
    y = dom.decode(seq)
    assert isinstance(y, list) and len(y) == 300
    y = np.stack(y)
    assert y.shape == (300, 8, 8) and y.min() >= 0 and y.max() <= 1
    # the trainer's final evaluation used the same (EMA) weights
    assert float(((y - x) ** 2).mean()) == pytest.approx(summary["recon_mse"], rel=1e-4)
    with pytest.raises(SeqgenError, match="trained on 8x8x1 images; the domain is 12x16x1"):
        ImageDomain(ImageDomain.Config(height=12, width=16, tokenizer=str(run_dir)))
    # a domain of tokenizer-sized tiles: codes of each 8x8 tile side by side (8x16 -> a 4x8 code grid)
    wide = ImageDomain(ImageDomain.Config(height=8, width=16, tokenizer=str(run_dir)))
    assert wide.grid == (4, 8) and wide.length == 32
    pair = np.concatenate([x[:5], x[5:10]], axis=2)  # (5, 8, 16)
    grid = wide.encode(pair).ids.view(5, 4, 8)
    assert torch.equal(grid[:, :, :4], seq.ids[:5].view(5, 4, 4))
    assert torch.equal(grid[:, :, 4:], seq.ids[5:10].view(5, 4, 4))
    np.testing.assert_allclose(np.stack(wide.decode(wide.encode(pair))), np.concatenate([y[:5], y[5:10]], axis=2),
                               atol=1e-6)


def test_repeated_tiles_are_encoded_once_with_the_same_codes(trained, monkeypatch):
    """The image domain encodes each distinct tokenizer tile once (scenes repeat their digits): the codes
    equal those of encoding every tile, within one call and across calls, and the encoder sees only the
    tiles it has not seen before"""
    run_dir, _ = trained
    x = heldout_digits()[:40]
    tk = load_tokenizer(run_dir)
    reference = tk.encode(torch.from_numpy(x).unsqueeze(-1))  # (40, 4, 4), every tile encoded
    wide = ImageDomain(ImageDomain.Config(height=8, width=16, tokenizer=str(run_dir)))
    seen = []
    encode = wide.tokenizer.encode
    monkeypatch.setattr(wide.tokenizer, "encode", lambda t: seen.append(len(t)) or encode(t))
    rng = np.random.default_rng(0)
    left, right = rng.integers(0, 30, size=50), rng.integers(0, 30, size=50)  # 50 scenes of 30 digits
    grid = wide.encode(np.concatenate([x[left], x[right]], axis=2)).ids.view(50, 4, 8)
    assert torch.equal(grid[:, :, :4], reference[left]) and torch.equal(grid[:, :, 4:], reference[right])
    assert sum(seen) == len(set(left.tolist()) | set(right.tolist())) <= 30  # each distinct digit once
    seen.clear()
    grid = wide.encode(np.concatenate([x[35:40], x[:5]], axis=2)).ids.view(5, 4, 8)  # 5 new tiles, 5 known
    assert torch.equal(grid[:, :, :4], reference[35:40]) and torch.equal(grid[:, :, 4:], reference[:5])
    assert seen == [5]
    assert wide.encode(x[:0].reshape(0, 8, 16)).ids.shape == (0, 32)


def test_load_tokenizer_explains_what_is_wrong(tmp_path):
    with pytest.raises(SeqgenError, match=r"is not a folder; set the image domain's tokenizer "
                                          r"\(domains.KEY.tokenizer\)"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(SeqgenError, match="no checkpoint"):
        load_tokenizer(tmp_path)
    ckpt = tmp_path / "gen" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"task": "generative"}))
    with pytest.raises(SeqgenError, match="not a tokenizer run"):
        load_tokenizer(tmp_path / "gen")


def test_generative_task_over_cached_codes(trained, tiny_cfg, tmp_path):
    from safetensors.torch import load_file, save_file

    from seqgen.task import GenerativeTask, fingerprint, load_run
    from seqgen.train import train

    src, _ = trained
    run_dir = tmp_path / "tok"
    shutil.copytree(src, run_dir)  # the cache writes into the tokenizer folder; keep the fixture's clean
    cfg = RunConfig.from_dict(tiny_cfg(
        domains={"image": {"adapter": "image", "height": 8, "width": 8, "tokenizer": str(run_dir)}},
        heads={"image": "categorical"},
        mixture=[{"name": "digits", "source": {"name": "digits", "heldout": 300}, "target": ["image"]}],
        train={"steps": 150, "ckpt_every": 150, "accelerator": "cpu", "precision": "32-true"}))
    task = GenerativeTask(cfg)
    e = task.entry()
    train_images = e.records["train"]["image"]
    cached = sorted(p.name for p in (run_dir / "codes").glob("*.safetensors"))
    assert len(cached) == 2  # the training and the held-out column, named by content and encoding
    train_cache = run_dir / "codes" / next(n for n in cached if n.startswith(fingerprint(train_images)))
    tk = load_tokenizer(run_dir)  # the same checkpoint: the cache stays
    assert train_cache.exists()
    col = e.columns["train"]["image"]
    assert torch.equal(col.seq.ids, tk.encode(torch.from_numpy(train_images).unsqueeze(-1)).view(-1, 16))
    assert torch.equal(col.units, torch.full((len(train_images), 16), 4.0))  # each code stands for a 2x2 patch
    # a second task reads the cache instead of encoding again: tamper with it and see the change
    t = load_file(str(train_cache))
    save_file({**t, "ids": torch.zeros_like(t["ids"])}, str(train_cache))
    assert int(GenerativeTask(cfg).entry().columns["train"]["image"].seq.ids.abs().sum()) == 0
    # a newer tokenizer checkpoint makes load_tokenizer drop codes cached from the old one
    (run_dir / "codes" / "checkpoint.txt").write_text("step_00000001/model.safetensors\n")
    load_tokenizer(run_dir)
    assert not list((run_dir / "codes").glob("*.safetensors"))
    # the AR model trains on the codes (beating the uniform code distribution) and samples decode
    # back to images through the tokenizer
    ar_dir = tmp_path / "ar"
    summary = train(cfg, ar_dir, progress_bar=False)
    uniform = math.log2(tk.vocab_size) / 4  # bits per dimension of uniformly random codes
    assert math.isfinite(summary["bits_per_dim"]) and 0 < summary["bits_per_dim"] < 0.8 * uniform, \
        (summary["bits_per_dim"], uniform)
    out = load_run(ar_dir).generate(n=3)
    assert len(out) == 3 and all(set(r) == {"image"} for r in out)
    images = np.stack([r["image"] for r in out])
    assert images.shape == (3, 8, 8) and images.min() >= 0 and images.max() <= 1


def test_cli_sample_and_eval(trained, tmp_path):
    from PIL import Image

    from seqgen.cli import main
    from seqgen.evaluate import evaluate_run, format_table

    run_dir, summary = trained
    out = tmp_path / "recon.png"
    assert main(["sample", str(run_dir), "--n", "12", "--out", str(out), "--device", "cpu"]) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (2 * 34 + 2, 12 * 34 + 2)  # 2 rows (originals, reconstructions) of 12 cells of 32 px
    top, bottom = img[2:34, 2:34].astype(float), img[36:68, 2:34].astype(float)
    assert np.corrcoef(top.ravel(), bottom.ravel())[0, 1] > 0.8  # the reconstruction sits under its original
    res = evaluate_run(run_dir, device="cpu")
    assert res["name"] == "tiny_fsq" and res["checkpoint"] == "step_00000080" and res["parameters"] > 0
    assert res["recon_mse"] == pytest.approx(summary["recon_mse"], rel=1e-5)
    assert res["codebook_usage"] == pytest.approx(summary["codebook_usage"])
    table = format_table(res)
    assert "recon_psnr" in table and "codebook_usage" in table


def test_resumed_tokenizer_run_matches_an_uninterrupted_one(tmp_path):
    from seqgen.checkpoint import latest_checkpoint, read_weights
    from seqgen.train import train

    cfg = tokenizer_config(steps=12, ckpt_every=6, ema=0.0)
    train(cfg, tmp_path / "a", progress_bar=False)
    train(cfg, tmp_path / "b", progress_bar=False, stop_after=6)
    train(cfg, tmp_path / "b", progress_bar=False, resume=True)
    a = read_weights(latest_checkpoint(tmp_path / "a") / "model.safetensors")
    b = read_weights(latest_checkpoint(tmp_path / "b") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["geometry"], torch.tensor([8, 8, 1]))


@pytest.mark.gpu
def test_tokenizer_trains_on_a_gpu_in_bf16(tmp_path):
    from seqgen.evaluate import evaluate_run
    from seqgen.train import train

    summary = train(tokenizer_config(accelerator="cuda", precision="bf16-mixed"), tmp_path / "gpu", progress_bar=False)
    assert summary["device"].startswith("cuda")
    per_pixel_variance = float(heldout_digits().var(axis=0).mean())
    assert summary["recon_mse"] < 0.4 * per_pixel_variance
    res = evaluate_run(tmp_path / "gpu", device="cuda")  # float32 evaluation of the same weights
    assert res["recon_mse"] == pytest.approx(summary["recon_mse"], rel=0.05)
    tk = load_tokenizer(tmp_path / "gpu")  # weights were saved in float32 and load on the CPU
    assert next(tk.parameters()).dtype == torch.float32 and next(tk.parameters()).device.type == "cpu"


def test_window_scan_over_learned_codes(trained):
    """scan: windows (Token-Shuffle) over FSQ codes: the 4x4 code grid padded to 6x6 with the code of a black
    patch, 9 consecutive tokens per 3x3 window, decoding crops the padding back to the same images"""
    run_dir, _ = trained
    tk = load_tokenizer(run_dir)
    x = heldout_digits()[:10]
    codes = tk.encode(torch.from_numpy(x).unsqueeze(-1))  # (10, 4, 4)
    dom = ImageDomain(ImageDomain.Config(height=8, width=8, tokenizer=str(run_dir), scan="windows", window=3))
    black = tk.encode(torch.zeros(1, 8, 8, 1)).reshape(-1)
    fill = dom.fill_token()
    assert isinstance(fill, int) and int((black == fill).sum()) == int(torch.bincount(black).max())  # the mode
    assert dom.length == 36 and dom.dims_per_token == pytest.approx(64 / 36)
    seq = dom.encode(x)
    r, c = seq.pos[0, :, 1], seq.pos[0, :, 2]
    assert torch.equal((r // 3) * 2 + c // 3, torch.arange(4).repeat_interleave(9))  # window after window
    pad = (r >= 4) | (c >= 4)
    assert bool((seq.ids[:, pad] == fill).all())
    assert torch.equal(seq.ids[:, ~pad], codes[:, r[~pad], c[~pad]])  # true (padded) grid cells
    assert torch.equal(dom.sequence_to_grid(seq)[..., 0], codes)  # the exact inverse, padding cropped
    raster = ImageDomain(ImageDomain.Config(height=8, width=8, tokenizer=str(run_dir)))
    np.testing.assert_allclose(np.stack(dom.decode(seq)), np.stack(raster.decode(raster.encode(x))), atol=1e-6)
    assert dom.encode_cache()[1] != raster.encode_cache()[1]  # the scan decides the cached codes
