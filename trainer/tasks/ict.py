"""train_mode ict: retrieval fine-tuning on (question, passage) pairs with in-batch negatives
gathered from every process (`trainer.dist.all_gather_with_grad`: each query scores world_size x
batch passages), cosine similarity over --temperature; recall@1/5/20/100 and MRR of held-out
KorQuAD questions against every (deduplicated) paragraph of the KorQuAD file."""
from __future__ import annotations

from argparse import Namespace

import numpy as np
import torch

from data.retrieval import QueryView, is_squad_file, read_pairs_tsv
from trainer.dist import DistContext
from trainer.tasks.base import Task, shard_range


class ICTTask(Task):
    name = "ict"

    def __init__(self, args: Namespace, ctx: DistContext, start=None):
        super().__init__(args, ctx, start)
        from data.mrc import load_squad, split_by_article
        from data.retrieval import PairDataset, korquad_eval_set, korquad_pairs
        from models import build_model

        self.tokenizer = self.load_tokenizer()
        self.eval_set = None
        try:
            train_pairs = []
            held_out, eval_path = None, args.eval_file
            if args.train_file and is_squad_file(args.train_file):
                examples = load_squad(args.train_file)
                if not args.eval_file:
                    examples, held_out = split_by_article(examples, args.eval_fraction, seed=args.seed)
                    eval_path = args.train_file
                train_pairs = korquad_pairs(self.limit(examples, "max_train_examples"))
            elif args.train_file:
                train_pairs = self.limit(read_pairs_tsv(args.train_file), "max_train_examples")
            if eval_path:
                self.eval_set = korquad_eval_set(eval_path, held_out)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"--train_mode ict: {e}") from None
        if self.eval_set is not None:
            n = args.max_eval_examples or len(self.eval_set.queries)
            es = self.eval_set
            es.query_ids, es.queries, es.gold = es.query_ids[:n], es.queries[:n], es.gold[:n]
        else:
            self.ctx.log("[ict] no evaluation: pass --eval_file (KorQuAD JSON) or a KorQuAD JSON --train_file")
        L = args.max_seq_length
        self.dataset = PairDataset(train_pairs, self.tokenizer, args.max_query_length, L) if train_pairs else None
        self.model = build_model(self.config, "ict", temperature=args.temperature, pooling=args.pooling)
        if self.dataset is not None:
            self.ctx.log(f"[ict] {len(self.dataset)} training pairs ({self.dataset.num_truncated_passages} passages cut "
                         f"at {L} tokens, {self.dataset.num_truncated_queries} queries at {args.max_query_length})")
        if self.eval_set is not None:
            self.ctx.log(f"[ict] eval: {len(self.eval_set.queries)} questions against "
                         f"{len(self.eval_set.passages)} passages")

    def make_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return self.to_device(
            self.random_rows(batch_size, self.args.max_query_length, "query_", None, g)
            | self.random_rows(batch_size, self.args.max_seq_length, "passage_", None, g))

    def encode(self, engine, texts: list[str], max_length: int, desc: str) -> np.ndarray | None:
        """Unit-length vectors of texts ([CLS] text [SEP]), sharded over processes; rank 0 only."""
        from data.retrieval import EncodeDataset

        lo, hi = shard_range(len(texts), self.ctx.rank, self.ctx.world_size)
        local = EncodeDataset(texts[lo:hi] or texts[:1], self.tokenizer, max_length)
        out = self.predict(engine, QueryView(local), range(hi - lo), ["query_vectors"], desc=desc)
        if out is None:
            return None
        v = np.concatenate(out["query_vectors"])
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    def evaluate(self, engine) -> dict[str, float]:
        from trainer import dist

        if self.eval_set is None:
            return {}
        es = self.eval_set
        passages = self.encode(engine, es.passages, self.args.max_seq_length, "eval passages")
        queries = self.encode(engine, es.queries, self.args.max_query_length, "eval questions")
        result = None
        if passages is not None:
            result = es.evaluate(queries @ passages.T, ks=(1, 5, 20, 100))
        return dist.broadcast_object(result)
