"""train_mode pretrain: MLM + SOP / ICT (or MLM alone) on a corpus spec (file, directory, glob,
weighted list: data.spec), with optional validation on held-out documents (--eval_fraction) or a
held-out corpus (--eval_corpus) every --eval_steps and at the end."""
from __future__ import annotations

import math
from argparse import Namespace

import numpy as np
import torch

from trainer import dist
from trainer.dist import DistContext
from trainer.tasks.base import Task

EVAL_ORDER_KEY = 104729  # the fixed validation sample order: default_rng([seed, EVAL_ORDER_KEY])


# more lines per document than any real document has (a book ~5-10k): the blank lines between documents
# are missing (a corpus of one document per line read as one document)
LINES_PER_DOCUMENT_WARNING = 10_000


class PretrainTask(Task):
    name = "pretrain"

    def __init__(self, args: Namespace, ctx: DistContext, start=None):
        super().__init__(args, ctx, start)
        from data.corpus import open_corpus
        from data.pretrain import PretrainDataset
        from data.spec import SpecError, check_disjoint, resolve
        from models import build_model

        try:
            spec = resolve(args.corpus_path)
            eval_spec = resolve(args.eval_corpus) if args.eval_corpus else None
            if eval_spec is not None:
                check_disjoint(spec, eval_spec)
        except SpecError as e:
            raise SystemExit(f"--corpus_path/--eval_corpus: {e}") from None
        self.tokenizer = self.load_tokenizer([str(s) for s in spec.shards])
        # every process builds its share of the shard caches and waits for the rest by polling the
        # file system: no collective (whose timeout a long build would exceed)
        build = dict(rank=ctx.rank, world_size=ctx.world_size, progress=ctx.is_main and not args.no_progress,
                     log=lambda m: print(m, flush=True))
        flag = "--corpus_path"
        try:
            corpus = open_corpus(spec, self.tokenizer, **build)
            flag = "--eval_corpus"
            eval_corpus = open_corpus(eval_spec, self.tokenizer, **build) if eval_spec else None
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"{flag} {args.eval_corpus if eval_spec and flag == '--eval_corpus' else args.corpus_path}"
                             f": {e}") from None
        if args.objective in ("sop", "ict") and corpus.num_sentences >= LINES_PER_DOCUMENT_WARNING * corpus.num_documents:
            ctx.log(f"[pretrain] warning: {args.corpus_path} has {corpus.num_documents} document(s) in "
                    f"{corpus.num_sentences} lines: documents are separated by blank lines, and --objective "
                    f"{args.objective} pairs the sentences of one document. A corpus of one document per line needs "
                    f"its sentences on lines of their own and a blank line after each document (or use --objective "
                    f"mlm)")
        common = dict(objective=args.objective, mlm_probability=args.mlm_probability,
                      whole_word_mask=args.whole_word_mask, seed=args.seed,
                      mlm_separator=args.mlm_separator, mlm_packing=args.mlm_packing)
        fraction = args.eval_fraction or 0.0
        flag = "--corpus_path"
        try:
            self.dataset = PretrainDataset(corpus, self.tokenizer, args.max_seq_length,
                                           split="train" if fraction else "all", eval_fraction=fraction, **common)
            self.eval_dataset = None
            if eval_corpus is not None:
                flag = "--eval_corpus"
                self.eval_dataset = PretrainDataset(eval_corpus, self.tokenizer, args.max_seq_length, **common)
            elif fraction:
                flag = "--eval_fraction"
                self.eval_dataset = PretrainDataset(corpus, self.tokenizer, args.max_seq_length, split="eval",
                                                    eval_fraction=fraction, **common)
        except ValueError as e:  # e.g. no document has two sentences for SOP
            raise SystemExit(f"{flag} {getattr(args, flag[2:])} (--objective {args.objective}): {e}") from None
        self.eval_indices: list[int] = []
        if self.eval_dataset is not None:
            order = np.random.default_rng([args.seed, EVAL_ORDER_KEY]).permutation(len(self.eval_dataset))
            self.eval_indices = order[:args.eval_samples].tolist()
            held = (f"{self.eval_dataset.stats['documents']} held-out documents" if fraction
                    else f"--eval_corpus {args.eval_corpus}")
            ctx.log(f"[pretrain] validation: {len(self.eval_indices)} of {len(self.eval_dataset)} samples of {held}; "
                    f"training on {len(self.dataset)} samples of {self.dataset.stats['documents']} documents")
        self.last_validation: dict[str, float] = {}
        self.model = build_model(self.config, "pretrain", objective=args.objective, temperature=args.temperature,
                                 pooling=args.pooling)

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """The dataset's batch with models.tasks.pretrain_hints (on the host: the forward then reads
        nothing back from the GPU)."""
        return self.with_hints(self.dataset.collate(samples))

    def with_hints(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from models.tasks import pretrain_hints
        return batch | pretrain_hints(batch, self.args.objective)

    @staticmethod
    def loss_tokens(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | int]:
        """The MLM loss is a mean over the predicted tokens of its micro-batch: their number (see Task)."""
        return {"mlm_loss": sum((v != -100).sum() for k, v in batch.items() if k.endswith("mlm_labels"))}

    # -- validation --------------------------------------------------------------------
    def validation_metrics(self) -> list[str]:
        if self.eval_dataset is None:
            return []
        extra = {"sop": ["sop_acc"], "ict": ["ict_acc"]}.get(self.args.objective, [])
        return ["mlm_loss", "mlm_acc", "perplexity", *extra]

    def validate(self, engine) -> dict[str, float]:
        """MLM loss/accuracy/perplexity (+ SOP or ICT accuracy) of the fixed validation samples.

        The samples form fixed batches of --eval_batch_size (ICT scores each batch on its own, no
        negatives from other processes), dealt round-robin to the processes; per-batch sums are
        all-reduced, so every process count gives the same values. Every process makes the same
        number of forward calls (sharded engines gather parameters inside each); the global RNG
        states are left as they were, so validating does not change training."""
        if self.eval_dataset is None:
            return {}
        ds, idx, bs = self.eval_dataset, self.eval_indices, self.args.eval_batch_size
        num_batches = math.ceil(len(idx) / bs)
        rank, world = self.ctx.rank, self.ctx.world_size
        pair_key = {"sop": "sop_acc", "ict": "ict_acc"}.get(self.args.objective)
        # mlm loss sum, mlm correct, masked tokens, pair correct, rows: summed on the device, read once
        sums = torch.zeros(5, dtype=torch.float64, device=self.ctx.device)
        module = engine.module
        gather = getattr(module, "gather_fn", None)
        if gather is not None:
            from models.tasks import local_only
            module.gather_fn = local_only
        engine.train(False)
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                for k in range(math.ceil(num_batches / world)):
                    b = rank + k * world
                    rows = idx[b * bs:(b + 1) * bs] if b < num_batches else idx[:1]
                    host = self.with_hints(ds.collate([ds[i] for i in rows]))
                    with engine.autocast():
                        out = engine.model(**self.to_device(host))
                    if b >= num_batches:
                        continue
                    masked = sum(int((v != -100).sum()) for key, v in host.items() if key.endswith("mlm_labels"))
                    sums[0] += out["mlm_loss"].double() * masked
                    sums[1] += out["mlm_acc"].double() * masked
                    sums[2] += masked
                    if pair_key:
                        sums[3] += out[pair_key].double() * len(rows)
                    sums[4] += len(rows)
        finally:
            engine.train(True)
            if gather is not None:
                module.gather_fn = gather
        sums = dist.all_reduce(sums, "sum").cpu()
        loss = float(sums[0] / max(sums[2], 1))
        result = {"mlm_loss": loss, "mlm_acc": float(sums[1] / max(sums[2], 1)),
                  "perplexity": math.exp(min(loss, 700.0))}
        if pair_key:
            result[pair_key] = float(sums[3] / max(sums[4], 1))
        self.last_validation = result
        return result

    def evaluate(self, engine) -> dict[str, float]:
        """After training: the validation of the last step (computed now when training did not run)."""
        return self.last_validation or self.validate(engine)

    def make_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Full-length rows with ~20% of positions predicted: an upper bound on a real batch's memory."""
        g = torch.Generator().manual_seed(0)

        def rows(prefix: str = "") -> dict[str, torch.Tensor]:
            out = self.random_rows(batch_size, prefix=prefix, token_type=None if prefix else 0, generator=g)
            ids = out[prefix + "input_ids"]
            labels = torch.full_like(ids, -100)
            pick = torch.rand(ids.shape, generator=g) < max(0.2, self.args.mlm_probability * 1.3)
            labels[pick] = ids[pick]
            return out | {prefix + "mlm_labels": labels}

        if self.args.objective == "ict":
            batch = rows("query_") | rows("passage_")
        else:
            batch = rows()
            if self.args.objective == "sop":
                batch["sop_labels"] = torch.randint(0, 2, (batch_size,), generator=g)
        return self.to_device(self.with_hints(batch))
