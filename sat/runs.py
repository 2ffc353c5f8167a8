"""A run name is one run: what main_train.py checks before it trains, and what --resume restores.

- `check_run_name`: a new run is refused while any artefact of its name exists (log, TensorBoard folder,
  losses, summary, checkpoints), unless --overwrite (train() then deletes them once nothing else refuses the
  run); --resume needs the last checkpoint.
- `resumed_config`: the configuration a checkpoint was trained with, so that `--resume` needs no flag
  repeated. A flag that is given anyway must agree with it: one that contradicts it is refused, naming the
  key and both values.

Both raise ConfigError or CheckpointError (exit 2, one line) before anything is written or deleted.
"""

from __future__ import annotations

from pathlib import Path

from sat.checkpoint import CheckpointError, load_checkpoint
from sat.config import ConfigError, TaskConfig, check_sections, from_dict, merge, preset_values
from sat.runlog import RunPaths

# keys a resumed run may change: they do not change what is computed
RESUME_MAY_CHANGE = {("training", "checkpoint_every")}


def check_run_name(paths: RunPaths, resume: bool, overwrite: bool, root: str | Path) -> None:
    """Refuse a new run whose name is taken (unless `overwrite`) and a resume with no checkpoint."""
    if resume and overwrite:
        raise ConfigError("pass either --resume (continue the run) or --overwrite (delete it and start again), "
                          "not both")
    found = paths.existing()
    shown = ", ".join(_show(p, root) for p in found)
    if resume and not paths.last.is_file():
        hint = (f"; the run has {shown} but no checkpoint yet: start it again with --overwrite" if found else
                "; train first (main_train.py) or check --random/--name/--task")
        raise CheckpointError(f"no checkpoint at {paths.last} to resume{hint}")
    if not resume and found and not overwrite:
        raise ConfigError(f"run {paths.name!r} already exists ({shown}); pass --resume to continue it or "
                          f"--overwrite to delete it and start again")


def _show(path: Path, root: str | Path) -> str:
    try:
        shown = str(path.relative_to(root))
    except ValueError:
        shown = str(path)
    return shown + "/" if path.is_dir() else shown


def resumed_config(paths: RunPaths, task: str, preset: str | None, overrides: dict) -> tuple[TaskConfig, Path]:
    """(the configuration the run's last checkpoint was trained with, the data folder it read). `preset` and
    `overrides` (the command line's config values) must agree with it; a key that may change on resume
    (RESUME_MAY_CHANGE) takes the command line's value."""
    state = load_checkpoint(paths.last, map_location="cpu")
    if state["task"] != task:
        raise CheckpointError(f"checkpoint {paths.last} holds task {state['task']}, not {task}; check --task")
    run = state.get("run")
    # checkpoints written before the "run" record hold the resolved config only; resolving it again is a no-op
    saved = run["config"] if isinstance(run, dict) and isinstance(run.get("config"), dict) else state["config"]
    given = merge(preset_values(task, preset) if preset else {}, overrides)
    check_sections(given)
    try:
        before = from_dict(saved)
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {paths.last} is damaged (its configuration does not load: {e}); "
                              f"delete it and start again, or restore a copy") from e
    now = from_dict(merge(saved, given))  # the command line's values typed and checked like any config
    conflicts = [f"{section}.{key} is {getattr(getattr(before, section), key)!r} in the checkpoint, "
                 f"{getattr(getattr(now, section), key)!r} on the command line"
                 for section, values in given.items() for key in values
                 if (section, key) not in RESUME_MAY_CHANGE
                 and getattr(getattr(before, section), key) != getattr(getattr(now, section), key)]
    if conflicts:
        raise ConfigError(f"--resume: {'; '.join(conflicts)}; leave such flags out (the run keeps its own "
                          f"settings) or start a new run with another --name")
    return now, Path(state["data_dir"])


def config_differences(saved: dict, now: dict, where: str) -> str:
    """The keys where two configs (TaskConfig.to_dict()) differ, as one line: "model.dim is 16 in the
    checkpoint, 32 {where}; ..." ("" when they agree, RESUME_MAY_CHANGE aside)."""
    out = []
    for section in sorted(set(saved) | set(now)):
        a, b = saved.get(section), now.get(section)
        if not isinstance(a, dict) or not isinstance(b, dict):
            if a != b:
                out.append(f"{section} is {a!r} in the checkpoint, {b!r} {where}")
            continue
        for key in sorted(set(a) | set(b)):
            if (section, key) not in RESUME_MAY_CHANGE and a.get(key) != b.get(key):
                out.append(f"{section}.{key} is {a.get(key)!r} in the checkpoint, {b.get(key)!r} {where}")
    return "; ".join(out)
