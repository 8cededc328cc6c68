"""train.precision: auto: resolve_precision and make_fabric."""
from types import SimpleNamespace

import pytest
import torch

from seqgen import precision as P
from seqgen.config import TrainConfig
from seqgen.precision import resolve_precision
from seqgen.train import make_fabric
from seqgen.types import SeqgenError


def run_config(**train):
    """make_fabric reads only cfg.train: a RunConfig stand-in, whatever format the rest of the config has."""
    return SimpleNamespace(train=TrainConfig(**train))


@pytest.mark.parametrize("requested", ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true"])
@pytest.mark.parametrize("accelerator", ["cpu", "cuda"])
def test_requested_precision_passes_through(requested, accelerator, monkeypatch):
    monkeypatch.setenv(P.ENV, "1")  # the override concerns auto only
    assert resolve_precision(requested, accelerator) == (requested, "requested")


@pytest.mark.parametrize("value, expected", [("0", "32-true"), ("1", "bf16-mixed"), ("false", "32-true"),
                                             ("true", "bf16-mixed")])
def test_env_forces_the_cpu_decision(value, expected, monkeypatch):
    monkeypatch.setattr(P, "measure_cpu_bf16", lambda: pytest.fail("a forced decision must not measure"))
    monkeypatch.setenv(P.ENV, value)
    precision, reason = resolve_precision("auto", "cpu")
    assert precision == expected and P.ENV in reason


def test_env_with_a_bad_value_is_an_error(monkeypatch):
    monkeypatch.setenv(P.ENV, "maybe")
    with pytest.raises(SeqgenError, match=P.ENV):
        resolve_precision("auto", "cpu")


def test_auto_on_cpu_picks_one_of_two_with_a_reason(monkeypatch):
    monkeypatch.delenv(P.ENV, raising=False)
    precision, reason = resolve_precision("auto", "cpu")
    assert precision in ("32-true", "bf16-mixed")
    assert reason.startswith("auto: ") and len(reason) > len("auto: ") and "\n" not in reason
    assert resolve_precision("auto", "cpu") == (precision, reason)  # measured once per process: stable


def test_cpu_without_native_bf16_gets_float32_without_measuring(monkeypatch):
    monkeypatch.delenv(P.ENV, raising=False)
    monkeypatch.setattr(P.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(P, "cpu_flags", lambda: {"avx", "avx2", "fma", "avx512f"})
    monkeypatch.setattr(P, "measure_cpu_bf16", lambda: pytest.fail("no native bf16: nothing to measure"))
    precision, reason = resolve_precision("auto", "cpu")
    assert precision == "32-true" and "no native bf16" in reason
    monkeypatch.setattr(P.platform, "machine", lambda: "aarch64")
    assert resolve_precision("auto", "cpu")[0] == "32-true"


@pytest.mark.parametrize("bf16_s, fp32_s, expected", [(0.01, 0.03, "bf16-mixed"), (0.03, 0.01, "32-true"),
                                                      (0.01, 0.0101, "32-true")])
def test_native_cpu_follows_the_measurement(bf16_s, fp32_s, expected, monkeypatch):
    monkeypatch.delenv(P.ENV, raising=False)
    monkeypatch.setattr(P.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(P, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.setattr(P, "cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(P, "measure_cpu_bf16", lambda: (bf16_s, fp32_s))
    precision, reason = resolve_precision("auto", "cpu")
    assert precision == expected and "avx512_bf16" in reason
    # the flag alone is not enough when PyTorch runs AVX2 kernels (ATEN_CPU_CAPABILITY=avx2)
    monkeypatch.setattr(P, "cpu_capability", lambda: "AVX2")
    assert resolve_precision("auto", "cpu")[0] == "32-true"


def test_measurement_is_cached_and_quick():
    P.measure_cpu_bf16.cache_clear()
    bf16_s, fp32_s = P.measure_cpu_bf16()
    assert 0 < bf16_s and 0 < fp32_s
    assert P.measure_cpu_bf16() == (bf16_s, fp32_s) and P.measure_cpu_bf16.cache_info().hits == 1


@pytest.mark.parametrize("supported, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_on_cuda(supported, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    precision, reason = resolve_precision("auto", "cuda")
    assert precision == expected and reason


@pytest.mark.parametrize("env, expected", [("0", "32-true"), ("1", "bf16-mixed")])
def test_make_fabric_records_the_resolved_precision(env, expected, monkeypatch, capsys):
    monkeypatch.setenv(P.ENV, env)
    cfg = run_config(precision="auto", accelerator="cpu")
    assert TrainConfig().precision == "auto"  # the default
    fabric = make_fabric(cfg)
    assert fabric.seqgen_precision == expected
    out = capsys.readouterr().out
    assert out.count(f"precision: {expected} (") == 1 and P.ENV in out


def test_make_fabric_keeps_a_requested_precision(monkeypatch, capsys):
    monkeypatch.setenv(P.ENV, "1")
    cfg = run_config(precision="32-true", accelerator="cpu")
    assert make_fabric(cfg).seqgen_precision == "32-true"
    assert "precision: 32-true (requested)" in capsys.readouterr().out
