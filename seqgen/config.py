"""Run configuration: a YAML file over the components' own ``Config`` dataclasses, with dotted
command-line overrides, parsed and type-checked by jsonargparse.

    name: digits_ar
    task: generative            # or: tokenizer
    condition: class            # none | class
    data:      {name: digits, heldout: 300}
    domain:    {name: image, height: 8, width: 8, levels: 17}
    backbone:  {name: transformer, dim: 128, layers: 4}
    head:      {name: categorical}
    paradigm:  {name: ar, order: random}
    train:     {steps: 2000, batch_size: 64, lr: 2e-3}

    seqgen train run.yaml --backbone.dim=256 --train.steps=100

Each component section names a registered component; its other keys are that component's Config
fields, so ``seqgen train run.yaml --help`` lists every option of the chosen components and a typo is
an error naming the accepted keys.  The resolved config is saved with every checkpoint (JSON), so a
run rebuilds from its folder alone.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
import yaml

from .registry import BACKBONES, DATASETS, DOMAINS, HEADS, PARADIGMS, TOKENIZERS, Registry
from .types import SeqgenError


@dataclass
class TrainConfig:
    steps: int = 1000
    """optimizer steps"""
    batch_size: int = 64
    """examples per micro-batch (per device)"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    lr: float = 1e-3
    """peak learning rate (AdamW)"""
    min_lr_ratio: float = 0.1
    """cosine decay ends at lr * min_lr_ratio"""
    warmup_steps: int = 100
    weight_decay: float = 0.1
    """decoupled weight decay on matrices (not on norms, biases or embeddings)"""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """clip the global gradient norm (0 disables)"""
    ema: float = 0.0
    """decay of an exponential moving average of the weights used for eval and sampling (0 disables)"""
    eval_every: int = 500
    """evaluation every this many steps (0: only at the end): on the validation split when
    train.val_fraction > 0, else on the held-out split"""
    eval_batches: int = 0
    """batches per evaluation during training (0: the whole split)"""
    val_fraction: float = 0.0
    """hold this fraction of the training split aside for validation (text: the end of the training
    text; images: a seeded random subset); periodic evaluations score it instead of the held-out split"""
    keep_best: bool = False
    """keep the weights (EMA weights when train.ema > 0) with the best validation NLL in RUN_DIR/best;
    `seqgen sample` and `seqgen eval` use them.  Needs val_fraction > 0 and eval_every > 0"""
    log_every: int = 20
    ckpt_every: int = 1000
    """checkpoint every this many steps (the last step is always saved)"""
    keep_checkpoints: int = 2
    time_limit: float = 0.0
    """stop (and save) once training has run this many seconds; 0 disables"""
    schedule: str = "steps"
    """steps: the cosine decay (and RAR annealing) run over train.steps; time: over train.time_limit
    seconds of training (a fixed wall-clock budget; then train.steps is only an upper bound)"""
    precision: str = "auto"
    """auto (32-true on CPU, bf16-mixed on GPU) or any Fabric precision"""
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    """Fabric strategy: auto, ddp, fsdp, ..."""
    num_nodes: int = 1
    threads: int = 0
    """CPU threads for torch (0: torch's default)"""
    compile: bool = False
    """torch.compile the model (GPU)"""


@dataclass
class SampleConfig:
    num: int = 100
    """samples to draw (class-conditional: rounded to a multiple of the class count)"""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float = 1.0
    """classifier-free guidance scale (1: no guidance)"""
    cfg_schedule: str = "constant"
    """constant or linear (1 -> cfg_scale over the decoding steps)"""
    order: str = "raster"
    """generation order: raster or random (models trained with random orders)"""
    length: int = 500
    """text: tokens to generate per sample"""
    prompt: str = "\n"
    """text: what the samples continue"""
    seed: int = 0
    batch_size: int = 500


@dataclass
class EvalConfig:
    samples_per_class: int = 100
    """class-conditional images: samples per class scored by the digit classifier"""
    cfg_scale: float = 2.0
    """guidance scale of the guided sample set"""
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    stride: int = 0
    """text: sliding-window stride of the held-out evaluation (0: half the context)"""
    compressors: bool = True
    """text: also report bz2 / xz / gzip bits per byte on the same held-out text"""
    dynamic: bool = False
    """text: also report dynamic evaluation (the model adapts, by gradient steps, to held-out text
    once that text has been scored; Krause et al. 2018)"""
    dynamic_lrs: list[float] = field(default_factory=lambda: [0.003, 0.01, 0.03])
    """dynamic evaluation learning rates tried on the validation split; the best one scores the
    held-out split.  Without a validation split give exactly one"""
    dynamic_segment: int = 0
    """dynamic evaluation: tokens scored between two adaptation steps (0: eval.stride, else half the context)"""
    dynamic_optimizer: str = "sgd"
    """dynamic evaluation steps: sgd or adam (sgd was better on Shakespeare, CPU and GPU models alike)"""
    seed: int = 1234


@dataclass
class ModelConfig:
    max_target_pos: int = 1024
    """random-order AR: size of the target-position tables (largest coordinate + 1)"""


COMPONENTS: dict[str, Registry] = {"data": DATASETS, "domain": DOMAINS, "backbone": BACKBONES, "head": HEADS,
                                   "paradigm": PARADIGMS, "tokenizer": TOKENIZERS}
PLAIN: dict[str, type] = {"train": TrainConfig, "sample": SampleConfig, "eval": EvalConfig, "model": ModelConfig}
TASKS = {"generative": ("data", "domain", "backbone", "head", "paradigm"), "tokenizer": ("data", "tokenizer")}
DEFAULT_NAMES = {"backbone": "transformer", "head": "categorical", "paradigm": "ar", "tokenizer": "fsq"}
CONDITIONS = ("none", "class")


def _load_source(source) -> dict:
    if source is None:
        return {}
    if isinstance(source, dict):
        return json.loads(json.dumps(source))  # deep copy, tuples -> lists
    path = Path(source)
    if not path.exists():
        raise SeqgenError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SeqgenError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SeqgenError(f"config file {path} must hold a mapping of sections; got {type(raw).__name__}")
    return raw


def _override_value(overrides: list[str], key: str) -> str | None:
    val = None
    for i, a in enumerate(overrides):
        if a.startswith(f"--{key}="):
            val = a.split("=", 1)[1]
        elif a == f"--{key}" and i + 1 < len(overrides):
            val = overrides[i + 1]
    return val


def build_parser(task: str, names: dict[str, str], prog: str = "seqgen train"):
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog=prog, exit_on_error=False, description="Train a seqgen model from a YAML config.")
    p.add_argument("--config", action=ActionConfigFile, help="YAML config (the positional CONFIG)")
    p.add_argument("--name", type=str, default="run", help="run name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", type=str, default="generative", help="generative or tokenizer")
    p.add_argument("--condition", type=str, default="none", help="none or class")
    for sec in TASKS[task]:
        reg = COMPONENTS[sec]
        p.add_argument(f"--{sec}.name", type=str, default=names[sec], help=f"{reg.kind}: {', '.join(reg.names())}")
        p.add_class_arguments(reg.config_class(names[sec]), sec)
    for sec, cls in PLAIN.items():
        p.add_class_arguments(cls, sec)
    return p


def resolve_config(source=None, overrides: list[str] | tuple = (), prog: str = "seqgen train") -> dict:
    """YAML path or dict, plus ``--dotted.key=value`` overrides -> the resolved, type-checked dict."""
    overrides = list(overrides)
    raw = _load_source(source)
    task = _override_value(overrides, "task") or raw.get("task", "generative")
    if task not in TASKS:
        raise SeqgenError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    names = {}
    for sec in TASKS[task]:
        section = raw.get(sec) or {}
        if not isinstance(section, dict):
            raise SeqgenError(f"config section {sec!r} must be a mapping; got {section!r}")
        name = _override_value(overrides, f"{sec}.name") or section.get("name") or DEFAULT_NAMES.get(sec)
        if not name:
            raise SeqgenError(f"config section {sec!r} needs a name ({COMPONENTS[sec].kind}s: "
                              f"{', '.join(COMPONENTS[sec].names())})")
        COMPONENTS[sec].get(name)  # unknown names fail here, listing the known ones
        names[sec] = name
    extra = sorted(set(raw) - set(TASKS[task]) - set(PLAIN) - {"name", "seed", "task", "condition"})
    if extra:
        raise SeqgenError(f"unknown config section(s) {extra} for task {task!r}; sections are: "
                          f"name, seed, task, condition, {', '.join(TASKS[task] + tuple(PLAIN))}")
    parser = build_parser(task, names, prog)
    from jsonargparse import ArgumentError

    try:
        ns = parser.parse_args(["--config", yaml.safe_dump(raw)] + overrides, defaults=True)
    except ArgumentError as e:
        raise SeqgenError(f"bad config: {e}") from None
    d = json.loads(json.dumps(ns.as_dict(), default=str))
    d.pop("config", None)
    if d["condition"] not in CONDITIONS:
        raise SeqgenError(f"unknown condition {d['condition']!r}; known: {', '.join(CONDITIONS)}")
    tr = d.get("train", {})
    if not 0 <= tr.get("val_fraction", 0.0) < 1:
        raise SeqgenError(f"train.val_fraction must be in [0, 1), got {tr['val_fraction']}")
    if tr.get("keep_best") and not (tr.get("val_fraction", 0) > 0 and tr.get("eval_every", 0) > 0):
        raise SeqgenError("train.keep_best selects weights on a validation split: it needs train.val_fraction > 0 "
                          "and train.eval_every > 0 (never on the held-out split)")
    return d


@dataclass
class RunConfig:
    name: str
    seed: int
    task: str
    condition: str
    components: dict[str, dict]
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    @classmethod
    def load(cls, source=None, overrides=()) -> "RunConfig":
        return cls.from_dict(resolve_config(source, overrides))

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = resolve_config(d)
        return cls(name=d["name"], seed=d["seed"], task=d["task"], condition=d["condition"],
                   components={sec: d[sec] for sec in TASKS[d["task"]]},
                   **{sec: _make(c, d[sec]) for sec, c in PLAIN.items()})

    def to_dict(self) -> dict:
        out = {"name": self.name, "seed": self.seed, "task": self.task, "condition": self.condition}
        out.update(json.loads(json.dumps(self.components)))
        for sec in PLAIN:
            out[sec] = dataclasses.asdict(getattr(self, sec))
        return json.loads(json.dumps(out))

    def component(self, section: str) -> tuple[str, dict]:
        """(registered name, options) of a component section."""
        if section not in self.components:
            raise SeqgenError(f"this {self.task} run has no {section!r} section")
        opts = dict(self.components[section])
        return opts.pop("name"), opts

    def build(self, section: str, *args, **kwargs):
        name, opts = self.component(section)
        return COMPONENTS[section].build(name, opts, *args, **kwargs)


def _make(cls, d: dict):
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})
