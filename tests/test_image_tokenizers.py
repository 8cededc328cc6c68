"""The multi-scale (msfsq, VAR) and continuous (ae, MAR) image tokenizers, and the image domain's use of them
and of the Token-Shuffle window scan: quantizer algebra, tiny training runs through the normal trainer,
coarse-to-fine decoding, normalised latents, coordinates and exact encode -> decode inverses."""
import math

import numpy as np
import pytest
import torch

from seqgen.config import RunConfig
from seqgen.domains.image import ImageDomain, scale_positions, scan_order
from seqgen.domains.tokenizers import load_tokenizer
from seqgen.domains.tokenizers.ae import AETokenizer
from seqgen.domains.tokenizers.msfsq import MultiScaleFSQTokenizer, scale_grids
from seqgen.domains.tokenizers.task import ImageBatch
from seqgen.types import SeqgenError


def heldout_digits() -> np.ndarray:
    from seqgen.datasets import Digits

    return Digits().load().heldout  # (300, 8, 8)


def run_config(name: str, tokenizer: dict, steps: int = 150) -> RunConfig:
    """A tiny tokenizer run on the 8x8 digits (a few seconds on a CPU)."""
    return RunConfig.from_dict({
        "name": name, "seed": 0, "task": "tokenizer", "data": {"name": "digits", "heldout": 300},
        "tokenizer": tokenizer,
        "train": {"steps": steps, "batch_size": 32, "lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.0,
                  "eval_every": 0, "log_every": 10, "ckpt_every": 1000, "ema": 0.9, "accelerator": "cpu",
                  "precision": "32-true", "threads": 1},  # one thread: many small ops, a shared CPU
    })


@pytest.fixture(scope="module")
def trained_ms(tmp_path_factory):
    from seqgen.train import train

    run_dir = tmp_path_factory.mktemp("msfsq") / "run"
    tok = {"name": "msfsq", **vars(MultiScaleFSQTokenizer.Config.tiny())}
    return run_dir, train(run_config("tiny_msfsq", tok), run_dir, progress_bar=False)


@pytest.fixture(scope="module")
def trained_ae(tmp_path_factory):
    from seqgen.train import train

    run_dir = tmp_path_factory.mktemp("ae") / "run"
    tok = {"name": "ae", **vars(AETokenizer.Config.tiny())}
    return run_dir, train(run_config("tiny_ae", tok), run_dir, progress_bar=False)


# ------------------------------------------------------------------------------------------ msfsq: algebra
def test_scale_ladder_and_its_errors():
    assert scale_grids([1, 2, 3, 4, 5, 7], (7, 7)) == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (7, 7)]
    assert scale_grids([1, 2, 4], (2, 4)) == [(1, 1), (1, 2), (2, 4)]  # a non-square grid shrinks in proportion
    with pytest.raises(SeqgenError, match="last scale must equal the code grid's side 7"):
        scale_grids([1, 2, 4], (7, 7))
    with pytest.raises(SeqgenError, match="increasing"):
        scale_grids([1, 3, 2, 7], (7, 7))
    with pytest.raises(SeqgenError, match="last scale must equal"):
        MultiScaleFSQTokenizer(MultiScaleFSQTokenizer.Config(scales=[1, 2, 3]), height=28, width=28)
    tk = MultiScaleFSQTokenizer(MultiScaleFSQTokenizer.Config(width=8), height=28, width=28)
    assert tk.grid == (7, 7) and tk.length == 1 + 4 + 9 + 16 + 25 + 49 and tk.vocab_size == 1000


def test_lattice_quantizer_rounds_clamps_and_names_its_values():
    tk = MultiScaleFSQTokenizer(MultiScaleFSQTokenizer.Config.tiny(), height=8, width=8)  # levels [5, 5, 5]
    v = torch.tensor([[0.0, 0.24, 0.26], [-0.74, 0.9, 3.0], [-3.0, -0.1, 0.6]], requires_grad=True)
    q, idx = tk._quantize(v)
    # lattice {-1, -0.5, 0, 0.5, 1}: nearest point, clamped at the ends
    assert q.tolist() == [[0.0, 0.0, 0.5], [-0.5, 1.0, 1.0], [-1.0, 0.0, 0.5]]
    assert torch.equal(tk.quantizer.indices_to_values(idx), q.detach())  # one vocabulary for every scale
    (q * torch.arange(9.0).view(3, 3)).sum().backward()
    assert torch.equal(v.grad, torch.arange(9.0).view(3, 3))  # straight through


def test_residual_quantization_is_straight_through_and_its_sum_is_what_decodes():
    torch.manual_seed(0)
    tk = MultiScaleFSQTokenizer(MultiScaleFSQTokenizer.Config.tiny(), height=8, width=8)
    f = torch.tanh(torch.randn(3, 3, 4, 4)).requires_grad_(True)
    tk._residual_quantize(f.detach())  # training mode: measures every scale's residual RMS (the gains)
    tk.eval()
    f_hat, codes, partial = tk._residual_quantize(f)
    assert [tuple(c.shape) for c in codes] == [(3, 1, 1), (3, 2, 2), (3, 4, 4)]
    assert torch.allclose(partial[-1], f_hat)
    w = torch.randn_like(f)
    (f_hat * w).sum().backward()
    assert torch.allclose(f.grad, w, atol=1e-6)  # d f_hat / d f = identity: the last scale is the full grid
    # the finest scale leaves at most half a lattice step (in its gain's units) where it is not clamped
    step = 1 / (tk.quantizer.half_width.float() * tk.gains()[-1])  # (d,)
    err = (f - f_hat).detach().abs().permute(0, 2, 3, 1)
    assert float(err.max()) > 0 and bool((err <= step / 2 + 1e-5).all())
    # each scale removes part of the residual: the error shrinks along the ladder
    errs = [float((f - p).detach().pow(2).mean()) for p in partial]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.2 * errs[0], errs


def test_encode_decode_shapes_and_consistency():
    torch.manual_seed(0)
    tk = MultiScaleFSQTokenizer(MultiScaleFSQTokenizer.Config(patch=2, levels=[5, 5, 5], scales=[1, 3, 4], width=8),
                                height=7, width=8, channels=3).eval()
    assert tk.grid == (4, 4) and tk.scales == [(1, 1), (3, 3), (4, 4)] and tk.length == 26
    x = torch.rand(5, 7, 8, 3, generator=torch.Generator().manual_seed(0))
    scales = tk.encode_scales(x)
    assert [tuple(c.shape) for c in scales] == [(5, 1, 1), (5, 3, 3), (5, 4, 4)]
    codes = tk.encode(x)
    assert codes.shape == (5, 26) and codes.dtype == torch.long and 0 <= int(codes.min()) and int(codes.max()) < 125
    assert torch.equal(codes, torch.cat([c.flatten(1) for c in scales], 1))  # scale after scale, raster inside
    assert all(torch.equal(a, b) for a, b in zip(tk.split(codes), scales))
    recon, idx = tk(x)
    y = tk.decode(codes)
    assert y.shape == (5, 7, 8, 3) and 0 <= float(y.min()) and float(y.max()) <= 1
    assert torch.equal(idx, codes) and torch.allclose(recon, y, atol=1e-6)
    assert torch.allclose(tk.decode_scales(scales), y, atol=1e-6)
    assert tk.decode_scales(scales[:2]).shape == (5, 7, 8, 3)
    assert torch.equal(tk.encode(x[2:3]), codes[2:3])  # a code depends on its own image only
    with pytest.raises(SeqgenError, match=r"\(N, 26\)"):
        tk.decode(codes[:, :25])
    with pytest.raises(SeqgenError, match=r"0\.\.124"):
        tk.decode(torch.full((1, 26), 125))
    with pytest.raises(SeqgenError, match="scale 1 codes must have shape"):
        tk.decode_scales([scales[0], scales[2]])
    with pytest.raises(SeqgenError, match=r"\[0, 1\]"):
        tk.encode(x * 3)


def test_residual_rms_is_measured_in_training_only():
    torch.manual_seed(0)
    tk = MultiScaleFSQTokenizer(MultiScaleFSQTokenizer.Config.tiny(), height=8, width=8)
    x = torch.rand(16, 8, 8, 1, generator=torch.Generator().manual_seed(1))
    tk.eval()
    tk(x)
    assert torch.equal(tk.residual_rms, torch.ones(3, 3)) and int(tk.stats_steps) == 0
    tk.train()
    tk.loss(ImageBatch(x))
    f = tk._latent(tk._check_images(x)).detach()
    first = torch.nn.functional.interpolate(f, size=(1, 1), mode="area").pow(2).mean(dim=(0, 2, 3)).sqrt()
    assert torch.allclose(tk.residual_rms[0], first, atol=1e-6)  # the first batch's RMS exactly
    assert int(tk.stats_steps) == 1 and bool((tk.residual_rms != 1).all())
    assert torch.allclose(tk.gains(), tk.config.spread / tk.residual_rms)


# ------------------------------------------------------------------------------------------ msfsq: trained
def test_trained_msfsq_reconstructs_and_refines_coarse_to_fine(trained_ms):
    run_dir, summary = trained_ms
    x = heldout_digits()
    variance = float(x.var(axis=0).mean())
    assert summary["recon_mse"] < 0.4 * variance, (summary["recon_mse"], variance)
    assert 0.05 < summary["codebook_usage"] <= 1
    prefix = [summary[f"prefix_mse_{k}"] for k in (1, 2, 3)]
    assert prefix[-1] == pytest.approx(summary["recon_mse"])
    assert prefix[0] > prefix[1] > prefix[2], prefix  # more scales, a finer image
    tk = load_tokenizer(run_dir)
    assert tk.scales == [(1, 1), (2, 2), (4, 4)] and tk.vocab_size == 125 and tk.grid == (4, 4)
    scales = tk.encode_scales(torch.from_numpy(x))
    errs = [float((tk.decode_scales(scales[:k]) - torch.from_numpy(x).unsqueeze(-1)).pow(2).mean()) for k in (1, 2, 3)]
    assert errs == pytest.approx(prefix, rel=1e-4)
    assert int(tk.stats_steps) == 150 and bool((tk.residual_rms != 1).all())  # measured, saved, loaded


def test_msfsq_in_the_image_domain(trained_ms):
    run_dir, _ = trained_ms
    tk = load_tokenizer(run_dir)
    dom = ImageDomain(ImageDomain.Config(height=8, width=8, tokenizer=str(run_dir)))
    assert dom.spec.vocab_size == 125 and dom.spec.scales == ((1, 1), (2, 2), (4, 4)) and dom.spec.pos_axes == 2
    assert dom.length == 21 and dom.dims_per_token == pytest.approx(64 / 21)
    x = heldout_digits()[:20]
    seq = dom.encode(x)
    codes = tk.encode(torch.from_numpy(x).unsqueeze(-1))
    assert torch.equal(seq.ids, codes)  # the tokenizer's order: scale after scale, raster inside each
    # every scale on the shared 4x4 grid: axis 0 is the scale, cells at floor((i + 0.5) * 4 / s_k)
    assert seq.pos[0].tolist() == [[0, 2, 2],
                                   [1, 1, 1], [1, 1, 3], [1, 3, 1], [1, 3, 3],
                                   *[[2, i, j] for i in range(4) for j in range(4)]]
    assert torch.equal(dom.layout(3).pos, seq.pos[:3]) and torch.equal(scale_positions(tk.scales, (4, 4)), seq.pos[0])
    assert torch.equal(dom.units(seq), torch.full((20, 21), 64 / 21))
    y = np.stack(dom.decode(seq))
    np.testing.assert_allclose(y, tk.decode(codes)[..., 0].numpy(), atol=1e-6)
    perm = torch.stack([torch.randperm(21, generator=torch.Generator().manual_seed(i)) for i in range(20)])
    np.testing.assert_allclose(np.stack(dom.decode(seq.gather(perm))), y, atol=1e-6)  # placed by coordinates
    bad = seq.replace(pos=seq.pos.clone())
    bad.pos[0, 0] = torch.tensor([0, 0, 0])  # no token of scale 0 sits at (0, 0)
    with pytest.raises(SeqgenError, match="coordinates of the scales"):
        dom.decode(bad)
    with pytest.raises(SeqgenError, match="scan must be raster"):
        ImageDomain(ImageDomain.Config(height=8, width=8, tokenizer=str(run_dir), scan="windows"))
    with pytest.raises(SeqgenError, match="cannot tile"):
        ImageDomain(ImageDomain.Config(height=8, width=16, tokenizer=str(run_dir)))
    assert dom.token_features is not None and not dom.config.code_features


def test_scale_positions_follow_the_nearest_cell_rule():
    pos = scale_positions([(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (7, 7)], (7, 7))
    assert len(pos) == 104 and len({tuple(p) for p in pos.tolist()}) == 104
    for k, s in enumerate([1, 2, 3, 4, 5, 7]):
        cells = pos[pos[:, 0] == k, 1:]
        want = [[math.floor((i + 0.5) * 7 / s), math.floor((j + 0.5) * 7 / s)] for i in range(s) for j in range(s)]
        assert cells.tolist() == want
    assert pos[0].tolist() == [0, 3, 3] and pos[1:5, 1:].tolist() == [[1, 1], [1, 5], [5, 1], [5, 5]]


# ------------------------------------------------------------------------------------------ ae
def test_ae_shapes_normalisation_and_statistics():
    torch.manual_seed(0)
    tk = AETokenizer(AETokenizer.Config.tiny(), height=7, width=8, channels=1)
    assert tk.grid == (4, 4) and tk.latent_dim == 3 and tk.vocab_size is None
    x = torch.rand(16, 7, 8, 1, generator=torch.Generator().manual_seed(0))
    tk.train()
    loss, m = tk.loss(ImageBatch(x))
    assert set(m) == {"mse", "l1", "kl"} and float(m["kl"]) > 0
    assert float(loss.detach()) == pytest.approx(float(m["mse"]) + tk.config.kl_weight * float(m["kl"]), rel=1e-5)
    mu = tk.posterior(tk._check_images(x))[0].detach()
    assert torch.allclose(tk.latent_mean, mu.mean(dim=(0, 2, 3)), atol=1e-6)  # the first batch exactly
    assert torch.allclose(tk.latent_std, mu.std(dim=(0, 2, 3), unbiased=False), atol=1e-6)
    tk.eval()
    z = tk.encode(x)
    assert z.shape == (16, 4, 4, 3) and z.dtype == torch.float32
    assert torch.equal(z, tk.encode(x))  # the posterior mean: deterministic
    assert torch.allclose(z.mean(dim=(0, 1, 2)), torch.zeros(3), atol=1e-5)  # normalised by this batch's stats
    assert torch.allclose(z.std(dim=(0, 1, 2), unbiased=False), torch.ones(3), atol=1e-4)
    before = tk.latent_mean.clone()
    recon, tokens = tk(x)  # eval: no statistics update, the decoder reads the mean
    assert torch.equal(tk.latent_mean, before) and torch.equal(tokens, z)
    y = tk.decode(z)
    assert y.shape == (16, 7, 8, 1) and torch.allclose(recon, y, atol=1e-6)
    assert torch.allclose(tk.denormalise(tk.normalise(mu)), mu, atol=1e-5)
    with pytest.raises(SeqgenError, match=r"\(N, 4, 4, 3\)"):
        tk.decode(z[..., :2])
    with pytest.raises(SeqgenError, match="float"):
        tk.decode(z.long())


def test_trained_ae_reconstructs_with_normalised_latents(trained_ae):
    from seqgen.checkpoint import latest_checkpoint, read_weights
    from seqgen.evaluate import evaluate_run

    run_dir, summary = trained_ae
    x = heldout_digits()
    variance = float(x.var(axis=0).mean())
    assert summary["recon_mse"] < 0.3 * variance, (summary["recon_mse"], variance)
    assert summary["recon_psnr"] == pytest.approx(10 * math.log10(1 / summary["recon_mse"]))
    assert "codebook_usage" not in summary
    assert abs(summary["latent_mean"]) < 0.3 and 0.7 < summary["latent_std"] < 1.3, summary
    assert 0.5 < summary["latent_std_min"] <= summary["latent_std_max"] < 1.5
    ema = read_weights(latest_checkpoint(run_dir) / "ema.safetensors")
    assert not torch.allclose(ema["latent_std"], torch.ones(3))  # measured statistics travel with the weights
    tk = load_tokenizer(run_dir)
    assert tk.latent_dim == 3 and tk.vocab_size is None and torch.equal(tk.latent_std, ema["latent_std"])
    z = tk.encode(torch.from_numpy(x))
    assert z.shape == (300, 4, 4, 3)
    y = tk.decode(z)[..., 0].numpy()
    assert float(((y - x) ** 2).mean()) == pytest.approx(summary["recon_mse"], rel=1e-4)
    res = evaluate_run(run_dir, device="cpu")  # seqgen eval
    assert res["recon_mse"] == pytest.approx(summary["recon_mse"], rel=1e-5) and res["latent_dim"] == 3
    assert res["latent_std"] == pytest.approx(summary["latent_std"], rel=1e-5) and res["vocab_size"] is None


def test_cli_sample_of_an_ae_run(trained_ae, tmp_path):
    from seqgen.cli import main

    run_dir, _ = trained_ae
    out = tmp_path / "recon.png"
    assert main(["sample", str(run_dir), "--n", "4", "--out", str(out), "--device", "cpu"]) == 0
    assert out.exists()


def test_ae_in_the_image_domain(trained_ae):
    run_dir, _ = trained_ae
    tk = load_tokenizer(run_dir)
    dom = ImageDomain(ImageDomain.Config(height=8, width=8, tokenizer=str(run_dir)))
    assert dom.spec.vocab_size is None and dom.spec.value_dim == 3 and dom.spec.pos_axes == 2
    assert dom.length == 16 and dom.dims_per_token == 4
    x = heldout_digits()[:12]
    seq = dom.encode(x)
    z = tk.encode(torch.from_numpy(x).unsqueeze(-1))  # (12, 4, 4, 3)
    assert bool((seq.ids == -1).all()) and seq.values.shape == (12, 16, 3)
    assert torch.equal(seq.values, z.reshape(12, 16, 3))  # raster order
    assert seq.pos[0, :5].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 1, 0]]
    seq.validate([dom.spec])
    y = np.stack(dom.decode(seq))
    np.testing.assert_allclose(y, tk.decode(z)[..., 0].numpy(), atol=1e-6)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0)).expand(12, -1)
    np.testing.assert_allclose(np.stack(dom.decode(seq.gather(perm))), y, atol=1e-6)
    lay = dom.layout(2)
    assert torch.equal(lay.pos, seq.pos[:2]) and lay.values.shape == (2, 16, 3)
    # tiles: a 8x16 scene is two latent grids side by side
    wide = ImageDomain(ImageDomain.Config(height=8, width=16, tokenizer=str(run_dir)))
    pair = np.concatenate([x[:6], x[6:]], axis=2)
    grid = wide.encode_grid(pair)
    assert torch.equal(grid[:, :, :4], z[:6]) and torch.equal(grid[:, :, 4:], z[6:])
    np.testing.assert_allclose(np.stack(wide.decode(wide.encode(pair))), np.concatenate([y[:6], y[6:]], axis=2),
                               atol=1e-6)
    # windows of 3: the 4x4 grid padded to 6x6 with the black image's median latent
    win = ImageDomain(ImageDomain.Config(height=8, width=8, tokenizer=str(run_dir), scan="windows", window=3))
    black = tk.encode(torch.zeros(1, 8, 8, 1)).reshape(-1, 3)
    assert torch.equal(win.fill_token(), black.median(dim=0).values)
    ws = win.encode(x)
    assert ws.values.shape == (12, 36, 3)
    pad = (ws.pos[0, :, 1] >= 4) | (ws.pos[0, :, 2] >= 4)
    assert int(pad.sum()) == 20 and torch.equal(ws.values[:, pad], win.fill_token().expand(12, 20, 3))
    np.testing.assert_allclose(np.stack(win.decode(ws)), y, atol=1e-6)
    with pytest.raises(SeqgenError, match="continuous"):
        ImageDomain(ImageDomain.Config(height=8, width=8, tokenizer=str(run_dir), code_features=True))


# ------------------------------------------------------------------------------------------ windows
def test_window_scan_order():
    assert scan_order(4, 4, "windows", window=2).tolist() == [
        [0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3],
        [2, 0], [2, 1], [3, 0], [3, 1], [2, 2], [2, 3], [3, 2], [3, 3]]
    assert scan_order(2, 3, "windows", window=1).tolist() == scan_order(2, 3, "raster").tolist()
    with pytest.raises(SeqgenError, match="multiples of the window 2"):
        scan_order(3, 4, "windows", window=2)


def test_window_scan_of_pixels_pads_keeps_windows_together_and_inverts_exactly():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, (4, 7, 7)) / 4
    dom = ImageDomain(ImageDomain.Config(height=7, width=7, levels=5, scan="windows", window=2))
    assert dom.padded == (8, 8) and dom.length == 64  # a 7x7 grid -> 8x8 = 64 tokens in 16 windows
    seq = dom.encode(x)
    assert seq.ids.shape == (4, 64)
    r, c = seq.pos[0, :, 1], seq.pos[0, :, 2]
    windows = (r // 2) * 4 + c // 2
    assert torch.equal(windows, torch.arange(16).repeat_interleave(4))  # 4 consecutive tokens: one window
    assert torch.equal(r % 2 * 2 + c % 2, torch.arange(4).repeat(16))  # raster inside a window
    pad = (r == 7) | (c == 7)
    assert int(pad.sum()) == 15 and bool((seq.ids[:, pad] == 0).all())  # the fill: intensity 0
    inside = ~pad
    np.testing.assert_array_equal(seq.ids[:, inside].numpy(), np.rint(x[:, r[inside], c[inside]] * 4))
    np.testing.assert_array_equal(np.stack(dom.decode(seq)), x.astype(np.float32))  # crops the padding
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1)).expand(4, -1)
    np.testing.assert_array_equal(np.stack(dom.decode(seq.gather(perm))), x.astype(np.float32))
    assert torch.equal(dom.units(seq), torch.full((4, 64), 49 / 64)) and torch.equal(dom.layout(2).pos, seq.pos[:2])
    # colour pixels: channels stay innermost, every cell's channels inside its window
    rgb = ImageDomain(ImageDomain.Config(height=3, width=3, channels=3, levels=3, scan="windows", window=2))
    xc = rng.integers(0, 3, (2, 3, 3, 3)) / 2
    s = rgb.encode(xc)
    assert s.length == 48 and s.pos[0, :3, 0].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(np.stack(rgb.decode(s)), xc.astype(np.float32))
    assert dom.encode_cache() is None


# ------------------------------------------------------------------------------------------ end to end
def _generative(tmp_path, image: dict, paradigm: dict, heads=None, steps: int = 30):
    """A tiny class-conditional digits run through the normal trainer, then held-out NLL and sampling."""
    import sys
    from pathlib import Path

    from seqgen.task import load_run
    from seqgen.train import train

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_digits_config

    cfg = tiny_digits_config(domains={"label": {"adapter": "label", "num_classes": 10},
                                      "image": {"adapter": "image", "height": 8, "width": 8, **image}},
                             paradigm=paradigm, train={"steps": steps, "ckpt_every": steps, "threads": 1})
    if heads is not None:
        cfg["heads"] = heads
    summary = train(RunConfig.from_dict(cfg), tmp_path / "gen", progress_bar=False)
    task = load_run(tmp_path / "gen")
    out = task.generate(entry="label_to_image", conds=[{"label": i} for i in range(3)], cfg_scale=2.0)
    assert len(out) == 3 and out[0]["image"].shape == (8, 8)
    assert all(np.isfinite(o["image"]).all() and 0 <= o["image"].min() <= o["image"].max() <= 1 for o in out)
    return summary, task


def test_next_scale_trains_and_samples_over_the_multiscale_tokenizer(trained_ms, tmp_path):
    run_dir, _ = trained_ms
    summary, task = _generative(tmp_path, {"tokenizer": str(run_dir)}, {"name": "next_scale"})
    spec = task.specs[task.modality["image"]]
    assert spec.scales is not None and summary["heldout_tokens"] == 300 * sum(spec.scale_lengths)
    assert task.paradigm.nll_kind.startswith("exact, of the multi-scale codes")


def test_masked_and_causal_flow_heads_train_and_sample_continuous_latents(trained_ae, tmp_path):
    run_dir, _ = trained_ae
    heads = {"image": {"name": "diffusion", "objective": "flow", "width": 32, "depth": 2, "time_embed_dim": 32,
                       "sample_steps": 4}}
    for name, paradigm in (("mar", {"name": "masked", "steps": 3}), ("nextstep", {"name": "ar"})):
        summary, task = _generative(tmp_path / name, {"tokenizer": str(run_dir)}, paradigm, heads=heads)
        assert "label_to_image/image/loss" in summary and "label_to_image/image/bits_per_dim" not in summary


def test_token_shuffle_trains_and_samples_pixel_windows(tmp_path):
    summary, task = _generative(tmp_path, {"levels": 17, "scan": "windows", "window": 2},
                                {"name": "ar", "token_shuffle": 2})
    assert task.model.shuffle is not None and summary["heldout_tokens"] == 300 * 64
