"""Property-based tests (hypothesis): config validation and the LRA data path.

- Config: random valid override dicts load and carry their values; an unknown key or section, a value of the
  wrong type or out of range raises ConfigError; arbitrary junk either loads or raises ConfigError, never
  another exception type.
- Data: LRALoader yields every example exactly once per epoch with correct padding and mask, and resumes from
  its state_dict exactly; random damage to a processed .npz gives a DataError (or a valid split), never
  another exception type.
- Checkpoints: random damage gives a CheckpointError (or, for harmless zip metadata, the same state), never
  another exception type.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sat.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sat.config import SECTIONS, ConfigError, from_dict, load_config
from sat.data.format import DataError, Split, load_split, save_split
from sat.data.lra import LRALoader

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TASK = "lra-listops"
DEFAULT_MAX_DENSITY = load_config(TASK).sparsity.max_density

unit = st.floats(0.0, 0.95, allow_nan=False)
pos_float = st.floats(1e-6, 10.0, allow_nan=False)

# Valid values of each field (the cross-field constraints of the LRA tasks are respected: pooling "mean", no
# Mixup/CutMix, the length / block size / density triple drawn together).
VALID = {
    "dataset": {
        "num_classes": st.integers(2, 1000),
        "two_inputs": st.booleans(),
        "vocab_size": st.integers(0, 999),
    },
    "model": {
        "num_layers": st.integers(1, 8),
        "dim": st.integers(1, 256),
        "hidden_dim": st.integers(1, 512),
        "num_heads": st.integers(1, 8),
        "head_dim": st.integers(1, 64),
        "dropout": unit,
        "attn_dropout": unit,
        "mlp": st.sampled_from(["dense", "monarch"]),
        "nblocks": st.integers(1, 8),
    },
    "training": {
        "batch_size": st.integers(1, 1024),
        "learning_rate": pos_float,
        "train_steps": st.integers(1, 10**6),
        "weight_decay": st.floats(0, 1),
        "warmup_steps": st.integers(0, 10**4),
        "eval_frequency": st.integers(1, 10**4),
        "num_eval_batches": st.integers(0, 100),
        "clip_value": st.floats(0, 10),
        "amp": st.sampled_from(["auto", "off", "bf16", "fp16"]),
        "label_smoothing": st.floats(0, 0.9),
        "checkpoint_every": st.integers(0, 10**6) | st.integers(1, 600).map(lambda m: f"{m}min"),
    },
    "sparsity": {
        "sk": st.floats(0, 10),
        "ds": st.floats(0, 100) | st.integers(0, 100),
        "attn_loss_scale": st.floats(0, 1),
        "monitor_every": st.integers(1, 10),
        "max_dense_steps": st.integers(0, 10**5),
        "lr_scale_after_transition": pos_float,
        "pattern": st.sampled_from(["learned", "measured", "coverage"]),
        "per_head": st.booleans(),
        "keep_diagonal": st.booleans(),
        "s2d_fraction": st.floats(0.01, 1.0),
        "enabled": st.booleans(),
    },
}


@st.composite
def geometry(draw):
    """(max_seq_len, block_size, density) that validate: the block divides the length, >= 1 block kept."""
    n = 2 ** draw(st.integers(4, 12))
    bs = 2 ** draw(st.integers(2, int(math.log2(n))))
    nb = n // bs
    density = draw(st.floats(min_value=min(1.0, 1.0 / (nb * nb) + 1e-9), max_value=1.0))
    return n, bs, density


@st.composite
def valid_overrides(draw) -> dict:
    out: dict = {}
    for section, fields in VALID.items():
        chosen = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=4))
        if chosen:
            out[section] = {k: draw(fields[k]) for k in chosen}
    if draw(st.booleans()):
        n, bs, density = draw(geometry())
        out.setdefault("dataset", {})["max_seq_len"] = n
        out.setdefault("sparsity", {}).update(block_size=bs, density=density)
        if out["sparsity"].get("pattern") == "coverage" and int((n // bs) ** 2 * DEFAULT_MAX_DENSITY) < 1:
            out["sparsity"]["max_density"] = 1.0  # the default keeps no block of a 1x1 grid: invalid
    return out


@FAST
@given(valid_overrides())
def test_valid_overrides_load_with_their_values(overrides):
    cfg = load_config(TASK, overrides=overrides)
    for section, values in overrides.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value
    assert from_dict(cfg.to_dict()) == cfg  # what a checkpoint stores rebuilds the same config


def _field_names(section):
    return {f for f in SECTIONS[section].__dataclass_fields__}


names = st.text(st.characters(codec="ascii", categories=["Ll", "Lu", "Nd", "Pc"]), min_size=1, max_size=12)


@FAST
@given(st.sampled_from(sorted(SECTIONS)), names, st.integers() | st.text() | st.floats())
def test_unknown_key_is_a_config_error(section, key, value):
    if key in _field_names(section):
        key += "_x"
    try:
        load_config(TASK, overrides={section: {key: value}})
    except ConfigError as e:
        assert "unknown config key" in str(e)
    else:
        raise AssertionError(f"{section}.{key} accepted")


@FAST
@given(names, st.dictionaries(names, st.integers()) | st.integers() | st.none())
def test_unknown_section_is_a_config_error(section, value):
    if section in SECTIONS:
        section += "_x"
    try:
        load_config(TASK, overrides={section: value})
    except ConfigError:
        return
    raise AssertionError(f"section {section!r} accepted")


FIELD_TYPES = {(s, f.name): f.type for s, cls in SECTIONS.items() for f in cls.__dataclass_fields__.values()}


def wrong_value(typ: str):
    """Values that are not of type `typ` (an int is a valid float; a bool is never an int or float)."""
    others = {
        "int": st.text(max_size=5)
        | st.floats(allow_nan=False).filter(lambda v: True)
        | st.booleans()
        | st.none()
        | st.lists(st.integers(), max_size=2),
        "float": st.text(max_size=5) | st.booleans() | st.none() | st.lists(st.floats(), max_size=2),
        "bool": st.integers() | st.text(max_size=5) | st.none() | st.floats(),
        "str": st.integers() | st.floats() | st.none() | st.booleans(),
        "dict": st.integers() | st.text(max_size=5) | st.lists(st.integers(), max_size=2),
        "int | str": st.floats(allow_nan=False) | st.booleans() | st.none() | st.lists(st.integers(), max_size=2),
    }
    return others[typ]


def test_every_config_field_type_has_wrong_values():
    for typ in set(FIELD_TYPES.values()):  # a new field type must get its wrong values here, or the draw below fails
        wrong_value(typ)


@st.composite
def wrong_type(draw):
    section, name = draw(st.sampled_from(sorted(FIELD_TYPES)))
    return section, name, draw(wrong_value(FIELD_TYPES[section, name]))


def assert_refused(section: str, name: str, value) -> None:
    """The override must be refused with a ConfigError (any other outcome fails the test)."""
    try:
        load_config(TASK, overrides={section: {name: value}})
    except ConfigError:
        return
    raise AssertionError(f"{section}.{name}={value!r} accepted")


@FAST
@given(wrong_type())
def test_wrong_type_is_a_config_error(case):
    assert_refused(*case)


NONFINITE = st.sampled_from([math.nan, math.inf, -math.inf])
OUT_OF_RANGE = {
    ("model", "num_layers"): st.integers(max_value=0),
    ("model", "dim"): st.integers(max_value=0),
    ("model", "dropout"): st.floats(1.0, 1e9) | st.floats(max_value=-1e-9) | NONFINITE,
    ("model", "mlp"): st.text(max_size=8).filter(lambda v: v not in ("dense", "monarch")),
    ("training", "batch_size"): st.integers(max_value=0),
    ("training", "learning_rate"): st.floats(max_value=0.0) | NONFINITE,
    ("training", "train_steps"): st.integers(max_value=0),
    ("training", "weight_decay"): st.floats(max_value=-1e-9) | NONFINITE,
    ("training", "clip_value"): NONFINITE,
    ("training", "eval_frequency"): st.integers(max_value=0),
    ("sparsity", "density"): st.floats(max_value=0.0) | st.floats(1.0 + 1e-9, 1e9) | NONFINITE,
    ("sparsity", "sk"): st.floats(max_value=-1e-9) | NONFINITE,
    ("sparsity", "ds"): st.floats(max_value=-1e-9) | NONFINITE,
    ("sparsity", "block_size"): st.integers(max_value=0) | st.sampled_from([3, 48, 100, 4096]),
    ("sparsity", "lr_scale_after_transition"): st.floats(max_value=0.0) | NONFINITE,
    ("sparsity", "s2d_fraction"): st.floats(max_value=0.0) | st.floats(1.0 + 1e-9, 10) | NONFINITE,
    ("dataset", "max_seq_len"): st.integers(max_value=0) | st.sampled_from([100, 2047, 2050]),
    ("dataset", "num_classes"): st.integers(max_value=1),
}


@st.composite
def out_of_range(draw):
    section, name = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
    return section, name, draw(OUT_OF_RANGE[section, name])


@FAST
@given(out_of_range())
def test_out_of_range_is_a_config_error(case):
    assert_refused(*case)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
section_names = st.sampled_from(sorted(SECTIONS)) | st.text(max_size=8)
key_names = st.sampled_from(sorted({name for _, name in FIELD_TYPES})) | st.text(max_size=8)


@FAST
@given(
    st.dictionaries(
        section_names, st.dictionaries(key_names, json_values, max_size=3) | json_values, max_size=3
    )
)
@example({"model": 5})  # a section that is not a dict (was a TypeError)
@example({"model": {1: 2}})  # a key that is not a string (was a TypeError in the did-you-mean)
@example({"training": {"learning_rate": math.inf}})
@example({"dataset": {"generate": {"n_train": "x"}}})
def test_junk_overrides_load_or_raise_config_error(overrides):
    try:
        load_config(TASK, overrides=overrides)
    except ConfigError:
        pass


GENERATE_BAD = st.sampled_from(
    [
        {"n_train": "x"},
        {"n_train": 0},
        {"min_len": 50, "max_len": 20},
        {"max_len": 10**6},
        {"value_p": 1.5},
        {"nrows": 3},
        {"seed": True},
        {"max_args": 1},
        {"value_p": math.nan},
    ]
)


@FAST
@given(GENERATE_BAD)
def test_bad_generator_settings_are_a_config_error(gen):
    """dataset.generate is passed to the ListOps generator: its keys and values are checked up front."""
    try:
        load_config(TASK, preset="quick", overrides={"dataset": {"generate": gen}})
    except ConfigError:
        return
    raise AssertionError(f"generate {gen} accepted")


# ---------------------------------------------------------------------------------------------- data


@st.composite
def splits(draw):
    """A valid Split (one or two inputs) whose labels are the example indices, and a fitting seq_len."""
    n = draw(st.integers(1, 25))
    width = draw(st.integers(1, 12))
    two = draw(st.booleans())
    shape = (n, 2) if two else (n,)
    lengths = np.array(
        draw(st.lists(st.integers(1, width), min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
        dtype=np.int64,
    ).reshape(shape)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.integers(1, 30, size=shape + (width,))
    x[np.arange(width) >= lengths[..., None]] = 0
    seq_len = draw(st.integers(int(lengths.max()), width + 6))
    return Split(x=x, lengths=lengths, y=np.arange(n, dtype=np.int64)), seq_len


def _check_batch(batch, split: Split, seq_len: int) -> None:
    idx = batch.y.numpy()
    assert batch.x.shape == (len(idx),) + split.x.shape[1:-1] + (seq_len,)
    keep = min(seq_len, split.x.shape[-1])
    expect = np.zeros(batch.x.shape, dtype=np.int64)
    expect[..., :keep] = split.x[idx][..., :keep]
    np.testing.assert_array_equal(batch.x.numpy(), expect)
    real = np.arange(seq_len) < split.lengths[idx][..., None]
    if (split.lengths < seq_len).any():
        np.testing.assert_array_equal(batch.mask.numpy(), real)
        assert not batch.x.numpy()[~real].any()  # padding positions hold the padding id 0
    else:
        assert batch.mask is None and real.all()


@FAST
@given(splits(), st.integers(1, 30), st.booleans(), st.integers(0, 1000))
def test_loader_yields_every_example_once_per_epoch(case, batch_size, shuffle, seed):
    split, seq_len = case
    loader = LRALoader(split, batch_size, seq_len, shuffle=shuffle, seed=seed)
    seen = []
    for batch in loader:
        assert 1 <= len(batch) <= batch_size
        _check_batch(batch, split, seq_len)
        seen.extend(batch.y.tolist())
    assert sorted(seen) == list(range(len(split)))
    assert len(seen) == len(split)
    if not shuffle:
        assert seen == list(range(len(split)))


@FAST
@given(splits(), st.integers(1, 30), st.integers(0, 1000), st.integers(0, 40), st.integers(1, 3))
def test_repeating_loader_epochs_and_resume(case, batch_size, seed, stop, epochs):
    split, seq_len = case
    n = len(split)
    drop = n >= batch_size
    loader = LRALoader(split, batch_size, seq_len, shuffle=True, seed=seed, repeat=True, drop_last=drop)
    per_epoch = len(loader)
    for _ in range(epochs):  # each epoch: distinct examples, all of them unless the last partial batch drops
        ids = [i for _ in range(per_epoch) for i in next(loader).y.tolist()]
        assert len(set(ids)) == len(ids) == (n // batch_size * batch_size if drop else n)
    for _ in range(stop):
        next(loader)
    state = loader.state_dict()
    resumed = LRALoader(split, batch_size, seq_len, shuffle=True, seed=seed + 1, repeat=True, drop_last=drop)
    resumed.load_state_dict(state)
    for _ in range(per_epoch + 2):
        a, b = next(loader), next(resumed)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
        _check_batch(b, split, seq_len)


_VALID_SPLIT = Split(
    x=np.arange(1, 1 + 6 * 8).reshape(6, 8) % 17,
    lengths=np.array([8, 3, 5, 1, 8, 2]),
    y=np.array([0, 1, 2, 0, 1, 2]),
)


@st.composite
def damage(draw):
    """A list of edits to the bytes of a valid .npz: truncate, overwrite runs, insert junk."""
    edits = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["truncate", "overwrite", "insert", "flip"]),
                st.floats(0, 1, exclude_max=True),
                st.binary(min_size=1, max_size=16),
            ),
            min_size=1,
            max_size=4,
        )
    )
    return edits


def _apply(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for kind, where, junk in edits:
        i = int(where * len(b)) if b else 0
        if kind == "truncate":
            del b[i:]
        elif kind == "overwrite":
            b[i : i + len(junk)] = junk
        elif kind == "insert":
            b[i:i] = junk
        elif b:
            b[min(i, len(b) - 1)] ^= junk[0] or 1
    return bytes(b)


@settings(max_examples=150, deadline=None)
@given(damage())
def test_damaged_npz_is_a_data_error(edits):
    with tempfile.TemporaryDirectory() as tmp:
        path = save_split(tmp, TASK, "train", _VALID_SPLIT)
        original = path.read_bytes()
        damaged = _apply(original, edits)
        Path(path).write_bytes(damaged)
        try:
            s = load_split(tmp, TASK, "train", num_classes=3)
        except DataError as e:
            assert "\n" not in str(e)
            return
        # the damage missed everything that matters (e.g. zip comment bytes): what loads is a valid split
        assert s.x.ndim == 2 and len(s) == s.lengths.shape[0] and 0 <= s.y.min() and s.y.max() < 3
        assert (s.lengths >= 1).all() and (s.lengths <= s.x.shape[-1]).all()


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_are_a_data_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = save_split(tmp, TASK, "train", _VALID_SPLIT)
        Path(path).write_bytes(data)
        try:
            load_split(tmp, TASK, "train", num_classes=3)
        except DataError:
            return
        raise AssertionError("arbitrary bytes loaded as a split")


# ---------------------------------------------------------------------------------------------- checkpoints


def _checkpoint_state() -> dict:
    """A small state with every key a SAT checkpoint has."""
    cfg = load_config(TASK)
    return {
        "task": TASK,
        "config": cfg.to_dict(),
        "step": 4,
        "best_dev_accuracy": 0.5,
        "vocab_size": 20,
        "data_dir": "data",
        "timing": {"dense_time": 1.0},
        "model": {"w": torch.arange(64, dtype=torch.float32), "b": torch.ones(3)},
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {"densify_step": None},
        "train_loader": {"pos": 0},
        "rng": {"torch": torch.get_rng_state()},
    }


@settings(max_examples=60, deadline=None)
@given(damage())
def test_damaged_checkpoint_is_a_checkpoint_error(edits):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.model"
        save_checkpoint(path, _checkpoint_state())
        path.write_bytes(_apply(path.read_bytes(), edits))
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            assert "\n" not in str(e)
            return
        assert state["task"] == TASK and set(state["model"]) == {"w", "b"}  # harmless damage (zip metadata)


@settings(max_examples=20, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_are_a_checkpoint_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.model"
        path.write_bytes(data)
        try:
            load_checkpoint(path)
        except CheckpointError:
            return
        raise AssertionError("arbitrary bytes loaded as a checkpoint")
