"""The one training loop shared by every task: forward, loss, backward, optimizer, monitor and transitions,
evaluation, checkpoints, TensorBoard and summary.json.

Output layout (SAT's): logs/log-{random}/{task}/{name}.log, {name}.tensorboard/, {name}.summary.json and
checkpoints/checkpoints-{random}/{task}/{name}.model (best dev accuracy) and {name}.last.model.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from sat.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sat.config import TaskConfig
from sat.data.format import DataError, load_meta, load_split
from sat.data.lra import Batch, LRALoader, check_split
from sat.models.lra import LRAModel
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
    generate_listops(raw, force=True, **gen)
    preprocess_listops(raw, data_dir, max_len=cfg.dataset.max_seq_len, force=True)


def load_data(cfg: TaskConfig, data_dir: Path) -> tuple[dict, int]:
    """Validated splits {train, dev, test} and the vocabulary size."""
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist; preprocess the data (see README) or pass "
                        f"--data_dir")
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


# ---------------------------------------------------------------------------------------------- model

def build_model(cfg: TaskConfig, vocab_size: int, backend: str = "auto") -> nn.Module:
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
def evaluate(model: nn.Module, loader: LRALoader, device: torch.device, dtype: torch.dtype | None,
             max_batches: int = 0) -> dict:
    """Accuracy, mean loss and mean batch latency (ms) over a loader (one pass)."""
    was_training = model.training
    model.eval()
    correct = total = 0
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
        total += len(batch)
    model.train(was_training)
    return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1),
            "latency_ms": 1000 * sum(times) / max(len(times), 1), "examples": total}


def eval_loader(split, cfg: TaskConfig) -> LRALoader:
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
    torch.manual_seed(seed)
    splits, vocab = load_data(cfg, data_dir)
    model = build_model(cfg, vocab, backend).to(dev)
    t = cfg.training
    scheduler = TransitionScheduler(cfg.sparsity, cfg.model.num_layers, t.train_steps,
                                    has_monarch=cfg.model.mlp == "monarch")
    optimizer = make_optimizer(model, cfg)
    train_loader = LRALoader(splits["train"], t.batch_size, cfg.dataset.max_seq_len, shuffle=True, seed=seed,
                             repeat=True, drop_last=len(splits["train"]) >= t.batch_size)
    step, best_acc = 0, -1.0
    timing = {"dense_time": 0.0, "dense_steps": 0, "sparse_time": 0.0, "sparse_steps": 0}
    dtype = amp_dtype(cfg, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    if resume:
        step, best_acc, model, optimizer, timing = _resume(paths, cfg, model, scheduler, train_loader, scaler, dev)

    _setup_logging(paths)
    writer = SummaryWriter(str(paths.tensorboard))
    loss_file = _open_loss_log(paths.losses, step)

    def say(msg: str) -> None:
        log.info(msg)
        tqdm.write(msg) if progress else print(msg, flush=True)

    say(f"task {cfg.task}: {sum(p.numel() for p in model.parameters())} parameters, {len(splits['train'])} train / "
        f"{len(splits['dev'])} dev / {len(splits['test'])} test examples, N={cfg.dataset.max_seq_len}, "
        f"sk={cfg.sparsity.sk} ds={cfg.sparsity.ds} density={cfg.sparsity.density}, device {dev}")
    model.train()
    bar = tqdm(total=t.train_steps, initial=step, disable=not progress, dynamic_ncols=True, desc=cfg.task)
    while step < t.train_steps:
        batch = next(train_loader).to(dev)
        collect = scheduler.wants_stats(step)
        lr = lr_at(step, cfg) * scheduler.lr_scale
        for g in optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            logits = model(batch, collect=collect)
            ce = F.cross_entropy(logits.float(), batch.y)
        loss = ce
        stats = [layer.stats for layer in model.attention_layers()] if collect else []
        if stats and stats[0].pattern_loss is not None:
            pattern = torch.stack([s.pattern_loss for s in stats]).sum()
            loss = ce + cfg.sparsity.attn_loss_scale * pattern
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss at step {step + 1}; the last good checkpoint {paths.last} is kept. "
                                f"Lower the learning rate or use --amp off")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if t.clip_value > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_value_(model.parameters(), t.clip_value)
        scaler.step(optimizer)
        scaler.update()
        if stats:
            scheduler.observe(step, [s.mean_map for s in stats])
        phase = "sparse" if scheduler.sparse else "dense"
        step += 1
        if dev.type == "cuda" and step % 50 == 0:
            torch.cuda.synchronize(dev)
        timing[f"{phase}_time"] += time.perf_counter() - t0
        timing[f"{phase}_steps"] += 1
        events = scheduler.after_step(step, model)
        for event in events:
            _log_event(event, writer, say)
            if event.kind == "densify":
                optimizer = make_optimizer(model, cfg, old=optimizer)
        bar.update(1)
        loss_file.write(f"{step}\t{float(ce.detach()):.8f}\t{phase}\n")
        if step % 10 == 0 or step == 1 or events:
            acc = float((logits.argmax(-1) == batch.y).float().mean())
            writer.add_scalar("train/loss", float(ce.detach()), step)
            writer.add_scalar("train/accuracy", acc, step)
            writer.add_scalar("lr", lr, step)
            writer.add_scalar("sparsity/density", scheduler.density_used or 1.0, step)
            sps = timing[f"{phase}_steps"] / max(timing[f"{phase}_time"], 1e-9)
            writer.add_scalar(f"perf/steps_per_sec_{phase}", sps, step)
            writer.add_scalar("perf/peak_memory_mb", peak_memory_mb(dev), step)
            bar.set_postfix(loss=f"{float(ce):.3f}", phase=phase, refresh=False)
        if stats:
            rec = scheduler.monitor.history[-1]
            for i in range(len(rec.skew)):
                writer.add_scalar(f"monitor/skewness/layer{i}", rec.skew[i], step)
                writer.add_scalar(f"monitor/distance/layer{i}", rec.dist[i], step)
                if math.isfinite(rec.drift[i]):
                    writer.add_scalar(f"monitor/drift/layer{i}", rec.drift[i], step)
            if stats[0].pattern_loss is not None:
                writer.add_scalar("train/pattern_loss", float(pattern), step)
        if step % t.eval_frequency == 0 or step == t.train_steps:
            res = evaluate(model, eval_loader(splits["dev"], cfg), dev, dtype, t.num_eval_batches)
            writer.add_scalar("val/loss", res["loss"], step)
            writer.add_scalar("val/accuracy", res["accuracy"], step)
            improved = res["accuracy"] > best_acc
            best_acc = max(best_acc, res["accuracy"])
            say(f"step {step}: dev accuracy {res['accuracy']:.4f} loss {res['loss']:.4f} ({phase})"
                + (" *best*" if improved else ""))
            state = _state(cfg, model, optimizer, scheduler, train_loader, step, best_acc, vocab, data_dir, timing)
            state["scaler"] = scaler.state_dict()
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

    best = load_checkpoint(paths.best, map_location=dev)
    eval_model = _model_from_state(best, dev, backend)
    test = evaluate(eval_model, eval_loader(splits["test"], cfg), dev, dtype)
    dev_res = evaluate(eval_model, eval_loader(splits["dev"], cfg), dev, dtype)
    majority = _majority_rate(splits["test"].y)
    summary = {
        "task": cfg.task, "name": paths.name, "steps": step, "best_step": best["step"],
        "transition_step": scheduler.transition_step, "transition_reason": scheduler.transition_reason,
        "densify_step": scheduler.densify_step,
        "dev_accuracy": dev_res["accuracy"], "test_accuracy": test["accuracy"], "test_majority_rate": majority,
        "dense_steps_per_sec": _rate(timing, "dense"), "sparse_steps_per_sec": _rate(timing, "sparse"),
        "peak_memory_mb": peak_memory_mb(dev), "density": cfg.sparsity.density,
        "density_used": scheduler.density_used, "added_diagonal_blocks": scheduler.added_diagonal,
        "block_size": cfg.sparsity.block_size, "seq_len": cfg.dataset.max_seq_len, "device": str(dev),
    }
    paths.summary.write_text(json.dumps(summary, indent=2) + "\n")
    say(f"test accuracy {test['accuracy']:.4f} (best dev checkpoint of step {best['step']}; majority class "
        f"{majority:.4f}); transition step {scheduler.transition_step} ({scheduler.transition_reason}); "
        f"summary {paths.summary}")
    writer.close()
    return summary


def _open_loss_log(path: Path, step: int):
    """Per-step training losses (step, loss, phase); on resume, lines past the checkpoint's step are dropped."""
    kept = []
    if step and path.is_file():
        kept = [line for line in path.read_text().splitlines(keepends=True) if int(line.split("\t")[0]) <= step]
    f = open(path, "w")  # noqa: SIM115 (closed by the loop)
    f.writelines(kept)
    return f


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


def _model_from_state(state: dict, dev: torch.device, backend: str) -> nn.Module:
    """Rebuild a model (densified if the run had densified) and load its weights."""
    from sat.config import from_dict

    cfg = from_dict(state["config"])
    model = build_model(cfg, state["vocab_size"], backend)
    if state["scheduler"]["densify_step"] is not None:
        from sat.models.monarch import densify

        densify(model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not match the model of task {cfg.task} "
                              f"({str(e).splitlines()[0]}); use the checkpoint of this task and config") from e
    return model.to(dev)


def _resume(paths, cfg, model, scheduler, loader, scaler, dev):
    state = load_checkpoint(paths.last, map_location="cpu")
    if state["task"] != cfg.task or state["config"] != cfg.to_dict():
        raise CheckpointError(f"{paths.last} was written by a run with another task or config; start a new run "
                              f"with another --name, or resume with the same settings")
    scheduler.load_state_dict(state["scheduler"], dev)
    if scheduler.densify_step is not None:
        from sat.models.monarch import densify

        densify(model)
    model.load_state_dict(state["model"])
    model.to(dev)
    optimizer = make_optimizer(model, cfg)
    optimizer.load_state_dict(state["optimizer"])
    loader.load_state_dict(state["train_loader"])
    if scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["best_dev_accuracy"], model, optimizer, dict(state["timing"])

