"""Run configuration: a YAML file over the components' own ``Config`` dataclasses, with dotted
command-line overrides, parsed and type-checked by jsonargparse.

    name: mnist_scenes
    domains:                                 # the run's domains; the runtime assigns modality indices
      caption: {adapter: text, tokenizer: bytes, max_length: 48}
      scene:   {adapter: image, height: 28, width: 56, tokenizer: runs/mnist_fsq}
    heads: {caption: categorical, scene: categorical}   # one per target domain (default: categorical)
    mixture:                                 # sources, each with its recipe and weight
      - {name: text_to_image, source: mnist_scenes, cond: [caption], target: [scene], fields: {scene: image}}
      - {name: image_to_text, source: mnist_scenes, cond: [scene], target: [caption], fields: {scene: image}}
    loss_weights: {caption: 1.0, scene: 1.0}
    backbone:  {name: transformer, dim: 128, layers: 4}
    paradigm:  {name: ar, order: raster}
    train:     {steps: 2000, batch_size: 64, lr: 2e-3}

    seqgen train run.yaml --backbone.dim=256 --domains.scene.scan=column --train.steps=100

Each component section names a registered component; its other keys are that component's Config
fields, so ``seqgen train run.yaml --help`` lists every option of the chosen components and a typo is
an error naming the accepted keys.  A mixture entry reads record fields into domains: a domain reads
the field of its own name unless ``fields`` maps it to another; ``stream: true`` joins the target
text of all records into one stream cut into windows (language modelling).  The resolved config is
saved with every checkpoint (JSON), so a run rebuilds from its folder alone.
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
    """micro-batches per optimizer step (each head's token mean is over the whole step: one large batch exactly)"""
    pack: int = 0
    """0: one example per row, padded; n > 0: pack examples into rows of n tokens (a same_document mask,
    coordinates restarting per example; the loss of every example is unchanged)"""
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
    """auto (GPU: bf16-mixed; CPU: bf16-mixed only where the CPU runs bf16 natively and faster, else 32-true; the choice is logged) or any Fabric precision"""
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    """Fabric strategy: auto, ddp, fsdp, ..."""
    num_nodes: int = 1
    threads: int = 0
    """CPU threads for torch (0: torch's default)"""
    compile: bool = False
    """torch.compile the training objective (GPU; on CPU too where a C++ compiler works, else trains
    eagerly and says so). The compile time is part of a time-budgeted run's budget"""


@dataclass
class SampleConfig:
    num: int = 100
    """samples to draw (class-conditional: rounded to a multiple of the class count)"""
    entry: str = ""
    """mixture entry (recipe) to sample from (default: the first, or the one a prompt selects)"""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float = 1.0
    """classifier-free guidance scale (1: no guidance)"""
    cfg_schedule: str = "constant"
    """constant or linear (1 -> cfg_scale over the decoding steps)"""
    order: str = "raster"
    """generation order: raster or random (models trained with random orders)"""
    steps: int = 0
    """masked / next-scale paradigms: decoding steps per segment (0: the paradigm's default)"""
    length: int = 500
    """text streams: tokens to generate per sample (variable-length targets stop at their END id or
    the domain's max_length)"""
    prompt: str = "\n"
    """text: what the samples continue"""
    seed: int = 0
    batch_size: int = 500


@dataclass
class EvalConfig:
    samples: int = 1000
    """samples drawn per mixture entry for its sample-based metrics (conditions from held-out records,
    cycled when there are fewer)"""
    cfg_scale: float = 2.0
    """guidance scale of the guided sample set"""
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    steps: int = 0
    """masked / next-scale paradigms: decoding steps per segment (0: the paradigm's default)"""
    greedy: bool = True
    """also score samples decoded greedily (temperature 0, no guidance): the captioning protocol"""
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
TASKS = {"generative": ("backbone", "paradigm"), "tokenizer": ("data", "tokenizer")}
#: generative runs: the sections that hold several components or a recipe list
MULTI = ("domains", "heads", "mixture", "loss_weights")
DEFAULT_NAMES = {"backbone": "transformer", "head": "categorical", "paradigm": "ar", "tokenizer": "fsq"}
ENTRY_KEYS = {"name", "source", "cond", "target", "fields", "weight", "stream"}
OLD_SECTIONS = {"data", "domain", "head", "condition"}


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


def _as_list(v, what: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise SeqgenError(f"{what} must be a domain name or a list of domain names; got {v!r}")
    return list(v)


def normalize_multi(raw: dict) -> dict:
    """domains / heads / mixture / loss_weights of a generative config, in one canonical form:
    domains {key: {adapter, ...}}, heads {key: {name, ...}}, mixture [{name, source: {name, ...}, cond,
    target, fields, weight, stream}].  Errors name the entry and the problem."""
    old = sorted(OLD_SECTIONS & set(raw))
    if old:
        raise SeqgenError(f"config section(s) {old} are from the single-domain format; a run now names its "
                          "domains, heads and a mixture of sources with recipes, e.g.\n"
                          "  domains: {label: {adapter: label, num_classes: 10}, image: {adapter: image, height: 8}}\n"
                          "  mixture: [{source: {name: digits}, cond: [label], target: [image]}]\n"
                          "(see examples/configs/digits_ar.yaml)")
    domains = raw.get("domains")
    if not isinstance(domains, dict) or not domains:
        raise SeqgenError("a generative run needs a `domains:` mapping of domain name -> {adapter: NAME, options}")
    out_domains = {}
    for key, d in domains.items():
        d = {} if d is None else d
        if isinstance(d, str):
            d = {"adapter": d}
        if not isinstance(d, dict):
            raise SeqgenError(f"domains.{key} must be a mapping {{adapter: NAME, ...}}; got {d!r}")
        d = dict(d)
        d.setdefault("adapter", key)
        DOMAINS.get(d["adapter"])  # unknown names fail here, listing the known ones
        out_domains[str(key)] = d
    mixture = raw.get("mixture")
    if not isinstance(mixture, list) or not mixture:
        raise SeqgenError("a generative run needs a `mixture:` list of entries {source, cond, target, weight}")
    out_mix, names = [], set()
    for i, e in enumerate(mixture):
        if not isinstance(e, dict):
            raise SeqgenError(f"mixture[{i}] must be a mapping; got {e!r}")
        bad = sorted(set(e) - ENTRY_KEYS)
        if bad:
            raise SeqgenError(f"mixture[{i}] has unknown key(s) {bad}; keys are {sorted(ENTRY_KEYS)}")
        src = e.get("source")
        if isinstance(src, str):
            src = {"name": src}
        if not isinstance(src, dict) or "name" not in src:
            raise SeqgenError(f"mixture[{i}] needs source: NAME or {{name: NAME, options}}")
        DATASETS.make_config(src["name"], src)  # unknown sources or options fail here
        cond, target = _as_list(e.get("cond"), f"mixture[{i}].cond"), _as_list(e.get("target"), f"mixture[{i}].target")
        if not target:
            raise SeqgenError(f"mixture[{i}] has no target domain: what should the model learn to generate?")
        for k in cond + target:
            if k not in out_domains:
                raise SeqgenError(f"mixture[{i}] names domain {k!r}, which is not in domains: {sorted(out_domains)}")
        if set(cond) & set(target):
            raise SeqgenError(f"mixture[{i}]: a domain cannot be both condition and target: {sorted(set(cond) & set(target))}")
        fields = e.get("fields") or {}
        if not isinstance(fields, dict) or set(fields) - set(cond + target):
            raise SeqgenError(f"mixture[{i}].fields maps domains of this entry to record fields; got {fields!r}")
        weight = float(e.get("weight", 1.0))
        if not weight > 0:
            raise SeqgenError(f"mixture[{i}].weight must be > 0, got {weight}")
        stream = bool(e.get("stream", False))
        if stream and (cond or len(target) != 1):
            raise SeqgenError(f"mixture[{i}]: stream: true needs exactly one target domain and no condition")
        name = str(e.get("name") or ("_".join(cond) + "_to_" if cond else "") + "_".join(target))
        if name in names:
            raise SeqgenError(f"two mixture entries are named {name!r}; give each a distinct name")
        names.add(name)
        out_mix.append({"name": name, "source": src, "cond": cond, "target": target,
                        "fields": {k: str(v) for k, v in fields.items()}, "weight": weight, "stream": stream})
    targets = [k for e in out_mix for k in e["target"]]
    heads = raw.get("heads")
    if heads is None:
        heads = {k: "categorical" for k in dict.fromkeys(targets)}
    if not isinstance(heads, dict):
        raise SeqgenError(f"heads must map domain names to head names; got {heads!r}")
    out_heads = {}
    for key, h in heads.items():
        if key not in out_domains:
            raise SeqgenError(f"heads.{key}: no such domain; domains are {sorted(out_domains)}")
        h = {"name": h} if isinstance(h, str) else dict(h or {})
        h.setdefault("name", DEFAULT_NAMES["head"])
        HEADS.get(h["name"])
        out_heads[str(key)] = h
    missing = sorted(set(targets) - set(out_heads))
    if missing:
        raise SeqgenError(f"target domain(s) {missing} have no head; add them to heads: (e.g. {missing[0]}: categorical)")
    lw = raw.get("loss_weights") or {}
    if not isinstance(lw, dict) or set(lw) - set(out_heads):
        raise SeqgenError(f"loss_weights maps head domains {sorted(out_heads)} to weights; got {lw!r}")
    return {"domains": out_domains, "heads": out_heads, "mixture": out_mix,
            "loss_weights": {k: float(v) for k, v in lw.items()}}


def build_parser(task: str, names: dict[str, str], prog: str = "seqgen train", multi: dict | None = None):
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog=prog, exit_on_error=False, description="Train a seqgen model from a YAML config.")
    p.add_argument("--config", action=ActionConfigFile, help="YAML config (the positional CONFIG)")
    p.add_argument("--name", type=str, default="run", help="run name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", type=str, default="generative", help="generative or tokenizer")
    for sec in TASKS[task]:
        reg = COMPONENTS[sec]
        p.add_argument(f"--{sec}.name", type=str, default=names[sec], help=f"{reg.kind}: {', '.join(reg.names())}")
        p.add_class_arguments(reg.config_class(names[sec]), sec)
    if task == "generative" and multi is not None:
        for key, d in multi["domains"].items():
            p.add_argument(f"--domains.{key}.adapter", type=str, default=d["adapter"],
                           help=f"domain adapter: {', '.join(DOMAINS.names())}")
            p.add_class_arguments(DOMAINS.config_class(d["adapter"]), f"domains.{key}")
        for key, h in multi["heads"].items():
            p.add_argument(f"--heads.{key}.name", type=str, default=h["name"], help=f"head: {', '.join(HEADS.names())}")
            p.add_class_arguments(HEADS.config_class(h["name"]), f"heads.{key}")
        p.add_argument("--mixture", type=list, default=multi["mixture"],
                       help="sources with recipes: [{name, source, cond, target, fields, weight, stream}]")
        p.add_argument("--loss_weights", type=dict, default=multi["loss_weights"], help="domain -> loss weight")
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
    multi = None
    allowed = set(TASKS[task]) | set(PLAIN) | {"name", "seed", "task"}
    if task == "generative":
        for key in list(raw.get("domains") or {}):  # an adapter swapped on the command line
            a = _override_value(overrides, f"domains.{key}.adapter")
            if a:
                raw["domains"][key] = {"adapter": a}
        multi = normalize_multi(raw)
        raw = {**raw, **multi}
        allowed |= set(MULTI)
    extra = sorted(set(raw) - allowed)
    if extra:
        raise SeqgenError(f"unknown config section(s) {extra} for task {task!r}; sections are: {', '.join(sorted(allowed))}")
    parser = build_parser(task, names, prog, multi)
    from jsonargparse import ArgumentError

    try:
        ns = parser.parse_args(["--config", yaml.safe_dump(raw)] + overrides, defaults=True)
    except ArgumentError as e:
        raise SeqgenError(f"bad config: {e}") from None
    d = json.loads(json.dumps(ns.as_dict(), default=str))
    d.pop("config", None)
    if task == "generative":  # overrides of the mixture / weights are checked again
        d.update(normalize_multi({"domains": d["domains"], "heads": d["heads"], "mixture": d["mixture"],
                                  "loss_weights": d.get("loss_weights")}))
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
        secs = TASKS[d["task"]] + (MULTI if d["task"] == "generative" else ())
        return cls(name=d["name"], seed=d["seed"], task=d["task"], components={sec: d[sec] for sec in secs},
                   **{sec: _make(c, d[sec]) for sec, c in PLAIN.items()})

    def to_dict(self) -> dict:
        out = {"name": self.name, "seed": self.seed, "task": self.task}
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

    # ------------------------------------------------------------ generative runs
    @property
    def domains(self) -> dict[str, dict]:
        return self.components["domains"]

    @property
    def heads(self) -> dict[str, dict]:
        return self.components["heads"]

    @property
    def mixture(self) -> list[dict]:
        return self.components["mixture"]

    @property
    def loss_weights(self) -> dict[str, float]:
        return self.components.get("loss_weights") or {}

    def build_domain(self, key: str):
        opts = dict(self.domains[key])
        return DOMAINS.build(opts.pop("adapter"), opts)

    def build_head(self, key: str, dim: int, spec):
        opts = dict(self.heads[key])
        return HEADS.build(opts.pop("name"), opts, dim, spec)


def _make(cls, d: dict):
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})
