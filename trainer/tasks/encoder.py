"""train_mode encoder: encode --encode_file (one passage per line, or id<TAB>text) into
output_dir/model_name/vectors.npy ((N, H) float32, unit length, so a dot product is the cosine
similarity the ict task trains), ids.txt (one id per line, in row order) and encoder.json (what
`python -m trainer.search` needs). No training: --num_steps is ignored. Every process encodes a
contiguous block of the file; rank 0 writes the rows in file order."""
from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import numpy as np

from trainer.args import run_dir
from trainer.dist import DistContext
from trainer.tasks.base import Task, shard_range


class EncoderTask(Task):
    name = "encoder"
    unpad = ("eval",)

    def __init__(self, args: Namespace, ctx: DistContext, start=None):
        super().__init__(args, ctx, start)
        from data.retrieval import EncodeDataset, read_text_file
        from models import build_model

        self.tokenizer = self.load_tokenizer()
        if not args.checkpoint:
            self.ctx.log("[encoder] no --checkpoint: encoding with randomly initialised weights")
        try:
            self.ids, texts = read_text_file(args.encode_file)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"--encode_file: {e}") from None
        self.lo, self.hi = shard_range(len(texts), ctx.rank, ctx.world_size)
        # Only this process's block is tokenized; an empty block keeps one text for the padding calls.
        self.local = EncodeDataset(texts[self.lo:self.hi] or texts[:1], self.tokenizer, args.max_seq_length)
        self.dataset = None  # nothing to train
        args.train_batch_size = args.train_batch_size or 1  # no batch-size search without training
        self.model = build_model(self.config, "encoder", pooling=args.pooling, normalize=True)
        from trainer import dist

        problem = dist.broadcast_object(self._replaces_other_vectors() if ctx.is_main else None)
        if problem:
            raise SystemExit(problem)
        self.ctx.log(f"[encoder] {len(texts)} texts from {args.encode_file}, {ctx.world_size} process(es), "
                     f"pooling {args.pooling}, max {args.max_seq_length} tokens")

    def _inputs(self) -> dict:
        """What the vectors are made from, as encoder.json records it."""
        return {"pooling": self.args.pooling, "max_seq_length": self.args.max_seq_length,
                "max_query_length": self.args.max_query_length,
                "encode_file": str(Path(self.args.encode_file).resolve()),
                "checkpoint": str(Path(self.args.checkpoint).resolve()) if self.args.checkpoint else None,
                "tokenizer": str(Path(self.tokenizer_dir).resolve()),
                "model_config": self.config.to_dict()}

    def _replaces_other_vectors(self) -> str | None:
        """Vectors already in the run directory that another file, checkpoint or setting made (encoding
        a passage collection can take hours): refused before any work. The same inputs again (an
        interrupted or repeated encode) write them anew."""
        rd = run_dir(self.args)
        if not (rd / "vectors.npy").exists():
            return None
        try:
            earlier = json.loads((rd / "encoder.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = {}
        now = json.loads(json.dumps(self._inputs()))  # as encoder.json holds it (tuples as lists)
        differ = [k for k in now if not isinstance(earlier, dict) or earlier.get(k) != now[k]]
        if not differ:
            return None
        what = (f"{earlier.get('num_vectors')} vectors of {earlier.get('encode_file')} (checkpoint "
                f"{earlier.get('checkpoint')})" if isinstance(earlier, dict) and earlier else "vectors.npy")
        return (f"{rd} already holds {what}, made with other {', '.join(differ)} than this run's; they would be "
                f"replaced. Pick another --model_name (or --output_dir) for these vectors, or move that folder away")

    def evaluate(self, engine) -> dict[str, float]:
        from trainer import dist

        out = self.predict(engine, self.local, range(self.hi - self.lo), ["vectors"], desc="encode")
        if out is not None:
            vectors = np.concatenate(out["vectors"]).astype(np.float32)
            assert len(vectors) == len(self.ids), (len(vectors), len(self.ids))
            rd = run_dir(self.args)
            rd.mkdir(parents=True, exist_ok=True)
            tmp = rd / "vectors.tmp.npy"
            np.save(tmp, vectors)
            tmp.replace(rd / "vectors.npy")
            (rd / "ids.txt").write_text("".join(i + "\n" for i in self.ids), encoding="utf-8")
            info = {"num_vectors": len(vectors), "hidden_size": int(vectors.shape[1]), "normalized": True,
                    **self._inputs()}
            (rd / "encoder.json").write_text(json.dumps(info, indent=2, ensure_ascii=False))
            self.ctx.log(f"[encoder] wrote {rd / 'vectors.npy'} {tuple(vectors.shape)} and {rd / 'ids.txt'}")
        dist.barrier()
        return {}
