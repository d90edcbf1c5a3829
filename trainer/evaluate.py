"""Score checkpoints on a suite of downstream tasks: fine-tune + evaluate each task with its
recipe, several seeds, through the one training loop (`trainer.loop.run`, in this process and its
process group: `torchrun --nproc_per_node=N -m trainer.evaluate ...` shards every run).

    python -m trainer.evaluate CKPT [CKPT ...] --suite korean [--tasks nsmc,ner] [--seeds 3]
        [--output_dir evaluation] [--data_dir ../shared/data] [--set ner.num_steps=500 ...]

CKPT: a step-N checkpoint, a final/ directory (or its model.safetensors), a run directory (its
final/, else its latest step-N) or a `transformers` folder (BERT or what `trainer.export` reads),
converted once into output_dir/checkpoints/.
Writes output_dir/results.json (every run's metrics and the arguments it ran with) and
output_dir/results.md (one column per checkpoint, mean ± std over seeds), and resumes: a run
recorded in results.json is not redone; an interrupted run starts again.
Recipes: `RECIPES` below (docs/tasks.md has the table); `--set TASK.FLAG=VALUE` (or
`all.FLAG=VALUE`, which a task's own setting beats, for the tasks the flag acts in) overrides any launcher flag; `train_batch_size` is the global batch (split over
the processes), so 1 and N processes run the same recipe.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

SUITES = {"korean": ("nsmc", "korquad", "ner", "nli", "sts", "ict")}
# Per task: the launcher flags of its fine-tune ({data} = --data_dir). Steps are sized for the
# shared data (epochs in docs/tasks.md); learning rates are the usual BERT fine-tuning ones.
RECIPES: dict[str, dict[str, object]] = {
    "nsmc": {"train_mode": "classify", "train_file": "{data}/nsmc/sentiment_train.tsv",
             "eval_file": "{data}/nsmc/sentiment_test.tsv", "max_train_examples": 20000, "max_eval_examples": 5000,
             "max_seq_length": 128, "train_batch_size": 32, "learning_rate": 5e-5, "num_steps": 1250,
             "warmup_steps": 125},
    "korquad": {"train_mode": "mrc", "train_file": "{data}/korquad/KorQuAD_v1.0_dev.json", "eval_fraction": 0.1,
                "max_seq_length": 384, "doc_stride": 128, "max_query_length": 64, "train_batch_size": 32,
                "learning_rate": 5e-5, "num_steps": 1000, "warmup_steps": 100},
    "ner": {"train_mode": "ner", "train_file": "{data}/klue/ner_train.tsv", "eval_fraction": 0.2,
            "max_seq_length": 128, "doc_stride": 64, "train_batch_size": 32, "learning_rate": 5e-5,
            "num_steps": 380, "warmup_steps": 38},
    "nli": {"train_mode": "nli", "train_file": "{data}/klue/nli_train.json", "eval_fraction": 0.2,
            "max_seq_length": 128, "train_batch_size": 32, "learning_rate": 5e-5, "num_steps": 225,
            "warmup_steps": 22},
    "sts": {"train_mode": "sts", "train_file": "{data}/klue/sts_train.json", "eval_fraction": 0.2,
            "max_seq_length": 128, "train_batch_size": 16, "learning_rate": 5e-5, "num_steps": 80,
            "warmup_steps": 8},
    "ict": {"train_mode": "ict", "train_file": "{data}/korquad/KorQuAD_v1.0_dev.json", "eval_fraction": 0.1,
            "max_seq_length": 256, "max_query_length": 64, "pooling": "mean", "train_batch_size": 32,
            "learning_rate": 5e-5, "num_steps": 300, "warmup_steps": 30},
}
# The metrics of each task in the table (every metric the run reports is kept in results.json).
HEADLINE = {"nsmc": ["accuracy"], "korquad": ["exact_match", "f1"], "ner": ["entity_f1", "char_f1"],
            "nli": ["accuracy"], "sts": ["pearson"], "ict": ["recall@20"]}
COMMON = {"save_steps": 0, "logging_steps": 10, "num_workers": 0, "eval_batch_size": 64}
JOB_MARK = ".evaluate_run"
DATA_DIR = str(Path(__file__).resolve().parents[2] / "shared" / "data")  # the default --data_dir


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="step-N, final/, run directory, model.safetensors or transformers folder")
    p.add_argument("--suite", choices=sorted(SUITES), default="korean", help="task suite")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the suite (default: all)")
    p.add_argument("--seeds", type=int, default=1, help="fine-tunes per task and checkpoint (seeds 42, 43, ...)")
    p.add_argument("--output_dir", default="evaluation", help="results.json, results.md, runs/ and checkpoints/")
    p.add_argument("--data_dir", default=DATA_DIR,
                   help="the shared data (nsmc/, korquad/, klue/)")
    p.add_argument("--set", action="append", default=[], metavar="TASK.FLAG=VALUE",
                   help="override a recipe flag, e.g. ner.num_steps=500, all.max_seq_length=64, nsmc.train_file=X")
    p.add_argument("--stage", type=int, choices=(0, 1, 2), default=0,
                   help="which launcher's engine: 0 train.py, 1 train_zero_one.py, 2 train_zero_two.py")
    p.add_argument("--keep_weights", action="store_true", help="keep each fine-tune's final/ (default: removed)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    # "" (an empty shell variable) is no task, not the whole suite; a task named twice runs once
    tasks = list(dict.fromkeys(a.tasks.split(","))) if a.tasks is not None else list(SUITES[a.suite])
    unknown = [t for t in tasks if t not in SUITES[a.suite]]
    if unknown:
        p.error(f"--tasks {unknown} not in suite {a.suite} ({', '.join(SUITES[a.suite])})")
    if a.seeds < 1:
        p.error(f"--seeds must be >= 1, got {a.seeds}")
    a.tasks = tasks
    a.recipes = recipes(tasks, a.set, a.data_dir, p)
    return a


def recipes(tasks: list[str], overrides: list[str], data_dir: str, parser) -> dict[str, dict]:
    out = {t: {k: (v.format(data=data_dir) if isinstance(v, str) else v) for k, v in RECIPES[t].items()} for t in tasks}
    from trainer.args import flag_applies, get_parse_args

    # the launcher's parser takes abbreviations (num_step for num_steps): a misspelt FLAG would act
    # under another name, beside the recipe's own value; only a flag's full name is taken here
    flags = {s[2:] for action in get_parse_args()._actions for s in action.option_strings if s.startswith("--")}
    parsed = []
    for item in overrides:
        m = re.fullmatch(r"(\w+)\.(\w+)=(.*)", item)
        if not m or (m.group(1) not in RECIPES and m.group(1) != "all"):
            parser.error(f"--set {item!r}: expected TASK.FLAG=VALUE with TASK one of {sorted(RECIPES)} or all")
        if m.group(2) not in flags:
            near = difflib.get_close_matches(m.group(2), flags, n=1)
            parser.error(f"--set {item!r}: {m.group(2)} is not a flag of the launchers (train.py --help lists "
                         f"them){f'; did you mean {near[0]}?' if near else ''}")
        parsed.append(m.groups())
    # all.FLAG first, then TASK.FLAG: a task's own setting wins whatever the order on the command line
    given: dict[str, set[str]] = {t: set() for t in tasks}

    for task, flag, value in sorted(parsed, key=lambda p: p[0] != "all"):
        for t in tasks if task == "all" else [task] if task in tasks else []:
            if task == "all" and not flag_applies(flag, argparse.Namespace(**out[t])):
                continue  # all.doc_stride=...: only the tasks that have windows take it
            out[t][flag] = value
            given[t].add(flag)
    # the recipes warm up over 10% of their steps: a shorter or longer run keeps that share
    # unless --set names its warm-up too
    for t in tasks:
        if "num_steps" in given[t] and "warmup_steps" not in given[t]:
            try:
                out[t]["warmup_steps"] = max(0, int(out[t]["num_steps"]) // 10)
            except ValueError:
                pass  # not a number: the launcher's parser names it
    return out


# --- checkpoints ---------------------------------------------------------------------------------
def label_of(path: Path, taken: set[str]) -> str:
    """A short unique column name: the last two path parts (e.g. pre/final, pre/step-10)."""
    parts = path.resolve().parts
    label = "/".join(parts[-2:]) if parts[-1] in ("final", "model.safetensors") or parts[-1].startswith("step-") \
        else parts[-1]
    label = label.replace("/model.safetensors", "")
    base, k = label, 2
    while label in taken:
        label, k = f"{base}~{k}", k + 1
    return label


def prepare(spec: str, work: Path, label: str, is_main: bool) -> dict:
    """What the loop needs to start from `spec`: {"checkpoint", "model", "tokenizer"}; a step-N
    gets its recorded config written out, a transformers folder is converted to our format."""
    from data.tokenizer import (TOKENIZER_FILES, KoTokenizer, check_vocab_size, lacks_tokenizer_json,
                                missing_tokenizer_hint)
    from models.hf_compat import is_hf_config
    from trainer import checkpoint
    path = Path(spec)
    if not path.exists():
        from models.config import hub_id_hint

        raise SystemExit(f"checkpoint {spec}: no such file or directory{hub_id_hint(spec)}")
    folder = path.parent if path.is_file() else path
    cfg_json = folder / "config.json"
    hf = cfg_json.is_file() and is_hf_config(json.loads(cfg_json.read_text()))
    slot = work / "checkpoints" / re.sub(r"[^\w.-]+", "_", label)
    convert = None  # a transformers folder's Source, written into `slot` once its tokenizer is checked
    try:
        if hf:
            from trainer.export import load_source  # every family it reads; it names what it refuses

            convert = load_source(folder)
            resolved = {"checkpoint": str(slot / checkpoint.WEIGHTS), "model": str(slot / "config.json"),
                        "tokenizer": str(slot) if convert.tokenizer_dir else None, "config": convert.config}
        else:
            if path.is_dir() and not (path / checkpoint.META).is_file() and (path / "final" / checkpoint.WEIGHTS).is_file():
                spec = str(path / "final")          # a run directory: its final/ (as trainer.export reads it)
            resolved_path, kind = checkpoint.resolve(spec, folder)
            if kind == "step":
                meta = checkpoint.read_meta(resolved_path)
                from models import ModelConfig

                config = ModelConfig.from_dict(meta["model_config"])
                model_json = slot / "config.json"
                if is_main:
                    slot.mkdir(parents=True, exist_ok=True)
                    config.to_json(model_json)
                tok = meta.get("tokenizer")
                if tok and not Path(tok).is_absolute() and not (Path(tok) / "tokenizer.json").is_file():
                    tok = str(Path(meta.get("args", {}).get("cwd", ".")) / tok)
                resolved = {"checkpoint": str(resolved_path), "model": str(model_json), "tokenizer": tok,
                            "config": config}
            else:
                src_dir = resolved_path.parent
                from models import ModelConfig

                resolved = {"checkpoint": str(resolved_path), "model": str(src_dir / "config.json"),
                            "tokenizer": str(src_dir) if (src_dir / "tokenizer.json").is_file() else None,
                            "config": ModelConfig.from_json(src_dir / "config.json")}
    except (FileNotFoundError, ValueError, KeyError, checkpoint.CheckpointError) as e:
        raise SystemExit(f"checkpoint {spec}: {e}") from None
    tokenizer = convert.tokenizer_dir if convert is not None else resolved["tokenizer"]  # the source's own
    if not tokenizer or not (Path(tokenizer) / "tokenizer.json").is_file():
        fix = (missing_tokenizer_hint(folder) if lacks_tokenizer_json(folder) else
               "put tokenizer.json beside the weights")
        raise SystemExit(f"checkpoint {spec}: its tokenizer ({resolved['tokenizer']}) is missing; every task "
                         f"tokenizes with the checkpoint's tokenizer: {fix}")
    try:
        check_vocab_size(KoTokenizer.load(tokenizer), resolved["config"].vocab_size)
    except ValueError as e:
        raise SystemExit(f"checkpoint {spec}: mismatched tokenizer: {e}") from None
    if convert is not None and is_main:
        try:
            _convert(convert, folder, slot, TOKENIZER_FILES)
        except ValueError as e:  # safety.UnsafeWrite: a folder there that is not an earlier conversion of ours
            raise SystemExit(f"checkpoint {spec}: {e}") from None
    return resolved


def _convert(src, folder: Path, slot: Path, tokenizer_files: tuple[str, ...]) -> None:
    """Write the transformers folder `folder` (read as `src`) into `slot` in our format, unless `slot`
    already holds the conversion of these very files (their sizes and times, recorded in its marker):
    a folder whose weights or tokenizer changed since is converted again. A `slot` that is not an
    earlier conversion of ours (a user's folder, the source itself) is refused, never replaced."""
    from trainer import checkpoint, safety

    files = [Path(src.info["path"]), folder / "config.json",
             *((src.tokenizer_dir / name) for name in tokenizer_files)]
    stamp = {str(f.resolve()): [f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()}
    safety.check_replaceable(slot, fix="use another --output_dir", source=folder)
    try:
        done = json.loads((slot / safety.MARKER).read_text()).get("source_files") == stamp
    except (OSError, ValueError, AttributeError):
        done = False
    if done and (slot / checkpoint.WEIGHTS).is_file():
        return
    with safety.staged_dir(slot, fix="use another --output_dir", source=folder,
                           info={"by": "python -m trainer.evaluate", "source_files": stamp}) as tmp:
        checkpoint.save_weights(src.state, tmp / checkpoint.WEIGHTS, {"train_mode": "", "step": ""})
        src.config.to_json(tmp / "config.json")
        for name in tokenizer_files:
            if (src.tokenizer_dir / name).is_file():
                shutil.copy2(src.tokenizer_dir / name, tmp / name)


# --- runs ----------------------------------------------------------------------------------------
def job_argv(task: str, recipe: dict, ckpt: dict, seed: int, run_root: Path, world: int, no_progress: bool) -> list[str]:
    flags = dict(COMMON) | recipe
    batch = int(flags["train_batch_size"])
    if batch % world:
        raise SystemExit(f"task {task}: train_batch_size {batch} (the global batch) is not divisible by the "
                         f"{world} processes; pass --set {task}.train_batch_size=<a multiple of {world}>")
    flags["train_batch_size"] = batch // world
    flags |= {"model_name": f"{task}-seed{seed}", "output_dir": str(run_root), "seed": seed,
              "checkpoint": ckpt["checkpoint"], "model": ckpt["model"]}
    argv = []
    for k, v in flags.items():
        if isinstance(v, bool) or v in ("True", "true"):
            if v in (True, "True", "true"):
                argv.append(f"--{k}")
            continue
        argv += [f"--{k}", str(v)]
    if no_progress:
        argv.append("--no_progress")
    return argv


def _std(values: list[float]) -> float:
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def markdown(results: dict) -> str:
    """One row per (task, metric), one column per checkpoint: mean ± std over seeds (n)."""
    labels = list(results["checkpoints"])
    rows = ["| task | metric | " + " | ".join(labels) + " |", "| --- | --- |" + " --- |" * len(labels)]
    for task in results["tasks"]:
        for metric in HEADLINE[task]:
            cells = []
            for label in labels:
                vals = [r["metrics"][metric] for key, r in results["runs"].items()
                        if key.startswith(f"{label}|{task}|") and metric in r["metrics"]]
                if not vals:
                    cells.append("—")
                elif len(vals) == 1:
                    cells.append(f"{vals[0]:.4g}")
                else:
                    cells.append(f"{sum(vals) / len(vals):.4g} ± {_std(vals):.2g} ({len(vals)})")
            rows.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    from trainer import dist
    from trainer.args import parse_args
    from trainer.loop import run

    out = Path(a.output_dir)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--output_dir {out} exists and is not a directory; pick another")
    ctx = dist.init("auto")
    try:
        results_path = out / "results.json"
        results = _earlier_results(out)
        labels: dict[str, str] = {}
        ckpts: dict[str, dict] = {}
        for spec in a.checkpoints:
            label = label_of(Path(spec), set(labels))
            labels[label] = str(Path(spec).resolve())
            ckpts[label] = prepare(spec, out, label, ctx.is_main)
        dist.barrier()
        # every run's arguments, validated by the launcher's parser before any run starts
        jobs = []
        for label, ckpt in ckpts.items():
            for task in a.tasks:
                for k in range(a.seeds):
                    seed = 42 + k
                    key = f"{label}|{task}|{seed}"
                    run_root = out / "runs" / re.sub(r"[^\w.-]+", "_", label)
                    argv_job = job_argv(task, a.recipes[task], ckpt, seed, run_root, ctx.world_size, a.no_progress)
                    done = results["runs"].get(key)
                    if done and _diff(done["argv"], argv_job):
                        raise SystemExit(f"{results_path} holds {key} run with other arguments ({_diff(done['argv'], argv_job)}); "
                                         f"use another --output_dir for another recipe or checkpoint")
                    said = io.StringIO()
                    try:
                        with contextlib.redirect_stderr(said):
                            parse_args(a.stage, argv_job)
                    except SystemExit as e:
                        if e.code:  # the launcher's one-line message, without its usage text
                            why = [line for line in said.getvalue().splitlines() if line.strip()][-1:]
                            raise SystemExit(f"task {task}: its recipe is not valid: "
                                             f"{why[0].split(': error: ', 1)[-1] if why else e.code}; "
                                             f"fix it with --set {task}.FLAG=VALUE") from None
                    sys.stderr.write(said.getvalue())  # the launcher's warnings, if any
                    _check_data(task, argv_job)
                    jobs.append((key, task, seed, run_root, argv_job, done is not None))
        results |= {"suite": a.suite, "tasks": a.tasks, "checkpoints": labels,
                    "recipes": a.recipes, "processes": ctx.world_size}
        todo = [j for j in jobs if not j[5]]
        ctx.log(f"[evaluate] {len(jobs)} runs ({len(jobs) - len(todo)} already in {results_path}), "
                f"{ctx.world_size} process(es)")
        for key, task, seed, run_root, argv_job, _ in todo:
            job_dir = run_root / f"{task}-seed{seed}"
            if ctx.is_main and job_dir.exists():
                if not (job_dir / JOB_MARK).is_file():
                    raise SystemExit(f"{job_dir} exists and was not written by trainer.evaluate; "
                                     f"use another --output_dir")
                shutil.rmtree(job_dir)        # an interrupted run of ours: start it again
            if ctx.is_main:
                job_dir.mkdir(parents=True)
                (job_dir / JOB_MARK).write_text(key + "\n")
            dist.barrier()
            ctx.log(f"[evaluate] {key}: {' '.join(argv_job)}")
            start = time.perf_counter()
            args = parse_args(a.stage, argv_job)
            metrics = run(args, ctx)["eval"]
            wall = time.perf_counter() - start
            if ctx.is_main:
                if not a.keep_weights:
                    shutil.rmtree(job_dir / "final", ignore_errors=True)
                    for step in job_dir.glob("step-*"):
                        shutil.rmtree(step, ignore_errors=True)
                results["runs"][key] = {"metrics": metrics, "argv": argv_job, "wall_s": round(wall, 1)}
                _write_json(results_path, results)
                (out / "results.md").write_text(markdown(results), encoding="utf-8")
                ctx.log(f"[evaluate] {key}: " + ", ".join(f"{m}={metrics[m]:.4f}" for m in HEADLINE[task]
                                                          if m in metrics) + f" ({wall:.0f} s)")
            dist.barrier()
        if ctx.is_main:
            _write_json(results_path, results)
            table = markdown(results)
            (out / "results.md").write_text(table, encoding="utf-8")
            print(table, flush=True)
            _log_to_tracked_runs(results, labels, [results_path, out / "results.md"], ctx.log)
        return results
    finally:
        dist.shutdown()


def _earlier_results(out: Path) -> dict:
    """results.json of an earlier evaluation into `out` (its runs are kept and skipped), or a fresh
    one; a results.json or results.md there that trainer.evaluate did not write stops the command
    before anything is written (both would be replaced)."""
    results_path, table = out / "results.json", out / "results.md"
    if results_path.exists():
        try:
            results = json.loads(results_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            results = e
        if not (isinstance(results, dict) and isinstance(results.get("runs"), dict)):
            raise SystemExit(f"--output_dir {out}: {results_path.name} there was not written by trainer.evaluate "
                             f"(no 'runs' record{f': {results}' if isinstance(results, Exception) else ''}) and "
                             f"would be replaced; pick another --output_dir")
        return results
    if table.exists():
        raise SystemExit(f"--output_dir {out}: {table.name} there was not written by trainer.evaluate (no "
                         f"results.json beside it) and would be replaced; pick another --output_dir")
    return {"runs": {}}


def _log_to_tracked_runs(results: dict, labels: dict[str, str], artifacts: list[Path], log) -> None:
    """Each checkpoint's table (mean over seeds, as `evaluate/<task>/<metric>`) goes to the MLflow /
    W&B runs that trained it, if it was tracked (`--report_to`); untracked checkpoints are skipped."""
    from trainer.tracking import log_to_run

    for label, spec in labels.items():
        per_metric: dict[str, list[float]] = {}
        for key, r in results["runs"].items():
            ckpt_label, task, _ = key.split("|")
            if ckpt_label == label:
                for m, v in r["metrics"].items():
                    per_metric.setdefault(f"evaluate/{task}/{m}", []).append(float(v))
        table = {k: sum(v) / len(v) for k, v in per_metric.items()}
        if table and log_to_run(spec, table, artifacts=artifacts, log=log):
            log(f"[evaluate] {label}: table logged to its tracked run")


def _diff(old: list[str], new: list[str]) -> str:
    """The flags where two runs' arguments differ ("" when none). Paths inside the evaluation's own
    directory (--output_dir, a converted checkpoint's --model) may differ: it can be moved."""
    def pairs(v: list[str]) -> dict[str, str]:
        out, i = {}, 0
        while i < len(v):
            if i + 1 < len(v) and not v[i + 1].startswith("--"):
                out[v[i]], i = v[i + 1], i + 2
            else:
                out[v[i]], i = "", i + 1
        for own in ("--output_dir", "--model", "--no_progress"):
            out.pop(own, None)
        return out

    o, n = pairs(old), pairs(new)
    return ", ".join(f"{k}: {o.get(k)} -> {n.get(k)}" for k in sorted(set(o) | set(n)) if o.get(k) != n.get(k))


def _check_data(task: str, argv_job: list[str]) -> None:
    """Read each run's data files once before any run starts: a wrong file stops here."""
    flags = dict(zip(argv_job[::2], argv_job[1::2]))
    mode = flags["--train_mode"]
    from data.classification import load_classification_tsv
    from data.mrc import load_squad
    from data.ner import load_klue_ner
    from data.pairs import load_klue_nli, load_klue_sts

    from data.retrieval import is_squad_file, read_pairs_tsv

    reader = {"classify": load_classification_tsv, "mrc": load_squad,  # whole files: a bad row far down stops here too
              "ict": lambda p: load_squad(p) if is_squad_file(p) else read_pairs_tsv(p),
              "ner": load_klue_ner, "nli": load_klue_nli, "sts": load_klue_sts}[mode]
    for flag in ("--train_file", "--eval_file"):
        path = flags.get(flag)
        if path and reader is not None:
            try:
                reader(path)
            except (ValueError, FileNotFoundError) as e:
                raise SystemExit(f"task {task}: {flag} {path}: {e}") from None


if __name__ == "__main__":
    from trainer import dist

    dist.run_process(main)  # Ctrl-C: exit code 130
