"""One interface to a task's data, for both task families: LRA tasks (processed .npz splits, sat/data/format.py)
and image folders (dataset.kind "image_folder": {data_dir}/train and {data_dir}/val class folders).

    data = load_task_data(cfg, data_dir)             # validated splits and the vocabulary size
    batches = data.train_stream(seed, rank, world)   # endless training batches of this rank, resumable
    for batch in data.eval_batches("dev"): ...       # one ordered pass over a split

Every batch is a `Batch` (sat/data/batch.py). Also here: `prepare_data` (generated ListOps for presets that ask
for it), `resolve_for_data` (what the config leaves to the data) and `make_mixer` (Mixup/CutMix).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sat.config import ConfigError, TaskConfig, validate
from sat.data import listops
from sat.data.batch import Batch
from sat.data.format import DataError, Split, load_meta, load_split
from sat.data.lra import LRALoader, check_split


def default_data_dir(cfg: TaskConfig, root: str | Path = ".") -> Path:
    """data/{task} under `root`; generated data (a preset's ListOps) in data/{task}-generated-{N}, so that
    presets of different lengths keep their own sets; data prepared from a release (dataset.source) in
    data/{task}-{source}. The ViT tasks read a release (dataset.source) where it is installed, the Debian
    package's folder (a DataError saying how to install it when it is not)."""
    if cfg.dataset.kind == "image_folder" and cfg.dataset.source:
        from sat.data.idx_images import installed_folder

        return installed_folder()
    suffix = f"-generated-{cfg.dataset.max_seq_len}" if cfg.dataset.generate else ""
    suffix = f"-{cfg.dataset.source}" if cfg.dataset.source else suffix
    return Path(root) / "data" / f"{cfg.task}{suffix}"


def prepare_data(cfg: TaskConfig, data_dir: Path) -> None:
    """Make the data a config asks for when the folder does not hold it yet: ListOps generated and preprocessed
    (again whenever the folder's data was made from other settings or in an older token convention), or
    Fashion-MNIST prepared from the installed release (dataset.source; the ViT tasks read the release itself,
    sat/data/idx_images.py: nothing to prepare)."""
    if cfg.dataset.kind == "image_folder":
        return
    if cfg.dataset.source:
        if not (data_dir / f"{cfg.task}.meta.json").is_file():
            from sat.data.prepare.fashion_mnist import preprocess_fashion_mnist

            print(f"preparing Fashion-MNIST into {data_dir} ...", flush=True)
            preprocess_fashion_mnist(data_dir)
        return
    gen = cfg.dataset.generate
    if not gen:
        return
    if (data_dir / f"{cfg.task}.meta.json").is_file():
        meta = load_meta(data_dir, cfg.task)
        if listops.is_current(meta) and meta.get("generate") == gen and meta.get("max_len") == cfg.dataset.max_seq_len:
            return
    raw = data_dir / "raw"
    print(f"generating ListOps into {raw} (n_train={gen.get('n_train')}, {gen.get('min_len')} < length < "
          f"{gen.get('max_len')}) ...", flush=True)
    try:
        listops.generate_listops(raw, force=True, **gen)
    except ValueError as e:  # e.g. a length range the generator keeps missing
        raise ConfigError(f"dataset.generate: {e}; widen min_len..max_len") from e
    # what it was made from goes into the meta, checked on the next run
    listops.preprocess_listops(raw, data_dir, max_len=cfg.dataset.max_seq_len, force=True,
                               extra_meta={"generate": gen})


MAX_LISTED_WORLD = 64  # a refused LRA batch lists the world sizes that split it, up to this many ranks


def rank_batch(cfg: TaskConfig, world: int) -> int:
    """Examples each rank trains on per step. LRA tasks: `training.batch_size` is the global batch (SAT's
    meaning, so a run is the same experiment on any number of ranks), split evenly over the ranks; a batch
    that does not split is a ConfigError naming the world sizes that do. Image-folder tasks: it is the batch
    per GPU, as in the DeiT recipe they follow."""
    bs = cfg.training.batch_size
    if cfg.dataset.kind == "image_folder":
        return bs
    if bs % world:
        valid = [w for w in range(1, min(bs, MAX_LISTED_WORLD) + 1) if bs % w == 0]
        raise ConfigError(f"training.batch_size {bs} is the global batch of task {cfg.task} and does not split "
                          f"over {world} ranks; run on {', '.join(map(str, valid))} rank(s), or pass "
                          f"--batch_size a multiple of {world}")
    return bs // world


def describe_batch(cfg: TaskConfig, world: int) -> str:
    """The start-of-run line on the batch: global, per rank, and what training.batch_size means here."""
    per = rank_batch(cfg, world)
    meaning = "the batch per GPU" if cfg.dataset.kind == "image_folder" else "the global batch"
    return (f"batch: {per * world} examples a step, {per} on each of {world} rank(s) (training.batch_size "
            f"{cfg.training.batch_size} is {meaning} for this task)")


@dataclass
class TaskData:
    """A task's validated splits and how batches come out of them, whatever the task family."""

    cfg: TaskConfig
    splits: dict[str, Any]  # "train" (unless loaded without it), "dev", "test": LRA Splits or ImageFolderDatasets
    vocab_size: int          # 0 for image folders
    meta_classes: int = 0    # LRA data: the class count (the config's, else the meta's)
    name: str = ""           # which data set (summary.json's "dataset")

    @property
    def image_folders(self) -> bool:
        return self.cfg.dataset.kind == "image_folder"

    def found_classes(self) -> int:
        """The number of classes the data holds: class folders of the train split (image folders), the meta's
        count (LRA data)."""
        return len(getattr(self.splits["train"], "classes", ())) if self.image_folders else self.meta_classes

    def labels(self, split: str):
        """Class ids of a split: LRA `Split.y` or an image folder's `targets`."""
        s = self.splits[split]
        return s.targets if hasattr(s, "targets") else s.y

    def train_stream(self, seed: int, rank: int = 0, world: int = 1):
        """Endless training batches of this rank (`rank_batch` examples each) with state_dict/load_state_dict.
        LRA tasks: every rank draws the same global batch, from the same shuffle, as a one-rank run does, and
        keeps its slice of it, so a step sees the same examples on any number of ranks."""
        bs = self.cfg.training.batch_size
        split = self.splits["train"]
        if self.image_folders:
            from sat.data.image_stream import ImageTrainStream

            return ImageTrainStream(split, bs, self.cfg.dataset.num_workers, seed, rank, world)
        rank_batch(self.cfg, world)  # the global batch must split evenly
        if world > 1 and len(split) < bs:  # a smaller batch would not split evenly (or leave a rank without data)
            raise ConfigError(f"the training split has {len(split)} examples, fewer than the global batch {bs}; "
                              f"lower --batch_size to a multiple of {world} of at most {len(split)}")
        loader = LRALoader(split, bs, self.cfg.dataset.max_seq_len, shuffle=True, seed=seed, repeat=True,
                           drop_last=len(split) >= bs)
        return _RankSlices(loader, rank, world) if world > 1 else loader

    def eval_batches(self, split: str, rank: int = 0, world: int = 1):
        """One ordered pass over a split; with world > 1 only this rank's share."""
        s, d = self.splits[split], self.cfg.dataset
        if self.image_folders:
            from sat.data.image_stream import eval_batches

            return eval_batches(s, self.cfg.training.batch_size, d.img_size, d.crop_pct, d.num_workers, rank,
                                world)
        if world > 1:
            s = Split(s.x[rank::world], s.lengths[rank::world], s.y[rank::world])
        return LRALoader(s, self.cfg.training.batch_size, d.max_seq_len, shuffle=False)


def load_task_data(cfg: TaskConfig, data_dir: Path, need_train: bool = True) -> TaskData:
    """Validated splits {train, dev, test} and the vocabulary size (0 for image folders). Image folders
    without `need_train` skip listing the (large) train split and give {dev, test} only."""
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist; preprocess the data (docs/data.md) or pass "
                        f"--data_dir")
    if cfg.dataset.kind == "image_folder":
        if cfg.dataset.source:  # Fashion-MNIST's IDX release, read into memory
            from sat.data.idx_images import NAME, fashion_mnist_splits

            d = cfg.dataset
            splits, name = fashion_mnist_splits(data_dir, d.img_size, d.crop_pct, need_train), NAME
            if d.num_classes and d.num_classes != len(splits["dev"].classes):
                raise DataError(f"Fashion-MNIST has {len(splits['dev'].classes)} classes but task {cfg.task} "
                                f"expects {d.num_classes}; pass --set dataset.num_classes=0 (from the data)")
        else:
            splits, name = _image_folder_splits(cfg, data_dir, need_train), f"image folders in {data_dir}"
        if cfg.dataset.channels and cfg.dataset.channels != image_channels(cfg):
            raise DataError(f"{name}: {image_channels(cfg)}-channel images, but task {cfg.task} expects "
                            f"{cfg.dataset.channels} (dataset.channels); pass --set dataset.channels=0 (from the data)")
        return TaskData(cfg, splits, 0, name=name)
    meta = load_meta(data_dir, cfg.task)
    if cfg.task == listops.TASK:
        listops.check_processed_meta(meta, data_dir)
    if cfg.dataset.source and meta.get("dataset") != cfg.dataset.source:
        raise DataError(f"{data_dir} holds {meta.get('dataset') or 'other'} data, but the config asks for "
                        f"{cfg.dataset.source}; pass --data_dir with {cfg.dataset.source} data (or none)")
    vocab = cfg.dataset.vocab_size or int(meta.get("vocab_size", 0))
    if vocab <= 0:
        raise DataError(f"{data_dir}: meta.json has no vocab_size; re-run the preprocess script")
    classes = cfg.dataset.num_classes or int(meta.get("num_classes", 0))
    if classes < 2:
        raise DataError(f"{data_dir}: meta.json has no num_classes of 2 or more; re-run the preprocess script or "
                        f"pass --set dataset.num_classes=C")
    splits = {}
    for split in ("train", "dev", "test"):
        s = load_split(data_dir, cfg.task, split, classes)
        want = 3 if cfg.dataset.two_inputs else 2
        if s.x.ndim != want:
            raise DataError(f"{data_dir}: {split} has {s.x.ndim - 1}-input shape {s.x.shape} but task {cfg.task} "
                            f"expects {want - 1} input(s)")
        check_split(s, cfg.dataset.max_seq_len, vocab, f"{cfg.task}.{split}",
                    reserved=1 if cfg.model.pooling == "cls" else 0)
        splits[split] = s
    return TaskData(cfg, splits, vocab, classes, dataset_name(meta, data_dir))


def dataset_name(meta: dict, data_dir: Path) -> str:
    """Which data set processed data was made from, for the log and summary.json: the meta's own name where
    the preparer records one (fashion-mnist, cifar-10), generated ListOps, else the folder."""
    if meta.get("dataset"):
        return str(meta["dataset"])
    if meta.get("generate"):
        return "listops (generated)"
    return f"processed data in {data_dir}"


def image_channels(cfg: TaskConfig) -> int:
    """Channels of the images an image task reads: 1 for Fashion-MNIST's grayscale release, 3 for image folders
    (every file is decoded as RGB)."""
    from sat.data import idx_images, image_folder

    return idx_images.CHANNELS if cfg.dataset.source else image_folder.CHANNELS


def _image_folder_splits(cfg: TaskConfig, data_dir: Path, need_train: bool) -> dict:
    """{data_dir}/train and {data_dir}/val class folders (ImageNet's layout); dev = val, and test = an
    optional {data_dir}/test folder, else val again (ImageNet's test labels are not public). Class ids are
    the positions of the train split's sorted class folder names."""
    from sat.data.image_folder import ImageFolderDataset, list_classes
    from sat.data.image_transforms import eval_transform, train_transform

    d = cfg.dataset
    splits = {}
    if need_train:
        splits["train"] = ImageFolderDataset(data_dir, "train", train_transform(d.img_size))
        classes = splits["train"].classes
    else:
        classes = list_classes(data_dir / "train") if (data_dir / "train").is_dir() else None
    if d.num_classes and classes is not None and len(classes) != d.num_classes:
        raise DataError(f"{data_dir}/train has {len(classes)} class folders but task {cfg.task} "
                        f"expects {d.num_classes}; pass --set dataset.num_classes={len(classes)} "
                        f"(or 0 = count them)")
    evaluation = eval_transform(d.img_size, d.crop_pct)
    splits["dev"] = ImageFolderDataset(data_dir, "val", evaluation, classes=classes)
    splits["test"] = (ImageFolderDataset(data_dir, "test", evaluation, classes=classes)
                      if (data_dir / "test").is_dir() else splits["dev"])
    return splits


class _RankSlices:
    """Rank-sharded LRA batches: every rank draws the same global batch (batch_size, same shuffle) and keeps
    its slice rank::world, so ranks never overlap, together they hold exactly the one-rank run's batch, and
    the loader state is the same on every rank."""

    def __init__(self, loader: LRALoader, rank: int, world: int) -> None:
        self.loader, self.rank, self.world = loader, rank, world

    def __len__(self) -> int:
        return len(self.loader)

    def __next__(self) -> Batch:
        b = next(self.loader)
        r, w = self.rank, self.world
        return Batch(b.x[r::w], None if b.mask is None else b.mask[r::w], b.y[r::w])

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def resolve_for_data(cfg: TaskConfig, num_classes: int, batches_per_epoch: int) -> TaskConfig:
    """Fill in what the config leaves to the data: num_classes 0 (count of class folders), an image task's
    channels 0 (`image_channels`, so that a checkpoint's config builds the model for its data) and epochs /
    warmup_epochs -> train_steps / warmup_steps (batches per epoch of one rank). Deterministic, so a resumed
    run resolves to the same config it saved."""
    d, t = cfg.dataset, cfg.training
    if d.num_classes == 0:
        d = dataclasses.replace(d, num_classes=num_classes)
    if d.kind == "image_folder" and d.channels == 0:
        d = dataclasses.replace(d, channels=image_channels(cfg))
    if t.epochs > 0:
        t = dataclasses.replace(t, train_steps=max(1, round(t.epochs * batches_per_epoch)))
    if t.warmup_epochs > 0:
        t = dataclasses.replace(t, warmup_steps=round(t.warmup_epochs * batches_per_epoch))
        if t.warmup_steps >= t.train_steps:
            raise ConfigError(f"warm-up of {t.warmup_epochs} epochs ({t.warmup_steps} steps) is not shorter "
                              f"than the run ({t.train_steps} steps); lower it, e.g. "
                              f"--set training.warmup_epochs=0")
    return validate(dataclasses.replace(cfg, dataset=d, training=t))


def make_mixer(cfg: TaskConfig, seed: int):
    """Mixup/CutMix (with label smoothing folded into its soft targets) when the config asks for either, else
    None. `cfg` must be resolved (resolve_for_data): the soft targets need the class count."""
    t = cfg.training
    if t.mixup == 0 and t.cutmix == 0:
        return None
    from sat.data.mixup import Mixup

    return Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, label_smoothing=t.label_smoothing,
                 num_classes=cfg.dataset.num_classes, seed=seed)
