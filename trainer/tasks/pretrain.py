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
        L, V = self.args.max_seq_length, self.config.vocab_size
        dev = self.ctx.device

        def rows(prefix: str = "") -> dict[str, torch.Tensor]:
            ids = torch.randint(6, V, (batch_size, L), generator=g)
            labels = torch.full((batch_size, L), -100)
            pick = torch.rand(batch_size, L, generator=g) < max(0.2, self.args.mlm_probability * 1.3)
            labels[pick] = ids[pick]
            out = {prefix + "input_ids": ids, prefix + "attention_mask": torch.ones(batch_size, L, dtype=torch.long),
                   prefix + "mlm_labels": labels}
            if not prefix:
                out["token_type_ids"] = torch.zeros(batch_size, L, dtype=torch.long)
            return out

        if self.args.objective == "ict":
            batch = rows("query_") | rows("passage_")
        else:
            batch = rows()
            if self.args.objective == "sop":
                batch["sop_labels"] = torch.randint(0, 2, (batch_size,), generator=g)
        return {k: v.to(dev) for k, v in batch.items()}
