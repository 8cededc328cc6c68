"""An out-of-tree package (examples/plugin_co2) adds a domain and a data set through entry points, and the
README's adapter example runs as written."""
import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
import types
from importlib import metadata

import numpy as np
import pytest
import torch

from conftest import ROOT
from seqgen.config import RunConfig
from seqgen.interfaces import DomainAdapter
from seqgen.registry import DATASETS, DOMAINS
from seqgen.task import GenerativeTask

PLUGIN = ROOT / "examples" / "plugin_co2"
README = ROOT / "README.md"
BEGIN, END = "<!-- adapter-example -->", "<!-- /adapter-example -->"


def _run(*args, timeout=300):
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _installed() -> bool:
    try:
        metadata.distribution("seqgen-co2")
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """seqgen-co2 pip-installed into this interpreter's environment (from a copy, so the build leaves
    nothing in the tree), uninstalled when the module's tests are done.  An install that was already
    there (``pip install -e examples/plugin_co2``) is used and left alone."""
    sys.path.insert(0, str(PLUGIN))
    try:
        from seqgen_co2 import CO2

        from seqgen.datasets import DataUnavailableError

        try:
            CO2().fetch()
        except DataUnavailableError as e:
            pytest.skip(f"the co2 data set needs the statsmodels 0.15.0 wheel, which cannot be fetched: {e}")
    finally:
        sys.path.remove(str(PLUGIN))
        for m in [m for m in sys.modules if m == "seqgen_co2" or m.startswith("seqgen_co2.")]:
            del sys.modules[m]
    ours = not _installed()
    if ours:
        src = tmp_path_factory.mktemp("plugin") / "plugin_co2"
        shutil.copytree(PLUGIN, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        _run("-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src))
    yield
    if ours:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "seqgen-co2"], capture_output=True,
                       timeout=120)


def test_installed_plugin_trains_samples_and_evaluates_through_the_cli(plugin, tmp_path):
    listed = dict(line.split(None, 1) for line in _run("-m", "seqgen.cli", "list").splitlines() if " " in line)
    assert "series" in listed["domains"].replace(",", " ").split()
    assert "co2" in listed["datasets"].replace(",", " ").split()
    run = tmp_path / "co2"
    _run("-m", "seqgen.cli", "train", str(PLUGIN / "co2.yaml"), "--out", str(run), "--no-progress",
         "--train.steps=30", "--train.eval_every=0", "--train.ckpt_every=30", "--train.log_every=10")
    _run("-m", "seqgen.cli", "sample", str(run), "--n", "4")
    x = np.loadtxt(run / "samples" / "samples.csv", delimiter=",", ndmin=2)
    assert x.shape == (4, 32) and x.min() >= 0 and x.max() <= 1
    table = _run("-m", "seqgen.cli", "eval", str(run))
    assert "bits_per_sample" in table
    res = json.loads((run / "eval.json").read_text())
    bits = res["co2"]["series"]["bits_per_sample"]
    assert math.isfinite(bits) and 0 < bits < 12


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        pytest.fail(f"README.md has no adapter example: its 'Adding a domain adapter' section must hold a "
                    f"```python block between the lines {BEGIN} and {END}")
    m = re.search(r"```python\n(.*?)```", text[text.index(BEGIN):text.index(END)], re.S)
    if m is None:
        pytest.fail(f"README.md: no ```python block between {BEGIN} and {END}")
    return m.group(1)


def test_readme_example_is_the_plugin_adapter():
    """The README shows the package's adapter class verbatim (the package registers it by entry point)."""
    code = readme_example()
    pkg = (PLUGIN / "seqgen_co2" / "adapter.py").read_text()
    assert code[code.index("class SeriesAdapter"):].strip() == pkg[pkg.index("class SeriesAdapter"):].strip()


def test_readme_adapter_example_trains_scores_and_samples(monkeypatch, tmp_path):
    # registries as they are, less anything registered from outside seqgen (an installed seqgen-co2 owns
    # the name "series"); restored afterwards
    for reg in (DOMAINS, DATASETS):
        monkeypatch.setattr(reg, "_classes", {k: v for k, v in reg._classes.items()
                                              if v.__module__.startswith("seqgen.")})
    module = types.ModuleType("readme_example")  # a module of its own, as a notebook's __main__ is
    monkeypatch.setitem(sys.modules, "readme_example", module)
    exec(compile(readme_example(), "README.md (adapter example)", "exec"), module.__dict__)
    names = [k for k, v in DOMAINS._classes.items() if v.__module__ == "readme_example"]
    assert len(names) == 1, f"the README example should register one domain adapter, registered {names}"
    (name,) = names
    cls = DOMAINS.get(name)
    options = dataclasses.asdict(cls.Config.tiny())
    adapter = cls(cls.Config.tiny())
    assert isinstance(adapter, DomainAdapter)

    @DATASETS.register("readme_example_data")
    class Examples:
        @dataclasses.dataclass
        class Config:
            n: int = 48

        def __init__(self, config=None):
            self.config = config or self.Config()

        def records(self, split):
            g = torch.Generator().manual_seed(0 if split == "train" else 1)
            return {name: adapter.example_batch(self.config.n, g)}

    cfg = RunConfig.from_dict({
        "name": "readme_example", "seed": 0,
        "domains": {name: {"adapter": name, **options}},
        "mixture": [{"name": "ex", "source": {"name": "readme_example_data"}, "target": [name]}],
        "backbone": {"name": "transformer", "dim": 32, "layers": 1, "heads": 2},
        "paradigm": {"name": "ar"},
        "train": {"steps": 1, "batch_size": 8},
    })
    task = GenerativeTask(cfg)
    opt = torch.optim.AdamW(task.model.parameters(), lr=1e-3)
    batch = task.make_batch(task.train_sampler(8, seed=0).next(), generator=torch.Generator().manual_seed(0))
    loss, _ = task.model.loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    nll = task.evaluate_nll(batch_size=16)
    assert math.isfinite(nll[f"ex/{name}/bits_per_{adapter.unit}"]) and nll["heldout_tokens"] > 0
    out = task.generate(entry="ex", n=3, generator=torch.Generator().manual_seed(0))
    items = [r[name] for r in out]
    assert len(items) == 3
    (path,) = task.write_samples("ex", out, tmp_path / "samples")
    assert path.exists() and path.suffix == adapter.sample_suffix
    # decode inverts encode up to the binning, whatever order the tokens come in
    x = adapter.example_batch(4, torch.Generator().manual_seed(2))
    seq = adapter.encode(x)
    flip = seq.replace(ids=seq.ids.flip(1), pos=seq.pos.flip(1))
    back = np.stack(adapter.decode(flip))
    assert back.shape == np.stack(x).shape
    assert np.abs(back - np.clip(np.stack(x), 0, 1)).max() <= 1 / options["bins"]
