"""--report_to mlflow,wandb: real runs read back through MLflow's client and W&B's own reader of
offline runs (`wandb leet inspect --json`): metrics equal loss.tsv at their steps, parameters
equal the run arguments, one tracked run across a resume at step 3; trackers that cannot start
fail before any work; a tracker that fails mid-run only warns. The run against a real
`mlflow server` (started once for this module) is marked slow: the server alone takes ~10 s to
start on 2 cores."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.trainer_util import launch, read_tsv, write_config
from trainer import tracking
from trainer.metrics import Logger

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("wandb")
from mlflow.tracking import MlflowClient  # noqa: E402

# A developer's tracker settings must not leak into the runs (W&B offline is the default under test).
TRACKER_ENV = ("MLFLOW_TRACKING_URI", "WANDB_MODE", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT",
               "MLFLOW_ALLOW_FILE_STORE")


def _clear_tracker_env(mp: pytest.MonkeyPatch) -> None:
    for k in TRACKER_ENV:
        mp.delenv(k, raising=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir):
    with pytest.MonkeyPatch.context() as mp:
        _clear_tracker_env(mp)
        yield _setup(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir)


def _setup(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("tracking")
    env = {"WANDB_CONFIG_DIR": str(root / "wandb_config"), "WANDB_CACHE_DIR": str(root / "wandb_cache"),
           "WANDB_DATA_DIR": str(root / "wandb_data")}
    base = ["--corpus_path", str(tiny_corpus), "--tokenizer", str(tiny_tokenizer_dir), "--max_seq_length", "64",
            "--train_batch_size", "4", "--logging_steps", "1", "--learning_rate", "5e-3",
            "--scheduler_num_steps", "100", "--num_workers", "0", "--no_progress", "--output_dir", str(root / "out"),
            "--model", str(write_config(root / "tiny.json"))]
    return {"root": root, "base": base, "out": root / "out", "env": env}


def _train(setup, name: str, extra: list[str], nproc: int = 1, check: bool = True, env: dict | None = None):
    return launch("train.py", setup["base"] + ["--model_name", name, *extra], nproc=nproc,
                  env=setup["env"] | (env or {}), check=check)


def _resumed_pair(setup, name: str, extra: list[str], nproc: int = 1) -> Path:
    """Run to step 5 (checkpoints at 3 and 5), then resume from step-3 to step 6: steps 4-5 are redone,
    as after a crash that lost the step-5 checkpoint."""
    _train(setup, name, ["--num_steps", "5", "--save_steps", "3", *extra], nproc)
    rd = setup["out"] / name
    _train(setup, name, ["--num_steps", "6", "--save_steps", "3", "--checkpoint", str(rd / "step-3"), *extra], nproc)
    return rd


def _newest_per_step(points) -> dict[int, float]:
    """(step, value) pairs in logging order -> the last value of each step (a redone step's newest)."""
    out = {}
    for step, value in points:
        out[int(step)] = value
    return out


def _tsv_name(tag: str) -> str:
    """The loss.tsv column of a scalar tag, as the Logger names it."""
    return tag.replace("/", "_") if tag.startswith("eval/") else tag.split("/", 1)[-1]


def _tsv_columns(rd: Path) -> dict[str, dict[int, float]]:
    rows = read_tsv(rd / "loss.tsv")
    return {col: {int(r["step"]): r[col] for r in rows if col in r} for col in rows[0] if col != "step"}


def _check_mlflow_run(rd: Path, uri: str, processes: int) -> None:
    meta3 = json.loads((rd / "step-3" / "meta.json").read_text())
    meta6 = json.loads((rd / "step-6" / "meta.json").read_text())
    ids = meta6["tracking"]["mlflow"]
    assert meta3["tracking"]["mlflow"]["run_id"] == ids["run_id"] and ids["tracking_uri"] == uri
    client = MlflowClient(uri)
    runs = client.search_runs([ids["experiment_id"]])
    assert [r.info.run_id for r in runs] == [ids["run_id"]]  # one run across the resume, from rank 0 only
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == rd.name

    # every scalar of loss.tsv, at its step; steps 4-5 were logged twice, the newest is the resumed run's
    tsv = _tsv_columns(rd)
    keys = [k for k in run.data.metrics if _tsv_name(k) in tsv]
    assert {"train/loss", "train/mlm_acc", "train/lr", "perf/tokens_per_s", "perf/rss_mb"} <= set(keys), keys
    for key in keys:
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)
        newest = _newest_per_step((m.step, m.value) for m in history)
        expected = tsv[_tsv_name(key)]
        assert sorted(newest) == sorted(expected) == [1, 2, 3, 4, 5, 6], key
        assert [newest[s] for s in sorted(newest)] == pytest.approx([expected[s] for s in sorted(expected)],
                                                                     rel=2e-5, abs=1e-9), key
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(loss_steps) == [1, 2, 3, 4, 4, 5, 5, 6]

    # parameters: the first start's arguments and model config; what the resume changed is a tag
    params = run.data.params
    for k, v in meta3["args"].items():
        assert params[k] == (v if isinstance(v, str) else json.dumps(v)), k
    for k, v in meta3["model_config"].items():
        assert params[f"model_config.{k}"] == (v if isinstance(v, str) else json.dumps(v)), k
    changed = json.loads(run.data.tags["resume.step_3.changed_params"])
    assert changed["num_steps"] == "6" and changed["checkpoint"] == str(rd / "step-3")
    assert {k: run.data.tags[k] for k in ("launcher", "engine", "stage", "processes", "train_mode")} == {
        "launcher": "train.py", "engine": "torch", "stage": "0", "processes": str(processes),
        "train_mode": "pretrain"}

    # the exported config as an artifact
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="final/config.json",
                                                tracking_uri=uri, dst_path=str(rd.parent / f"{rd.name}_dl"))
    assert json.loads(Path(local).read_text()) == json.loads((rd / "final" / "config.json").read_text())


def _wandb_records(run_dir: Path) -> list[dict]:
    """W&B's own reader of an offline run's .wandb file, one JSON record per line."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(run_dir), "--json"],
                          capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_mlflow_local_store_and_wandb_offline_across_a_resume(setup):
    rd = _resumed_pair(setup, "local", ["--report_to", "tensorboard,mlflow,wandb"])
    assert (rd / "tensorboard").is_dir()
    # the default store: a local database under the run directory, artifacts beside it
    uri = tracking.default_tracking_uri(rd)
    _check_mlflow_run(rd, uri, processes=1)
    assert list((rd / "mlruns" / "artifacts").rglob("final/config.json"))

    # W&B offline: one run id, one directory per start; the newest value per step equals loss.tsv
    meta6 = json.loads((rd / "step-6" / "meta.json").read_text())
    run_id = meta6["tracking"]["wandb"]["run_id"]
    dirs = sorted((rd / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and all(d.name.endswith(f"-{run_id}") for d in dirs), dirs
    points: dict[str, list] = {}
    first, last = _wandb_records(dirs[0]), _wandb_records(dirs[1])
    for record in first + last:
        if record["type"] == "history":
            item = record["history"]["item"]
            for k, v in item.items():
                if "/" in k and k != tracking.STEP_METRIC:
                    points.setdefault(k, []).append((item[tracking.STEP_METRIC], v))
    tsv = _tsv_columns(rd)
    assert "train/loss" in points and "perf/tokens_per_s" in points
    for key, pts in points.items():
        newest = _newest_per_step(pts)
        expected = tsv[_tsv_name(key)]
        assert sorted(newest) == sorted(expected) == [1, 2, 3, 4, 5, 6], key
        assert [newest[s] for s in sorted(newest)] == pytest.approx([expected[s] for s in sorted(expected)],
                                                                     rel=2e-5, abs=1e-9), key
    run_record = next(r["run"] for r in first if r["type"] == "run")
    assert run_record["project"] == tracking.DEFAULT_EXPERIMENT and run_record["display_name"] == "local"
    assert "launcher:train.py" in run_record["tags"] and "processes:1" in run_record["tags"]
    config = {}
    for r in first:
        if r["type"] == "config":
            config.update(r["config"]["update"])
    meta3 = json.loads((rd / "step-3" / "meta.json").read_text())
    assert config["args"] == json.loads(json.dumps(meta3["args"]))
    assert config["model_config"] == meta3["model_config"]
    assert json.loads((dirs[1] / "files" / "final" / "config.json").read_text()) == \
        json.loads((rd / "final" / "config.json").read_text())

    # trainer.evaluate's table (mean over seeds) goes to the same runs through log_to_run, from final/
    from trainer.evaluate import _log_to_tracked_runs
    results = {"runs": {"f|nsmc|42": {"metrics": {"accuracy": 0.7}}, "f|nsmc|43": {"metrics": {"accuracy": 0.8}},
                        "f|ict|42": {"metrics": {"recall@5": 0.5}}, "other|nsmc|42": {"metrics": {"accuracy": 0.1}}}}
    logs = []
    _log_to_tracked_runs(results, {"f": str(rd / "final")}, [], logs.append)
    assert logs == ["[evaluate] f: table logged to its tracked run"]
    client = MlflowClient(uri)
    run = client.get_run(meta6["tracking"]["mlflow"]["run_id"])
    assert abs(run.data.metrics["evaluate/nsmc/accuracy"] - 0.75) < 1e-9
    assert run.data.metrics["evaluate/ict/recall_at_5"] == 0.5
    assert client.get_metric_history(run.info.run_id, "evaluate/nsmc/accuracy")[0].step == 6
    assert run.info.status == "FINISHED"
    assert len(sorted((rd / "wandb").glob(f"offline-run-*-{run_id}"))) == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(setup):
    """A real `mlflow server` on 127.0.0.1 (a free port), SQLite backend, proxied artifacts."""
    root = setup["root"] / "server"
    root.mkdir()
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.3)
    yield uri
    proc.terminate()
    proc.wait(timeout=60)
    log.close()


@pytest.mark.slow
def test_mlflow_server_one_run_across_a_resume_from_two_processes(setup, mlflow_server):
    rd = _resumed_pair(setup, "server", ["--report_to", "mlflow", "--tracking_uri", mlflow_server,
                                         "--experiment_name", "server-test"], nproc=2)
    assert not (rd / "tensorboard").exists() and not (rd / "mlruns").exists()  # --report_to without tensorboard
    _check_mlflow_run(rd, mlflow_server, processes=2)
    assert MlflowClient(mlflow_server).get_experiment_by_name("server-test") is not None


class _DyingProxy:
    """An HTTP proxy to the MLflow server that answers 503 once `live` metric batches went through:
    a tracking server dying in the middle of a run, at a known step."""

    def __init__(self, upstream: str, live: int):
        import http.server
        import threading

        proxy = self
        self.metric_batches = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.endswith("/runs/log-batch") and b'"metrics"' in body:
                    proxy.metric_batches += 1
                if proxy.metric_batches > live:
                    self.send_response(503)
                    self.end_headers()
                    return
                req = urllib.request.Request(upstream + self.path, data=body or None, method=self.command,
                                             headers={k: v for k, v in self.headers.items()
                                                      if k.lower() not in ("host", "content-length")})
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        status, data, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
                except urllib.error.HTTPError as e:
                    status, data, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.mark.slow
def test_a_tracking_server_dying_mid_run_only_warns(setup, mlflow_server):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proxy = _DyingProxy(mlflow_server, live=2)
    try:
        proc = _train(setup, "dying", ["--num_steps", "6", "--report_to", "tensorboard,mlflow", "--tracking_uri",
                                       proxy.uri, "--experiment_name", "dying"],
                      env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    finally:
        proxy.close()
    assert proc.stderr.count("[tracking] WARNING") == 1 and "mlflow failed (metrics:" in proc.stderr
    rd = setup["out"] / "dying"
    assert [int(r["step"]) for r in read_tsv(rd / "loss.tsv")] == [1, 2, 3, 4, 5, 6]
    acc = EventAccumulator(str(rd / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert (rd / "final" / "model.safetensors").is_file()
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("dying").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]


def _parse(setup, extra: list[str], name: str = "bad"):
    from trainer.args import parse_args

    return parse_args(0, setup["base"] + ["--model_name", name, "--num_steps", "2"] + extra)


@pytest.mark.parametrize("extra,message", [
    (["--report_to", "tensorboard,mlfow"], "unknown tracker 'mlfow'"),
    (["--report_to", "mlflow", "--tracking_uri", "htp://127.0.0.1:5000"], "MLflow cannot log to a 'htp' URI"),
    (["--report_to", "mlflow", "--tracking_uri", "http://127.0.0.1:{port}"], "cannot reach the MLflow tracking server"),
    (["--tracking_uri", "http://127.0.0.1:5000"], "--tracking_uri is MLflow's: add mlflow to --report_to"),
    (["--experiment_name", "x"], "add mlflow or wandb to --report_to"),
    (["--report_to", "mlflow", "--tracking_uri", "sqlite:///{file}/runs/mlflow.db"], "is not a writable directory"),
])
def test_trackers_that_cannot_start_fail_in_validation(setup, monkeypatch, capsys, tmp_path, extra, message):
    _clear_tracker_env(monkeypatch)
    (tmp_path / "a_file").write_text("")
    extra = [a.replace("{port}", str(_free_port())).replace("{file}", str(tmp_path / "a_file")) for a in extra]
    with pytest.raises(SystemExit) as e:
        _parse(setup, extra)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_package_and_bad_wandb_mode_name_the_fix(setup, monkeypatch, capsys):
    import importlib.util

    _clear_tracker_env(monkeypatch)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit):
        _parse(setup, ["--report_to", "tensorboard,wandb"])
    assert "`pip install wandb`" in capsys.readouterr().err
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setenv("WANDB_MODE", "offlin")
    with pytest.raises(SystemExit):
        _parse(setup, ["--report_to", "wandb"])
    assert "WANDB_MODE='offlin' is not a W&B mode" in capsys.readouterr().err


def test_directory_store_refused_by_this_mlflow_names_sqlite(setup, monkeypatch, capsys, tmp_path):
    env_vars = pytest.importorskip("mlflow.environment_variables")
    if not hasattr(env_vars, "MLFLOW_ALLOW_FILE_STORE"):
        pytest.skip("this MLflow still takes directory stores")
    _clear_tracker_env(monkeypatch)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(SystemExit):
        _parse(setup, ["--report_to", "mlflow", "--tracking_uri", str(tmp_path / "mlruns")])
    assert f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    args = _parse(setup, ["--report_to", "mlflow", "--tracking_uri", str(tmp_path / "mlruns")])
    assert args.report_to == ["mlflow"]


def test_unreachable_server_fails_before_any_work(setup, tmp_path):
    """A real launch: the message, and neither the corpus cache nor the run directory was made."""
    corpus = tmp_path / "fresh.dat"
    corpus.write_bytes(Path(setup["base"][1]).read_bytes())
    args = setup["base"] + ["--model_name", "unreachable", "--num_steps", "2", "--report_to", "tensorboard,mlflow",
                            "--tracking_uri", f"http://127.0.0.1:{_free_port()}"]
    args[1] = str(corpus)
    proc = launch("train.py", args, env=setup["env"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot reach the MLflow tracking server" in proc.stderr and "mlflow server" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.dat"]
    assert not (setup["out"] / "unreachable").exists()


class _Recorder:
    """A tracker that records what it gets and raises from a given step on (a server that died)."""

    def __init__(self, name: str, fail_at: int | None = None, delay: float = 0.0):
        self.name, self.fail_at, self.delay = name, fail_at, delay
        self.steps: list[int] = []
        self.keys: set[str] = set()
        self.artifacts: list[tuple[str, str]] = []
        self.closed = None

    def ids(self) -> dict:
        return {"run_id": self.name}

    def params(self, run_info: dict, step: int) -> None:
        self.params_got = run_info

    def metrics(self, step: int, scalars: dict) -> None:
        time.sleep(self.delay)
        if self.fail_at is not None and step >= self.fail_at:
            raise ConnectionError("connection refused")
        self.steps.append(step)
        self.keys |= set(scalars)

    def artifact(self, path, artifact_dir: str) -> None:
        self.artifacts.append((path.name, artifact_dir))

    def close(self, status: str, exit_code: int) -> None:
        self.closed = status


def test_a_tracker_failing_mid_run_warns_once_and_training_logs_go_on(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dead, alive = _Recorder("dead", fail_at=3), _Recorder("alive")
    logger = Logger(tmp_path, True, 6, 0, {"args": {"lr": 1.0}}, progress=False,
                    tracking=tracking.Tracking([dead, alive]))
    for step in range(1, 7):
        logger.log(step, {"train/loss": 1.0 / step, "perf/tokens_per_s": 100.0})
    logger.log_eval(6, {"accuracy": 0.5})
    logger.close()
    err = capsys.readouterr().err
    assert err.count("[tracking] WARNING") == 1 and "dead failed (metrics: ConnectionError" in err
    assert dead.steps == [1, 2] and dead.closed is None and not dead.artifacts  # switched off after the failure
    assert alive.steps == [1, 2, 3, 4, 5, 6, 6] and alive.closed == "FINISHED"
    assert alive.keys == {"train/loss", "perf/tokens_per_s", "eval/accuracy"}
    assert alive.artifacts == [("eval.json", "")] and alive.params_got == {"args": {"lr": 1.0}}
    assert [int(r["step"]) for r in read_tsv(tmp_path / "loss.tsv")] == [1, 2, 3, 4, 5, 6]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_a_hung_tracker_never_holds_up_logging_or_closing(tmp_path, capsys):
    slow = _Recorder("slow", delay=0.5)
    logger = Logger(tmp_path, True, 3, 0, {"args": {}}, progress=False, tensorboard=False,
                    tracking=tracking.Tracking([slow]))
    start = time.perf_counter()
    for step in range(1, 4):
        logger.log(step, {"train/loss": 1.0})
    assert time.perf_counter() - start < 0.5  # the calls run on the tracking thread
    logger.tracking.close(timeout=0.2)
    assert "still sending after" in capsys.readouterr().err
    assert not (tmp_path / "tensorboard").exists()


def test_failed_and_preempted_runs_get_their_status():
    assert tracking.exit_status(None) == ("FINISHED", 0)
    assert tracking.exit_status(SystemExit(0)) == ("FINISHED", 0)
    assert tracking.exit_status(SystemExit("bad input")) == ("FAILED", 1)
    assert tracking.exit_status(RuntimeError("boom")) == ("FAILED", 1)
    assert tracking.exit_status(KeyboardInterrupt()) == ("KILLED", 130)
    stop = RuntimeError("SIGTERM")
    stop.code = 143
    assert tracking.exit_status(stop) == ("KILLED", 143)
