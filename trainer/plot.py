"""PNG curves from runs' TensorBoard logs, several runs overlaid.

    python -m trainer.plot output/run_a output/run_b --out plots/ [--smooth 0.6] [--names a b]

A run is `output_dir/<model_name>` (its `tensorboard/` is read) or a TensorBoard log directory.
Figures: `loss.png` (total and auxiliary loss), one per objective (`mlm.png`, `sop.png`,
`ict.png`, ...: loss and accuracy), `lr.png` (and epoch), `grad.png` (gradient norm, loss scale),
`throughput.png` (tokens/s, samples/s, step time), `memory.png`, and one per other tag prefix
(e.g. `eval.png`). The runs are the legend. A bookkeeping series with one value throughout
(aux loss without MoE, loss scale without fp16, epoch) gets no panel; its value is printed.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

Series = tuple[np.ndarray, np.ndarray]           # (steps, values)
PNG_MARK = "ko-encoder-pretrain trainer.plot"     # the "Software" text of the PNGs written here

FIXED_FIGURES: dict[str, list[str]] = {
    "loss": ["train/loss", "train/aux_loss"],
    "lr": ["train/lr", "train/epoch"],
    "grad": ["train/grad_norm", "train/loss_scale"],
    "throughput": ["perf/tokens_per_s", "perf/samples_per_s", "perf/step_time_s"],
    "memory": ["perf/rss_mb", "perf/cuda_max_allocated_mb", "perf/optimizer_state_mb",
               "perf/optimizer_state_max_mb"],
}
OBJECTIVE_TAG = re.compile(r"^train/(\w+?)_(loss|acc)$")
logger = logging.getLogger(__name__)


class Plotted(dict):
    """figure -> tag -> run -> (steps, values); `constant`: tag -> value of the series left out."""

    def __init__(self):
        super().__init__()
        self.constant: dict[str, float] = {}


def constant_series(data: dict[str, dict[str, Series]]) -> dict[str, float]:
    """Bookkeeping series of FIXED_FIGURES (aux loss without MoE, loss scale without fp16, epoch,
    optimizer state, ...) that hold one value at every step of every run: a flat panel shows
    nothing, so they are named with their value instead. The total loss, objective metrics and
    evaluation results are always drawn (a flat accuracy is a finding), as is a single point."""
    out: dict[str, float] = {}
    for tag in {t for ts in FIXED_FIGURES.values() for t in ts} - {"train/loss"}:
        series = [d[tag][1] for d in data.values() if tag in d]
        if not series or all(len(v) < 2 for v in series):
            continue
        values = np.concatenate(series)
        if np.all(values == values[0]):
            out[tag] = float(values[0])
    return dict(sorted(out.items()))


def log_dir(run: Path) -> Path:
    return run / "tensorboard" if (run / "tensorboard").is_dir() else run


def read_scalars(run: str | Path) -> dict[str, Series]:
    """Every scalar tag of a run: steps ascending, one value per step (the last one written,
    which is what a resumed run logged after its checkpoint)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not Path(run).is_dir():
        raise FileNotFoundError(f"{run}: no such directory; pass a run directory (output_dir/model_name) or "
                                f"a TensorBoard log directory")
    d = log_dir(Path(run))
    files = sorted(d.rglob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"{run}: no TensorBoard event files (expected {d}/events.out.tfevents.*)")
    damaged = [problem for f in files if (problem := event_file_damage(f))]
    for problem in damaged:  # TensorBoard's reader stops there silently
        logger.warning("warning: %s", problem)
    # Each file on its own, oldest first by the time of its first point: a resumed run's file
    # replaces the points from its first step on (TensorBoard orders files by name, and the
    # writer's per-process counter in the name sorts ".10" before ".9").
    per_file = []
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})   # 0 = keep every point
        acc.Reload()
        series = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}
        first = min((e.wall_time for events in series.values() for e in events), default=None)
        if first is not None:
            per_file.append((first, str(f), series))
    by_tag: dict[str, dict[int, float]] = {}
    for _, _, series in sorted(per_file):
        restart = min(e.step for events in series.values() for e in events)
        for points in by_tag.values():
            for step in [s for s in points if s >= restart]:
                del points[step]
        for tag, events in series.items():
            points = by_tag.setdefault(tag, {})
            points.update((e.step, e.value) for e in events)
    out: dict[str, Series] = {}
    for tag, points in by_tag.items():
        steps = np.array(sorted(points), dtype=np.int64)
        out[tag] = steps, np.array([points[s] for s in steps], dtype=np.float64)
    if not out:
        raise ValueError(f"{run}: no scalars could be read from {len(files)} event file(s)"
                         + (f" ({'; '.join(damaged)})" if damaged else " (a run that logged nothing yet?)"))
    return out


def event_file_damage(path: Path) -> str | None:
    """Why the records of a TensorBoard event file end early (truncated, failed checksum), or None."""
    from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow

    reader = pywrap_tensorflow.PyRecordReader_New(str(path))
    records = 0
    try:
        while True:
            reader.GetNext()
            records += 1
    except errors.OutOfRangeError:
        return None
    except errors.DataLossError as e:
        reason = str(e.message).replace(str(path), "").strip()
        return (f"{path} is damaged after {records} readable record(s) ({reason}); what follows is lost "
                f"(a copy cut short, or a run still writing it)")
    finally:
        reader.file_handle.close()


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's debiased exponential moving average (weight 0 = unchanged). A non-finite value
    (a NaN or inf loss) stays as it is and is left out of the average, as TensorBoard does: the
    curve goes on after it instead of being NaN from there on."""
    if weight <= 0 or len(values) == 0:
        return values
    out = np.empty_like(values)
    last, count = 0.0, 0
    for i, v in enumerate(values):
        if not np.isfinite(v):
            out[i] = v
            continue
        last, count = weight * last + (1 - weight) * v, count + 1
        out[i] = last / (1 - weight ** count)
    return out


def figure_layout(tags: set[str]) -> dict[str, list[str]]:
    """Figure name -> the tags it plots (one panel each), for the tags some run has."""
    figures: dict[str, list[str]] = {}
    used: set[str] = set()
    for name, wanted in FIXED_FIGURES.items():
        present = [t for t in wanted if t in tags]
        if present:
            figures[name] = present
            used |= set(present)
    objectives: dict[str, list[str]] = defaultdict(list)
    for t in sorted(tags - used):
        if (m := OBJECTIVE_TAG.match(t)) and m.group(1) != "aux":
            objectives[m.group(1)].append(t)
    for obj, ts in objectives.items():
        figures[obj] = sorted(ts, key=lambda t: (not t.endswith("_loss"), t))
        used |= set(ts)
    rest: dict[str, list[str]] = defaultdict(list)
    for t in sorted(tags - used):
        rest[t.split("/", 1)[0] if "/" in t else "other"].append(t)
    for prefix, ts in rest.items():
        figures[prefix if prefix not in figures else f"{prefix}_other"] = ts
    return figures


def run_names(runs: list[Path]) -> list[str]:
    """The run directory's name (its parent's when given the tensorboard/ folder); duplicates
    get their parent directory's name in front."""
    base = [(r.parent if r.name == "tensorboard" else r) for r in runs]
    names = [b.name for b in base]
    names = [f"{b.parent.name}/{b.name}" if names.count(b.name) > 1 else b.name for b in base]
    unique: list[str] = []
    for name in names:  # still the same (a run given twice, a/x/run and b/x/run): numbered, none dropped
        label, k = name, 2
        while label in unique:
            label, k = f"{name}~{k}", k + 1
        unique.append(label)
    return unique


def replaceable(png: Path) -> bool:
    """Whether writing `png` loses nothing: it does not exist, or an earlier trainer.plot wrote it
    (PNG_MARK in its header's text chunks, which come before the image data)."""
    if not png.exists():
        return True
    if not png.is_file():
        return False
    with open(png, "rb") as f:
        return PNG_MARK.encode() in f.read(4096)


def plot_runs(runs: list[str | Path], out_dir: str | Path, smoothing: float = 0.0,
              names: list[str] | None = None, dpi: int = 110, overwrite: bool = False) -> Plotted:
    """Write one PNG per figure; returns what was plotted: figure -> tag -> run -> (steps, values),
    values after smoothing, with the constant series left out in `.constant`. PNG files of the
    same names in `out_dir` that trainer.plot did not write are refused unless `overwrite`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [Path(r) for r in runs]
    names = names or run_names(runs)
    if len(names) != len(runs):
        raise ValueError(f"{len(names)} names for {len(runs)} runs")
    if len(set(names)) != len(names):  # the legend (and the data) is keyed by name: a run would vanish
        raise ValueError(f"--names {' '.join(names)}: each run needs its own name "
                         f"({', '.join(sorted({n for n in names if names.count(n) > 1}))} given more than once)")
    data = {name: read_scalars(r) for name, r in zip(names, runs)}
    for name, scalars in data.items():
        for tag, (steps, values) in scalars.items():
            bad = ~np.isfinite(values)
            if bad.any():  # matplotlib leaves them out of the curve without a word
                logger.warning("warning: %s: %s has %d non-finite value(s) (NaN/inf, first at step %d), not drawn",
                               name, tag, int(bad.sum()), int(steps[bad][0]))
    constant = constant_series(data)
    layout = figure_layout(set().union(*(d.keys() for d in data.values())) - set(constant))
    out_dir = Path(out_dir)
    foreign = [n + ".png" for n in layout if not replaceable(out_dir / f"{n}.png")]
    if foreign and not overwrite:
        raise FileExistsError(f"--out {out_dir} already holds {', '.join(foreign)}, not written by trainer.plot: "
                              f"pick another --out, or pass --overwrite to replace them")
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    plotted = Plotted()
    plotted.constant = constant
    for fig_name, tags in layout.items():
        fig, axes = plt.subplots(1, len(tags), figsize=(5.2 * len(tags), 3.8), squeeze=False)
        plotted[fig_name] = {}
        for ax, tag in zip(axes[0], tags):
            plotted[fig_name][tag] = {}
            for i, (name, scalars) in enumerate(data.items()):
                if tag not in scalars:
                    continue
                steps, values = scalars[tag]
                color = colors[i % len(colors)]
                shown = smooth(values, smoothing)
                if smoothing > 0:
                    ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
                ax.plot(steps, shown, color=color, label=name, linewidth=1.6,
                        marker="." if len(steps) < 30 else None)
                plotted[fig_name][tag][name] = steps, shown
            ax.set_title(tag)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if tag.endswith("_acc"):
                ax.set_ylim(-0.02, 1.02)
            elif tag == "train/lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            ax.legend(fontsize=8)
        fig.suptitle(fig_name + (f" (smoothing {smoothing})" if smoothing > 0 else ""))
        fig.tight_layout()
        path = out_dir / f"{fig_name}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        try:  # written whole, then renamed: an earlier plot is never left half-replaced
            fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": PNG_MARK})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
            plt.close(fig)
    return plotted


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (output_dir/model_name) or TensorBoard log directories")
    p.add_argument("--out", required=True, help="directory for the PNG files")
    p.add_argument("--smooth", type=float, default=0.0,
                   help="exponential moving average weight in [0, 1), as TensorBoard's slider (default 0)")
    p.add_argument("--names", nargs="+", default=None, help="legend names, one per run (default: directory names)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace PNG files of the same names in --out that trainer.plot did not write "
                        "(its own earlier plots are always replaced)")
    a = p.parse_args(argv)
    if not 0.0 <= a.smooth < 1.0:
        p.error(f"--smooth must be in [0, 1), got {a.smooth}")
    if a.names is not None and len(a.names) != len(a.runs):
        p.error(f"--names: {len(a.names)} name(s) for {len(a.runs)} run(s); give one per run")
    out = Path(a.out)
    existing = next(q for q in (out, *out.absolute().parents) if q.exists())
    if not existing.is_dir():
        p.error(f"--out {out}: {existing} is a file, not a directory; pick another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        p.error(f"--out {out}: cannot write in {existing} (permissions); pick another --out")
    try:
        plotted = plot_runs(a.runs, a.out, a.smooth, a.names, overwrite=a.overwrite)
    except (ValueError, OSError) as e:  # a missing run, no event files, no readable scalars: one line
        p.exit(1, f"{p.prog}: error: {e}\n")
    for fig, tags in plotted.items():
        print(f"{Path(a.out) / (fig + '.png')}: {', '.join(tags)}")
    if plotted.constant:
        print("constant, not plotted: " + ", ".join(f"{t} = {v:.6g}" for t, v in plotted.constant.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
