"""The book's cross-validations as independent units on several GPUs, CPU slots or a SLURM
cluster (``psma-pfs grid plan | run | submit | collect``).

A **unit** is one fold of one configuration the chapters ask for
(:func:`psma_lib.book.cv_configs`: the ablation's runs and chapter 6's repeats), trained by its
own process, ``python -m psma_lib cv --config C --fold K`` (:func:`psma_lib.cv.run_fold`), into
exactly the folder the book's :func:`psma_lib.pipeline.run_cv` uses (``<output>/cv/<name>-<key>``).
Once every fold of a configuration is done, :func:`collect` writes its tables and
``results.json`` (:func:`psma_lib.cv.collect`: the files of one sequential run), so the book
afterwards only reads cached results: papermill runs on the driver, never in a unit.

* :func:`plan` / :func:`book_grid`: the units and whether each is done;
* :func:`run_local`: one workstation, one unit process per GPU (``CUDA_VISIBLE_DEVICES``) or per
  CPU slot (``OMP_NUM_THREADS`` = its share of the cores);
* :func:`submit`: a SLURM job array through submitit, one array task per unit, each running the
  same command as :func:`run_local`;
* :func:`collect`: every configuration whose folds are all done.

Finished units are skipped, so every command resumes. Files under ``<output>/grid/``:
``configs/<folder>.json`` (a unit's configuration), ``logs/<folder>-fold<k>.log`` (its output),
``submitit/`` (submitit's job files).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from tqdm.auto import tqdm

from .errors import InputError
from .io import write_csv, write_json

if TYPE_CHECKING:  # a SLURM task imports this module to run a unit's command: no torch there
    from .book import BookSettings
    from .crop import CropSet
    from .cv import CVConfig, CVResult

POLL_S = 0.2  # how often the local runner looks at its unit processes


@dataclass(frozen=True, eq=False)
class Unit:
    """Fold ``fold`` of ``config`` (``repeat`` r: chapter 6's repeat on the folds of seed + r),
    trained into ``folder``."""

    config: CVConfig
    fold: int
    repeat: int
    folder: Path

    @property
    def label(self) -> str:
        return f"{self.folder.name} fold {self.fold}"

    @property
    def done(self) -> bool:
        from .cv import fold_done

        return fold_done(self.folder, self.fold)


@dataclass(frozen=True, eq=False)
class Grid:
    """The units of one results folder ``root`` on the crops in ``crops_dir``."""

    crops_dir: Path
    root: Path
    units: tuple[Unit, ...]

    @property
    def work_dir(self) -> Path:
        return self.root / "grid"

    def log_path(self, unit: Unit) -> Path:
        return self.work_dir / "logs" / f"{unit.folder.name}-fold{unit.fold}.log"

    def config_path(self, unit: Unit) -> Path:
        return self.work_dir / "configs" / f"{unit.folder.name}.json"

    def command(self, unit: Unit) -> list[str]:
        """The unit's process: this interpreter and library, ``cv --config C --fold K``."""
        return [sys.executable, "-m", "psma_lib", "cv", "--crops", str(self.crops_dir),
                "--out", str(unit.folder), "--config", str(self.config_path(unit)),
                "--fold", str(unit.fold), "--no-progress"]

    def configurations(self) -> dict[Path, CVConfig]:
        """Each configuration's folder and config, in plan order."""
        return {u.folder: u.config for u in self.units}

    def table(self) -> pd.DataFrame:
        """``configuration, repeat, fold, done, folder`` (folder relative to ``root``)."""
        return pd.DataFrame([{"configuration": u.config.name, "repeat": u.repeat, "fold": u.fold,
                              "done": u.done, "folder": str(u.folder.relative_to(self.root))}
                             for u in self.units], columns=["configuration", "repeat", "fold", "done", "folder"])

    def write_configs(self) -> None:
        """Each configuration's JSON file, which its units' command reads (``cv --config``)."""
        for unit in {u.folder: u for u in self.units}.values():
            write_json(self.config_path(unit), dataclasses.asdict(dataclasses.replace(unit.config, progress=False)))


def plan(crops: CropSet, root: str | os.PathLike, configs: Sequence[CVConfig], seed: int = 0) -> Grid:
    """Every fold of every configuration as a unit, trained into the folder
    :func:`psma_lib.pipeline.run_cv` would use under ``root``; ``repeat`` = config seed - ``seed``.

    >>> import tempfile; from psma_lib.crop import load_crops; from psma_lib.cv import CVConfig
    >>> from psma_lib.testing import write_tiny_crops
    >>> tmp = Path(tempfile.mkdtemp())
    >>> crops = load_crops(write_tiny_crops(tmp / "crops", n_patients=12, size=8))
    >>> grid = plan(crops, tmp, [CVConfig(modality="clinical", model="coxph", folds=2)])
    >>> grid.table()[["configuration", "repeat", "fold", "done"]].to_dict("records")[1]
    {'configuration': 'clinical-coxph', 'repeat': 0, 'fold': 1, 'done': False}
    """
    from . import pipeline

    root = Path(root)
    units = [Unit(config, k, config.seed - seed, pipeline.cv_folder(crops, root, config))
             for config in configs for k in range(config.folds)]
    return Grid(Path(crops.root), root, tuple(units))


def book_grid(s: BookSettings) -> Grid:
    """The grid of the book with settings ``s``: its cohort and crops are prepared first (cached,
    as the chapters would), then every configuration of :func:`psma_lib.book.cv_configs`."""
    from . import book

    crops = book.crops(s)
    # as in a chapter (book.start): configurations without progress bars
    configs = book.cv_configs(dataclasses.replace(s, show_progress=False))
    return plan(crops, s.output_dir, configs, seed=s.seed)


def _unit_env(threads: int, extra: dict[str, str]) -> dict[str, str]:
    """A unit's environment: its threads and devices, and this very library on the path."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **extra}
    lib_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (lib_parent, os.environ.get("PYTHONPATH")) if p)
    return env


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:300] if lines else "(empty log)"


def _failure(grid: Grid, unit: Unit, reason: str) -> str:
    log = grid.log_path(unit)
    return f"unit {unit.label} (repeat {unit.repeat}) failed ({reason}): {_last_line(log)}; log: {log}"


def run_local(grid: Grid, *, gpus: Sequence[str] | None = None, slots: int = 1,
              progress: bool = True) -> list[str]:
    """Run the unfinished units on this machine; the failures' messages (empty: all done).

    ``gpus`` (e.g. ``["0", "1"]``): one unit at a time per GPU, each process seeing only its own
    (``CUDA_VISIBLE_DEVICES``); otherwise ``slots`` CPU processes with no GPU. Either way each
    unit gets cores / slots torch threads. A failing unit is reported (its log's last line and
    path) and the others go on.
    """
    if gpus is not None and not gpus:
        raise InputError("--gpus needs at least one GPU index")
    if slots < 1:
        raise InputError(f"need at least one slot, got {slots}")
    lanes = [{"CUDA_VISIBLE_DEVICES": str(g)} for g in gpus] if gpus else [{"CUDA_VISIBLE_DEVICES": ""}] * slots
    threads = max(1, _cores() // len(lanes))
    todo = deque(u for u in grid.units if not u.done)
    grid.write_configs()
    free, running, failures = list(range(len(lanes))), {}, []
    with tqdm(total=len(todo), desc="grid units", unit="unit", disable=not progress) as bar:
        try:
            while todo or running:
                while todo and free:
                    lane, unit = free.pop(0), todo.popleft()
                    log = grid.log_path(unit)
                    log.parent.mkdir(parents=True, exist_ok=True)
                    with open(log, "w") as out:  # the child holds its own descriptor
                        proc = subprocess.Popen(grid.command(unit), stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=_unit_env(threads, lanes[lane]))
                    running[lane] = (unit, proc)
                for lane, (unit, proc) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    del running[lane]
                    free.append(lane)
                    bar.update()
                    if proc.returncode != 0:
                        failures.append(_failure(grid, unit, f"exit status {proc.returncode}"))
                        tqdm.write(f"grid: {failures[-1]}", file=sys.stderr)
                time.sleep(POLL_S)
        finally:  # interrupted: stop this runner's own unit processes
            for _, proc in running.values():
                proc.terminate()
                proc.wait()
    return failures


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class UnitTask:
    """What one array task needs to run a unit (pickled by submitit: plain strings only)."""

    command: tuple[str, ...]
    log: str
    label: str
    pythonpath: str


def run_task(task: UnitTask) -> None:
    """A SLURM array task's body: the unit's command, with the task's cores as torch threads."""
    threads = os.environ.get("SLURM_CPUS_PER_TASK") or str(_cores())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": task.pythonpath}
    Path(task.log).parent.mkdir(parents=True, exist_ok=True)
    with open(task.log, "w") as out:
        code = subprocess.call(list(task.command), stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, env=env)
    if code != 0:
        raise RuntimeError(f"unit {task.label} failed with exit status {code}; log: {task.log}")


def slurm_executor(folder: str | os.PathLike, *, partition: str | None = None, time_min: int = 60,
                   gpus_per_task: int = 0, cpus_per_task: int | None = None,
                   array_parallelism: int | None = None, mem_gb: float | None = None,
                   cluster: str = "slurm"):
    """A submitit executor for the units: one SLURM array task per unit with these resources.

    ``cluster="local"`` or ``"debug"``: submitit's local executors (a trial on one machine, the
    tests), which ignore the SLURM-only settings.
    """
    import shutil

    import submitit

    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise InputError("no SLURM on this machine (sbatch not found): submit from a cluster's login "
                         "node, or run the units here with psma-pfs grid run")
    executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster=cluster)
    params: dict = {"name": "psma-grid", "timeout_min": int(time_min)}
    if cpus_per_task:
        params["cpus_per_task"] = int(cpus_per_task)
    if mem_gb:
        params["mem_gb"] = float(mem_gb)
    if cluster == "slurm":
        params.update(slurm_partition=partition, slurm_array_parallelism=array_parallelism,
                      slurm_gpus_per_task=gpus_per_task or None)
        params = {k: v for k, v in params.items() if v is not None}
    elif gpus_per_task:
        params["gpus_per_node"] = int(gpus_per_task)
    executor.update_parameters(**params)
    return executor


def submit(grid: Grid, executor, *, wait: bool = True, progress: bool = True) -> tuple[list, list[str]]:
    """Submit the unfinished units as one job array of ``executor`` (:func:`slurm_executor`);
    ``(jobs, failures)``. ``wait`` False returns at once (collect later with :func:`collect`)."""
    todo = [u for u in grid.units if not u.done]
    grid.write_configs()
    pythonpath = _unit_env(1, {})["PYTHONPATH"]
    tasks = [UnitTask(tuple(grid.command(u)), str(grid.log_path(u)), u.label, pythonpath) for u in todo]
    jobs = executor.map_array(run_task, tasks) if tasks else []
    if not wait:
        return jobs, []
    failures: list[str] = []
    pending = list(zip(todo, jobs, strict=True))
    with tqdm(total=len(pending), desc="grid units", unit="unit", disable=not progress) as bar:
        while pending:
            still = []
            for unit, job in pending:
                try:
                    finished, error = job.done(), None
                except Exception as exc:  # submitit's debug executor runs the task inside done()
                    finished, error = True, exc
                if not finished:
                    still.append((unit, job))
                    continue
                bar.update()
                error = error or job.exception()
                if error is not None:
                    failures.append(_failure(grid, unit, f"job {job.job_id}; submitit log {job.paths.stderr}"))
                    tqdm.write(f"grid: {failures[-1]}", file=sys.stderr)
            pending = still
            if pending:
                time.sleep(1.0)
    return jobs, failures


def collect(grid: Grid) -> tuple[list[CVResult], dict[str, list[int]]]:
    """Collect every configuration whose folds are all done and that has no ``results.json`` yet.

    Returns the runs collected now and, for each configuration still unfinished, its folder name
    and missing folds.
    """
    from .cv import collect as collect_run
    from .cv import fold_done

    collected, unfinished = [], {}
    for folder, config in grid.configurations().items():
        missing = [k for k in range(config.folds) if not fold_done(folder, k)]
        if missing:
            unfinished[folder.name] = missing
        elif not (folder / "results.json").is_file():
            collected.append(collect_run(folder, config))
    return collected, unfinished


# --------------------------------------------------------------------------- command line


def register_cli(subparsers) -> None:
    from .book import PROFILES

    p = subparsers.add_parser(
        "grid", help="the book's cross-validations as independent units: plan, run on GPUs/CPU slots, submit to SLURM",
        description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="grid_command", required=True, metavar="ACTION")
    common = []
    for name, text in (("plan", "list the units (configuration, repeat, fold, done, folder)"),
                       ("run", "run the unfinished units on this machine, then collect"),
                       ("submit", "submit the unfinished units as a SLURM job array (submitit), then collect"),
                       ("collect", "write results.json of every configuration whose folds are all done")):
        q = sub.add_parser(name, help=text, description=text)
        q.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                       help="the book profile whose runs make the grid (default quick)")
        q.add_argument("--output", default=None, help="results folder (default _build/results/<profile>), as for psma-pfs book")
        q.add_argument("--manifest", default=None, help="a real cohort's manifest.yaml (default: the synthetic cohort)")
        q.add_argument("--device", default="auto", help="as for psma-pfs book (part of each run's key)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--no-progress", dest="progress", action="store_false")
        q.set_defaults(func=_cli)
        common.append(q)
    plan_p, run_p, submit_p, _ = common
    plan_p.add_argument("--csv", type=Path, default=None, help="also write the table as CSV")
    plan_p.add_argument("--json", type=Path, default=None, help="also write the table as JSON records")
    where = run_p.add_mutually_exclusive_group()
    where.add_argument("--gpus", default=None,
                       help="GPU indices, one unit process per GPU (e.g. 0,1,2,3; default: every visible GPU)")
    where.add_argument("--slots", type=int, default=None,
                       help="CPU unit processes at once, no GPU (default 1 where there is no GPU)")
    submit_p.add_argument("--partition", default=None)
    submit_p.add_argument("--time", type=int, default=60, help="minutes per unit (SLURM --time)")
    submit_p.add_argument("--gpus-per-task", type=int, default=0)
    submit_p.add_argument("--cpus-per-task", type=int, default=4)
    submit_p.add_argument("--mem", type=float, default=None, help="GB per task")
    submit_p.add_argument("--array-parallelism", type=int, default=None,
                          help="at most this many units at once (default: all)")
    submit_p.add_argument("--no-wait", dest="wait", action="store_false",
                          help="return after submitting; psma-pfs grid collect afterwards")
    submit_p.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm",
                          help="slurm (default); local/debug: submitit's executors on this machine")


def _cli(args) -> int:
    from . import book

    s = book.settings(profile=args.profile, output_dir=os.path.abspath(args.output) if args.output else None,
                      manifest=os.path.abspath(args.manifest) if args.manifest else None,
                      device=args.device, seed=args.seed, show_progress=args.progress)
    grid = book_grid(s)
    todo = sum(not u.done for u in grid.units)
    print(f"[grid] {len(grid.units)} units ({len(grid.configurations())} configurations, profile "
          f"{s.profile}), {todo} to run, results in {grid.root}", flush=True)
    failures: list[str] = []
    if args.grid_command == "plan":
        table = grid.table()
        print(table.to_string(index=False))
        if args.csv:
            write_csv(args.csv, table)
        if args.json:
            write_json(args.json, table.to_dict("records"))
        return 0
    if args.grid_command == "run":
        if args.gpus is not None:
            gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
        elif args.slots is None:
            import torch

            gpus = [str(i) for i in range(torch.cuda.device_count())] or None
        else:
            gpus = None
        slots = args.slots or 1
        print(f"[grid] one unit at a time on each of GPUs {','.join(gpus)}" if gpus else
              f"[grid] {slots} CPU slot(s), {max(1, _cores() // slots)} torch thread(s) each", flush=True)
        failures = run_local(grid, gpus=gpus, slots=slots, progress=args.progress)
    elif args.grid_command == "submit":
        executor = slurm_executor(grid.work_dir / "submitit", partition=args.partition, time_min=args.time,
                                  gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task,
                                  array_parallelism=args.array_parallelism, mem_gb=args.mem,
                                  cluster=args.cluster)
        jobs, failures = submit(grid, executor, wait=args.wait, progress=args.progress)
        if not args.wait:
            print(f"[grid] submitted {len(jobs)} units (job {jobs[0].job_id.split('_')[0] if jobs else '-'}); "
                  f"afterwards: psma-pfs grid collect --profile {s.profile} --output {s.output_dir}")
            return 0
    collected, unfinished = collect(grid)
    print(f"[grid] collected {len(collected)} configuration(s); "
          f"{len(grid.configurations()) - len(unfinished)} of {len(grid.configurations())} finished")
    for name, missing in unfinished.items():
        print(f"[grid] unfinished: {name} (folds {', '.join(map(str, missing))})", file=sys.stderr)
    for message in failures:
        print(f"psma-pfs grid: {message}", file=sys.stderr)
    return 1 if failures or unfinished else 0
