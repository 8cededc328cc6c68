"""Checks that need a CUDA device (skipped without one): bf16 training, FSDP pass-through, flex
attention in a training model, cached decoding on the GPU."""
import pytest
import torch

from seqgen.config import RunConfig
from seqgen.task import GenerativeTask, load_run
from seqgen.train import train

from conftest import tiny_digits_config

pytestmark = pytest.mark.gpu


def test_bf16_mixed_training_on_gpu(tmp_path):
    s = train(RunConfig.from_dict(tiny_digits_config(train={"steps": 40, "lr": 5e-3})), tmp_path / "r",
              progress_bar=False)
    assert s["precision"] == "bf16-mixed" and s["device"].startswith("cuda")
    assert s["bits_per_dim"] < 3.5


def test_fsdp_strategy_passes_through(tmp_path):
    s = train(RunConfig.from_dict(tiny_digits_config(train={"steps": 6, "strategy": "fsdp"})), tmp_path / "r",
              progress_bar=False)
    assert s["steps"] == 6
    task = load_run(tmp_path / "r", device="cuda")
    assert task.evaluate_nll(max_batches=1)["bits_per_dim"] > 0


@pytest.mark.parametrize("order", ["raster", "random"])
def test_flex_attention_trains_like_sdpa(order):
    losses = {}
    for impl in ("sdpa", "flex"):
        cfg = RunConfig.from_dict(tiny_digits_config(backbone={"attn_impl": impl},
                                                     paradigm={"name": "ar", "order": order}))
        torch.manual_seed(0)
        task = GenerativeTask(cfg)
        model = task.model.cuda()
        batch = task.make_batch(torch.arange(32), generator=torch.Generator().manual_seed(0)).to("cuda")
        loss, _ = model.loss(batch)
        loss.backward()
        losses[impl] = (loss.item(), model.backbone.blocks[0].attn.wq.weight.grad.clone())
    assert abs(losses["sdpa"][0] - losses["flex"][0]) < 1e-4
    torch.testing.assert_close(losses["flex"][1], losses["sdpa"][1], atol=1e-4, rtol=1e-3)


def test_cached_generation_on_gpu_matches_teacher_forcing():
    cfg = RunConfig.from_dict(tiny_digits_config())
    task = GenerativeTask(cfg)
    model = task.model.cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    images, labels = task.generate(model, n=20, generator=g, temperature=0.0)
    seq = task.domain.encode(images)
    cond, _ = task.prefix(torch.as_tensor(labels), 20)
    batch = task.paradigm.prepare(seq, cond).to("cuda")
    with torch.no_grad():
        logits = model.heads["image"].logits(model(batch.inputs, mask=batch.mask))
    assert torch.equal(logits.argmax(-1), batch.targets)
