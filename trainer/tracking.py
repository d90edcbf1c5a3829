"""Experiment trackers beside TensorBoard: MLflow and Weights & Biases (`--report_to`).

Rank 0 only. The Logger (trainer/metrics.py) hands everything it writes to a `Tracking`, which
forwards it to each started tracker: run arguments and model config as parameters, every scalar
(train/*, eval/*, perf/*, probe/*) as a metric at its step, files (eval.json, the exported
config) as artifacts, and tags (launcher, engine, stage, processes, train_mode).

- The calls run on one background thread, so a slow or dead tracking server never holds up a
  step. A tracker that raises is reported once and then skipped; TensorBoard and loss.tsv go on.
- Checkpoints keep each tracker's run id (meta.json "tracking", final/tracking.json), so a resumed
  run continues the same tracked run, and `log_to_run` adds results to it later.
- A tracker that cannot start (package missing, bad URI, unreachable server) fails in
  `validate` (called by trainer.args.validate_args), before the corpus cache or the model exist.

MLflow: `--tracking_uri` or $MLFLOW_TRACKING_URI; by default a local SQLite store under the run
directory (`mlruns/mlflow.db`, artifacts in `mlruns/artifacts/`), since MLflow 3 refuses its
plain directory store unless MLFLOW_ALLOW_FILE_STORE=true. W&B: offline unless $WANDB_MODE says
otherwise; the run is written under `<run dir>/wandb/` for a later `wandb sync`.
mlflow and wandb are optional packages, imported only when asked for.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import queue
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

REPORTERS = ("tensorboard", "mlflow", "wandb")
TRACKERS = ("mlflow", "wandb")  # the ones this module starts (TensorBoard is the Logger's own)
DEFAULT_EXPERIMENT = "ko-encoder-pretrain"
STEP_METRIC = "trainer/step"  # W&B's x axis: the optimizer step, which may repeat after a resume
WANDB_MODES = ("offline", "online", "disabled", "dryrun", "run", "shared")
CLOSE_TIMEOUT_S = 120.0
PROBE_TIMEOUT_S = 10


def parse_report_to(value: str) -> list[str]:
    """argparse type of --report_to: comma-separated tracker names, in order, without repeats."""
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in REPORTERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown tracker {', '.join(map(repr, unknown)) or repr(value)}: give a comma-separated list of "
            f"{', '.join(REPORTERS)} (e.g. --report_to tensorboard,mlflow)")
    return list(dict.fromkeys(names))


def default_tracking_uri(run_dir: Path) -> str:
    return "sqlite:///" + str((Path(run_dir) / "mlruns" / "mlflow.db").resolve())


def mlflow_uri(args: argparse.Namespace, run_dir: Path) -> str:
    """--tracking_uri, else $MLFLOW_TRACKING_URI, else the local store under the run directory;
    local paths made absolute (the URI is kept in checkpoints and read from other directories)."""
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(run_dir)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if not urlparse(uri).scheme:
        return str(Path(uri).resolve())
    return uri


def experiment_name(args: argparse.Namespace, tracker: str) -> str:
    env = {"mlflow": "MLFLOW_EXPERIMENT_NAME", "wandb": "WANDB_PROJECT"}[tracker]
    return args.experiment_name or os.environ.get(env) or DEFAULT_EXPERIMENT


def validate(args: argparse.Namespace, run_dir: Path) -> str | None:
    """Why the requested trackers cannot start (with the fix), or None. Every rank checks that the
    packages are there; rank 0, the only one that logs, also checks the MLflow URI and server."""
    trackers = [n for n in args.report_to if n in TRACKERS]
    if args.tracking_uri and "mlflow" not in trackers:
        return (f"--tracking_uri is MLflow's: add mlflow to --report_to (e.g. --report_to "
                f"{','.join(args.report_to + ['mlflow'])}) or leave --tracking_uri out")
    if args.experiment_name and not trackers:
        return ("--experiment_name names the MLflow experiment / W&B project: add mlflow or wandb to --report_to "
                "or leave --experiment_name out")
    for name in trackers:
        if importlib.util.find_spec(name) is None:
            return (f"--report_to {name} needs the {name} package, which is not installed: `pip install {name}` "
                    f"(or drop {name} from --report_to)")
    mode = os.environ.get("WANDB_MODE")
    if "wandb" in trackers and mode is not None and mode not in WANDB_MODES:  # W&B refuses an empty one too
        return (f"--report_to wandb: WANDB_MODE={mode!r} is not a W&B mode; use one of {', '.join(WANDB_MODES)} "
                f"or unset it (this trainer logs offline by default; `wandb sync` uploads later)")
    if "wandb" in trackers and any(c in experiment_name(args, "wandb") for c in "/\\#?%:"):
        return (f"--experiment_name {experiment_name(args, 'wandb')!r} is not a valid W&B project name "
                f"(no / \\ # ? % :); pick another")
    if "mlflow" in trackers and os.environ.get("RANK", "0") == "0":
        return _mlflow_uri_problem(mlflow_uri(args, run_dir), explicit=bool(args.tracking_uri))
    return None


def _mlflow_uri_problem(uri: str, explicit: bool) -> str | None:
    flag = "--tracking_uri" if explicit else "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else ""
    where = f"{flag} {uri}" if flag else f"the local MLflow store {uri}"
    default_hint = ("leave --tracking_uri out (and unset MLFLOW_TRACKING_URI) to log to a local store under the run "
                    "directory")
    scheme = urlparse(uri).scheme
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        schemes = set(_tracking_store_registry._registry)  # built-ins and installed plugins
    except (ImportError, AttributeError):
        schemes = {"", "file", "http", "https", "databricks", "databricks-uc", "uc", "postgresql", "mysql",
                   "sqlite", "mssql"}
    if scheme not in schemes:
        return (f"{where}: MLflow cannot log to a '{scheme}' URI; use http(s)://HOST:PORT of an `mlflow server`, "
                f"sqlite:///PATH/mlflow.db, a database URI (postgresql://, mysql://), or {default_hint}")
    if scheme in ("", "file"):
        path = Path(urlparse(uri).path if scheme else uri)
        if path.is_file():
            return (f"{where} is a file; MLflow's file store is a directory. For a database file use "
                    f"sqlite:///{path}")
        try:
            from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
        except ImportError:  # an MLflow that still takes directories
            return _unwritable(path, where)
        if not MLFLOW_ALLOW_FILE_STORE.get():
            return (f"{where} is a directory, and this MLflow refuses its directory (file) store; use "
                    f"--tracking_uri sqlite:///{path / 'mlflow.db'} (a local database `mlflow ui` reads), "
                    f"or set MLFLOW_ALLOW_FILE_STORE=true to keep the directory store")
        return _unwritable(path, where)
    if scheme == "sqlite":
        return _unwritable(Path(uri[len("sqlite:///"):]).parent, where)
    from mlflow.tracking import MlflowClient

    try:  # the request the run will make first; no retries: a dead server must fail now, not in minutes
        with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(PROBE_TIMEOUT_S)):
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - connection, HTTP, auth and driver errors all mean "cannot start"
        what = "tracking server" if scheme in ("http", "https") else "tracking store"
        return (f"{where}: cannot reach the MLflow {what} ({_short(e)}); start it (e.g. `mlflow server "
                f"--host 127.0.0.1 --port 5000`), fix the address or credentials (MLFLOW_TRACKING_USERNAME/"
                f"PASSWORD or MLFLOW_TRACKING_TOKEN), or {default_hint}")
    return None


def _unwritable(path: Path, where: str) -> str | None:
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return f"{where}: {existing or path} is not a writable directory; pick another --tracking_uri"
    return None


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _param_value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str)


def flat_params(run_info: dict) -> dict[str, str]:
    """Run info sections as parameters: the "args" section by flag name, others as section.key."""
    out = {}
    for section, values in run_info.items():
        for k, v in values.items():
            out[k if section == "args" else f"{section}.{k}"] = _param_value(v)
    return out


def run_tags(args: argparse.Namespace | dict, processes: int) -> dict[str, str]:
    a = args if isinstance(args, dict) else vars(args)
    return {"launcher": str(a["launcher"]), "engine": str(a["engine"]), "stage": str(a["stage"]),
            "processes": str(processes), "train_mode": str(a["train_mode"])}


class _MLflowRun:
    name = "mlflow"

    def __init__(self, client, run_id: str, uri: str, experiment_id: str, experiment: str, resumed: bool,
                 reopened: bool = False):
        self.client, self.run_id, self.uri = client, run_id, uri
        self.experiment_id, self.experiment, self.resumed = experiment_id, experiment, resumed
        self.reopened = reopened  # by log_to_run: the run's status is its training's, not ours
        self.foreign_artifacts: str | None = None  # set by `start`: artifacts are not logged there

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, tags: dict[str, str], resume: dict | None,
              log, local: bool = False) -> _MLflowRun:
        """`local`: `uri` is the run directory's own store (default_tracking_uri), which moves and is
        copied with the run directory."""
        tracked = cls._start(uri, experiment, run_name, tags, resume, log, local)
        if local:
            # a run directory moved or copied elsewhere keeps, in its store, the artifact location of
            # where the store was created: logging there would write into the old (or the original
            # run's) directory, outside this run's
            artifact_uri = tracked.client.get_run(tracked.run_id).info.artifact_uri or ""
            here = Path(uri[len("sqlite:///"):]).parent.resolve()
            where = (Path(unquote(urlparse(artifact_uri).path)) if urlparse(artifact_uri).scheme in ("", "file")
                     else None)  # as_uri() quoted it: a space or Hangul in --model_name
            if where is not None and here not in where.resolve().parents:
                tracked.foreign_artifacts = artifact_uri
                log(f"[tracking] MLflow: run {tracked.run_id} keeps its artifacts in {artifact_uri}, outside this "
                    f"run directory (it was moved or copied); its artifacts (final/'s config.json, args.json, "
                    f"eval.json: all kept in the run directory) are not logged there")
        return tracked

    @classmethod
    def _start(cls, uri: str, experiment: str, run_name: str, tags: dict[str, str], resume: dict | None,
               log, local: bool) -> _MLflowRun:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        db_dir = Path(uri[len("sqlite:///"):]).parent if uri.startswith("sqlite:///") else None
        if db_dir is not None:
            db_dir.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            # a local database keeps artifacts beside it, not in ./mlruns of whatever directory we run in
            location = (db_dir / "artifacts").as_uri() if db_dir is not None else None
            try:
                client.create_experiment(experiment, artifact_location=location)
            except MlflowException:  # created meanwhile by another job
                pass
            exp = client.get_experiment_by_name(experiment)
        if exp.lifecycle_stage != "active":
            raise SystemExit(f"MLflow experiment {experiment!r} in {uri} is deleted; restore it (`mlflow experiments "
                             f"restore --experiment-id {exp.experiment_id}`) or pick another --experiment_name")
        run = None
        if resume and resume.get("run_id"):
            # the run directory's own store, moved or copied with it: the same run, if it is in there
            moved = (local and resume.get("tracking_uri") != uri
                     and str(resume.get("tracking_uri", "")).endswith(f"/{run_name}/mlruns/mlflow.db"))
            if moved:
                try:
                    moved = client.get_run(resume["run_id"]).info.lifecycle_stage == "active"
                except MlflowException:
                    moved = False
            if resume.get("tracking_uri") != uri and not moved:
                log(f"[tracking] the checkpoint's MLflow run {resume['run_id']} is in {resume.get('tracking_uri')}; "
                    f"starting a new run in {uri} (pass --tracking_uri {resume.get('tracking_uri')} to continue it)")
            else:
                try:
                    run = client.get_run(resume["run_id"])
                except MlflowException:
                    run = None
                if run is None or run.info.lifecycle_stage != "active":
                    log(f"[tracking] the checkpoint's MLflow run {resume['run_id']} is gone from {uri}; "
                        f"starting a new run")
                    run = None
        if run is not None:
            from mlflow.entities import RunTag

            client.update_run(run.info.run_id, status="RUNNING")
            client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])  # e.g. processes
            log(f"[tracking] MLflow: continuing run {run.info.run_id} in {uri}")
            return cls(client, run.info.run_id, uri, run.info.experiment_id, experiment, True)
        run = client.create_run(exp.experiment_id, run_name=run_name, tags=tags)
        log(f"[tracking] MLflow: run {run.info.run_id} in {uri} (experiment {experiment!r})")
        return cls(client, run.info.run_id, uri, exp.experiment_id, experiment, False)

    @classmethod
    def reopen(cls, ids: dict) -> _MLflowRun:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(ids["tracking_uri"])
        client.get_run(ids["run_id"])  # fails now if it is gone
        return cls(client, ids["run_id"], ids["tracking_uri"], ids.get("experiment_id", ""),
                   ids.get("experiment", ""), True, reopened=True)

    def ids(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri, "experiment_id": self.experiment_id,
                "experiment": self.experiment}

    def params(self, run_info: dict, step: int) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

        params = {k: v[:MAX_PARAM_VAL_LENGTH] for k, v in flat_params(run_info).items()}
        existing = self.client.get_run(self.run_id).data.params if self.resumed else {}
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        # MLflow parameters cannot change: what a resume changed (argv, --checkpoint, ...) goes into a tag
        changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
        if changed:
            self.client.set_tag(self.run_id, f"resume.step_{step}.changed_params",
                                json.dumps(changed)[:MAX_TAG_VAL_LENGTH])

    def metrics(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_metric_name(k), float(v), now, step) for k, v in scalars.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def artifact(self, path: Path, artifact_dir: str) -> None:
        if self.foreign_artifacts is None:
            self.client.log_artifact(self.run_id, str(path), artifact_dir or None)

    def close(self, status: str, exit_code: int) -> None:
        if not self.reopened:
            self.client.set_terminated(self.run_id, status)


def mlflow_metric_name(name: str) -> str:
    """MLflow names allow letters, digits, _ - . / and spaces: recall@5 becomes recall_at_5."""
    return re.sub(r"[^/\w.\- ]", "_", name.replace("@", "_at_"))


class _WandbRun:
    name = "wandb"

    def __init__(self, run, run_dir: Path):
        self.run, self.run_dir = run, run_dir

    @classmethod
    def start(cls, project: str, run_name: str, run_dir: Path, tags: dict[str, str], resume: dict | None,
              log) -> _WandbRun:
        import wandb

        run_id = resume["run_id"] if resume and resume.get("run_id") else None  # None: W&B makes one
        run_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=project, name=run_name, id=run_id, resume="allow", dir=str(run_dir),
                         mode=os.environ.get("WANDB_MODE") or "offline", job_type=tags["train_mode"],
                         tags=[f"{k}:{v}" for k, v in tags.items()], reinit="create_new")
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC, step_sync=True)
        log(f"[tracking] W&B: run {run.id} ({'continued, ' if resume else ''}{run.settings.mode}) in {run.dir}")
        return cls(run, run_dir)

    @classmethod
    def reopen(cls, ids: dict, run_dir: Path) -> _WandbRun:
        import wandb

        saved_dir = Path(ids.get("dir", ""))
        wdir = saved_dir if ids.get("dir") and saved_dir.is_dir() else run_dir
        run = wandb.init(project=ids["project"], id=ids["run_id"], resume="allow", dir=str(wdir),
                         mode=os.environ.get("WANDB_MODE") or "offline", reinit="create_new",
                         settings=wandb.Settings(console="off"))  # the caller's output is not this run's
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC, step_sync=True)
        return cls(run, wdir)

    def ids(self) -> dict:
        return {"run_id": self.run.id, "project": self.run.project, "dir": str(self.run_dir.resolve())}

    def params(self, run_info: dict, step: int) -> None:
        self.run.config.update(run_info, allow_val_change=True)

    def metrics(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({**scalars, STEP_METRIC: step})

    def artifact(self, path: Path, artifact_dir: str) -> None:
        # a copy in the run's files/: the original may be rewritten before `wandb sync` uploads it
        dest = Path(self.run.dir) / artifact_dir / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
        self.run.save(str(dest), base_path=self.run.dir, policy="now")

    def close(self, status: str, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


class Tracking:
    """The started trackers of one run (rank 0), fed in order by one background thread."""

    def __init__(self, trackers: list, carried: dict | None = None):
        self.trackers = trackers
        self._ids = dict(carried or {}) | {t.name: t.ids() for t in trackers}
        self._queue: queue.Queue = queue.Queue()
        self._failed: set[str] = set()
        self._thread = threading.Thread(target=self._work, name="tracking", daemon=True)
        if trackers:
            self._thread.start()

    @property
    def ids(self) -> dict:
        """Run ids by tracker, for meta.json (ids of earlier trackers of this run are carried over)."""
        return dict(self._ids)

    def _put(self, method: str, *a) -> None:
        for t in self.trackers:
            self._queue.put((t, method, a))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            tracker, method, a = item
            if tracker.name in self._failed:
                continue
            try:
                getattr(tracker, method)(*a)
            except Exception as e:  # noqa: BLE001 - whatever a tracker raises, training goes on
                self._failed.add(tracker.name)
                print(f"[tracking] WARNING: {tracker.name} failed ({method}: {_short(e)}); it is switched off "
                      f"for the rest of this run. Training goes on; TensorBoard and loss.tsv keep every metric.",
                      file=sys.stderr, flush=True)

    def params(self, run_info: dict, step: int) -> None:
        """Run info sections ({"args": {...}, "model_config": {...}}) as parameters / W&B config."""
        self._put("params", run_info, step)

    def metrics(self, step: int, scalars: dict[str, float]) -> None:
        self._put("metrics", step, dict(scalars))

    def artifact(self, path: Path, artifact_dir: str = "") -> None:
        self._put("artifact", Path(path), artifact_dir)

    def close(self, status: str = "FINISHED", exit_code: int = 0, timeout: float = CLOSE_TIMEOUT_S) -> None:
        if not self.trackers:
            return
        self._put("close", status, exit_code)
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            print(f"[tracking] WARNING: the trackers were still sending after {timeout:.0f} s; giving up on them "
                  f"(TensorBoard and loss.tsv are complete)", file=sys.stderr, flush=True)


def start(args: argparse.Namespace, run_dir: Path, resume_meta: dict | None, processes: int,
          log=print) -> Tracking:
    """Start the trackers of --report_to (rank 0). `resume_meta`: the meta.json of the --checkpoint
    step; when it is this run's (same --model_name and train_mode) its tracked runs are continued."""
    wanted = [n for n in args.report_to if n in TRACKERS]
    carried = (resume_meta or {}).get("tracking") or {}
    # a checkpoint of another run (another --model_name: a branch; another task) starts new tracked runs
    same_run = (resume_meta is not None and resume_meta["args"].get("model_name") == args.model_name
                and resume_meta["args"].get("train_mode") == args.train_mode)
    tags = run_tags(args, processes)
    trackers = []
    try:
        for name in wanted:
            previous = carried.get(name) if isinstance(carried.get(name), dict) else None
            resume = previous if same_run else None
            if name == "mlflow":
                branch = {"resumed_from_run": previous["run_id"]} if previous and not same_run else {}
                uri = mlflow_uri(args, run_dir)
                trackers.append(_MLflowRun.start(uri, experiment_name(args, "mlflow"), args.model_name,
                                                 tags | branch, resume, log,
                                                 local=uri == default_tracking_uri(run_dir)))
            else:
                trackers.append(_WandbRun.start(experiment_name(args, "wandb"), args.model_name, run_dir, tags,
                                                resume, log))
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001
        for t in trackers:
            with contextlib.suppress(Exception):
                t.close("FAILED", 1)
        fix = {"mlflow": "check --tracking_uri / MLFLOW_TRACKING_URI and the server",
               "wandb": "check WANDB_MODE (offline needs no account; online needs `wandb login`)"}[name]
        raise SystemExit(f"--report_to {name}: the tracker could not start ({_short(e)}); {fix}, "
                         f"or drop {name} from --report_to") from e
    return Tracking(trackers, carried if same_run else None)  # without trackers: only carries the ids


def exit_status(exc: BaseException | None) -> tuple[str, int]:
    """(MLflow run status, exit code) for a run ending with `exc` (None: finished)."""
    if exc is None:
        return "FINISHED", 0
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED", 130
    code = getattr(exc, "code", 1)
    if isinstance(exc, SystemExit) and code in (0, None):
        return "FINISHED", 0
    code = code if isinstance(code, int) and code else 1
    return ("KILLED" if code == 143 else "FAILED"), code  # 143: SIGTERM (preempted, resumable)


def _tracking_info(source: str | Path | dict) -> tuple[dict, Path | None, int | None]:
    if isinstance(source, dict):
        return source.get("tracking") or {}, None, source.get("step")
    path = Path(source)
    if path.is_file():
        path = path.parent
    if (path / "meta.json").is_file():
        meta = json.loads((path / "meta.json").read_text())
        return meta.get("tracking") or {}, path.parent, meta.get("step")
    if (path / "tracking.json").is_file():  # an exported final/
        info = json.loads((path / "tracking.json").read_text())
        return info.get("runs") or {}, path.parent, info.get("step")
    from trainer.checkpoint import list_checkpoints

    found = list_checkpoints(path)
    if found:
        return _tracking_info(found[-1])
    return _tracking_info(path / "final") if (path / "final" / "tracking.json").is_file() else ({}, path, None)


def log_to_run(source: str | Path | dict, metrics: dict[str, float], artifacts=(), step: int | None = None,
               log=print) -> list[str]:
    """Add metrics (at `step`, default the checkpoint's step) and files to the tracked runs of a
    checkpoint: a step-N directory, a run directory (its latest step-N), an exported final/
    directory, or a meta.json dict. Returns the trackers logged to ([] when the checkpoint was not
    tracked). A tracker that fails is reported, never raised: the caller's results stand."""
    info, run_dir, saved_step = _tracking_info(source)
    step = saved_step if step is None else step
    trackers = []
    for name, ids in info.items():
        if name not in TRACKERS or not isinstance(ids, dict) or importlib.util.find_spec(name) is None:
            continue
        try:
            trackers.append(_MLflowRun.reopen(ids) if name == "mlflow" else
                            _WandbRun.reopen(ids, run_dir or Path(ids.get("dir", "."))))
        except Exception as e:  # noqa: BLE001
            log(f"[tracking] WARNING: cannot reopen the {name} run {ids.get('run_id')} ({_short(e)}); not logged there")
    if not trackers:
        return []
    tracking = Tracking(trackers)
    if metrics:
        tracking.metrics(step or 0, metrics)
    for path in artifacts:
        tracking.artifact(Path(path))
    tracking.close()
    return [t.name for t in trackers if t.name not in tracking._failed]
