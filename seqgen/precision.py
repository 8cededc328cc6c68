"""``train.precision: auto``: which Fabric precision a run gets on this machine.

    precision, reason = resolve_precision("auto", "cpu")   # ("32-true", "CPU has no native bf16 ...")

GPU (cuda): ``bf16-mixed`` where the device supports bf16, else ``16-mixed``.

CPU: ``bf16-mixed`` only where the CPU runs bf16 matmuls natively (x86 with AVX512_BF16 or AMX_BF16 in
/proc/cpuinfo, and PyTorch dispatching AVX-512 kernels) AND a short measurement (a (1024x768)@(768x768)
matmul and its backward, a few interleaved repetitions, a fraction of a second, once per process) finds
bf16 autocast faster than float32 (by ``MIN_SPEEDUP``, 10%); otherwise ``32-true``.  Without native
support bf16 autocast is emulated and can be an order of magnitude slower than float32 (10.0 s against
0.56 s a training step on an AVX2-only EPYC).  Other CPU architectures (ARM, POWER, ...) get
``32-true``: set SEQGEN_CPU_BF16=1 where bf16 pays there.

The environment variable ``SEQGEN_CPU_BF16`` forces the CPU decision: ``1`` (or true/yes/on) gives
``bf16-mixed``, ``0`` (or false/no/off) gives ``32-true``, without detection or measurement; unset or
empty: decide as above.

Any precision other than ``auto`` is returned unchanged, with the reason ``requested``.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from functools import lru_cache
from pathlib import Path

import torch

from .types import SeqgenError

log = logging.getLogger(__name__)

ENV = "SEQGEN_CPU_BF16"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
#: bf16 must beat float32 by this factor in the probe (bf16 costs accuracy; a tie keeps float32)
MIN_SPEEDUP = 1.1


def resolve_precision(requested: str, accelerator: str) -> tuple[str, str]:
    """(Fabric precision string, a one-line human reason) for ``requested`` on ``accelerator``."""
    if requested != "auto":
        return requested, "requested"
    if accelerator in ("cuda", "gpu"):
        try:
            bf16 = torch.cuda.is_bf16_supported()
        except Exception:  # no usable CUDA device: Fabric reports that itself
            bf16 = False
        if bf16:
            return "bf16-mixed", "auto: the GPU supports bf16"
        return "16-mixed", "auto: the GPU has no bf16 support, float16 mixed precision instead"
    if accelerator == "cpu":
        use, reason = cpu_bf16_decision()
        return ("bf16-mixed" if use else "32-true"), f"auto: {reason}"
    return "32-true", f"auto: float32 on accelerator {accelerator!r}"


def cpu_bf16_decision() -> tuple[bool, str]:
    """Whether bf16 autocast should be used for training on this CPU, and why."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in _TRUE:
        return True, f"{ENV}={os.environ[ENV]} forces bf16 on the CPU"
    if forced in _FALSE:
        return False, f"{ENV}={os.environ[ENV]} forces float32 on the CPU"
    if forced:
        raise SeqgenError(f"{ENV} must be 0 or 1 (or unset), got {os.environ[ENV]!r}")
    native, why = cpu_bf16_native()
    if not native:
        return False, why
    bf16_s, fp32_s = measure_cpu_bf16()
    speedup = fp32_s / max(bf16_s, 1e-12)
    timing = f"bf16 {bf16_s * 1e3:.0f} ms vs float32 {fp32_s * 1e3:.0f} ms on a matmul probe"
    if speedup >= MIN_SPEEDUP:
        return True, f"{why}, and {timing} ({speedup:.2f}x)"
    return False, f"{why}, but bf16 is not faster ({timing}, {speedup:.2f}x)"


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - old torch
        return "unknown"


def cpu_bf16_native() -> tuple[bool, str]:
    """Whether this CPU runs bf16 matmuls in hardware (conservative: x86 with AVX512_BF16 / AMX_BF16)."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i686", "i386", "x86"):
        return False, f"bf16 is not enabled automatically on {machine or 'this'} CPUs (set {ENV}=1 to force it)"
    flags = cpu_flags()
    hw = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    capability = cpu_capability()
    if not hw:
        return False, f"CPU has no native bf16 (no avx512_bf16 / amx_bf16; PyTorch capability {capability})"
    if not capability.upper().startswith(("AVX512", "AMX")):
        return False, f"CPU has {'+'.join(hw)} but PyTorch dispatches {capability} kernels"
    return True, f"CPU has native bf16 ({'+'.join(hw)}, PyTorch capability {capability})"


def _probe_cache() -> Path:
    return Path(os.environ.get("SEQGEN_CACHE", Path.home() / ".cache" / "seqgen")).expanduser() / "cpu_bf16_probe.json"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=None)
def measure_cpu_bf16(m: int = 1024, k: int = 768, n: int = 768, reps: int = 3) -> tuple[float, float]:
    """Seconds of ``x @ w`` and its backward under bf16 autocast and in float32: (bf16, float32).

    One warm-up each, then ``reps`` of each, interleaved, best of each kept.  Measured once per machine:
    the result is kept in ``~/.cache/seqgen/cpu_bf16_probe.json`` (``$SEQGEN_CACHE``), keyed by the CPU
    model and torch version, so that later runs -- and the ranks of a CPU DDP run -- decide the same way
    whatever the load on the machine is at the time."""
    import json

    key = f"{_cpu_model()} | torch {torch.__version__} | {m}x{k}x{n}"
    path = _probe_cache()
    try:
        cached = json.loads(path.read_text()).get(key)
        if cached:
            return float(cached[0]), float(cached[1])
    except (OSError, ValueError, AttributeError):
        cached = None
    result = _measure(m, k, n, reps)
    try:
        known = json.loads(path.read_text()) if path.exists() else {}
        known[key] = list(result)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
    except (OSError, ValueError):
        pass
    return result


def _measure(m: int, k: int, n: int, reps: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).requires_grad_()
    w = torch.randn(k, n, generator=g).requires_grad_()

    def once(bf16: bool) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = x @ w
        y.float().sum().backward()
        x.grad = w.grad = None
        return time.perf_counter() - t0

    with torch.enable_grad():
        once(False), once(True)
        times = {False: [], True: []}
        for _ in range(reps):
            for bf16 in (False, True):
                times[bf16].append(once(bf16))
    bf16_s, fp32_s = min(times[True]), min(times[False])
    log.debug("CPU bf16 probe: bf16 %.1f ms, float32 %.1f ms", bf16_s * 1e3, fp32_s * 1e3)
    return bf16_s, fp32_s
