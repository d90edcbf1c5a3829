"""train_mode pretrain: MLM + SOP / ICT (or MLM alone) on a .dat corpus."""
from __future__ import annotations

from argparse import Namespace

import torch

from trainer import dist
from trainer.dist import DistContext
from trainer.tasks.base import Task


class PretrainTask(Task):
    name = "pretrain"

    def __init__(self, args: Namespace, ctx: DistContext):
        super().__init__(args, ctx)
        from data.corpus import load_or_build
        from data.pretrain import PretrainDataset
        from models import build_model

        self.tokenizer = self.load_tokenizer([args.corpus_path])
        try:
            cache = load_or_build(args.corpus_path, self.tokenizer, is_main=ctx.is_main, barrier=dist.barrier,
                                  progress=ctx.is_main and not args.no_progress)
        except ValueError as e:
            raise SystemExit(f"--corpus_path {args.corpus_path}: {e}") from None
        try:
            self.dataset = PretrainDataset(cache, self.tokenizer, args.max_seq_length, objective=args.objective,
                                           mlm_probability=args.mlm_probability,
                                           whole_word_mask=args.whole_word_mask, seed=args.seed)
        except ValueError as e:  # e.g. no document has two sentences for SOP
            raise SystemExit(f"--corpus_path {args.corpus_path} (--objective {args.objective}): {e}") from None
        self.model = build_model(self.config, "pretrain", objective=args.objective, temperature=args.temperature,
                                 pooling=args.pooling)

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
        return self.to_device(batch)
