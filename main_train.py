"""Train a model with SAT's automatic dense -> block-sparse attention switch.

    python main_train.py --mode train --task lra-image --random 1001 --name sat --sk 1.7 --ds 1.3
    python main_train.py --task lra-listops --preset quick          # generated ListOps, minutes on a CPU
    python main_train.py --task imagenet-vit-s --data_dir /data/imagenet --amp bf16
    torchrun --nproc_per_node=8 main_train.py --task imagenet-vit-s --data_dir /data/imagenet  # 8 GPUs

Exit codes: 0 success, 2 bad usage or bad input (one-line error), 1 a failure during training, 130 / 143 stopped
by SIGINT (Ctrl-C) / SIGTERM after saving a checkpoint (continue with --resume).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path


def _stop_while_loading(signum: int, frame) -> None:
    """Ctrl-C / SIGTERM while Python loads torch (a second or two, before sat.interrupt takes over): nothing
    has been written yet, so one line and out, not a traceback through the import machinery."""
    print("interrupted during start-up; nothing was written", file=sys.stderr, flush=True)
    os._exit(128 + signum)


if __name__ == "__main__":
    for _s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_s, _stop_while_loading)

from sat.cli import evaluate_run, exit_codes, overrides_from_args, run_parser  # noqa: E402 (after the handlers)
from sat.config import die, load_config  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return run_parser("main_train.py", __doc__.split("\n")[0], modes=["train", "eval"])


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
        return evaluate_run(a)
    from sat import distributed
    from sat.data.loading import default_data_dir, prepare_data, rank_batch
    from sat.device import resolve_device
    from sat.interrupt import STOP, Interrupted
    from sat.runlog import RunPaths
    from sat.runs import check_run_name, resumed_config
    from sat.train import train

    STOP.install()  # SIGINT/SIGTERM: the loop finishes its step, saves a checkpoint and exits 130/143
    try:
        with exit_codes(training=True):
            if Path(a.root).exists() and not Path(a.root).is_dir():
                die(f"--root {a.root} is not a folder; pass the folder that holds (or will hold) logs/ and "
                    f"checkpoints/")
            paths = RunPaths.make(a.root, a.random, a.task, a.name)
            check_run_name(paths, a.resume, a.overwrite, a.root)
            resume: bool | dict = False
            if a.resume:  # the run's own settings; flags may only repeat them. The checkpoint is read once.
                cfg, saved_data_dir, resume = resumed_config(paths, a.task, a.preset, overrides_from_args(a))
                data_dir = Path(a.data_dir) if a.data_dir else saved_data_dir
            else:
                cfg = load_config(a.task, a.preset, overrides_from_args(a))
                data_dir = Path(a.data_dir) if a.data_dir else default_data_dir(cfg, a.root)
            rank_batch(cfg, distributed.env_world_size())  # a batch that cannot split is refused before any write
            device = resolve_device(a.device)
            info, device = distributed.init_from_env(device)  # under torchrun: join the group, one GPU per rank
            if a.data_dir is None and info.is_main:
                prepare_data(cfg, data_dir)
            distributed.barrier()
            train(cfg, paths, data_dir, device=device, backend=a.backend, seed=a.random, resume=resume,
                  progress=not a.no_progress, stop_at=a.stop_at, overwrite=a.overwrite)
    except Interrupted as e:  # the one line is printed by train() once a step has run
        release_frames(e)
        if not e.said and distributed.current().is_main:
            print("interrupted before training resumed; continue with --resume" if a.resume else
                  "interrupted before the first training step; nothing to resume", flush=True)
        return e.code
    finally:
        STOP.quiet()  # a signal during the teardown below ends the process, not with a traceback from here
        release_frames(sys.exc_info()[1])  # the exception on its way out, if any
        distributed.shutdown()
        STOP.uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main())
