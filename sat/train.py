"""The one training loop shared by every task: forward, loss, backward, optimizer, monitor and transitions,
evaluation, checkpoints, TensorBoard and summary.json.

Output layout (SAT's): logs/log-{random}/{task}/{name}.log, {name}.tensorboard/, {name}.summary.json and
checkpoints/checkpoints-{random}/{task}/{name}.model (best dev accuracy) and {name}.last.model.

Task families: LRA (processed .npz, `LRALoader`) and image folders (dataset.kind "image_folder": ViT,
`ImageTrainStream` with workers, label smoothing, Mixup/CutMix; resume continues the sample order at the batch
but restarts the augmentation streams at the epoch, see sat/data/image_stream.py). Evaluation reports top-1
and top-5.

Under torchrun (sat/distributed.py) the model runs in DistributedDataParallel, `batch_size` is per process,
and every rank takes each transition at the same step: the monitor sees the per-layer maps averaged over
ranks (identical on every rank), rank 0's layouts are broadcast at the switch, the densify swap is step-based,
and DDP is re-wrapped after each transition (the frozen pattern and the replaced Monarch parameters leave it).
Only rank 0 writes the log, TensorBoard, checkpoints and summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from sat import distributed
from sat.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sat.config import ConfigError, TaskConfig, validate
from sat.data.batch import Batch
from sat.data.format import DataError, Split, load_meta, load_split
from sat.data.lra import LRALoader, check_split
from sat.fileio import atomic_write_text
from sat.models.lra import LRAModel
from sat.models.monarch import count_parameters
from sat.sparsity.scheduler import Event, TransitionScheduler

log = logging.getLogger("sat")


class TrainingError(Exception):
    """A run that cannot go on (non-finite loss...); the last good checkpoint is kept (exit code 1)."""


@dataclass
class RunPaths:
    log_dir: Path
    ckpt_dir: Path
    name: str

    @classmethod
    def make(cls, root: str | Path, random: int, task: str, name: str) -> RunPaths:
        root = Path(root)
        return cls(root / "logs" / f"log-{random}" / task, root / "checkpoints" / f"checkpoints-{random}" / task, name)

    @property
    def text_log(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    @property
    def tensorboard(self) -> Path:
        return self.log_dir / f"{self.name}.tensorboard"

    @property
    def summary(self) -> Path:
        return self.log_dir / f"{self.name}.summary.json"

    @property
    def losses(self) -> Path:
        return self.log_dir / f"{self.name}.losses.tsv"

    @property
    def best(self) -> Path:
        return self.ckpt_dir / f"{self.name}.model"

    @property
    def last(self) -> Path:
        return self.ckpt_dir / f"{self.name}.last.model"


# ---------------------------------------------------------------------------------------------- data

def default_data_dir(cfg: TaskConfig, root: str | Path = ".") -> Path:
    suffix = "-generated" if cfg.dataset.generate else ""
    return Path(root) / "data" / f"{cfg.task}{suffix}"


def prepare_data(cfg: TaskConfig, data_dir: Path) -> None:
    """Generate and preprocess ListOps when the config asks for generated data and none exists yet."""
    gen = cfg.dataset.generate
    if not gen or (data_dir / f"{cfg.task}.meta.json").is_file():
        return
    from preprocess.create_listops import preprocess_listops
    from sat.data.listops import generate_listops

    raw = data_dir / "raw"
    print(f"generating ListOps into {raw} (n_train={gen.get('n_train')}, lengths {gen.get('min_len')}-"
          f"{gen.get('max_len')}) ...", flush=True)
    try:
        generate_listops(raw, force=True, **gen)
    except ValueError as e:  # e.g. a length range the generator keeps missing
        raise ConfigError(f"dataset.generate: {e}; widen min_len..max_len") from e
    preprocess_listops(raw, data_dir, max_len=cfg.dataset.max_seq_len, force=True)


def load_data(cfg: TaskConfig, data_dir: Path, need_train: bool = True) -> tuple[dict, int]:
    """Validated splits {train, dev, test} and the vocabulary size (0 for image folders). Image folders
    without `need_train` skip listing the (large) train split and give {dev, test} only."""
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist; preprocess the data (see README) or pass "
                        f"--data_dir")
    if cfg.dataset.kind == "image_folder":
        return load_image_folders(cfg, data_dir, need_train), 0
    meta = load_meta(data_dir, cfg.task)
    vocab = cfg.dataset.vocab_size or int(meta.get("vocab_size", 0))
    if vocab <= 0:
        raise DataError(f"{data_dir}: meta.json has no vocab_size; re-run the preprocess script")
    splits = {}
    for split in ("train", "dev", "test"):
        s = load_split(data_dir, cfg.task, split, cfg.dataset.num_classes)
        want = 3 if cfg.dataset.two_inputs else 2
        if s.x.ndim != want:
            raise DataError(f"{data_dir}: {split} has {s.x.ndim - 1}-input shape {s.x.shape} but task {cfg.task} "
                            f"expects {want - 1} input(s)")
        check_split(s, cfg.dataset.max_seq_len, vocab, f"{cfg.task}.{split}")
        splits[split] = s
    return splits, vocab


def load_image_folders(cfg: TaskConfig, data_dir: Path, need_train: bool = True) -> dict:
    """{data_dir}/train and {data_dir}/val class folders (ImageNet's layout); dev = val, and test = an
    optional {data_dir}/test folder, else val again (ImageNet's test labels are not public). Class ids are
    the positions of the train split's sorted class folder names."""
    from sat.data.imagenet import ImageFolderDataset, eval_transform, list_classes, train_transform

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


def resolve_for_data(cfg: TaskConfig, num_classes: int, batches_per_epoch: int) -> TaskConfig:
    """Fill in what the config leaves to the data: num_classes 0 (count of class folders) and epochs /
    warmup_epochs -> train_steps / warmup_steps (batches per epoch of one rank). Deterministic, so a resumed
    run resolves to the same config it saved."""
    d, t = cfg.dataset, cfg.training
    if d.num_classes == 0:
        d = dataclasses.replace(d, num_classes=num_classes)
    if t.epochs > 0:
        t = dataclasses.replace(t, train_steps=max(1, round(t.epochs * batches_per_epoch)))
    if t.warmup_epochs > 0:
        t = dataclasses.replace(t, warmup_steps=round(t.warmup_epochs * batches_per_epoch))
        if t.warmup_steps >= t.train_steps:
            raise ConfigError(f"warm-up of {t.warmup_epochs} epochs ({t.warmup_steps} steps) is not shorter "
                              f"than the run ({t.train_steps} steps); lower it, e.g. "
                              f"--set training.warmup_epochs=0")
    return validate(dataclasses.replace(cfg, dataset=d, training=t))


class _RankSlices:
    """Rank-sharded LRA batches: every rank draws the same global batch (batch_size * world, same shuffle) and
    keeps its slice rank::world, so ranks never overlap and the loader state is the same on every rank."""

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


def train_stream(cfg: TaskConfig, split, seed: int, info: distributed.DistInfo):
    """Endless training batches of this rank (`batch_size` each) with state_dict/load_state_dict."""
    bs = cfg.training.batch_size
    if cfg.dataset.kind == "image_folder":
        from sat.data.image_stream import ImageTrainStream

        return ImageTrainStream(split, bs, cfg.dataset.num_workers, seed, info.rank, info.world)
    loader = LRALoader(split, bs * info.world, cfg.dataset.max_seq_len, shuffle=True, seed=seed, repeat=True,
                       drop_last=len(split) >= bs * info.world)
    return _RankSlices(loader, info.rank, info.world) if info.enabled else loader


def make_mixer(cfg: TaskConfig, seed: int):
    """Mixup/CutMix (with label smoothing folded into its soft targets) when the config asks for either."""
    t = cfg.training
    if t.mixup == 0 and t.cutmix == 0:
        return None
    from sat.data.imagenet import Mixup

    return Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, label_smoothing=t.label_smoothing,
                 num_classes=cfg.dataset.num_classes, seed=seed)


def _labels(split):
    """Class ids of a split: LRA `Split.y` or an image folder's `targets`."""
    return split.targets if hasattr(split, "targets") else split.y


# ---------------------------------------------------------------------------------------------- model

def data_parallel(model: nn.Module, cfg: TaskConfig, sparse: bool) -> nn.Module:
    """DistributedDataParallel around `model` under torchrun, else `model`. Built again after every
    transition: DDP fixes its parameter set at construction, and the switch freezes each pattern P while the
    densify swap replaces the Monarch parameters. While dense, P only gets a gradient on monitored steps of
    the learned pattern, so unused parameters are tolerated exactly when that is not every step."""
    if not distributed.current().enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    s = cfg.sparsity
    unused = not sparse and (s.monitor_every > 1 or s.pattern != "learned")
    return DistributedDataParallel(model, device_ids=None, find_unused_parameters=unused)


def build_model(cfg: TaskConfig, vocab_size: int, backend: str = "auto") -> nn.Module:
    if cfg.dataset.kind == "image_folder":
        from sat.models.vit import ViT

        return ViT(cfg, backend)
    return LRAModel(cfg, vocab_size, backend)


def make_optimizer(model: nn.Module, cfg: TaskConfig, old: torch.optim.Optimizer | None = None) -> torch.optim.AdamW:
    """AdamW(0.9, 0.999, eps 1e-6); no weight decay on biases, norms, embeddings' positions and the pattern.

    With `old`, parameters that survive keep their optimizer state (used after the densify swap)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or name.endswith("pos") or "pattern" in name else decay).append(p)
    t = cfg.training
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.learning_rate, betas=(0.9, 0.999), eps=1e-6)
    if old is not None:
        for p, state in old.state.items():
            if any(p is q for g in opt.param_groups for q in g["params"]):
                opt.state[p] = state
    return opt


def lr_at(step: int, cfg: TaskConfig) -> float:
    """One-cycle linear schedule: warm up from 0 to lr over warmup_steps, then decay linearly to 0."""
    t = cfg.training
    if t.warmup_steps and step < t.warmup_steps:
        return t.learning_rate * (step + 1) / t.warmup_steps
    span = max(1, t.train_steps - t.warmup_steps)
    return t.learning_rate * max(0.0, 1.0 - (step - t.warmup_steps) / span)


def amp_dtype(cfg: TaskConfig, device: torch.device) -> torch.dtype | None:
    mode = cfg.training.amp
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, dtype: torch.dtype | None,
             max_batches: int = 0, across_ranks: bool = False) -> dict:
    """Top-1 accuracy, top-5 accuracy, mean loss and mean batch latency (ms) over a loader of Batches (one
    pass). `across_ranks`: every rank passed its shard; counts and losses are summed over ranks."""
    was_training = model.training
    model.eval()
    correct = correct5 = total = 0
    loss_sum = 0.0
    times = []
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        batch = batch.to(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        loss_sum += float(F.cross_entropy(logits.float(), batch.y, reduction="sum"))
        correct += int((logits.argmax(-1) == batch.y).sum())
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, 5)
        correct5 += int((top5 == batch.y.unsqueeze(-1)).any(-1).sum())
        total += len(batch)
    model.train(was_training)
    if across_ranks:
        sums = torch.tensor([correct, correct5, total, loss_sum], dtype=torch.float64, device=device)
        sums = distributed.all_reduce_sum_(sums).tolist()
        correct, correct5, total, loss_sum = int(sums[0]), int(sums[1]), int(sums[2]), sums[3]
    n = max(total, 1)
    return {"accuracy": correct / n, "top5": correct5 / n, "loss": loss_sum / n,
            "latency_ms": 1000 * sum(times) / max(len(times), 1), "examples": total}


def eval_loader(split, cfg: TaskConfig, rank: int = 0, world: int = 1):
    """One ordered pass over a split (LRA Split or image folder); with world > 1 only this rank's share."""
    if cfg.dataset.kind == "image_folder":
        from sat.data.image_stream import eval_batches

        d = cfg.dataset
        return eval_batches(split, cfg.training.batch_size, d.img_size, d.crop_pct, d.num_workers, rank,
                            world)
    if world > 1:
        split = Split(split.x[rank::world], split.lengths[rank::world], split.y[rank::world])
    return LRALoader(split, cfg.training.batch_size, cfg.dataset.max_seq_len, shuffle=False)


# ---------------------------------------------------------------------------------------------- training

def _setup_logging(paths: RunPaths) -> None:
    paths.log_dir.mkdir(parents=True, exist_ok=True)
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    handler = logging.FileHandler(paths.text_log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)


class _NullWriter:
    """TensorBoard stand-in for ranks other than 0 (only rank 0 writes)."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def _log_event(event: Event, writer, say) -> None:
    if event.kind == "sparsify":
        d = event.details
        say(f"step {event.step}: attention switched to block-sparse ({event.reason}); density used "
            f"{d['density_used']:.4f}, {d['added_diagonal']} diagonal block(s) added to empty rows")
        for i, layout in enumerate(d["layouts"]):
            writer.add_image(f"layout/layer{i}", layout.float().mean(0, keepdim=True), event.step)  # (1, nb, nb)
    else:
        d = event.details
        say(f"step {event.step}: MLPs densified (S2D): {len(d['layers'])} Monarch layers -> dense; parameters "
            f"{d['params_before']} -> {d['params_after']}")
    writer.add_text("transitions", f"{event.kind} at step {event.step} {event.reason}", event.step)
    writer.add_scalar(f"transition/{event.kind}", 1.0, event.step)


def train(cfg: TaskConfig, paths: RunPaths, data_dir: Path, device: str = "cpu", backend: str = "auto",
          seed: int = 0, resume: bool = False, progress: bool = True, stop_at: int = 0) -> dict | None:
    """Train one run end to end; returns the summary written to summary.json.

    `stop_at` > 0 ends the process's work after that many steps (as an interruption would) and returns None;
    `resume` continues from the last checkpoint."""
    from torch.utils.tensorboard import SummaryWriter

    dev = torch.device(device)
    info = distributed.current()
    main = info.is_main
    torch.manual_seed(seed)
    splits, vocab = load_data(cfg, data_dir)
    train_loader = train_stream(cfg, splits["train"], seed, info)
    cfg = resolve_for_data(cfg, len(getattr(splits["train"], "classes", ())), len(train_loader))
    model = build_model(cfg, vocab, backend).to(dev)
    t = cfg.training
    scheduler = TransitionScheduler(cfg.sparsity, cfg.model.num_layers, t.train_steps,
                                    has_monarch=cfg.model.mlp == "monarch")
    optimizer = make_optimizer(model, cfg)
    mixer = make_mixer(cfg, seed + info.rank)
    step, best_acc = 0, -1.0
    timing = {"dense_time": 0.0, "dense_steps": 0, "sparse_time": 0.0, "sparse_steps": 0}
    dtype = amp_dtype(cfg, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    if resume:
        step, best_acc, model, optimizer, timing = _resume(paths, cfg, model, scheduler, train_loader, scaler,
                                                           dev, mixer)
    if info.enabled:  # per-rank random streams (dropout, Mixup) differ by rank; on resume they are re-derived
        torch.manual_seed(seed * 1009 + info.rank * 7919 + step)
        if mixer is not None:
            mixer.rng = np.random.default_rng([seed, info.rank, step])
    net = data_parallel(model, cfg, scheduler.sparse)

    if main:
        _setup_logging(paths)
        writer = SummaryWriter(str(paths.tensorboard))
        loss_file = _open_loss_log(paths.losses, step)
    else:
        writer, loss_file = _NullWriter(), open(os.devnull, "w")  # noqa: SIM115 (closed by the loop)

    def say(msg: str) -> None:
        if main:
            log.info(msg)
            tqdm.write(msg) if progress else print(msg, flush=True)

    say(f"task {cfg.task}: {count_parameters(model)} parameters, {len(splits['train'])} train / "
        f"{len(splits['dev'])} dev / {len(splits['test'])} test examples, N={cfg.dataset.max_seq_len}, "
        f"sk={cfg.sparsity.sk} ds={cfg.sparsity.ds} density={cfg.sparsity.density}, device {dev}, "
        f"{t.train_steps} steps of {info.world} x {t.batch_size} examples ({len(train_loader)} per epoch)")
    model.train()
    bar = tqdm(total=t.train_steps, initial=step, disable=not progress or not main, dynamic_ncols=True,
               desc=cfg.task)
    while step < t.train_steps:
        batch = next(train_loader).to(dev)
        inputs, target = batch, batch.y
        if mixer is not None:  # soft targets (B, classes), label smoothing included
            mixed, target = mixer(batch.x, batch.y)
            inputs = Batch(mixed, batch.mask, batch.y)
        collect = scheduler.wants_stats(step)
        lr = lr_at(step, cfg) * scheduler.lr_scale
        for g in optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            logits = net(inputs, collect=collect)
            ce = F.cross_entropy(logits.float(), target, label_smoothing=0.0 if mixer else t.label_smoothing)
        loss = ce
        stats = [layer.stats for layer in model.attention_layers()] if collect else []
        if stats and stats[0].pattern_loss is not None:
            pattern = torch.stack([s.pattern_loss for s in stats]).sum()
            loss = ce + cfg.sparsity.attn_loss_scale * pattern
        if not distributed.all_ranks_true(bool(torch.isfinite(loss)), dev):
            raise TrainingError(f"non-finite loss at step {step + 1}; {_kept(paths)}. Lower the learning rate "
                                f"or use --amp off")
        ce_value = float(ce.detach())  # read here, where the finiteness check has waited for the forward anyway
        pattern_value = float(pattern.detach()) if stats and stats[0].pattern_loss is not None else None
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if t.clip_value > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_value_(model.parameters(), t.clip_value)
        scaler.step(optimizer)
        scaler.update()
        if stats:  # every rank feeds the monitor the same rank-averaged maps, so all decide alike
            scheduler.observe(step, distributed.all_reduce_mean([s.mean_map for s in stats]))
        phase = "sparse" if scheduler.sparse else "dense"
        step += 1
        if dev.type == "cuda" and step % 50 == 0:
            torch.cuda.synchronize(dev)
        timing[f"{phase}_time"] += time.perf_counter() - t0
        timing[f"{phase}_steps"] += 1
        events = scheduler.after_step(step, model)
        for event in events:
            _log_event(event, writer, say)
            if info.enabled:
                print(f"rank {info.rank}/{info.world}: {event.kind} at step {event.step}", file=sys.stderr,
                      flush=True)
            if event.kind == "densify":
                optimizer = make_optimizer(model, cfg, old=optimizer)
        if events:
            net = data_parallel(model, cfg, scheduler.sparse)
        bar.update(1)
        loss_file.write(f"{step}\t{ce_value:.8f}\t{phase}\n")
        if step % 10 == 0 or step == 1 or events:
            acc = float((logits.argmax(-1) == batch.y).float().mean())
            writer.add_scalar("train/loss", ce_value, step)
            writer.add_scalar("train/accuracy", acc, step)
            writer.add_scalar("lr", lr, step)
            writer.add_scalar("sparsity/density", scheduler.density_used or 1.0, step)
            sps = timing[f"{phase}_steps"] / max(timing[f"{phase}_time"], 1e-9)
            writer.add_scalar(f"perf/steps_per_sec_{phase}", sps, step)
            writer.add_scalar("perf/peak_memory_mb", peak_memory_mb(dev), step)
            bar.set_postfix(loss=f"{ce_value:.3f}", phase=phase, refresh=False)
        if stats:
            rec = scheduler.monitor.history[-1]
            for i in range(len(rec.skew)):
                writer.add_scalar(f"monitor/skewness/layer{i}", rec.skew[i], step)
                writer.add_scalar(f"monitor/distance/layer{i}", rec.dist[i], step)
                if math.isfinite(rec.drift[i]):
                    writer.add_scalar(f"monitor/drift/layer{i}", rec.drift[i], step)
            if pattern_value is not None:
                writer.add_scalar("train/pattern_loss", pattern_value, step)
        if step % t.eval_frequency == 0 or step == t.train_steps:
            res = evaluate(model, eval_loader(splits["dev"], cfg, info.rank, info.world), dev, dtype,
                           t.num_eval_batches, across_ranks=info.enabled)
            writer.add_scalar("val/loss", res["loss"], step)
            writer.add_scalar("val/accuracy", res["accuracy"], step)
            writer.add_scalar("val/top5", res["top5"], step)
            if not (math.isfinite(res["loss"]) and _finite(model)):  # never checkpoint a diverged model
                raise TrainingError(f"the model diverged by step {step} (non-finite dev loss or weights); "
                                    f"{_kept(paths)}. Lower the learning rate or use --amp off")
            improved = res["accuracy"] > best_acc
            best_acc = max(best_acc, res["accuracy"])
            say(f"step {step}: dev accuracy {res['accuracy']:.4f} top-5 {res['top5']:.4f} "
                f"loss {res['loss']:.4f} ({phase})" + (" *best*" if improved else ""))
            if main:
                state = _state(cfg, model, optimizer, scheduler, train_loader, step, best_acc, vocab,
                               data_dir, timing)
                state["scaler"] = scaler.state_dict()
                state["mixup"] = mixer.state_dict() if mixer is not None else None
                loss_file.flush()
                if improved:
                    save_checkpoint(paths.best, state)
                save_checkpoint(paths.last, state)
        if stop_at and step >= stop_at and step < t.train_steps:
            bar.close()
            loss_file.close()
            writer.close()
            say(f"stopped at step {step} (--stop_at); continue with --resume")
            return None
    bar.close()
    loss_file.close()
    if getattr(train_loader, "substituted", 0):
        say(f"{train_loader.substituted} unreadable training image(s) were replaced by the next readable one")
    if not main:  # rank 0 alone evaluates the best checkpoint (no collectives from here on)
        return None

    best = load_checkpoint(paths.best, map_location=dev)
    eval_model = _model_from_state(best, dev, backend)
    test = evaluate(eval_model, eval_loader(splits["test"], cfg), dev, dtype)
    dev_res = evaluate(eval_model, eval_loader(splits["dev"], cfg), dev, dtype)
    majority = _majority_rate(_labels(splits["test"]))
    summary = {
        "task": cfg.task, "name": paths.name, "steps": step, "best_step": best["step"],
        "transition_step": scheduler.transition_step, "transition_reason": scheduler.transition_reason,
        "densify_step": scheduler.densify_step,
        "dev_accuracy": dev_res["accuracy"], "test_accuracy": test["accuracy"], "test_majority_rate": majority,
        "dev_top5": dev_res["top5"], "test_top5": test["top5"],
        "world_size": info.world, "global_batch_size": info.world * t.batch_size,
        "dense_steps_per_sec": _rate(timing, "dense"), "sparse_steps_per_sec": _rate(timing, "sparse"),
        "peak_memory_mb": peak_memory_mb(dev), "density": cfg.sparsity.density,
        "density_used": scheduler.density_used, "added_diagonal_blocks": scheduler.added_diagonal,
        "block_size": cfg.sparsity.block_size, "seq_len": cfg.dataset.max_seq_len, "device": str(dev),
    }
    atomic_write_text(paths.summary, json.dumps(summary, indent=2) + "\n")
    say(f"test accuracy {test['accuracy']:.4f}, top-5 {test['top5']:.4f} "
        f"(best dev checkpoint of step {best['step']}; majority class "
        f"{majority:.4f}); transition step {scheduler.transition_step} ({scheduler.transition_reason}); "
        f"summary {paths.summary}")
    writer.close()
    return summary


def _open_loss_log(path: Path, step: int):
    """Per-step training losses (step, loss, phase), one line per step as it happens; on resume, lines past
    the checkpoint's step are dropped. The kept lines are rewritten atomically, so a crash during the rewrite
    never loses them."""
    kept = []
    if step and path.is_file():
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if line.endswith("\n") and line.split("\t")[0].isdigit() and int(line.split("\t")[0]) <= step]
    atomic_write_text(path, "".join(kept))
    return open(path, "a", buffering=1)  # noqa: SIM115 (closed by the loop); line-buffered: tail -f works


def _finite(model: nn.Module) -> bool:
    """Every parameter finite (one device sync)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def _kept(paths: RunPaths) -> str:
    if paths.last.is_file():
        return f"the last good checkpoint {paths.last} is kept (continue from it with --resume)"
    return "no checkpoint was written"


def _rate(timing: dict, phase: str) -> float | None:
    return timing[f"{phase}_steps"] / timing[f"{phase}_time"] if timing[f"{phase}_steps"] else None


def _majority_rate(y) -> float:
    counts = torch.bincount(torch.as_tensor(y))
    return float(counts.max()) / float(counts.sum())


def _state(cfg, model, optimizer, scheduler, loader, step, best_acc, vocab, data_dir, timing) -> dict:
    return {
        "task": cfg.task, "config": cfg.to_dict(), "step": step, "best_dev_accuracy": best_acc,
        "vocab_size": vocab, "data_dir": str(data_dir), "timing": dict(timing),
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "train_loader": loader.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }


def _load_weights(model: nn.Module, state: dict) -> None:
    """Load a checkpoint's weights, densifying the Monarch MLPs first if the run had densified them."""
    if state["scheduler"]["densify_step"] is not None:
        from sat.models.monarch import densify

        densify(model)
    model.load_state_dict(state["model"])


def _model_from_state(state: dict, dev: torch.device, backend: str) -> nn.Module:
    """Rebuild a model (densified if the run had densified) and load its weights."""
    from sat.config import from_dict

    cfg = from_dict(state["config"])
    model = build_model(cfg, state["vocab_size"], backend)
    try:
        _load_weights(model, state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not match the model of task {cfg.task} "
                              f"({str(e).splitlines()[0]}); use the checkpoint of this task and config") from e
    return model.to(dev)


def _resume(paths, cfg, model, scheduler, loader, scaler, dev, mixer=None):
    state = load_checkpoint(paths.last, map_location="cpu")
    if state["task"] != cfg.task or state["config"] != cfg.to_dict():
        raise CheckpointError(f"{paths.last} was written by a run with another task or config; start a new run "
                              f"with another --name, or resume with the same settings")
    try:  # the config matches, so anything that does not fit is damage inside the file
        scheduler.load_state_dict(state["scheduler"], dev)
        _load_weights(model, state)
        model.to(dev)
        optimizer = make_optimizer(model, cfg)
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["train_loader"])
        if scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        if mixer is not None and state.get("mixup"):
            mixer.load_state_dict(state["mixup"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        first = str(e).splitlines()[0][:120] if str(e) else ""
        raise CheckpointError(f"checkpoint {paths.last} is damaged ({type(e).__name__}: {first}); delete it and "
                              f"start again, or restore a copy") from e
    return state["step"], state["best_dev_accuracy"], model, optimizer, dict(state["timing"])

