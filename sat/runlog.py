"""Where a run writes (`RunPaths`) and the one object that holds what it writes to (`RunLog`).

Output layout (SAT's): logs/log-{random}/{task}/{name}.log (text log), {name}.tensorboard/, {name}.losses.tsv
(per-step training losses), {name}.summary.json, and checkpoints/checkpoints-{random}/{task}/{name}.model (best
dev accuracy) and {name}.last.model.

`RunLog` opens the text log, the TensorBoard writer, the losses file and the progress bar, and saves the
checkpoints. It is a context manager: leaving the `with` block closes all of them, whether the run finished,
stopped at --stop_at or raised. Under torchrun only rank 0 writes; other ranks get stand-ins that write nothing.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sat.checkpoint import save_checkpoint
from sat.fileio import atomic_write_text
from sat.sparsity.scheduler import Event
from sat.viz import attention_overlay, layout_image, monitor_layout

log = logging.getLogger("sat")


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

    def artefacts(self) -> list[Path]:
        """Everything a run of this name writes: a run name is one run, so any of these marks it as taken."""
        return [self.text_log, self.tensorboard, self.losses, self.summary, self.best, self.last]

    def existing(self) -> list[Path]:
        return [p for p in self.artefacts() if p.exists() or p.is_symlink()]

    def remove(self) -> list[Path]:
        """Delete this run's artefacts (--overwrite), and the temporary files a killed write of them left;
        returns what existed. Only paths named after this run: other runs in the same folders are untouched."""
        found = self.existing()
        leftovers = [t for p in self.artefacts() for t in p.parent.glob(f".{glob.escape(p.name)}.*.tmp")]
        for p in found + leftovers:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        return found


class RunLog:
    """The run's text log, TensorBoard writer, losses file, progress bar and checkpoints (see the module
    docstring). `step` is where the run starts (a resumed run's checkpoint step) and `total` where it ends."""

    def __init__(self, paths: RunPaths, main: bool, progress: bool, step: int, total: int, desc: str) -> None:
        self.paths, self.main, self.progress = paths, main, progress
        with ExitStack() as stack:  # what opened before a failure here is closed again
            if main:
                stack.callback(_close_handlers)
                _log_to(paths.text_log)
                from torch.utils.tensorboard import SummaryWriter

                self.writer = stack.enter_context(SummaryWriter(str(paths.tensorboard)))
                self.losses = stack.enter_context(_open_loss_log(paths.losses, step))
            else:
                self.writer = _NullWriter()
                self.losses = stack.enter_context(open(os.devnull, "w"))  # noqa: SIM115 (closed by the stack)
            self.bar = stack.enter_context(tqdm(total=total, initial=step, disable=not progress or not main,
                                                dynamic_ncols=True, desc=desc))
            self._stack = stack.pop_all()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the progress bar, the losses file, the writer and the text log (in that order)."""
        self._stack.close()

    def say(self, msg: str) -> None:
        """A line for the text log and the terminal (rank 0 only)."""
        if self.main:
            log.info(msg)
            tqdm.write(msg) if self.progress else print(msg, flush=True)

    def step(self, step: int, loss: float, phase: str) -> None:
        """One finished training step: the progress bar moves and its loss line is written."""
        self.bar.update(1)
        self.losses.write(f"{step}\t{loss:.8f}\t{phase}\n")

    def show(self, **values: str) -> None:
        """Values beside the progress bar (drawn with its next update)."""
        self.bar.set_postfix(**values, refresh=False)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def transition(self, event: Event) -> None:
        """A transition of the scheduler: one line, its layouts as images (sparsify), a text and a scalar."""
        d = event.details
        if event.kind == "sparsify":
            self.say(f"step {event.step}: attention switched to block-sparse ({event.reason}); density used "
                     f"{d['density_used']:.4f} (per layer "
                     f"{', '.join(f'{x:.3f}' for x in d['density_per_layer'])}), {d['added_diagonal']} diagonal "
                     f"block(s) added to empty rows")
            for i, (layout, added) in enumerate(zip(d["layouts"], d["added_blocks"], strict=True)):
                self.writer.add_image(f"layout/layer{i}", layout_image(layout, added), event.step)
            if "recall" in d:
                self._recall(event.step, d["recall"], d["block_mass"], d["layouts"])
        else:
            self.say(f"step {event.step}: MLPs densified (S2D): {len(d['layers'])} Monarch layers -> dense; "
                     f"parameters {d['params_before']} -> {d['params_after']}")
        legend = ("; pictures: layout/layerN blue = blocks chosen, orange = diagonal blocks added to empty rows; "
                  "attention_vs_layout/layerN darker = more dense attention (log scale, 3 decades), red outline = "
                  "blocks kept" if event.kind == "sparsify" else "")
        self.writer.add_text("transitions", f"{event.kind} at step {event.step} {event.reason}{legend}", event.step)
        self.writer.add_scalar(f"transition/{event.kind}", 1.0, event.step)

    def monitor_charts(self, num_layers: int) -> None:
        """TensorBoard's custom-scalars tab: every layer's skewness and drift beside the --sk/--ds thresholds."""
        self.writer.add_custom_scalars(monitor_layout(num_layers, "monitor/skewness/layer", "monitor/drift/layer",
                                                      "monitor/threshold/sk", "monitor/threshold/ds"))

    def _recall(self, step: int, recall: dict, masses: list, layouts: list) -> None:
        """The layout recall at the switch: one line per layer (recall, and the densities that would keep 90/95/99%
        of the dense attention mass), scalars, the recall-against-density curve, and the block-pooled dense
        attention with the chosen layout outlined."""
        for i, (layer, mass, layout) in enumerate(zip(recall["layers"], masses, layouts, strict=True)):
            reach = ", ".join(f"{float(t):.0%} at {'-' if v is None else f'{v:.3f}'}"
                              for t, v in layer["density_for_recall"].items())
            value = "n/a" if layer["recall"] is None else f"{layer['recall']:.3f}"
            self.say(f"step {step}: layer {i} layout recall {value} (dense attention mass kept; density needed for "
                     f"{reach})")
            if layer["recall"] is not None:
                self.writer.add_scalar(f"sparsity/recall/layer{i}", layer["recall"], step)
            for density, r in layer["curve"].items():  # x axis: density in thousandths
                if r is not None:
                    self.writer.add_scalar(f"sparsity/recall_curve/layer{i}", r, round(float(density) * 1000))
            self.writer.add_image(f"attention_vs_layout/layer{i}", attention_overlay(mass, layout), step)
        if recall["mean"] is not None:
            self.say(f"step {step}: mean layout recall {recall['mean']:.3f}")
            self.writer.add_scalar("sparsity/recall/mean", recall["mean"], step)

    def save_checkpoint(self, state: dict, improved: bool) -> None:
        """The last checkpoint, and the best one too when dev accuracy `improved` (rank 0 only; the losses
        written so far are flushed first, so a resumed run finds every line up to the checkpoint)."""
        if not self.main:
            return
        self.losses.flush()
        if improved:
            save_checkpoint(self.paths.best, state)
        save_checkpoint(self.paths.last, state)

    def kept(self) -> str:
        """What an error message says about the checkpoint a failed run leaves."""
        if self.paths.last.is_file():
            return f"the last good checkpoint {self.paths.last} is kept (continue from it with --resume)"
        return "no checkpoint was written"


def _log_to(path: Path) -> None:
    """The "sat" logger writes to `path` alone (handlers of an earlier run in this process are closed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log.setLevel(logging.INFO)
    _close_handlers()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)


def _close_handlers() -> None:
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()


def _open_loss_log(path: Path, step: int):
    """Per-step training losses (step, loss, phase), one line per step as it happens; on resume, lines past
    the checkpoint's step are dropped. The kept lines are rewritten atomically, so a crash during the rewrite
    never loses them."""
    kept = []
    if step and path.is_file():
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if line.endswith("\n") and line.split("\t")[0].isdigit() and int(line.split("\t")[0]) <= step]
    atomic_write_text(path, "".join(kept))
    return open(path, "a", buffering=1)  # noqa: SIM115 (closed by RunLog); line-buffered: tail -f works


class _NullWriter:
    """TensorBoard stand-in for ranks other than 0 (only rank 0 writes)."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
