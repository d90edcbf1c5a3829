"""One tiny pretrain (10 steps: step-10 and final/) shared by the KLUE task and evaluate tests,
made once per session however many modules ask (a lock file, as launch_util.shared_setup)."""
from __future__ import annotations

import fcntl
from argparse import Namespace
from pathlib import Path

from tests.trainer_util import launch, write_config

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
KLUE = SHARED / "klue"
COMMON = ["--max_seq_length", "64", "--num_workers", "0", "--no_progress", "--logging_steps", "1",
          "--learning_rate", "5e-3", "--scheduler_num_steps", "100", "--save_steps", "0"]


def tiny_pretrain(tmp_path_factory, corpus: Path, tokenizer: Path) -> Namespace:
    root = tmp_path_factory.getbasetemp() / "klue_pretrain"
    root.mkdir(exist_ok=True)
    cfg, out = root / "tiny.json", root / "out"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "pre" / "final").is_dir():
            write_config(cfg)
            launch("train.py", ["--model_name", "pre", "--model", str(cfg), "--output_dir", str(out),
                                "--corpus_path", str(corpus), "--tokenizer", str(tokenizer),
                                "--train_batch_size", "8", "--num_steps", "10", *COMMON])
    return Namespace(root=root, cfg=cfg, out=out, pre=out / "pre", tokenizer=tokenizer)
