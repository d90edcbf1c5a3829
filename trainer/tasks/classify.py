"""train_mode classify: sentence classification fine-tuning (NSMC-style sentiment TSV), accuracy
on --eval_file (or a held-out --eval_fraction of the training rows)."""
from __future__ import annotations

from argparse import Namespace

import numpy as np
import torch

from trainer.dist import DistContext
from trainer.tasks.base import Task, shard_range


class ClassifyTask(Task):
    name = "classify"
    unpad = ("train", "eval")

    def __init__(self, args: Namespace, ctx: DistContext, start=None):
        super().__init__(args, ctx, start)
        from data.classification import (ClassificationDataset, label_counts, load_classification_tsv,
                                         number_labels, resolve_num_labels, split_held_out)
        from models import build_model

        self.tokenizer = self.load_tokenizer()

        def load(path: str, flag: str):
            try:
                return self.limit(load_classification_tsv(path), flag)
            except (ValueError, FileNotFoundError) as e:
                raise SystemExit(f"--train_mode classify: {e}") from None

        train = load(args.train_file, "max_train_examples") if args.train_file else []
        if args.eval_file:
            evals = load(args.eval_file, "max_eval_examples")
        elif train:
            train, held = split_held_out(train, args.eval_fraction, args.seed)
            evals = self.limit(held, "max_eval_examples")
        else:
            raise SystemExit("--train_mode classify needs --train_file and/or --eval_file")
        sources = {f"--train_file {args.train_file}": train + ([] if args.eval_file else evals),
                   f"--eval_file {args.eval_file}": evals if args.eval_file else []}
        sources = {name: rows for name, rows in sources.items() if rows}
        known = self.start.label_names()
        self.label_names = number_labels(sources, known)
        if self.label_names is not None:
            origin = (f"the order of {self.start.path}" if self.label_names == known else
                      "sorted" + (f"; {self.start.path} has other labels {known}" if known else ""))
            self.ctx.log(f"[classify] label names as classes ({origin}): "
                         + ", ".join(f"{i} {n}" for i, n in enumerate(self.label_names)))
        try:
            num_labels = resolve_num_labels(sources, args.num_labels)
        except ValueError as e:
            raise SystemExit(f"--train_mode classify: {e}") from None
        L = args.max_seq_length
        self.dataset = ClassificationDataset(train, self.tokenizer, L, num_labels) if train else None
        self.eval_dataset = ClassificationDataset(evals, self.tokenizer, L, num_labels)
        self.num_labels = num_labels
        self.model = build_model(self.config, "classify", num_labels=num_labels)
        self.ctx.log(f"[classify] {len(train)} training rows (label counts {label_counts(train)}, "
                     f"{self.dataset.num_truncated if train else 0} cut at {L} tokens), {len(evals)} evaluation "
                     f"rows (label counts {label_counts(evals)}), {num_labels} labels")

    def make_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        batch = self.random_rows(batch_size, generator=g)
        batch["labels"] = torch.randint(0, self.num_labels, (batch_size,), generator=g)
        return self.to_device(batch)

    def evaluate(self, engine) -> dict[str, float]:
        from data.metrics import accuracy
        from trainer import dist

        ds = self.eval_dataset
        lo, hi = shard_range(len(ds), self.ctx.rank, self.ctx.world_size)
        out = self.predict(engine, ds, range(lo, hi), ["logits"], desc="eval classify")
        result = None
        if out is not None:
            logits = np.concatenate(out["logits"])
            labels = np.array([e.label for e in ds.examples])
            result = {"accuracy": accuracy(logits, labels)}
        return dist.broadcast_object(result)
