"""train_mode classify: sentence classification fine-tuning (NSMC-style sentiment TSV), accuracy
on --eval_file (or a held-out --eval_fraction of the training rows)."""
from __future__ import annotations

import random
from argparse import Namespace

import numpy as np
import torch

from trainer.dist import DistContext
from trainer.tasks.base import Task, shard_range


class ClassifyTask(Task):
    name = "classify"

    def __init__(self, args: Namespace, ctx: DistContext):
        super().__init__(args, ctx)
        from data.classification import ClassificationDataset, load_classification_tsv
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
            order = list(range(len(train)))
            random.Random(args.seed).shuffle(order)
            held = set(order[:max(1, round(args.eval_fraction * len(train)))])
            evals = self.limit([e for i, e in enumerate(train) if i in held], "max_eval_examples")
            train = [e for i, e in enumerate(train) if i not in held]
        else:
            raise SystemExit("--train_mode classify needs --train_file and/or --eval_file")
        num_labels = max(e.label for e in train + evals) + 1
        L = args.max_seq_length
        self.dataset = ClassificationDataset(train, self.tokenizer, L, num_labels) if train else None
        self.eval_dataset = ClassificationDataset(evals, self.tokenizer, L, num_labels)
        self.num_labels = num_labels
        self.model = build_model(self.config, "classify", num_labels=num_labels)
        counts = np.bincount([e.label for e in train], minlength=num_labels).tolist() if train else []
        self.ctx.log(f"[classify] {len(train)} training rows (labels {counts}, {self.dataset.num_truncated if train else 0} "
                     f"cut at {L} tokens), {len(evals)} evaluation rows, {num_labels} labels")

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
