"""`--pooling auto`: the pooling a checkpoint was retrieval-trained with, else mean.

A [CLS] vector is a sentence vector only after contrastive training with cls pooling (`--train_mode
ict` or `--objective ict`): after MLM + SOP pretraining alone, the [CLS] outputs of different texts
are nearly the same (pairwise cosine >= 0.9996 on the demo model, every search score 1.0000), while
the mean over the tokens tells them apart.
"""
from __future__ import annotations

from argparse import Namespace
from pathlib import Path

POOLINGS = ("cls", "mean")


def uses_pooling(args: Namespace) -> bool:
    """Whether this run pools one vector per input (ict, encoder, --objective ict pretraining)."""
    return args.train_mode in ("ict", "encoder") or (args.train_mode == "pretrain" and args.objective == "ict")


def retrieval_trained(trained: dict | None) -> bool:
    """Whether a run (its arguments: train_mode, objective) trained retrieval vectors."""
    return isinstance(trained, dict) and (trained.get("train_mode") == "ict" or (
        trained.get("train_mode") == "pretrain" and trained.get("objective") == "ict"))


def retrieval_pooling(trained: dict | None) -> str | None:
    """The pooling a run trained retrieval vectors with, None when it trained none."""
    return trained.get("pooling") if retrieval_trained(trained) and trained.get("pooling") in POOLINGS else None


def _describe(path: Path | None, trained: dict | None) -> str:
    if path is None:
        return "no --checkpoint"
    if not isinstance(trained, dict):
        return f"--checkpoint {path} records no run arguments"
    mode = trained.get("train_mode")
    kind = f"{mode} ({trained.get('objective')})" if mode == "pretrain" else mode
    return f"--checkpoint {path} is a {kind} checkpoint"


def resolve_pooling(args: Namespace, run_dir: Path | None = None, start=None) -> tuple[str, str]:
    """(pooling to use, a line saying why, or "" when there is nothing to say).

    start: the resolved --checkpoint (`checkpoint.Start`, as the loop hands it), else resolved
    here against `run_dir`. auto: the checkpoint's retrieval pooling, else mean. An explicit cls on
    a checkpoint never retrieval-trained is kept, with a warning for the encoder (it only encodes,
    nothing trains the [CLS] vector)."""
    from trainer import checkpoint

    if start is None:
        try:
            start = checkpoint.resolve_start(args.checkpoint, run_dir)
        except checkpoint.CheckpointError as e:
            raise SystemExit(str(e)) from None
    path, trained = start.path, start.trained_args()
    trained_with = retrieval_pooling(trained)
    if args.pooling == "auto":
        if trained_with:
            return trained_with, f"--pooling auto: {trained_with}, as --checkpoint {path} was trained with"
        return "mean", (f"--pooling auto: mean ({_describe(path, trained)}: its [CLS] vector was never "
                        f"trained to tell texts apart)")
    if args.pooling == "cls" and args.train_mode == "encoder" and not trained_with:
        return "cls", (f"warning: --pooling cls, but {_describe(path, trained)}, not retrieval-trained: its "
                       f"[CLS] vectors of different texts are nearly identical (every search score about the "
                       f"same). Use --pooling mean (or auto), or fine-tune with --train_mode ict first")
    if trained_with and trained_with != args.pooling:
        return args.pooling, (f"note: --pooling {args.pooling}, but --checkpoint {path} was retrieval-trained "
                              f"with --pooling {trained_with}")
    return args.pooling, ""
