"""TensorBoard scalars, `loss.tsv` and the rank-0 progress bar.

Per-micro-batch metrics stay on the device as tensors and are summed; at each logging step
they are averaged over the interval and over processes (one all-reduce), then written.
The tags, and when each is written: README's TensorBoard table (tests/test_plot.py checks it
against the tags of a real run). Every scalar also goes to the `--report_to` trackers (MLflow,
W&B: trainer/tracking.py) through `Logger._scalars`, the one place scalars are written.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from trainer import dist


class MetricMeter:
    """Sums scalar tensors per name over micro-batches without host synchronisation."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.tokens = 0
        self.samples = 0

    def add(self, outputs: dict, tokens: torch.Tensor | int, samples: int) -> None:
        for k, v in outputs.items():
            if isinstance(v, torch.Tensor) and v.ndim == 0 and (k == "loss" or k.endswith(("_loss", "_acc"))):
                v = v.detach().float()
                self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1
        self.tokens = self.tokens + tokens
        self.samples += samples

    def reduce(self, device: torch.device) -> tuple[dict[str, float], float, int]:
        """(mean metrics over micro-batches and processes, global tokens, global samples); resets."""
        names = sorted(self.sums)
        vals = torch.stack([self.sums[n] for n in names]) / max(1, self.count) if names else torch.zeros(0, device=device)
        tok = torch.as_tensor(self.tokens, dtype=torch.float64, device=device).reshape(1)
        packed = torch.cat([vals.to(device=device, dtype=torch.float64), tok,
                            torch.tensor([float(self.samples)], dtype=torch.float64, device=device)])
        dist.all_reduce(packed, "sum")
        world = dist.world_size()
        out = dict(zip(names, (packed[:len(names)] / world).tolist()))
        tokens, samples = packed[-2].item(), int(packed[-1].item())
        self.__init__()
        return out, tokens, samples


def memory_mb(device: torch.device) -> dict[str, float]:
    import psutil

    out = {"perf/rss_mb": psutil.Process().memory_info().rss / 2**20}
    if device.type == "cuda":
        out["perf/cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _row_step(line: str) -> float:
    """The step of a loss.tsv row; inf for a row that is not one (blank, or cut short or zero-filled
    by a crash or power loss), which a resume drops."""
    try:
        return int(line.split("\t", 1)[0])
    except ValueError:
        return float("inf")


class Logger:
    """Rank 0 writes TensorBoard events and loss.tsv and drives the progress bar; it hands the
    same parameters, scalars and files to the `--report_to` trackers (`tracking`, trainer/tracking.py)."""

    def __init__(self, run_dir: Path, is_main: bool, total_steps: int, start_step: int,
                 run_info: dict, progress: bool = True, tensorboard: bool = True, tracking=None,
                 trains: bool = True):
        """`start_step`: the resumed checkpoint's step. A run that trains on from it redoes the later
        steps, so their loss.tsv rows are dropped and TensorBoard hides their events; one that only
        evaluates (`trains` False) keeps both as they are."""
        self.is_main = is_main
        self.writer = None
        self.bar = None
        self.tracking = tracking if is_main else None
        self.tsv_path = run_dir / "loss.tsv"
        self.columns: list[str] | None = None
        self.reserved: list[str] = []      # loss.tsv columns that later rows fill (validation: eval_*)
        self.last_eval: dict[str, str] = {}  # the last validation stays in the progress bar
        if not is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            # TensorBoard hides the events at and after purge_step: the checkpoint's own step stays
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                        purge_step=start_step + 1 if start_step and trains else None)
            for name, value in run_info.items():
                self.writer.add_text(name, "```\n" + json.dumps(value, indent=2, default=str) + "\n```", start_step)
        if self.tracking is not None:
            self.tracking.params(run_info, start_step)
        if trains:
            self._truncate_tsv(start_step)
        else:
            self._read_columns()
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _read_columns(self) -> list[str]:
        """loss.tsv's lines, its header fixing the columns of the rows to come."""
        if not self.tsv_path.is_file():
            return []
        lines = self.tsv_path.read_text().splitlines()
        if lines:
            self.columns = lines[0].split("\t")
        return lines

    def _truncate_tsv(self, start_step: int) -> None:
        """On resume, drop rows after the checkpoint's step (they are about to be redone)."""
        lines = self._read_columns()
        if not lines:
            return
        kept = [lines[0]] + [ln for ln in lines[1:] if _row_step(ln) <= start_step]
        if len(kept) == len(lines):
            return
        # a new file renamed over the old: a process killed here leaves the whole log, never half of it
        tmp = self.tsv_path.with_name(f".{self.tsv_path.name}.tmp-{os.getpid()}")
        tmp.write_text("\n".join(kept) + "\n")
        os.replace(tmp, self.tsv_path)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.is_main:
            return
        self._scalars(step, scalars)
        # loss.tsv columns: train/x -> x, eval/x (validation during training) -> eval_x,
        # probe/task/x (trainer/probe.py) -> probe_task_x
        row = {"step": step, **{k.replace("/", "_") if k.startswith(("eval/", "probe/")) else k.split("/", 1)[-1]: v
                                for k, v in scalars.items()}}
        if self.columns is None:  # fixed by the first row (and `reserve`); later new keys go to TensorBoard only
            self.columns = list(row) + [c for c in self.reserved if c not in row]
            self.tsv_path.write_text("\t".join(self.columns) + "\n")
        with open(self.tsv_path, "a") as f:
            f.write("\t".join(_fmt(row.get(c, "")) for c in self.columns) + "\n")
        if self.bar is not None:
            self.last_eval.update({k: f"{row[k]:.4g}" for k in ("eval_mlm_loss", "eval_mlm_acc") if k in row})
            post = {k: f"{row[k]:.4g}" for k in ("loss", "mlm_acc", "lr", "tokens_per_s") if k in row} | self.last_eval
            self.bar.set_postfix(post, refresh=False)
            if self.bar.n >= self.bar.total:  # closed now: its final it/s must not include evaluation or export
                self.bar.close()

    def reserve(self, tags: list[str]) -> None:
        """Columns for tags logged only at some steps (e.g. `eval/mlm_loss` every --eval_steps)."""
        self.reserved = [t.replace("/", "_") for t in tags]

    def log_eval(self, step: int, results: dict[str, float]) -> None:
        """Evaluation results: TensorBoard `eval/*` and `eval.json` (loss.tsv stays training-only)."""
        if not self.is_main:
            return
        self._scalars(step, {f"eval/{k}": v for k, v in results.items()})
        (self.tsv_path.parent / "eval.json").write_text(json.dumps({"step": step, **results}, indent=2))
        self.artifact(self.tsv_path.parent / "eval.json")

    def _scalars(self, step: int, scalars: dict[str, float]) -> None:
        """The one place scalars go: TensorBoard and the trackers."""
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.tracking is not None:
            self.tracking.metrics(step, scalars)

    def artifact(self, path: Path, artifact_dir: str = "") -> None:
        """A file for the trackers' run (e.g. the exported config); TensorBoard has no place for it."""
        if self.tracking is not None:
            self.tracking.artifact(path, artifact_dir)

    @property
    def tracking_ids(self) -> dict:
        """The trackers' run ids, for the checkpoints' meta.json ({} when none)."""
        return self.tracking.ids if self.tracking is not None else {}

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.tracking is not None:
            from trainer.tracking import exit_status

            # called from the loop's `finally`: an exception on its way out makes the run FAILED/KILLED
            status, code = exit_status(sys.exc_info()[1])
            self.tracking.close(status, code)
            self.tracking = None


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)
