"""The output folder of a run: what may be written into it, and when a checkpoint may be resumed.

Four rules keep a folder's config, checkpoint and metrics from one and the same run:

* one command at a time: the folder is locked while a command runs in it
  (:mod:`liftplus_fast.run_lock`), and a second one is refused naming the first;
* a folder that already holds a run (a checkpoint or metrics) is written into only when the run
  is resumed or ``overwrite`` is asked for; overwriting removes the old run's files just before
  the new run writes its own, after every check of the new run has passed;
* the folder is checked to be a writable folder before anything runs, and a resume to hold a
  checkpoint;
* a run is resumed only with the options it was started with, except those in
  :data:`RESUME_FREE_OPTIONS` (where data is read from, workers, devices, evaluation and logging),
  so the schedule the log shows is the one config.json records.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from .checkpoint import CHECKPOINT_NAME, load_checkpoint
from .errors import MissingInputError, OutputWriteError, ResumeMismatchError, RunExistsError, UserInputError
from .run_lock import RunLock, lock_run_folder

__all__ = [
    "RunExistsError",
    "ResumeMismatchError",
    "RESUME_FREE_OPTIONS",
    "RUN_FILES",
    "RUN_FOLDERS",
    "model_run_folder",
    "new_test_folder",
    "claim_test_folder",
    "prepare_output_dir",
    "same_folder",
    "clear_previous_run",
    "resume_conflicts",
    "check_resume",
    "lock_folders",
    "lock_run_folder",
    "own_model_dir",
    "place_test",
    "restarted_run",
    "torchrun_job",
]

# The checkpoint entry naming the torchrun job that wrote it (see restarted_run).
TORCHRUN_JOB_KEY = "torchrun_job"
# The files that make up a run (log.txt is appended to, never removed), and its folders.
RUN_FILES = (
    CHECKPOINT_NAME,
    "metrics.json",
    "config.json",
    "run.json",
    "per_class.csv",
    "per_class_accuracy.png",
    "confusion.npy",
    "confusion.png",
)
RUN_FOLDERS = ("tensorboard", "tuner")  # TensorBoard's event files; the safetensors tuner
# Options that do not change what is trained: a resumed run may set them anew.
RESUME_FREE_OPTIONS = frozenset(
    {
        "root",
        "num_workers",
        "device",
        "deterministic",
        "output_dir",
        "model_dir",
        "print_freq",
        "confusion_matrix",
        "tte",
        "expand",
        "prec_test",
        "test_only",
        "dist_timeout",
        "nonfinite_loss",
    }
)


def _holds_run(path: str) -> List[str]:
    return [name for name in (CHECKPOINT_NAME, "metrics.json") if os.path.exists(os.path.join(path, name))]


def prepare_output_dir(path: Optional[str], resume: bool = False, overwrite: bool = False) -> Optional[RunLock]:
    """Check that ``path`` can take this run's outputs before anything is trained, and lock it.

    Creates the folder when missing. Raises ``ValueError`` when ``path`` is a file or both
    ``resume`` and ``overwrite`` are set, :class:`~liftplus_fast.errors.OutputWriteError` when
    the folder cannot be created or written, :class:`~liftplus_fast.errors.RunInUseError` when a
    live command holds it (:mod:`liftplus_fast.run_lock`), ``FileNotFoundError`` when ``resume``
    finds no checkpoint to continue, and :class:`RunExistsError` when it holds a run and neither
    ``resume`` nor ``overwrite``
    is set. Returns the folder's :class:`~liftplus_fast.run_lock.RunLock`, which the caller
    keeps until the run ends (``None`` without a folder); writes nothing else that stays.
    """
    if path is None:
        if resume:
            raise UserInputError("resume needs the output folder of the run to continue (output_dir / --output-dir)")
        return None
    if resume and overwrite:
        raise UserInputError(
            f"resume and overwrite exclude each other: resume continues the run in {path!r}, overwrite replaces it"
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserInputError(f"output_dir {path!r} is a file, not a folder; choose another output folder")
    if resume and not os.path.isdir(path):
        raise MissingInputError(f"nothing to resume: the output folder {path!r} does not exist")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise OutputWriteError(f"output folder {path!r} cannot be written: {exc.strerror or exc}") from None
    lock = lock_run_folder(path)
    try:
        _check_contents(path, resume, overwrite)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_contents(path: str, resume: bool, may_hold_run: bool) -> None:
    found = _holds_run(path)
    if resume and CHECKPOINT_NAME not in found:
        present = sorted(n for n in os.listdir(path) if not n.startswith("."))
        raise MissingInputError(
            f"nothing to resume in {path!r}: it has no {CHECKPOINT_NAME} (the checkpoint a run writes after "
            f"each epoch; the folder holds {', '.join(present) if present else 'no files'}). Start the run "
            "without --resume (resume=True in Python)"
        )
    if found and not (resume or may_hold_run):
        raise RunExistsError(
            f"output folder {path!r} already holds a run ({', '.join(found)}); pass --resume to "
            "continue it or --overwrite to replace it (resume=True / overwrite=True in Python), "
            "or choose another output folder"
        )


def torchrun_job() -> Optional[str]:
    """The id of the torchrun job this process belongs to (``--rdzv-id``; a random one with
    ``--standalone``), or ``None`` outside torchrun. Checkpoints record it (``torchrun_job``)."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


def restarted_run(path: Optional[str]) -> Optional[str]:
    """The torchrun job id when this process belongs to a job whose run in ``path`` it restarts
    (``--max-restarts``, after a process or node failed), else ``None``.

    The job that wrote the folder's checkpoint is the one running: its restarted processes
    continue that checkpoint instead of starting over (or being refused as a folder that holds a
    run). torchrun's restart counter cannot tell: a node whose own processes did not fail
    restarts them with the counter unchanged.
    """
    job = torchrun_job()
    if not (job and path and os.path.isfile(os.path.join(path, CHECKPOINT_NAME))):
        return None
    try:
        written_by = load_checkpoint(path).get(TORCHRUN_JOB_KEY)
    except (OSError, ValueError):
        return None  # not resumable anyway: the run's own checks report it
    return job if written_by == job else None


def clear_previous_run(path: str) -> List[str]:
    """Remove the files of the run in ``path`` (see :data:`RUN_FILES`); returns those removed."""
    removed = []
    for name in RUN_FILES:
        file = os.path.join(path, name)
        if os.path.exists(file):
            os.remove(file)
            removed.append(name)
    for name in RUN_FOLDERS:
        folder = os.path.join(path, name)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
            removed.append(name)
    return removed


def model_run_folder(model_dir: str) -> str:
    """The folder of the run a trained tuner comes from: ``model_dir`` itself (a run folder or a
    tuner folder), the folder of a checkpoint file, or the run folder around a run's ``tuner/``."""
    folder = (os.path.dirname(model_dir) or ".") if os.path.isfile(model_dir) else model_dir
    parent = os.path.dirname(os.path.normpath(folder)) or "."
    if os.path.basename(os.path.normpath(folder)) == "tuner" and os.path.isfile(os.path.join(parent, "config.json")):
        return parent
    return folder


def same_folder(a: str, b: str) -> bool:
    """Whether the paths ``a`` and ``b`` name one folder."""
    return os.path.realpath(a) == os.path.realpath(b)


# Test folders this process named (absolute path -> the name without its "-N" suffix): the
# folder is claimed when the test starts (claim_test_folder), as tests started in the same
# second name the same folder.
_NAMED_TESTS: Dict[str, str] = {}


def new_test_folder(run_folder: str) -> str:
    """A folder name for one evaluation of the run in ``run_folder``: ``test-<date>-<time>``
    inside it (``-2``, ``-3``, ... when that exists), so a test never writes over the run's files."""
    base = os.path.join(run_folder, time.strftime("test-%Y%m%d-%H%M%S"))
    path = _next_free(base, base)
    _NAMED_TESTS[os.path.abspath(path)] = base
    return path


def _next_free(base: str, path: str) -> str:
    n = int(path.rsplit("-", 1)[1]) if path != base else 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def claim_test_folder(path: Optional[str]) -> Optional[str]:
    """``path``, created now when it is a test folder this process named (:func:`new_test_folder`);
    when another test created it first, the next free name, created. Any other path as given."""
    base = _NAMED_TESTS.get(os.path.abspath(path)) if path else None
    if base is None or not os.path.isdir(os.path.dirname(base)):
        return path
    while True:
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            path = _next_free(base, path)


def _flat(d: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: v for k, v in d.items() if k != "v"}
    out.update({f"v.{k}": v for k, v in d.get("v", {}).items()})
    # JSON form on both sides: tuples and lists, ints and floats compare as written.
    return json.loads(json.dumps(out, default=str))


def resume_conflicts(saved: Dict[str, Any], current: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``(option, saved value, current value)`` for every schedule-defining option that differs.

    Both arguments are :meth:`LiftConfig.to_dict` forms. Options missing from ``saved`` (a
    checkpoint of an older version) are not compared.
    """
    old, new = _flat(saved), _flat(current)
    out = []
    for name in sorted(new):
        if name in RESUME_FREE_OPTIONS or name not in old:
            continue
        a, b = old[name], new[name]
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            same = float(a) == float(b)
        else:
            same = a == b
        if not same:
            out.append((name, a, b))
    return out


def check_resume(saved: Optional[Dict[str, Any]], current: Dict[str, Any], ckpt_path: str) -> None:
    """Raise :class:`ResumeMismatchError` naming every option that differs from the saved run's."""
    if saved is None:
        return
    conflicts = resume_conflicts(saved, current)
    if conflicts:
        changes = ", ".join(f"{name} {a!r} -> {b!r}" for name, a, b in conflicts)
        raise ResumeMismatchError(
            f"cannot resume {ckpt_path}: it was trained with other values of {changes}. Resume with "
            "the run's own values, or start a new run (--overwrite, or another output folder)"
        )


def own_model_dir(output_dir: str) -> str:
    """Where ``test_only`` finds the tuner when ``model_dir`` is not given: the run's own output
    folder, i.e. the training run's folder when the name carries the published
    ``_test_only_True`` suffix (``output/..._lift+_test_only_True_tte_True`` ->
    ``output/..._lift+``), else ``output_dir`` itself."""
    marker = "_test_only_True"
    return output_dir[: output_dir.index(marker)] if marker in output_dir else output_dir


def place_test(cfg) -> None:
    """For a run's config (a :class:`~liftplus_fast.config.LiftConfig`, read and set by attribute):
    resolve a test-only run's tuner (``model_dir``, else the published rule
    :func:`own_model_dir`) and keep its outputs out of the trained run's folder: a test asked to
    write into the folder its tuner comes from writes into a ``test-<date>-<time>`` folder there."""
    if not cfg.test_only or cfg.zero_shot:
        return
    if cfg.model_dir is None:
        if not cfg.output_dir:
            raise UserInputError(
                "test_only needs model_dir: a run folder, a checkpoint file or a tuner folder "
                "(on the command line: liftplus-fast test ... model_dir PATH), or an output_dir holding it"
            )
        cfg.model_dir = own_model_dir(cfg.output_dir)
    if cfg.output_dir and same_folder(model_run_folder(cfg.model_dir), cfg.output_dir):
        cfg.output_dir = new_test_folder(model_run_folder(cfg.model_dir))


def lock_folders(cfg, resume: bool, overwrite: bool) -> List[RunLock]:
    """For a run's config: lock the output folder (checked for this run) and, for a test, the
    run folder its tuner comes from, shared, so that no training writes that run while it is
    evaluated and other tests of it may run beside."""
    locks: List[RunLock] = []
    try:
        if cfg.test_only and cfg.model_dir is not None:
            run_folder = model_run_folder(cfg.model_dir)
            if os.path.isdir(run_folder) and not (cfg.output_dir and same_folder(run_folder, cfg.output_dir)):
                locks.append(lock_run_folder(run_folder, shared=True))
        cfg.output_dir = claim_test_folder(cfg.output_dir)
        lock = prepare_output_dir(cfg.output_dir, resume, overwrite)
        if lock is not None:
            locks.append(lock)
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks
