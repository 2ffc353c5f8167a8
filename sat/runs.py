"""A run name is one run: what main_train.py checks before it trains, and what --resume restores.

- `check_run_name`: a new run is refused while any artefact of its name exists (log, TensorBoard folder,
  losses, summary, checkpoints), unless --overwrite (train() then deletes them once nothing else refuses the
  run); --resume needs the last checkpoint.
- `resumed_config`: the configuration a checkpoint was trained with, so that `--resume` needs no flag
  repeated. A flag that is given anyway must agree with it: one that contradicts it is refused, naming the
  key and both values.
- `config_conflicts`: the one comparison of a checkpoint's configuration with a command line (or with the
  configuration as the data resolves it now), used by --resume and by the evaluation of a saved run.

Both raise ConfigError or CheckpointError (exit 2, one line) before anything is written or deleted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sat.checkpoint import CheckpointError, load_checkpoint
from sat.config import SECTIONS, ConfigError, TaskConfig, check_sections, from_dict, merge, preset_values
from sat.runlog import RunPaths

# keys whose 0 means "what the data holds" (resolved when the data is loaded, stored resolved in a checkpoint)
FROM_DATA = {("dataset", "num_classes"), ("dataset", "channels")}
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


def command_line_config(task: str, preset: str | None, overrides: dict) -> dict:
    """What a command line sets, {section: {key: value}}: its preset's values with its flags and --set over them."""
    given = merge(preset_values(task, preset) if preset else {}, overrides)
    check_sections(given)
    return given


def config_conflicts(saved: dict, given: dict, compared: Callable[[str, str], bool], where: str) -> list[str]:
    """The one comparison of a checkpoint's configuration with another: each key that `given` ({section: {key:
    value}}) sets and `compared(section, key)` accepts whose value, typed and validated like any
    configuration laid over `saved` (TaskConfig.to_dict()), differs from the saved one, as "section.key is A in
    the checkpoint, B {where}". A given 0 for a key the data resolves (FROM_DATA: "what the data holds") never
    conflicts. Used by --resume (the command line, and the data as it resolves now) and by the evaluation of a
    saved run."""
    before = from_dict(saved)
    now = from_dict(merge(saved, given))
    return [f"{section}.{key} is {getattr(getattr(before, section), key)!r} in the checkpoint, "
            f"{getattr(getattr(now, section), key)!r} {where}"
            for section, values in given.items() if section in SECTIONS for key, value in values.items()
            if compared(section, key) and not ((section, key) in FROM_DATA and value == 0)
            and getattr(getattr(before, section), key) != getattr(getattr(now, section), key)]


def may_change_on_resume(section: str, key: str) -> bool:
    return (section, key) not in RESUME_MAY_CHANGE


def resumed_config(paths: RunPaths, task: str, preset: str | None,
                   overrides: dict) -> tuple[TaskConfig, Path, dict]:
    """(the configuration the run's last checkpoint was trained with, the data folder it read, the checkpoint,
    read here once). `preset` and `overrides` (the command line's config values) must agree with it; a key
    that may change on resume (RESUME_MAY_CHANGE) takes the command line's value."""
    state = load_checkpoint(paths.last, map_location="cpu")
    if state["task"] != task:
        raise CheckpointError(f"checkpoint {paths.last} holds task {state['task']}, not {task}; check --task")
    run = state.get("run")
    # checkpoints written before the "run" record hold the resolved config only; resolving it again is a no-op
    saved = run["config"] if isinstance(run, dict) and isinstance(run.get("config"), dict) else state["config"]
    given = command_line_config(task, preset, overrides)
    try:
        from_dict(saved)
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {paths.last} is damaged (its configuration does not load: {e}); "
                              f"delete it and start again, or restore a copy") from e
    conflicts = config_conflicts(saved, given, may_change_on_resume, "on the command line")
    if conflicts:
        raise ConfigError(f"--resume: {'; '.join(conflicts)}; leave such flags out (the run keeps its own "
                          f"settings) or start a new run with another --name")
    return from_dict(merge(saved, given)), Path(state["data_dir"]), state
