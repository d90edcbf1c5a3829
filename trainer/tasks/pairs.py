"""train_mode nli and sts: KLUE sentence-pair fine-tuning ([CLS] a [SEP] b [SEP], token types
0/1) with the classify model: NLI 3-way cross-entropy (accuracy), STS one output trained with MSE
on the 0-5 similarity (Pearson r, F1 of score >= 3). Evaluation on --eval_file, or on the pairs
data.pairs.hash_split holds out of --train_file (by guid)."""
from __future__ import annotations

from argparse import Namespace

import numpy as np
import torch

from trainer.dist import DistContext
from trainer.tasks.base import Task, shard_range


class PairTask(Task):
    name = "pairs"
    unpad = ("train", "eval")
    num_labels = 3

    def load(self, path: str) -> list:
        raise NotImplementedError

    def __init__(self, args: Namespace, ctx: DistContext, start=None):
        super().__init__(args, ctx, start)
        from data.pairs import SentencePairDataset, hash_split
        from models import build_model

        try:
            train = self.load(args.train_file) if args.train_file else []
            if args.eval_file:
                evals = self.load(args.eval_file)
            elif train:
                train, evals = hash_split(train, lambda e: e.guid, args.eval_fraction)
            else:
                raise SystemExit(f"--train_mode {self.name} needs --train_file and/or --eval_file")
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"--train_mode {self.name}: {e}") from None
        train, evals = self.limit(train, "max_train_examples"), self.limit(evals, "max_eval_examples")
        if len(evals) < 2:
            raise SystemExit(f"--train_mode {self.name}: {len(evals)} evaluation pairs (--eval_fraction "
                             f"{args.eval_fraction} of {len(train)}); raise --eval_fraction or pass --eval_file")
        self.tokenizer = self.load_tokenizer()
        L, regression = args.max_seq_length, self.num_labels == 1
        self.dataset = SentencePairDataset(train, self.tokenizer, L, regression) if train else None
        self.eval_dataset = SentencePairDataset(evals, self.tokenizer, L, regression)
        self.model = build_model(self.config, "classify", num_labels=self.num_labels)
        self.ctx.log(f"[{self.name}] {len(train)} training pairs ({self.dataset.num_truncated if train else 0} cut "
                     f"at {L} tokens), {len(evals)} evaluation pairs")

    def make_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        batch = self.random_rows(batch_size, token_type=1, generator=g)
        batch["labels"] = (torch.rand(batch_size, generator=g) * 5 if self.num_labels == 1
                           else torch.randint(0, self.num_labels, (batch_size,), generator=g))
        return self.to_device(batch)

    def scores(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, engine) -> dict[str, float]:
        from trainer import dist

        ds = self.eval_dataset
        lo, hi = shard_range(len(ds), self.ctx.rank, self.ctx.world_size)
        out = self.predict(engine, ds, range(lo, hi), ["logits"], desc=f"eval {self.name}")
        result = None
        if out is not None:
            result = self.scores(np.concatenate(out["logits"]), np.array([e.label for e in ds.examples]))
        return dist.broadcast_object(result)


class NLITask(PairTask):
    name = "nli"
    num_labels = 3

    def load(self, path: str) -> list:
        from data.pairs import load_klue_nli
        return load_klue_nli(path)

    def scores(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        from data.metrics import accuracy
        return {"accuracy": accuracy(logits, labels)}


class STSTask(PairTask):
    name = "sts"
    num_labels = 1

    def load(self, path: str) -> list:
        from data.pairs import load_klue_sts
        return load_klue_sts(path)

    def scores(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        from data.metrics import sts_scores
        return sts_scores(logits[:, 0], labels)
