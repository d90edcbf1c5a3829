"""Rank passages encoded by `--train_mode encoder` for a query.

    python -m trainer.search --vectors output/enc --query "임종석이 여의도 농민 폭력 시위를 주도한 혐의로 지명수배 된 날은?"

The query is encoded as `[CLS] query [SEP]` (cut at the encode run's --max_query_length) by the
same model and tokenizer (the encode run's --checkpoint unless --checkpoint is given), pooled
the same way and normalised; passages are ranked by cosine similarity (the stored vectors are
unit length), which is what the ict task trains.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Hit:
    rank: int
    id: str
    score: float
    text: str | None


class Searcher:
    """Stored vectors + the query encoder of one encode run (output_dir/model_name of it)."""

    def __init__(self, vectors_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu"):
        from data.tokenizer import KoTokenizer
        from models import build_model
        from trainer import checkpoint as ckpt

        folder = Path(vectors_dir)
        if not (folder / "encoder.json").is_file():
            raise SystemExit(f"--vectors {folder}: no encoder.json; point it at the output_dir/model_name of a "
                             f"`--train_mode encoder` run")
        self.info = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
        self.vectors = np.load(folder / "vectors.npy", mmap_mode="r")
        self.ids = (folder / "ids.txt").read_text(encoding="utf-8").splitlines()
        if len(self.ids) != len(self.vectors):
            raise SystemExit(f"{folder}: {len(self.ids)} ids but {len(self.vectors)} vectors; re-run the encoder")
        source = checkpoint or self.info.get("checkpoint")
        if checkpoint and self.info.get("checkpoint") and Path(checkpoint).resolve() != Path(self.info["checkpoint"]):
            print(f"[search] note: {folder} was encoded with {self.info['checkpoint']}, queries use {checkpoint}",
                  file=sys.stderr, flush=True)
        if not source:
            raise SystemExit(f"{folder} was encoded without --checkpoint; pass --checkpoint (the same weights)")
        from trainer.export import load_source

        try:
            loaded = load_source(source)  # a step-N, final/, run directory or model.safetensors
        except (FileNotFoundError, ValueError, ckpt.CheckpointError) as e:
            raise SystemExit(f"--checkpoint {source}: {e}") from None
        if loaded.config.to_dict() != self.info["model_config"]:
            raise SystemExit(f"--checkpoint {source} has another model config than the one that encoded {folder} "
                             f"({self.info.get('checkpoint')}); use the same checkpoint")
        from trainer.tasks.pooling import retrieval_trained

        if self.info["pooling"] == "cls" and not retrieval_trained(loaded.info):
            print(f"[search] warning: {folder} was encoded with --pooling cls from a {loaded.info.get('train_mode')} "
                  f"checkpoint that was not retrieval-trained: its [CLS] vectors are nearly identical, so the "
                  f"scores hardly differ; encode again with --pooling mean (the default, auto, picks it)",
                  file=sys.stderr, flush=True)
        self.tokenizer = KoTokenizer.load(self.info["tokenizer"])
        self.device = torch.device(device)
        model = build_model(loaded.config, "encoder", pooling=self.info["pooling"], normalize=True)
        weights = ckpt.matching_weights(loaded.state, model.state_dict(), source)
        model.load_state_dict(weights, strict=False)
        self.model = model.to(self.device).eval()
        self._texts: dict[str, str] | None = None

    def texts(self) -> dict[str, str]:
        """id -> text from the encoded file, when it is still there."""
        if self._texts is None:
            from data.retrieval import read_text_file

            self._texts = {}
            src = self.info.get("encode_file")
            if src and Path(src).is_file():
                self._texts = dict(zip(*read_text_file(src)))
        return self._texts

    def encode(self, queries: list[str]) -> np.ndarray:
        """(Q, H) unit-length query vectors."""
        from data.retrieval import EncodeDataset

        ds = EncodeDataset(queries, self.tokenizer, self.info["max_query_length"])
        batch = {k: v.to(self.device) for k, v in ds.collate([ds[i] for i in range(len(ds))]).items()}
        with torch.no_grad():
            return self.model(**batch)["vectors"].float().cpu().numpy()

    def search(self, queries: list[str], top_k: int = 10) -> list[list[Hit]]:
        scores = self.encode(queries) @ np.asarray(self.vectors).T  # (Q, N)
        k = min(top_k, scores.shape[1])
        texts = self.texts()
        results = []
        for row in scores:
            top = np.argpartition(-row, k - 1)[:k]
            top = top[np.argsort(-row[top], kind="stable")]
            results.append([Hit(r + 1, self.ids[i], float(row[i]), texts.get(self.ids[i])) for r, i in enumerate(top)])
        return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m trainer.search", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vectors", required=True, help="output_dir/model_name of a --train_mode encoder run")
    p.add_argument("--query", action="append", required=True, help="query text (repeat for several)")
    p.add_argument("--checkpoint", default=None, help="model weights (default: the encode run's --checkpoint)")
    p.add_argument("--top_k", type=int, default=10, help="passages to print per query")
    p.add_argument("--device", default="cpu", help="torch device for encoding the query")
    p.add_argument("--max_chars", type=int, default=120, help="print at most this many characters of each text")
    args = p.parse_args(argv)
    if args.top_k < 1:
        p.error(f"--top_k must be >= 1, got {args.top_k}")
    searcher = Searcher(args.vectors, args.checkpoint, args.device)
    for query, hits in zip(args.query, searcher.search(args.query, args.top_k)):
        print(f"query: {query}")
        for h in hits:
            text = "" if h.text is None else h.text[:args.max_chars] + ("..." if len(h.text) > args.max_chars else "")
            print(f"{h.rank}\t{h.score:.4f}\t{h.id}\t{text}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
