"""train_mode mrc: extractive QA fine-tuning on KorQuAD/SQuAD 1.1 JSON with doc-stride windows;
evaluation with the official KorQuAD EM/F1 and a predictions file (output_dir/model_name/
predictions.json, {question id: answer text})."""
from __future__ import annotations

from argparse import Namespace

import torch

from trainer.args import run_dir
from trainer.dist import DistContext
from trainer.tasks.base import Task, shard_range


class MRCTask(Task):
    name = "mrc"
    unpad = ("eval",)  # training windows are mostly full (doc stride)
    null_answers = False  # the data hold unanswerable questions (SQuAD 2.0): predictions may be empty

    def __init__(self, args: Namespace, ctx: DistContext, start=None):
        super().__init__(args, ctx, start)
        from data.mrc import MRCDataset, build_features, check_answer_alignment, load_squad, split_by_article
        from models import build_model

        self.tokenizer = self.load_tokenizer()
        try:
            train = load_squad(args.train_file) if args.train_file else []
            if args.eval_file:
                evals = load_squad(args.eval_file)
            elif train:
                train, evals = split_by_article(train, args.eval_fraction, seed=args.seed)
            else:
                raise SystemExit("--train_mode mrc needs --train_file and/or --eval_file")
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"--train_mode mrc: {e}") from None
        train, evals = self.limit(train, "max_train_examples"), self.limit(evals, "max_eval_examples")

        def features(examples):
            try:
                return build_features(examples, self.tokenizer, args.max_seq_length, args.doc_stride,
                                      args.max_query_length)
            except ValueError as e:
                raise SystemExit(f"--train_mode mrc: {e}") from None

        room = args.max_seq_length - args.max_query_length - 3
        if args.doc_stride > room:
            self.ctx.log(f"[mrc] --doc_stride {args.doc_stride} exceeds the context room of a window "
                         f"({room} tokens with --max_seq_length {args.max_seq_length}, --max_query_length "
                         f"{args.max_query_length}): windows will not overlap, answers across a cut are lost")
        self.dataset = MRCDataset(features(train)) if train else None
        if self.dataset is not None:
            try:
                warning = check_answer_alignment(self.dataset.features, f"--train_file {args.train_file}")
            except ValueError as e:
                raise SystemExit(f"--train_mode mrc: {e}") from None
            if warning:
                self.ctx.log(f"[mrc] warning: {warning}")
        self.eval_features = features(evals)
        self.eval_dataset = MRCDataset(self.eval_features)
        # SQuAD 2.0-style data (questions without an answer, trained to point at [CLS]): empty predictions
        unanswerable = {name: sum(1 for e in rows if not e.answers) for name, rows in (("train", train), ("eval", evals))}
        self.null_answers = any(unanswerable.values())
        if self.null_answers:
            self.ctx.log(f"[mrc] questions without an answer (SQuAD 2.0 style): {unanswerable['train']} of {len(train)} "
                         f"training, {unanswerable['eval']} of {len(evals)} evaluation; they are trained to point at "
                         f"[CLS], and a prediction is empty where [CLS] scores above the best span")
        self.model = build_model(self.config, "mrc")
        if self.dataset is not None:
            self.ctx.log(f"[mrc] train {self.dataset.features.stats}")
        self.ctx.log(f"[mrc] eval {self.eval_features.stats}")

    def make_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        L = self.args.max_seq_length
        g = torch.Generator().manual_seed(0)
        batch = self.random_rows(batch_size, token_type=1, generator=g)
        batch["start_positions"] = torch.randint(0, L, (batch_size,), generator=g)
        batch["end_positions"] = torch.randint(0, L, (batch_size,), generator=g)
        return self.to_device(batch)

    def evaluate(self, engine) -> dict[str, float]:
        from data.metrics import squad_em_f1
        from data.mrc import postprocess, write_predictions
        from trainer import dist

        ds = self.eval_dataset
        lo, hi = shard_range(len(ds), self.ctx.rank, self.ctx.world_size)
        out = self.predict(engine, ds, range(lo, hi), ["start_logits", "end_logits"], desc="eval mrc")
        result = None
        if out is not None:
            starts = [row for batch in out["start_logits"] for row in batch]
            ends = [row for batch in out["end_logits"] for row in batch]
            predictions = postprocess(self.eval_features, starts, ends, null_answers=self.null_answers)
            path = write_predictions(predictions, run_dir(self.args) / "predictions.json")
            scores = squad_em_f1(predictions, self.eval_features.examples)
            self.ctx.log(f"[mrc] {scores['total']} questions, predictions in {path}")
            result = {"exact_match": scores["exact_match"], "f1": scores["f1"]}
        return dist.broadcast_object(result)
