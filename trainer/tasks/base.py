"""Shared pieces of the tasks: model config checks, tokenizer resolution, token counting."""
from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import torch
import torch.nn as nn

from trainer import dist
from trainer.dist import DistContext


class Task:
    name = "base"
    model: nn.Module
    dataset: torch.utils.data.Dataset | None = None

    def __init__(self, args: Namespace, ctx: DistContext):
        from models import load_config

        self.args, self.ctx = args, ctx
        try:
            self.config = load_config(args.model)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"--model {args.model}: {e}") from None
        if args.max_seq_length > self.config.max_position_embedding:
            raise SystemExit(
                f"--max_seq_length {args.max_seq_length} exceeds the model's max_position_embedding "
                f"{self.config.max_position_embedding} ({args.model}); lower --max_seq_length or use a config "
                f"with a larger max_position_embedding")
        self.tokenizer_dir: Path | None = None

    # -- hooks -------------------------------------------------------------------------
    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return self.dataset.collate(samples)

    def make_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"--train_batch_size 0 is not supported for --train_mode {self.name}")

    def attach(self, engine) -> None:
        if hasattr(engine.module, "gather_fn"):
            engine.module.gather_fn = dist.all_gather_with_grad

    def evaluate(self, engine) -> dict[str, float]:
        return {}

    @staticmethod
    def count_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor | int:
        """Real (non-padding) tokens in a batch: every *attention_mask summed."""
        masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
        return sum(m.sum() for m in masks) if masks else 0

    # -- tokenizer ---------------------------------------------------------------------
    def load_tokenizer(self, train_inputs: list[str] | None = None):
        """--tokenizer, else <corpus>.tokenizer beside the corpus, trained there (rank 0) if missing."""
        from data.tokenizer import KoTokenizer, check_vocab_size, train_tokenizer

        args = self.args
        if args.tokenizer:
            path = Path(args.tokenizer)
        elif train_inputs:
            first = Path(train_inputs[0])
            path = first.with_name(first.name + ".tokenizer")
            if self.ctx.is_main and not (path / "tokenizer.json").is_file():
                print(f"[tokenizer] none given: training WordPiece (vocab {self.config.vocab_size}, "
                      f"morpheme {args.morpheme}) on {first} into {path}", flush=True)
                train_tokenizer(train_inputs, self.config.vocab_size, path,
                                morpheme=None if args.morpheme == "none" else args.morpheme)
            dist.barrier()
        else:
            raise SystemExit("no tokenizer: pass --tokenizer DIR (a tokenizer.json directory)")
        tok = KoTokenizer.load(path)
        try:
            check_vocab_size(tok, self.config.vocab_size)
        except ValueError as e:
            raise SystemExit(f"{e} (tokenizer {path}, model {args.model})") from None
        self.tokenizer_dir = path
        return tok
