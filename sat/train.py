"""The one training loop shared by every task: forward, loss, backward, optimizer, monitor and transitions,
evaluation, checkpoints, TensorBoard and summary.json.

`train` reads top to bottom: set-up (data, model, optimizer, transition scheduler, a checkpoint's state on
--resume), the loop (one named call per step of it), the finish (the best checkpoint evaluated on test,
summary.json). Its pieces live beside it: data in sat/data/loading.py (LRA .npz tasks and image folders alike;
image tasks add label smoothing and Mixup/CutMix), the optimizer and schedule in sat/optim.py, evaluation in
sat/evaluate.py, and every output (text log, TensorBoard, losses file, progress bar, checkpoints) in
sat/runlog.py, whose `RunLog` closes them on every way out.

Under torchrun (sat/distributed.py) the model runs in DistributedDataParallel; `batch_size` is the global batch
of an LRA task (split over the ranks, sat/data/loading.py `rank_batch`) and the batch per GPU of an image task;
every rank takes each transition at the same step: the monitor sees the per-layer maps averaged over
ranks (identical on every rank), rank 0's layouts are broadcast at the switch, the densify swap is step-based,
and DDP is re-wrapped after each transition (the frozen pattern and the replaced Monarch parameters leave it).
Only rank 0 writes the log, TensorBoard, checkpoints and summary.json.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sat import distributed
from sat.checkpoint import CheckpointError, load_checkpoint
from sat.config import SECTIONS, ConfigError, TaskConfig, checkpoint_interval
from sat.data.batch import Batch
from sat.data.loading import TaskData, describe_batch, load_task_data, make_mixer, rank_batch, resolve_for_data
from sat.device import amp_dtype, peak_memory_mb
from sat.evaluate import evaluate, majority_rate, model_from_checkpoint
from sat.fileio import atomic_write_text
from sat.interrupt import STOP, Interrupted
from sat.kernels import check_backend
from sat.models.build import build_model
from sat.models.monarch import count_parameters
from sat.optim import lr_at, make_optimizer, set_lr
from sat.run_state import RunState, restore, snapshot
from sat.runlog import RunLog, RunPaths
from sat.runs import config_conflicts, may_change_on_resume
from sat.sparsity.monitor import MonitorRecord
from sat.sparsity.recall import measure_block_mass
from sat.sparsity.scheduler import Event, TransitionScheduler


class TrainingError(Exception):
    """A run that cannot go on (non-finite loss...); the last good checkpoint is kept (exit code 1)."""


def train(cfg: TaskConfig, paths: RunPaths, data_dir: Path, device: str = "cpu", backend: str = "auto",
          seed: int = 0, resume: bool | dict = False, progress: bool = True, stop_at: int = 0,
          overwrite: bool = False) -> dict | None:
    """Train one run end to end; returns the summary written to summary.json.

    `stop_at` > 0 ends the process's work after that many steps, with a checkpoint as an interruption would,
    and returns None; `resume` continues from the last checkpoint (True: read it here; a dict: the checkpoint
    already read, as main_train.py's --resume does); `overwrite` deletes the run's earlier artefacts once the
    set-up has found nothing to refuse. SIGINT/SIGTERM (with sat.interrupt's handlers installed) stop the loop
    after the step in progress, with a checkpoint, by raising `Interrupted`."""
    s = _set_up(cfg, data_dir, device, backend, seed)
    if resume:
        _resume(s, paths, resume if isinstance(resume, dict) else load_checkpoint(paths.last, map_location="cpu"))
    if s.info.enabled:  # per-rank random streams (dropout, Mixup) differ by rank; on resume they are re-derived
        torch.manual_seed(seed * 1009 + s.info.rank * 7919 + s.step)
        if s.mixer is not None:
            s.mixer.rng = np.random.default_rng([seed, s.info.rank, s.step])
    s.forward_model = data_parallel(s.model, s.cfg, s.scheduler.sparse)
    saver = Checkpointer(s.cfg.training.checkpoint_every)
    t = s.cfg.training
    removed = paths.remove() if overwrite and s.info.is_main else []  # nothing above refused the run

    with RunLog(paths, s.info.is_main, progress, s.step, t.train_steps, s.cfg.task) as run, STOP.deferred():
        if removed:
            run.say(f"--overwrite: removed the earlier run {paths.name!r} ({', '.join(p.name for p in removed)})")
        run.say(_describe(s))
        run.say(f"data: {data_dir}; logs: {paths.log_dir}; checkpoints: {paths.ckpt_dir}")
        if resume:
            run.say(f"resumed from step {s.step} (phase {'sparse' if s.scheduler.sparse else 'dense'}) of "
                    f"{paths.last}")
        run.monitor_charts(s.cfg.model.num_layers)
        run.say(describe_batch(s.cfg, s.info.world))
        s.model.train()
        while s.step < t.train_steps:
            signum = _train_step(s, run)
            if s.step % t.eval_frequency == 0 or s.step == t.train_steps:
                saver.at_evaluation(s, run, _evaluate_dev(s, run))
            if not s.info.enabled:  # one process: the signal as of this step's end (no other rank to agree with)
                signum = STOP.signum
            if saver.after_step(s, run, signum, bool(stop_at and stop_at <= s.step < t.train_steps)):
                return None

        # finish: rank 0 alone evaluates the best checkpoint (no collectives from here on). The last step's
        # checkpoint is on disk, so a signal from here on stops at once; --resume repeats only this part.
        try:
            STOP.immediate()
            run.bar.close()  # the final bar stays above the closing lines
            if getattr(s.batches, "substituted", 0):
                run.say(f"{s.batches.substituted} unreadable training image(s) were replaced by the next readable "
                        f"one")
            if not s.info.is_main:
                return None
            return _summarize(s, paths, backend, run)
        except Interrupted as e:
            if not e.said:
                run.say(f"interrupted at step {s.step}; checkpoint saved; continue with --resume")
                e.said = True
            raise


def _set_up(cfg: TaskConfig, data_dir: Path, device: str, backend: str, seed: int) -> RunState:
    """Data, model, optimizer and transition scheduler of a new run (step 0)."""
    dev, info = torch.device(device), distributed.current()
    requested = cfg.to_dict()  # before the data fills in what the config leaves open: what --resume restores
    dtype = amp_dtype(cfg, dev)
    per_rank = rank_batch(cfg, info.world)  # LRA: the global batch split over the ranks (refused if it does not)
    try:  # a backend that cannot run this model is a one-line error now, not a crash at the switch
        check_backend(backend, dtype or torch.float32, cfg.sparsity.block_size, cfg.model.head_dim,
                      per_rank * (2 if cfg.dataset.two_inputs else 1), dev, cfg.model.num_heads)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    torch.manual_seed(seed)
    data = load_task_data(cfg, data_dir)
    batches = data.train_stream(seed, info.rank, info.world)
    cfg = resolve_for_data(cfg, data.found_classes(), len(batches))
    model = build_model(cfg, data.vocab_size, backend).to(dev)
    scheduler = TransitionScheduler(cfg.sparsity, cfg.model.num_layers, cfg.training.train_steps,
                                    has_monarch=cfg.model.mlp == "monarch",
                                    probe=_recall_probe(data, cfg, dev, dtype))
    return RunState(cfg=cfg, requested=requested, seed=seed, data_dir=data_dir, dev=dev, dtype=dtype, info=info,
                    data=data, batches=batches, model=model, scheduler=scheduler,
                    optimizer=make_optimizer(model, cfg), scaler=torch.amp.GradScaler(dev.type,
                                                                                       enabled=dtype == torch.float16),
                    mixer=make_mixer(cfg, seed + info.rank))


def _train_step(s: RunState, run: RunLog) -> int:
    """One optimizer step: forward (with the monitor's statistics when it wants them), backward, the monitor,
    the transitions due, the step's logging. Returns the stop signal all ranks agreed on (0: none)."""
    cfg = s.cfg
    batch = next(s.batches).to(s.dev)
    inputs, target = _mix(s.mixer, batch)
    collect = s.scheduler.wants_stats(s.step)
    lr = set_lr(s.optimizer, lr_at(s.step, cfg) * s.scheduler.lr_scale)
    t0 = time.perf_counter()
    logits, loss = step_forward(s.forward_model, s.model, inputs, target, collect, cfg, s.dtype, s.mixer is not None)
    finite, signum = distributed.finite_and_stop(bool(torch.isfinite(loss.total)), STOP.signum, s.dev)
    if not finite:
        raise TrainingError(f"non-finite loss at step {s.step + 1}; {run.kept()}. Lower the learning rate "
                            f"or use --amp off")
    ce, pattern = loss.values()  # read here, where the finiteness check has waited for the forward anyway
    if s.info.enabled:  # the loss of the whole global batch, as a one-rank run logs it (not rank 0's slice)
        ce = float(distributed.all_reduce_mean([loss.ce.detach().float()])[0])
    step_backward(loss.total, s.model, s.optimizer, s.scaler, cfg.training.clip_value)
    if loss.maps:  # every rank feeds the monitor the same rank-averaged maps, so all decide alike
        s.scheduler.observe(s.step, distributed.all_reduce_mean(loss.maps))
    phase = "sparse" if s.scheduler.sparse else "dense"
    s.step += 1
    _clock(s.timing, phase, t0, s.dev, s.step)
    events = s.scheduler.after_step(s.step, s.model)
    if events:
        s.optimizer = _after_transitions(events, s.model, cfg, s.optimizer, run, s.info)
        s.forward_model = data_parallel(s.model, cfg, s.scheduler.sparse)
    run.step(s.step, ce, phase)
    if s.step % 10 == 0 or s.step == 1 or events:
        run.scalars(s.step, _train_scalars(ce, logits, batch.y, lr, s.scheduler, s.timing, phase, s.dev))
        run.show(loss=f"{ce:.3f}", phase=phase)
    if loss.maps:
        run.scalars(s.step, _monitor_scalars(s.scheduler.monitor.history[-1], pattern, cfg.sparsity))
    return signum


# ---------------------------------------------------------------------------------------------- the loop's steps

@dataclass
class StepLoss:
    """One step's losses: cross-entropy, SAT's pattern loss (monitored steps of the learned pattern, else None),
    their weighted sum (what is back-propagated) and the monitored per-layer mean maps (empty if unmonitored)."""

    ce: torch.Tensor
    pattern: torch.Tensor | None
    total: torch.Tensor
    maps: list[torch.Tensor]

    def values(self) -> tuple[float, float | None]:
        """(cross-entropy, pattern loss) as numbers: waits for the forward on a GPU."""
        return float(self.ce.detach()), None if self.pattern is None else float(self.pattern.detach())


def _mix(mixer, batch: Batch) -> tuple[Batch, torch.Tensor]:
    """(inputs, targets): the batch and its class ids, or with Mixup/CutMix the mixed batch and soft targets
    (B, classes) with label smoothing included."""
    if mixer is None:
        return batch, batch.y
    mixed, target = mixer(batch.x, batch.y)
    return Batch(mixed, batch.mask, batch.y), target


def step_forward(ddp_model: nn.Module, model: nn.Module, inputs: Batch, target: torch.Tensor, collect: bool,
                 cfg: TaskConfig, dtype: torch.dtype | None, mixed: bool) -> tuple[torch.Tensor, StepLoss]:
    """Logits and losses of one training step; with `collect` the attention layers' statistics too (also what
    bench/train_step.py times)."""
    with torch.autocast(inputs.x.device.type, dtype=dtype, enabled=dtype is not None):
        logits = ddp_model(inputs, collect=collect)
        ce = F.cross_entropy(logits.float(), target, label_smoothing=0.0 if mixed else cfg.training.label_smoothing)
    stats = [layer.stats for layer in model.attention_layers()] if collect else []
    pattern, total = None, ce
    if stats and stats[0].pattern_loss is not None:
        pattern = torch.stack([s.pattern_loss for s in stats]).sum()
        total = ce + cfg.sparsity.attn_loss_scale * pattern
    return logits, StepLoss(ce, pattern, total, [s.mean_map for s in stats])


def step_backward(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler, clip_value: float) -> None:
    """Gradients (scaled for fp16), clipped by value when clip_value > 0, and one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_value > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)
    scaler.step(optimizer)
    scaler.update()


def _clock(timing: dict, phase: str, t0: float, dev: torch.device, step: int) -> None:
    """Add the step's time to its phase (the GPU is waited for every 50 steps, so queued work is counted)."""
    if dev.type == "cuda" and step % 50 == 0:
        torch.cuda.synchronize(dev)
    timing[f"{phase}_time"] += time.perf_counter() - t0
    timing[f"{phase}_steps"] += 1


def _recall_probe(data: TaskData, cfg: TaskConfig, dev: torch.device, dtype: torch.dtype | None):
    """The scheduler's block-mass probe: the first `recall_batches` dev batches, in order, through the model in
    eval mode (no random stream is touched, so the training run goes on exactly as without it)."""

    def probe(model: nn.Module) -> list[torch.Tensor]:
        def run(batch: Batch) -> None:
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                model(batch.to(dev))

        return measure_block_mass(model, itertools.islice(data.eval_batches("dev"), cfg.sparsity.recall_batches),
                                  run)

    return probe


def _after_transitions(events: list[Event], model: nn.Module, cfg: TaskConfig, optimizer: torch.optim.Optimizer,
                       run: RunLog, info: distributed.DistInfo) -> torch.optim.Optimizer:
    """Log the transitions; after the densify swap the optimizer is rebuilt (surviving parameters keep state)."""
    for event in events:
        run.transition(event)
        if info.enabled:
            print(f"rank {info.rank}/{info.world}: {event.kind} at step {event.step}", file=sys.stderr, flush=True)
        if event.kind == "densify":
            optimizer = make_optimizer(model, cfg, old=optimizer)
    return optimizer


def _train_scalars(ce: float, logits: torch.Tensor, y: torch.Tensor, lr: float, scheduler: TransitionScheduler,
                   timing: dict, phase: str, dev: torch.device) -> dict[str, float]:
    sps = timing[f"{phase}_steps"] / max(timing[f"{phase}_time"], 1e-9)
    return {"train/loss": ce, "train/accuracy": float((logits.argmax(-1) == y).float().mean()), "lr": lr,
            "sparsity/density": scheduler.density_used or 1.0, f"perf/steps_per_sec_{phase}": sps,
            "perf/peak_memory_mb": peak_memory_mb(dev)}


def _monitor_scalars(rec: MonitorRecord, pattern: float | None, s) -> dict[str, float]:
    """The monitor's per-layer skewness, distance and (once defined) drift beside the --sk/--ds thresholds; the
    pattern loss if learned."""
    out = {"monitor/threshold/sk": s.sk, "monitor/threshold/ds": s.ds}
    for i in range(len(rec.skew)):
        out[f"monitor/skewness/layer{i}"] = rec.skew[i]
        out[f"monitor/distance/layer{i}"] = rec.dist[i]
        if math.isfinite(rec.drift[i]):
            out[f"monitor/drift/layer{i}"] = rec.drift[i]
    if pattern is not None:
        out["train/pattern_loss"] = pattern
    return out


def _evaluate_dev(s: RunState, run: RunLog) -> bool:
    """An evaluation step: dev accuracy (rank-sharded under torchrun) logged with the phase it ran in; the best
    so far is updated. Returns whether it improved. A diverged model ends the run before it could be
    checkpointed."""
    res = evaluate(s.model, s.data.eval_batches("dev", s.info.rank, s.info.world), s.dev, s.dtype,
                   s.cfg.training.num_eval_batches, across_ranks=s.info.enabled)
    run.scalars(s.step, {"val/loss": res["loss"], "val/accuracy": res["accuracy"], "val/top5": res["top5"]})
    if not (math.isfinite(res["loss"]) and _finite(s.model)):  # never checkpoint a diverged model
        raise TrainingError(f"the model diverged by step {s.step} (non-finite dev loss or weights); "
                            f"{run.kept()}. Lower the learning rate or use --amp off")
    improved, s.best_acc = res["accuracy"] > s.best_acc, max(s.best_acc, res["accuracy"])
    top5 = f" top-5 {res['top5']:.4f}" if s.cfg.dataset.num_classes > 5 else ""
    run.say(f"step {s.step}: dev accuracy {res['accuracy']:.4f}{top5} loss {res['loss']:.4f} "
            f"({_eval_phase(s.scheduler)})" + (" *best*" if improved else ""))
    return improved


class Checkpointer:
    """The one owner of "when to save": a checkpoint at every evaluation (the best one too when dev accuracy
    improved), and between evaluations when training.checkpoint_every says one is due (every `steps` steps, or
    once `seconds` of wall time have passed since the last checkpoint) or the run stops at this step. What a
    checkpoint holds is sat/run_state.py's; rank 0 writes it (RunLog.save_checkpoint)."""

    def __init__(self, every: int | str, clock=time.monotonic) -> None:
        self.steps, self.seconds = checkpoint_interval(every)
        self.clock, self.since, self.saved_at = clock, clock(), -1

    def due(self, step: int) -> bool:
        if self.steps:
            return step % self.steps == 0
        return self.seconds > 0 and self.clock() - self.since >= self.seconds

    def saved(self, step: int) -> None:
        self.since, self.saved_at = self.clock(), step

    def at_evaluation(self, s: RunState, run: RunLog, improved: bool) -> None:
        if s.info.is_main:
            run.save_checkpoint(snapshot(s), improved)
        self.saved(s.step)

    def after_step(self, s: RunState, run: RunLog, signum: int, stop_at_here: bool) -> bool:
        """After every step: a checkpoint when one is due or the run stops here (and the evaluation did not
        just write one); then a signal raises Interrupted, and `--stop_at` returns True."""
        stop = bool(signum or stop_at_here)
        if self.saved_at != s.step and (stop or self.due(s.step)):
            if s.info.is_main:
                if not _finite(s.model):  # never checkpoint a diverged model
                    raise TrainingError(f"the model diverged by step {s.step} (non-finite weights); "
                                        f"{run.kept()}. Lower the learning rate or use --amp off")
                run.save_checkpoint(snapshot(s), improved=False)
            self.saved(s.step)
        if signum:
            run.say(f"interrupted at step {s.step}; checkpoint saved; continue with --resume")
            if s.info.enabled:  # each rank says where it stopped, as for transitions
                print(f"rank {s.info.rank}/{s.info.world}: interrupted at step {s.step}", file=sys.stderr,
                      flush=True)
            raise Interrupted(signum, said=True)
        if stop:
            run.say(f"stopped at step {s.step} (--stop_at); checkpoint saved; continue with --resume")
        return stop


def _finite(model: nn.Module) -> bool:
    """Every parameter finite (one device sync)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


# ---------------------------------------------------------------------------------------------- set-up and finish

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


def _eval_phase(scheduler: TransitionScheduler) -> str:
    """Which attention an evaluation ran with; at the switch step it ran after the switch."""
    if scheduler.sparse:
        return f"sparse, switched at step {scheduler.transition_step}"
    return "dense"


def _describe(s: RunState) -> str:
    cfg, t, splits = s.cfg, s.cfg.training, s.data.splits
    return (f"task {cfg.task} on {s.data.name}: {count_parameters(s.model)} parameters, {len(splits['train'])} "
            f"train / {len(splits['dev'])} dev / {len(splits['test'])} test examples, N={cfg.dataset.max_seq_len}, "
            f"sk={cfg.sparsity.sk} ds={cfg.sparsity.ds} density={cfg.sparsity.density}, device {s.dev}, "
            f"{t.train_steps} steps ({len(s.batches)} per epoch) on {s.info.world} rank(s)")


def _resume(s: RunState, paths: RunPaths, ckpt: dict) -> None:
    """Restore a loaded checkpoint (the run's last) into the run's objects (sat/run_state.py says what it holds)."""
    if ckpt["task"] != s.cfg.task:
        raise CheckpointError(f"checkpoint {paths.last} holds task {ckpt['task']}, not {s.cfg.task}; check --task")
    now = {section: values for section, values in s.cfg.to_dict().items() if section in SECTIONS}
    differ = config_conflicts(ckpt["config"], now, may_change_on_resume, "now")
    if differ:  # main_train.py restores the run's config, so this is data that resolves differently now
        raise CheckpointError(f"checkpoint {paths.last} was written with another configuration ({'; '.join(differ)}); "
                              f"resume with the data and settings it was trained with, or start a new --name")
    try:  # the config matches, so anything that does not fit is damage inside the file
        restore(s, ckpt)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        first = str(e).splitlines()[0][:120] if str(e) else ""
        raise CheckpointError(f"checkpoint {paths.last} is damaged ({type(e).__name__}: {first}); delete it and "
                              f"start again, or restore a copy") from e


def _configured_parameters(cfg: TaskConfig, vocab_size: int) -> int:
    """Parameters of the model the config describes, before any transition (a resumed run's model may be past S2D)."""
    with torch.device("meta"):
        return count_parameters(build_model(cfg, vocab_size, "reference"))


def _summarize(s: RunState, paths: RunPaths, backend: str, run: RunLog) -> dict:
    """The best dev checkpoint evaluated on test and dev, written to summary.json and returned."""
    cfg, scheduler, dev = s.cfg, s.scheduler, s.dev
    best = load_checkpoint(paths.best, map_location=dev)
    eval_model = model_from_checkpoint(best, dev, backend)
    test = evaluate(eval_model, s.data.eval_batches("test"), dev, s.dtype)
    dev_res = evaluate(eval_model, s.data.eval_batches("dev"), dev, s.dtype)
    majority = majority_rate(s.data.labels("test"))
    summary = {
        "task": cfg.task, "dataset": s.data.name, "name": paths.name, "steps": s.step, "best_step": best["step"],
        "transition_step": scheduler.transition_step, "transition_reason": scheduler.transition_reason,
        "densify_step": scheduler.densify_step,
        # what the configured model had at step 0 (built on the meta device: shapes only, no weights) and what
        # the run ended with (S2D densifies Monarch MLPs)
        "params_at_start": _configured_parameters(cfg, s.data.vocab_size),
        "params_at_end": count_parameters(s.model),
        "dev_accuracy": dev_res["accuracy"], "test_accuracy": test["accuracy"], "test_majority_rate": majority,
        "dev_top5": dev_res["top5"], "test_top5": test["top5"],
        "world_size": s.info.world, "global_batch_size": rank_batch(cfg, s.info.world) * s.info.world,
        "rank_batch_size": rank_batch(cfg, s.info.world),
        "dense_steps_per_sec": _rate(s.timing, "dense"), "sparse_steps_per_sec": _rate(s.timing, "sparse"),
        "peak_memory_mb": peak_memory_mb(dev), "density": cfg.sparsity.density,
        "density_used": scheduler.density_used, "added_diagonal_blocks": scheduler.added_diagonal,
        "pattern": cfg.sparsity.pattern, "keep_diagonal": cfg.sparsity.keep_diagonal,
        "selection": cfg.sparsity.selection,
        "layout_recall": scheduler.layout_recall,
        "block_size": cfg.sparsity.block_size, "seq_len": cfg.dataset.max_seq_len, "device": str(dev),
    }
    atomic_write_text(paths.summary, json.dumps(summary, indent=2) + "\n")
    top5 = f", top-5 {test['top5']:.4f}" if cfg.dataset.num_classes > 5 else ""
    if scheduler.transition_step is None:
        switched = "attention stayed dense" + (" (--no_switch)" if not cfg.sparsity.enabled else "")
    else:
        switched = f"switched to sparse at step {scheduler.transition_step} ({scheduler.transition_reason})"
    run.say(f"test accuracy {test['accuracy']:.4f}{top5} (best dev checkpoint of step {best['step']}; majority "
            f"class {majority:.4f}); {switched}; summary {paths.summary}")
    return summary


def _rate(timing: dict, phase: str) -> float | None:
    return timing[f"{phase}_steps"] / timing[f"{phase}_time"] if timing[f"{phase}_steps"] else None
