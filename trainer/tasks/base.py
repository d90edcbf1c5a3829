"""Shared pieces of the tasks: model config checks, checkpoint/tokenizer matching, token
counting, and `predict` (sharded inference through the wrapped model) for the evaluations."""
from __future__ import annotations

import math
import os
from argparse import Namespace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from trainer import dist
from trainer.dist import DistContext


_TOKENIZER_FIX = "move it away or pass --tokenizer DIR"


class Task:
    name = "base"
    model: nn.Module
    dataset: torch.utils.data.Dataset | None = None
    # --unpad auto opts a task in: "train" = length-bucketed training micro-batches (its samples
    # need input_ids), "eval" = `predict` runs length-sorted batches and restores the order
    unpad: tuple[str, ...] = ()
    # prefixes of model weights not to take from --checkpoint (a head that means other labels there)
    fresh_weights: tuple[str, ...] = ()

    def __init__(self, args: Namespace, ctx: DistContext, start=None):
        """start: the resolved --checkpoint (`checkpoint.Start`; the loop resolves it once and has
        checked its model config), resolved here when None."""
        from models import load_config
        from trainer import checkpoint
        from trainer.args import run_dir

        self.args, self.ctx = args, ctx
        self.config = load_config(args.model)  # validated by trainer.args.validate_args
        self.tokenizer_dir: Path | None = None
        if start is None:
            try:
                start = checkpoint.resolve_start(args.checkpoint, run_dir(args))
            except checkpoint.CheckpointError as e:
                raise SystemExit(str(e)) from None
        self.start = start
        self.checkpoint_tokenizer: Path | None = start.tokenizer()  # for `load_tokenizer`

    # -- hooks -------------------------------------------------------------------------
    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return self.dataset.collate(samples)

    def make_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"--train_batch_size 0 is not supported for --train_mode {self.name}")

    def random_rows(self, batch_size: int, length: int | None = None, prefix: str = "",
                    token_type: int | None = 0, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Full-length rows of random non-special ids, no padding: for `make_batch`, an upper bound
        on a real batch's memory. token_type None leaves out token_type_ids."""
        L, V = length or self.args.max_seq_length, self.config.vocab_size
        rows = {prefix + "input_ids": torch.randint(6, V, (batch_size, L), generator=generator),
                prefix + "attention_mask": torch.ones(batch_size, L, dtype=torch.long)}
        if token_type is not None:
            rows[prefix + "token_type_ids"] = torch.full((batch_size, L), token_type, dtype=torch.long)
        return rows

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's tensors on this process's device (a collate's plain values, such as
        models.tasks.pretrain_hints' padded, as they are)."""
        return {k: v.to(self.ctx.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def attach(self, engine) -> None:
        if hasattr(engine.module, "gather_fn"):
            engine.module.gather_fn = dist.all_gather_with_grad

    def evaluate(self, engine) -> dict[str, float]:
        return {}

    def validation_metrics(self) -> list[str]:
        """Names of what `validate` returns ([] = no periodic validation)."""
        return []

    def validate(self, engine) -> dict[str, float]:
        """Held-out metrics during training: the loop calls it every --eval_steps and at the last step."""
        return {}

    @staticmethod
    def loss_tokens(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | int]:
        """The losses of the model's output that are a mean over tokens of the micro-batch (name ->
        how many tokens in this batch, a tensor on its device: no host sync). The loop weights each by
        its micro-batch's share of the step's tokens (all micro-batches, all processes), so that a step
        trains on the mean over all of them whatever the split (--train_batch_size x processes x
        accumulation), as one batch would. {}: every loss is a mean over rows (each micro-batch holds
        as many)."""
        return {}

    @staticmethod
    def count_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor | int:
        """Real (non-padding) tokens in a batch: every *attention_mask summed."""
        masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
        return sum(m.sum() for m in masks) if masks else 0

    def unpads(self, what: str) -> bool:
        """Whether --unpad applies to `what` ("train" or "eval") here: the task opted in, --unpad
        auto, and the model computes each sample alone (Switch MoE layers do not: expert capacity
        is shared by the tokens of a batch, so regrouping samples changes their outputs)."""
        return (what in self.unpad and getattr(self.args, "unpad", "off") == "auto"
                and not self.config.is_moe)

    def train_lengths(self) -> np.ndarray | None:
        """Tokens of every training sample when training batches are length-bucketed, else None."""
        from trainer.sampler import example_lengths

        if self.dataset is None or not self.unpads("train"):
            return None
        self.ctx.log("[unpad] training micro-batches of similar lengths, each padded to its own longest row "
                     "(--unpad off: random batches)")
        return example_lengths(self.dataset)

    # -- checkpoint and tokenizer ------------------------------------------------------
    def _tokenizer_path(self) -> Path | None:
        """--tokenizer if given (it must be the checkpoint's, when there is a checkpoint), else the
        checkpoint's tokenizer, else None."""
        args, ckpt_tok = self.args, self.checkpoint_tokenizer
        if ckpt_tok is not None and not (ckpt_tok / "tokenizer.json").is_file():
            if not args.tokenizer:
                raise SystemExit(f"--checkpoint {args.checkpoint} was trained with the tokenizer {ckpt_tok}, which "
                                 f"no longer exists; pass that tokenizer with --tokenizer DIR")
            self.ctx.log(f"[tokenizer] cannot check --tokenizer {args.tokenizer} against the checkpoint's "
                         f"{ckpt_tok} (gone)")
            return Path(args.tokenizer)
        if not args.tokenizer:
            return ckpt_tok
        given = Path(args.tokenizer)
        if ckpt_tok is not None:
            mine, theirs = _load_tokenizer(given), _load_tokenizer(ckpt_tok)
            if mine.ids_key != theirs.ids_key:  # (an export's copy, with its [CLS] A [SEP] template, is the same)
                raise SystemExit(
                    f"--tokenizer {given} (vocab {mine.vocab_size}, fingerprint {mine.fingerprint}) is not the "
                    f"tokenizer --checkpoint {args.checkpoint} was trained with ({ckpt_tok}: vocab "
                    f"{theirs.vocab_size}, fingerprint {theirs.fingerprint}); token ids would not match the "
                    f"trained embeddings. Leave out --tokenizer to use the checkpoint's, or pass --tokenizer {ckpt_tok}")
        return given

    def _train_tokenizer_once(self, train_inputs: list[str], path: Path) -> None:
        """Train the tokenizer into `path` unless another process has: the first process to take the
        file lock beside it trains (into a staging folder, renamed into place), every other process of
        the job, on any node, waits on that lock, outside any collective, so a training longer than
        the process-group timeout cannot kill the job. On node-local disks each node trains its own
        copy, byte-identical (the trainer is deterministic)."""
        from data.corpus import _file_lock
        from data.tokenizer import train_tokenizer
        from trainer.safety import UnsafeWrite, check_replaceable, staged_dir

        try:  # a folder of the user's there is refused before anything is written (also the lock)
            check_replaceable(path, fix=_TOKENIZER_FIX)
        except UnsafeWrite as e:
            raise SystemExit(f"cannot train the tokenizer into {path}: {e}") from None

        def train_holding_the_lock() -> None:
            if (path / "tokenizer.json").is_file():
                return
            if os.environ.get("TOKENIZER_TEST_TRAIN_DELAY"):  # tests: a training longer than the pg timeout
                import time
                time.sleep(float(os.environ["TOKENIZER_TEST_TRAIN_DELAY"]))
            print(f"[tokenizer] none given: rank {self.ctx.rank} trains WordPiece (vocab {self.config.vocab_size}, "
                  f"morpheme {self.args.morpheme}) on {train_inputs[0]} into {path}", flush=True)
            try:  # staged beside `path`, swapped in when complete (staged_dir checks `path` again)
                with staged_dir(path, fix=_TOKENIZER_FIX) as tmp:
                    train_tokenizer(train_inputs, self.config.vocab_size, tmp,
                                    morpheme=None if self.args.morpheme == "none" else self.args.morpheme)
            except UnsafeWrite as e:
                raise SystemExit(f"cannot train the tokenizer into {path}: {e}") from None

        lock = path.with_name(path.name + ".lock")
        # the lock taken at the first try is kept (not released and taken again: another process could
        # take it in between, and this one would then wait without saying so)
        with _file_lock(lock, blocking=False) as mine:
            if mine:
                train_holding_the_lock()
                return
        print(f"[tokenizer] rank {self.ctx.rank}: waiting for the tokenizer another process is "
              f"training into {path}", flush=True)
        with _file_lock(lock):
            train_holding_the_lock()

    def _check_auto_tokenizer(self, tok, path: Path) -> None:
        """The tokenizer a launcher trained beside the corpus (`tok`, loaded from `path`) is reused only
        for what it was trained for: the model's vocab_size and --morpheme (a run asking for another
        would silently get it)."""
        want = (self.config.vocab_size, None if self.args.morpheme == "none" else self.args.morpheme)
        have = (tok.vocab_size, tok.morpheme)
        if tok.foreign or have == want:
            return
        raise SystemExit(
            f"{path} (trained automatically beside the corpus by an earlier run) has vocab {have[0]}, morpheme "
            f"{have[1] or 'none'}; this run asks for vocab {want[0]} (--model {self.args.model}), --morpheme "
            f"{want[1] or 'none'}. Pass a tokenizer made for it with --tokenizer DIR (python -m data.tokenizer "
            f"train --input CORPUS --vocab_size {want[0]}{f' --morpheme {want[1]}' if want[1] else ''} --out DIR), "
            f"or move {path} away to have one trained there")

    def load_tokenizer(self, train_inputs: list[str] | None = None):
        """--tokenizer, else the checkpoint's tokenizer, else <corpus>.tokenizer beside the corpus,
        trained there (by the first process to get its lock) if missing."""
        from data.tokenizer import check_vocab_size, lacks_tokenizer_json, missing_tokenizer_hint

        args = self.args
        path = self._tokenizer_path()
        # the folder of the weights --checkpoint resolved to (a step-N records its tokenizer)
        folder = self.start.path.parent if self.start.kind == "weights" else None
        if path is None and folder is not None and lacks_tokenizer_json(folder):
            # a transformers folder whose tokenizer is vocab.txt alone: a tokenizer trained here would not
            # give the ids its embeddings were trained on
            raise SystemExit(f"--checkpoint {args.checkpoint} has no tokenizer.json: {missing_tokenizer_hint(folder)}")
        if path is None and train_inputs:
            first = Path(train_inputs[0])
            path = first.with_name(first.name + ".tokenizer")
            if not (path / "tokenizer.json").is_file():
                self._train_tokenizer_once(train_inputs, path)
            tok = _load_tokenizer(path)
            self._check_auto_tokenizer(tok, path)
        elif path is None:
            raise SystemExit(f"--train_mode {args.train_mode} needs a tokenizer: pass --checkpoint (a pretrained "
                             f"model; its tokenizer is used) or --tokenizer DIR (a tokenizer.json directory)")
        else:
            tok = _load_tokenizer(path)
        if args.morpheme != "none" and tok.morpheme != args.morpheme:  # given, or the checkpoint's
            raise SystemExit(f"--morpheme {args.morpheme} chooses how a tokenizer trained here cuts words, but this "
                             f"run uses {path} (morpheme {tok.morpheme or 'none'}, recorded in its "
                             f"pretokenizer.json, which decides how text is cut); drop --morpheme, or pass a "
                             f"tokenizer trained with it (python -m data.tokenizer train ... --morpheme "
                             f"{args.morpheme})")
        try:
            check_vocab_size(tok, self.config.vocab_size)
        except ValueError as e:
            if folder is not None and Path(path).resolve() == folder.resolve():
                # the tokenizer beside the weights (a transformers or exported folder): neither of the usual
                # fixes applies, the weights' vocabulary is fixed
                raise SystemExit(
                    f"--checkpoint {args.checkpoint}: the tokenizer beside its weights ({path}/tokenizer.json) has "
                    f"{tok.vocab_size} tokens but the weights have {self.config.vocab_size} embedding rows "
                    f"(vocab_size of its config.json), so it is not the tokenizer this model was trained with; put "
                    f"the model's own tokenizer.json there, or pass it with --tokenizer DIR") from None
            raise SystemExit(f"{e} (tokenizer {path}, model {args.model})") from None
        if tok.foreign:
            ids = ", ".join(f"{r} {tok.named()[r]}={i}" for r, i in tok.roles.items() if r != "eod")
            eod = ("" if tok.eod_id != tok.sep_id or args.train_mode != "pretrain" else
                   f"; it has no [EOD], so pretraining documents end with {tok.named()['sep']}")
            self.ctx.log(f"[tokenizer] {path}: not trained here; special tokens {ids}{eod}")
        self.tokenizer_dir = path
        return tok

    # -- data limits and inference ---------------------------------------------------
    def limit(self, items: list, flag: str) -> list:
        """The first --max_train_examples / --max_eval_examples items (0 = all)."""
        n = getattr(self.args, flag, 0) or 0
        return items[:n] if n else items

    def predict(self, engine, dataset, indices: Sequence[int], keys: Sequence[str], desc: str = "eval",
                **forward_kwargs) -> dict[str, list[np.ndarray]] | None:
        """Run the wrapped model without gradients over `dataset[i] for i in indices` (this
        process's share) in batches of --eval_batch_size; on rank 0 return, per output key, the
        per-batch float arrays of every process in rank order (None on other ranks).

        Every process makes the same number of forward calls (FSDP and ZeRO-3 gather parameters
        inside each call): a process with fewer rows repeats dataset[0] and drops the result.
        With --unpad (`unpads("eval")`) the rows run longest first, each batch padded to its own
        longest row, and come back in the order of `indices`: the arrays then group consecutive
        rows of one shape instead of following the batches.
        """
        bs = self.args.eval_batch_size
        order = None  # with --unpad: positions of `indices` in the order they run (longest first)
        if self.unpads("eval"):
            from trainer.sampler import example_lengths, length_sorted

            order = length_sorted(example_lengths(dataset, indices))
            indices = [indices[p] for p in order]
        count = torch.tensor([math.ceil(len(indices) / bs)], dtype=torch.int64, device=self.ctx.device)
        num_batches = int(dist.all_reduce(count, "max").item())
        model = engine.model
        outputs: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        bar = None
        if self.ctx.is_main and not self.args.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=num_batches, desc=desc, dynamic_ncols=True)
        engine.train(False)
        try:
            with torch.no_grad():
                for b in range(num_batches):
                    rows = list(indices[b * bs:(b + 1) * bs])
                    batch = dataset.collate([dataset[i] for i in (rows or [0])])
                    batch = self.to_device(batch) | forward_kwargs
                    with engine.autocast():
                        out = model(**batch)
                    if rows:
                        for k in keys:
                            outputs[k].append(out[k].detach().float().cpu().numpy())
                    if bar is not None:
                        bar.update(1)
        finally:
            engine.train(True)
            if bar is not None:
                bar.close()
        if order is not None:
            outputs = {k: restore_order(v, order) for k, v in outputs.items()}
        return gather_to_main(outputs, self.ctx)


def _load_tokenizer(path: Path):
    """KoTokenizer.load with its error as the exit message (a checkpoint's tokenizer is not checked
    by validate_args)."""
    from data.tokenizer import KoTokenizer, TokenizerError

    try:
        return KoTokenizer.load(path)
    except (TokenizerError, FileNotFoundError) as e:
        raise SystemExit(f"tokenizer {path}: {e}") from None


def restore_order(batches: list[np.ndarray], order: np.ndarray) -> list[np.ndarray]:
    """Rows of `batches` (row p is sample order[p]) back in sample order, as arrays of consecutive
    rows of one shape (rows padded to their batch's length differ in shape)."""
    rows = [row for b in batches for row in b]
    restored = [None] * len(rows)
    for p, i in enumerate(order):
        restored[i] = rows[p]
    out, run = [], []
    for row in restored:
        if run and row.shape != run[0].shape:
            out.append(np.stack(run))
            run = []
        run.append(row)
    if run:
        out.append(np.stack(run))
    return out


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous block [lo, hi) of n items that process `rank` of `world` takes."""
    per = math.ceil(n / world)
    lo = min(n, rank * per)
    return lo, min(n, lo + per)


def gather_to_main(outputs: dict[str, list], ctx: DistContext) -> dict[str, list] | None:
    """Per-key lists of every process concatenated in rank order, on rank 0 (None elsewhere)."""
    import torch.distributed as tdist

    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return outputs
    parts = [None] * tdist.get_world_size() if ctx.is_main else None
    tdist.gather_object(outputs, parts, dst=0)
    if not ctx.is_main:
        return None
    return {k: [a for p in parts for a in p[k]] for k in outputs}
