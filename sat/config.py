"""Typed, validated view of the root config.py.

`load_config(task, preset=None, overrides=None)` merges CONFIG[task], an optional preset and overrides
(same nested shape), then checks every key and value. Any problem raises ConfigError with a one-line message
that says what to do; the CLIs turn it into exit code 2.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sat.shapes import block_grid_problem

ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """Bad configuration or command-line value (exit code 2)."""


@dataclass
class DatasetConfig:
    max_seq_len: int               # padded tokens; image_folder: 0 = 1 + (img/patch)^2 rounded up to blocks
    num_classes: int               # 0 = from the data: class folders (image_folder) or the meta's count
    two_inputs: bool = False
    vocab_size: int = 0            # 0 = read from the processed data's meta.json
    generate: dict = field(default_factory=dict)   # ListOps generator settings for presets
    kind: str = "lra"              # lra (processed .npz) | image_folder ({data_dir}/{train,val}/{class}/)
    img_size: int = 224            # image_folder: square input size
    patch_size: int = 16           # image_folder: ViT patch size
    num_workers: int = 8           # image_folder: DataLoader worker processes per rank
    crop_pct: float = 0.875        # image_folder: evaluation resizes to img_size / crop_pct, centre-crops
    source: str = ""               # "" = processed files in data_dir | "fashion-mnist" (made from the release)
    channels: int = 0              # image_folder: input channels; 0 = from the data (1 Fashion-MNIST, 3 folders)


@dataclass
class ModelConfig:
    num_layers: int
    dim: int
    hidden_dim: int
    num_heads: int
    head_dim: int
    dropout: float = 0.1
    attn_dropout: float = 0.1
    pooling: str = "mean"
    mlp: str = "dense"             # dense | monarch
    nblocks: int = 4
    recompute: str = "off"         # off | sparse: after the switch, recompute each block's activations in the backward


@dataclass
class TrainingConfig:
    batch_size: int                # LRA: the global batch, split over the ranks; image folders: per GPU
    learning_rate: float
    train_steps: int = 0           # total optimizer steps (ignored when epochs > 0)
    epochs: float = 0.0            # > 0: train_steps = round(epochs * batches per epoch of one rank)
    weight_decay: float = 0.01
    warmup_steps: int = 0
    warmup_epochs: float = 0.0     # > 0: warmup_steps = round(warmup_epochs * batches per epoch)
    label_smoothing: float = 0.0
    mixup: float = 0.0             # Mixup alpha (image_folder tasks; 0 = off)
    cutmix: float = 0.0            # CutMix alpha (image_folder tasks; 0 = off)
    eval_frequency: int = 500
    checkpoint_every: int | str = "5min"  # also between evaluations: N steps, or "M min" of wall time; 0 = off
    num_eval_batches: int = 0      # 0 = the whole dev split
    clip_value: float = 1.0
    amp: str = "auto"              # auto | off | bf16 | fp16


@dataclass
class SparsityConfig:
    sk: float = 1.7
    ds: float = 1.3
    density: float = 0.05
    block_size: int = 64
    attn_loss_scale: float = 0.01
    monitor_every: int = 1
    max_dense_steps: int = 0       # 0 = never force the switch
    lr_scale_after_transition: float = 0.5
    # The top-k of the measured block mass with every diagonal block kept: what measured best on LRA (ListOps,
    # bench/results/parity-*.txt). SAT's own rule is pattern "learned" without the diagonal rule.
    pattern: str = "measured"      # learned | measured | coverage | random (a negative control)
    recall_target: float = 0.9     # coverage: keep the fewest blocks holding this fraction of the measured mass
    min_density: float = 0.02      # coverage: bounds on the blocks kept (before diagonal blocks for empty rows)
    max_density: float = 0.5
    recall_batches: int = 4        # dev batches over which the layout recall (and coverage's mass) is measured
    per_head: bool = False
    keep_diagonal: bool = True     # every query block keeps its own key block, within the blocks chosen
    selection: str = "global"      # top-k patterns: global (SAT) | rows (spread over query rows) | stripes (columns)
    s2d_fraction: float = 0.7      # Monarch MLPs densified at this fraction of train_steps (mlp: monarch)
    enabled: bool = True           # False = dense-only training (the monitor still runs and logs)


@dataclass
class TaskConfig:
    task: str
    dataset: DatasetConfig
    model: ModelConfig
    training: TrainingConfig
    sparsity: SparsityConfig

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PATTERNS = ("learned", "measured", "coverage", "random")  # sparsity.pattern: how the switch picks its blocks
SELECTIONS = ("global", "rows", "stripes")  # sparsity.selection (sat.sparsity.pattern.selection_scores)
SOURCES = ("", "fashion-mnist")  # dataset.source: data the trainer prepares itself from an installed release

SECTIONS = {"dataset": DatasetConfig, "model": ModelConfig, "training": TrainingConfig, "sparsity": SparsityConfig}


def _load_root_config():
    path = ROOT / "config.py"
    spec = importlib.util.spec_from_file_location("sat_root_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CONFIG, getattr(module, "PRESETS", {})


def tasks() -> list[str]:
    return sorted(_load_root_config()[0])


def presets() -> dict:
    """config.py's PRESETS: preset name -> {task: partial config dict}."""
    return _load_root_config()[1]


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def merge(base: dict, extra: dict) -> dict:
    """`extra` laid over `base` (nested dicts merged key by key; dataset.generate replaced whole)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "generate":
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict, "int | str": (int, str)}


def _coerce(section: str, name: str, value: Any, typ) -> Any:
    where = f"{section}.{name}"
    typ = _TYPES.get(typ, typ)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {where} must be a finite number, got {value!r}; fix it in config.py or "
                          f"on the command line")
    if (int in (typ if isinstance(typ, tuple) else (typ,)) and isinstance(value, bool)) or not isinstance(value, typ):
        kind = " or ".join(t.__name__ for t in typ) if isinstance(typ, tuple) else typ.__name__
        raise ConfigError(f"config key {where} must be of type {kind}, got {value!r}; fix it in config.py "
                          f"or on the command line")
    return value


def _build_section(section: str, values: dict):
    cls = SECTIONS[section]
    if not isinstance(values, dict):
        raise ConfigError(f"config section {section} must map keys to values, got {values!r}; set single keys "
                          f"with --set {section}.KEY=VALUE")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise ConfigError(f"unknown config key {section}.{key}{_suggest(key, fields)}; valid keys: "
                              f"{', '.join(fields)}")
    kwargs = {k: _coerce(section, k, v, fields[k].type) for k, v in values.items()}
    required = [f.name for f in fields.values()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in kwargs]
    if missing:
        raise ConfigError(f"config section {section} lacks required keys {missing}; add them in config.py")
    return cls(**kwargs)


def validate(cfg: TaskConfig) -> TaskConfig:
    """Value checks that cut across fields; raise ConfigError."""
    d, m, t, s = cfg.dataset, cfg.model, cfg.training, cfg.sparsity
    image = d.kind == "image_folder"
    checks = [
        (d.max_seq_len > 0, "dataset.max_seq_len must be positive"),
        (d.num_classes >= 2 or d.num_classes == 0 or image,
         "dataset.num_classes must be at least 2 (or 0: the count in the data's meta)"),
        (m.num_layers > 0 and m.dim > 0 and m.hidden_dim > 0 and m.num_heads > 0 and m.head_dim > 0,
         "model sizes (num_layers, dim, hidden_dim, num_heads, head_dim) must be positive"),
        (0.0 <= m.dropout < 1.0 and 0.0 <= m.attn_dropout < 1.0, "model dropouts must lie in [0, 1)"),
        (m.pooling in ("mean", "cls"), f"model.pooling must be 'mean' or 'cls', got {m.pooling!r}"),
        (m.mlp in ("dense", "monarch"), f"model.mlp must be 'dense' or 'monarch', got {m.mlp!r}"),
        (m.recompute in ("off", "sparse"), f"model.recompute must be 'off' or 'sparse', got {m.recompute!r}"),
        (m.nblocks >= 1, "model.nblocks must be at least 1"),
        (t.batch_size > 0, "training.batch_size must be positive"),
        (t.learning_rate > 0, "training.learning_rate must be positive"),
        (t.train_steps > 0 or t.epochs > 0,
         "training.train_steps must be positive (use --train_steps N with N >= 1, or --epochs E)"),
        (t.train_steps >= 0 and t.epochs >= 0 and t.warmup_epochs >= 0,
         "training.train_steps, epochs and warmup_epochs must be >= 0"),
        (0.0 <= t.label_smoothing < 1.0, "training.label_smoothing must lie in [0, 1)"),
        (t.mixup >= 0 and t.cutmix >= 0, "training.mixup and training.cutmix (alphas) must be >= 0"),
        (image or (t.mixup == 0 and t.cutmix == 0),
         "training.mixup / cutmix apply to image_folder tasks only"),
        (d.source in SOURCES, f"dataset.source must be one of {', '.join(map(repr, SOURCES))}, got {d.source!r}"),
        (d.kind in ("lra", "image_folder"), f"dataset.kind must be 'lra' or 'image_folder', got {d.kind!r}"),
        (not image or (d.patch_size > 0 and d.img_size > 0 and d.img_size % d.patch_size == 0),
         f"dataset.img_size {d.img_size} must be a positive multiple of dataset.patch_size {d.patch_size}"),
        (not image or d.max_seq_len >= image_tokens(d),
         f"dataset.max_seq_len {d.max_seq_len} is shorter than the {image_tokens(d) if image else 0} image "
         f"tokens; set it to 0 (derived)"),
        (not image or (not d.two_inputs and (d.num_classes == 0 or d.num_classes >= 2)),
         "image_folder tasks have one input and num_classes >= 2 (or 0 = count the class folders)"),
        (d.num_workers >= 0 and 0.0 < d.crop_pct <= 1.0,
         "dataset.num_workers must be >= 0, crop_pct in (0, 1]"),
        (d.channels >= 0 and (image or d.channels == 0),
         f"dataset.channels applies to image_folder tasks and must be >= 0 (0 = from the data), got {d.channels}"),
        (t.warmup_steps >= 0 and t.eval_frequency > 0 and t.num_eval_batches >= 0,
         "training.warmup_steps and num_eval_batches must be >= 0 and eval_frequency > 0"),
        (t.weight_decay >= 0 and t.clip_value >= 0, "training.weight_decay and clip_value must be >= 0"),
        (t.amp in ("auto", "off", "bf16", "fp16"), f"training.amp must be auto, off, bf16 or fp16, got {t.amp!r}"),
        (0.0 < s.density <= 1.0, f"sparsity.density must lie in (0, 1], got {s.density} (try --density 0.05)"),
        (s.sk >= 0 and s.ds >= 0, f"sparsity thresholds must be non-negative, got sk={s.sk} ds={s.ds}"),
        (not block_grid_problem(d.max_seq_len, s.block_size),
         f"sparsity.block_size {s.block_size} must divide the padded length dataset.max_seq_len "
         f"{d.max_seq_len}; choose a power of two such as 32 or 64"),
        (s.monitor_every >= 1, "sparsity.monitor_every must be at least 1"),
        (s.max_dense_steps >= 0, "sparsity.max_dense_steps must be >= 0 (0 = never force)"),
        (s.attn_loss_scale >= 0, "sparsity.attn_loss_scale must be >= 0"),
        (s.lr_scale_after_transition > 0, "sparsity.lr_scale_after_transition must be positive"),
        (s.pattern in PATTERNS, f"sparsity.pattern must be one of {', '.join(map(repr, PATTERNS))}, got {s.pattern!r}"),
        (s.selection in SELECTIONS, f"sparsity.selection must be one of {', '.join(map(repr, SELECTIONS))}, got "
                                    f"{s.selection!r}"),
        (0.0 < s.recall_target <= 1.0, f"sparsity.recall_target must lie in (0, 1], got {s.recall_target}"),
        (0.0 < s.min_density <= s.max_density <= 1.0,
         f"sparsity needs 0 < min_density <= max_density <= 1, got min_density {s.min_density} and max_density "
         f"{s.max_density}"),
        (s.recall_batches >= 1, f"sparsity.recall_batches must be at least 1, got {s.recall_batches}"),
        (0.0 < s.s2d_fraction <= 1.0, "sparsity.s2d_fraction must lie in (0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    checkpoint_interval(t.checkpoint_every)
    _check_generate(d)
    nb = d.max_seq_len // s.block_size
    if int(nb * nb * s.density) < 1:
        raise ConfigError(f"density {s.density} keeps no block of the {nb}x{nb} block grid; raise --density or "
                          f"lower block_size")
    if s.pattern == "coverage" and int(nb * nb * s.max_density) < 1:
        raise ConfigError(f"sparsity.max_density {s.max_density} keeps no block of the {nb}x{nb} block grid; "
                          f"raise it or lower block_size")
    return cfg


# dataset.generate: keyword arguments of sat.data.listops.generate_listops and their (type, lowest value)
GENERATE = {"n_train": (int, 1), "n_val": (int, 1), "n_test": (int, 1), "min_len": (int, 0),
            "max_len": (int, 1), "max_depth": (int, 1), "seed": (int, 0), "max_args": (int, 2),
            "value_p": (float, 0.0)}


def _check_generate(d: DatasetConfig) -> None:
    for key, value in d.generate.items():
        if key not in GENERATE:
            raise ConfigError(f"unknown key dataset.generate.{key}{_suggest(key, GENERATE)}; valid keys: "
                              f"{', '.join(GENERATE)}")
        typ, low = GENERATE[key]
        ok = isinstance(value, (int, float) if typ is float else int) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < low or (key == "value_p" and value > 1):
            want = "a number in [0, 1]" if typ is float else f"an integer >= {low}"
            raise ConfigError(f"dataset.generate.{key} must be {want}, got {value!r}")
    # LRA's rule: trees kept when min_len < length < max_len, lengths without parentheses
    lo, hi = d.generate.get("min_len", 0), d.generate.get("max_len", d.max_seq_len)
    if d.generate and not lo + 2 <= hi <= d.max_seq_len:
        raise ConfigError(f"dataset.generate keeps trees with min_len < length < max_len, so it needs min_len + 2 "
                          f"<= max_len <= dataset.max_seq_len, got {lo}, {hi}, {d.max_seq_len}")


def checkpoint_interval(value: int | str) -> tuple[int, float]:
    """training.checkpoint_every as (steps, seconds), one of them 0: an int is a number of steps (0: checkpoints
    at evaluations only), a string "M min" (e.g. "10min", "2.5 min") minutes of wall time."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 0:
            return value, 0.0
    elif isinstance(value, str):
        number = value.strip().removesuffix("min").strip()
        try:
            minutes = float(number) if value.strip().endswith("min") else math.nan
        except ValueError:
            minutes = math.nan
        if math.isfinite(minutes) and minutes > 0:
            return 0, minutes * 60.0
    raise ConfigError(f"training.checkpoint_every must be a number of steps (an integer >= 0; 0 = at evaluations "
                      f"only) or minutes of wall time such as \"10min\", got {value!r}")


def image_tokens(d: DatasetConfig) -> int:
    """Real tokens of an image task: the class token + (img_size / patch_size)^2 patches."""
    return 1 + (d.img_size // max(d.patch_size, 1)) ** 2


def _derive(cfg: TaskConfig) -> TaskConfig:
    """Image tasks with max_seq_len 0: the tokens padded up to a multiple of the block size (docs/block-sparse.md)."""
    d, bs = cfg.dataset, cfg.sparsity.block_size
    if d.kind == "image_folder" and d.max_seq_len == 0 and bs > 0:
        d.max_seq_len = -(-image_tokens(d) // bs) * bs
    return cfg


def load_config(task: str, preset: str | None = None, overrides: dict | None = None) -> TaskConfig:
    """CONFIG[task] + PRESETS[preset][task] + overrides -> validated TaskConfig."""
    configs = _load_root_config()[0]
    if task not in configs:
        raise ConfigError(f"unknown task {task!r}{_suggest(task, configs)}; choose one of {', '.join(sorted(configs))}")
    raw = configs[task]
    if preset:
        raw = merge(raw, preset_values(task, preset))
    if overrides:
        raw = merge(raw, overrides)
    check_sections(raw)
    built = {name: _build_section(name, raw.get(name, {})) for name in SECTIONS}
    return validate(_derive(TaskConfig(task=task, **built)))


def preset_values(task: str, preset: str) -> dict:
    """PRESETS[preset][task] (what the preset changes), or ConfigError naming the presets the task has."""
    presets = _load_root_config()[1]
    if preset not in presets or task not in presets[preset]:
        have = sorted(p for p, v in presets.items() if task in v)
        raise ConfigError(f"no preset {preset!r} for task {task}; presets for it: {have or 'none'}")
    return presets[preset][task]


def check_sections(raw: dict) -> None:
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r}{_suggest(section, SECTIONS)}; sections are "
                              f"{', '.join(SECTIONS)}")


def from_dict(d: dict) -> TaskConfig:
    """Rebuild a TaskConfig saved with to_dict() (checkpoints)."""
    built = {name: _build_section(name, d[name]) for name in SECTIONS}
    return validate(_derive(TaskConfig(task=d["task"], **built)))


def die(message: str, code: int = 2) -> None:
    """Print a one-line error and exit (the CLIs' only way out on bad input)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
