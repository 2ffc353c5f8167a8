"""Train a model with SAT's automatic dense -> block-sparse attention switch.

    python main_train.py --mode train --task lra-image --random 1001 --name sat --sk 1.7 --ds 1.3
    python main_train.py --task lra-listops --preset quick          # generated ListOps, minutes on a CPU
    python main_train.py --task imagenet-vit-s --data_dir /data/imagenet --amp bf16
    torchrun --nproc_per_node=8 main_train.py --task imagenet-vit-s --data_dir /data/imagenet  # 8 GPUs

Exit codes: 0 success, 2 bad usage or bad input (one-line error), 1 a failure during training.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from sat.cli import evaluate_run, exit_codes
from sat.config import ConfigError, die, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", default="train", choices=["train", "eval"], help="eval = main_inference.py --mode eval")
    p.add_argument("--task", required=True,
                   help="lra-listops, lra-text, lra-retrieval, lra-image, lra-pathfinder, imagenet-vit-ti, "
                        "imagenet-vit-s")
    p.add_argument("--random", type=int, default=1001, help="seed; also names logs/log-{random} and checkpoints")
    p.add_argument("--name", default="sat", help="run name inside logs/ and checkpoints/")
    p.add_argument("--sk", type=float, help="skewness threshold (SAT default 1.7)")
    p.add_argument("--ds", type=float, help="drift threshold in percent (SAT default 1.3)")
    p.add_argument("--train_steps", type=int, help="total optimizer steps")
    p.add_argument("--epochs", type=float, help="train this many epochs (steps from the dataset size)")
    p.add_argument("--density", type=float, help="fraction of attention blocks kept after the switch")
    p.add_argument("--block_size", type=int, help="attention block size")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--max_dense_steps", type=int, help="force the switch after this many steps (0 = never)")
    p.add_argument("--no_switch", action="store_true", help="dense-only training (the monitor still logs)")
    p.add_argument("--preset", help="named settings from config.py PRESETS, e.g. 'quick'")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set model.num_layers=1 (repeatable)")
    p.add_argument("--data_dir", help="processed .npz files (default data/{task}); image tasks: the folder "
                                      "holding train/ and val/ class folders")
    p.add_argument("--img_size", type=int, help="image tasks: input size in pixels (a multiple of the patch)")
    p.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"],
                   help="mixed precision (auto = bf16 on CUDA, off on CPU)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "reference"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto = cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue the last checkpoint of this --name")
    p.add_argument("--root", default=".", help="where logs/ and checkpoints/ go")
    p.add_argument("--stop_at", type=int, default=0, help="stop after N steps, as an interruption would (tests)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (plain lines)")
    return p


def overrides_from_args(a: argparse.Namespace) -> dict:
    o: dict = {"sparsity": {}, "training": {}}
    for key in ("sk", "ds", "density", "block_size", "max_dense_steps"):
        if getattr(a, key) is not None:
            o["sparsity"][key] = getattr(a, key)
    if a.no_switch:
        o["sparsity"]["enabled"] = False
    for key in ("train_steps", "batch_size", "learning_rate", "epochs", "amp"):
        if getattr(a, key) is not None:
            o["training"][key] = getattr(a, key)
    if a.train_steps is not None and a.epochs is not None:
        raise ConfigError("pass either --train_steps or --epochs, not both")
    if a.train_steps is not None:
        o["training"]["epochs"] = 0  # explicit steps replace the task's epoch count
    if a.img_size is not None:
        o["dataset"] = {"img_size": a.img_size}
    for item in a.set:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set expects SECTION.KEY=VALUE (e.g. model.dim=32), got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        o.setdefault(section, {})[name] = parsed
    return o


def release_frames(e: BaseException | None) -> None:
    """Clear the frames of a failed run's traceback and of the exceptions it chains. They hold the DDP
    wrapper, which holds the process group: freed only after `distributed.shutdown`, its reducer would
    destroy the group with the GIL held and wait forever for a gloo worker that needs the GIL to release
    the last collective. Freed here, while the group still exists, shutdown destroys the group itself."""
    todo, seen = [e], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)  # frames still running (this one) are left alone
        todo += [e.__cause__, e.__context__]


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.mode == "eval":
        return evaluate_run(a.task, a.random, a.name, a.root, a.device, a.backend, data_dir=a.data_dir)
    from sat import distributed
    from sat.data.loading import default_data_dir, prepare_data, rank_batch
    from sat.device import resolve_device
    from sat.runlog import RunPaths
    from sat.train import train

    try:
        with exit_codes(training=True):
            cfg = load_config(a.task, a.preset, overrides_from_args(a))
            rank_batch(cfg, distributed.env_world_size())  # a batch that cannot split is refused before any write
            device = resolve_device(a.device)
            data_dir = Path(a.data_dir) if a.data_dir else default_data_dir(cfg, a.root)
            if Path(a.root).exists() and not Path(a.root).is_dir():
                die(f"--root {a.root} is not a folder; pass the folder that holds (or will hold) logs/ and "
                    f"checkpoints/")
            paths = RunPaths.make(a.root, a.random, a.task, a.name)
            if not a.resume and paths.last.exists():
                die(f"a run named {a.name!r} already exists at {paths.last}; pass --resume to continue it or "
                    f"choose another --name")
            info, device = distributed.init_from_env(device)  # under torchrun: join the group, one GPU per rank
            if a.data_dir is None and info.is_main:
                prepare_data(cfg, data_dir)
            distributed.barrier()
            train(cfg, paths, data_dir, device=device, backend=a.backend, seed=a.random, resume=a.resume,
                  progress=not a.no_progress, stop_at=a.stop_at)
    finally:
        release_frames(sys.exc_info()[1])  # the exception on its way out, if any
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
