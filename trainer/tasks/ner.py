"""train_mode ner: KLUE NER character tagging (data/ner.py), optionally with a CRF (--crf);
entity F1 (seqeval, strict IOB2), KLUE's character macro F1 and per-type F1 on --eval_file (or
the sentences data.pairs.hash_split holds out of --train_file); per-character predictions in
output_dir/model_name/predictions.tsv (KLUE layout)."""
from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import torch

from trainer.args import run_dir
from trainer.dist import DistContext
from trainer.tasks.base import Task, shard_range


def write_predictions(dataset, predicted: list[list[str]], path: Path) -> Path:
    """KLUE NER layout: '## guid<TAB>text', then 'char<TAB>predicted tag' lines, blank line between."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for s, tags in zip(dataset.sentences, predicted):
            f.write(f"## {s.guid}\t{s.text}\n")
            f.writelines(f"{c}\t{t}\n" for c, t in zip(s.text, tags))
            f.write("\n")
    tmp.replace(path)
    return path


class NERTask(Task):
    name = "ner"
    unpad = ("train", "eval")

    def __init__(self, args: Namespace, ctx: DistContext, start=None):
        super().__init__(args, ctx, start)
        from data.ner import CHAR_SLOTS, NERDataset, label_list, load_klue_ner
        from data.pairs import hash_split
        from models import build_model

        try:
            train = load_klue_ner(args.train_file) if args.train_file else []
            if args.eval_file:
                evals = load_klue_ner(args.eval_file)
            elif train:
                train, evals = hash_split(train, lambda s: s.guid, args.eval_fraction)
            else:
                raise SystemExit("--train_mode ner needs --train_file and/or --eval_file")
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"--train_mode ner: {e}") from None
        train, evals = self.limit(train, "max_train_examples"), self.limit(evals, "max_eval_examples")
        if not evals:
            raise SystemExit(f"--train_mode ner: no evaluation sentences (--eval_fraction {args.eval_fraction} of "
                             f"{len(train)}); raise --eval_fraction or pass --eval_file")
        self.tokenizer = self.load_tokenizer()
        self.labels = label_list(train or evals)
        known = self.start.label_names() if self.start.train_mode() == "ner" else None
        if known and set(self.labels) <= set(known):  # the checkpoint's tagger: its tag ids, as trained
            self.labels = list(known)
        elif known and not train:
            raise SystemExit(f"--train_mode ner: --eval_file {args.eval_file} has tags {sorted(set(self.labels) - set(known))} "
                             f"that --checkpoint {self.start.path} was not trained on (its tags: {known}); evaluate it on "
                             f"a file of its entity types, or fine-tune it on these (--train_file)")
        elif known:
            self.ctx.log(f"[ner] the files' tags differ from those of --checkpoint {self.start.path} ({known}): "
                         f"the tag layer starts fresh")
            self.fresh_weights = ("tag_head.", "crf.")
        self.label_names = self.labels  # recorded in the checkpoints: an evaluation of them reads the same ids
        L, stride = args.max_seq_length, args.doc_stride
        try:
            self.dataset = NERDataset(train, self.tokenizer, self.labels, L, stride) if train else None
            self.eval_dataset = NERDataset(evals, self.tokenizer, self.labels, L, stride)
        except ValueError as e:
            raise SystemExit(f"--train_mode ner: {e}") from None
        self.model = build_model(self.config, "ner", num_labels=len(self.labels), slots=CHAR_SLOTS, crf=args.crf)
        if self.dataset is not None:
            self.ctx.log(f"[ner] train {self.dataset.stats}; tags {self.labels}{' + CRF' if args.crf else ''}")
        self.ctx.log(f"[ner] eval {self.eval_dataset.stats}")

    def make_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        from data.ner import CHAR_SLOTS

        L = self.args.max_seq_length
        g = torch.Generator().manual_seed(0)
        batch = self.random_rows(batch_size, generator=g)
        n = L * 2  # Korean tokens hold 1-2 characters on average: a generous bound
        batch["char_index"] = torch.randint(0, L * CHAR_SLOTS, (batch_size, n), generator=g)
        batch["char_labels"] = torch.randint(0, len(self.labels), (batch_size, n), generator=g)
        batch["char_mask"] = torch.ones(batch_size, n, dtype=torch.long)
        return self.to_device(batch)

    def evaluate(self, engine) -> dict[str, float]:
        from data.metrics import ner_scores
        from data.ner import clean_tags
        from trainer import dist

        ds = self.eval_dataset
        lo, hi = shard_range(len(ds), self.ctx.rank, self.ctx.world_size)
        out = self.predict(engine, ds, range(lo, hi), ["char_tags"], desc="eval ner", decode=True)
        result = None
        if out is not None:
            rows = [row for batch in out["char_tags"] for row in batch]
            predicted = ds.sentence_tags(rows)
            path = write_predictions(ds, predicted, run_dir(self.args) / "predictions.tsv")
            result = ner_scores([clean_tags(s.text, s.tags) for s in ds.sentences],
                                [clean_tags(s.text, p) for s, p in zip(ds.sentences, predicted)], self.labels)
            self.ctx.log(f"[ner] {len(ds.sentences)} sentences, predictions in {path}")
        return dist.broadcast_object(result)
