"""Bad input gives the promised message (docs/operations.md, "Bad input") and damages nothing.

Every case runs the real entry point, `trainer.loop.main`, in this process (so ~25 cases cost
seconds, not a torch import each) beside the run directory of an earlier run ('prev', also the
target of the checkpoint cases), whose files are hashed before and after; the failed run's own
directory must not even be created. Two cases also run as `python train.py`
to show the user sees the message and no traceback.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.launch_util import launch, train_args, tree_digest
from tests.trainer_util import TINY_CONFIG, write_config

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE")


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir):
    """An earlier run 'prev' (4 steps, step-2 and step-4) and a directory of malformed inputs."""
    root = tmp_path_factory.mktemp("bad_input")
    cfg = write_config(root / "tiny.json")
    out = root / "out"
    launch("train.py", train_args(tiny_corpus, tiny_tokenizer_dir, cfg, out, "prev", "--num_steps", "4"))
    d = root / "inputs"
    d.mkdir()
    write_config(d / "unknown_key.json", hidden_dim=32)
    write_config(d / "act_fn.json", act_fn="tanh")
    write_config(d / "heads.json", hidden_size=33)
    write_config(d / "layer_group.json", layer_group=3, num_hidden_layers=2)
    write_config(d / "vocab.json", vocab_size=1000)
    write_config(d / "wider.json", hidden_size=64)
    (d / "truncated.json").write_text(json.dumps(TINY_CONFIG)[:40])
    (d / "empty.dat").write_bytes(b"")
    (d / "binary.dat").write_bytes(bytes(range(256)) * 64)
    (d / "cp949.dat").write_bytes("영화가 정말 재미있다\n\n".encode("cp949") * 100)
    (d / "corpus_dir.dat").mkdir()
    (d / "no_tokenizer").mkdir()
    (d / "broken_tokenizer").mkdir()
    (d / "broken_tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    (d / "not_a_dir").write_text("a file")
    (d / "own_tok.dat").write_bytes(tiny_corpus.read_bytes())
    (d / "own_tok.dat.tokenizer").mkdir()  # where the tokenizer would be trained: the user's folder
    (d / "own_tok.dat.tokenizer" / "notes.txt").write_text("mine")
    (d / "auto_tok.dat").write_bytes(tiny_corpus.read_bytes())  # with a tokenizer trained there earlier
    shutil.copytree(tiny_tokenizer_dir, d / "auto_tok.dat.tokenizer")
    # damaged copies of prev's checkpoint (prev itself must stay intact)
    step = out / "prev" / "step-4"
    shutil.copytree(step, d / "ckpt_meta" / "step-4")
    meta = (d / "ckpt_meta" / "step-4" / "meta.json")
    meta.write_text(meta.read_text()[:100])
    shutil.copytree(step, d / "ckpt_shards" / "step-4")
    for f in (d / "ckpt_shards" / "step-4" / "dcp").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:64])
    shutil.copytree(step, d / "ckpt_tmp" / ".step-6.tmp")
    return {"root": root, "out": out, "prev": out / "prev", "cfg": cfg, "d": d,
            "base": train_args(tiny_corpus, tiny_tokenizer_dir, cfg, out, "fresh", "--num_steps", "6")}


def _with(base: list[str], **flags: str | None) -> list[str]:
    """base with --flag values replaced (None: removed) or appended."""
    out, i = [], 0
    while i < len(base):
        name = base[i][2:]
        has_value = i + 1 < len(base) and not base[i + 1].startswith("--")
        if name in flags:
            i += 2 if has_value else 1
            continue
        out.extend(base[i:i + (2 if has_value else 1)])
        i += 2 if has_value else 1
    for name, value in flags.items():
        if value is not None:
            out += [f"--{name}"] + ([value] if value != "" else [])
    return out


def _run_main(argv: list[str], monkeypatch, capsys, stage: int = 0) -> tuple[int | str, str]:
    """trainer.loop.main in this process: (exit code or message, stderr + message)."""
    from trainer.loop import main

    for name in DIST_ENV:  # setenv first: monkeypatch then also removes what dist.init sets
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    with pytest.raises(SystemExit) as exc:
        main(stage, argv)
    assert not torch.distributed.is_initialized()  # main() leaves no process group behind
    captured = capsys.readouterr()
    code = exc.value.code
    return code, captured.err + (code if isinstance(code, str) else "")


# (case id, flags to change (None = drop the flag), expected message); {d} = the inputs directory.
CASES = [
    # flags, parsed by argparse
    ("flag_not_an_int", {"num_steps": "ten"}, "argument --num_steps: invalid int value: 'ten'"),
    ("flag_eval_file_in_pretraining", {"eval_file": "{d}/own_tok.dat"},
     "--eval_file {d}/own_tok.dat does nothing with --train_mode pretrain --objective sop: it is for the fine-tuning "
     "tasks (--train_mode mrc, ict, classify, ner, nli, sts); held-out text during pretraining is --eval_corpus SPEC"),
    ("flag_doc_stride_in_pretraining", {"doc_stride": "64"},
     "--doc_stride 64 does nothing with --train_mode pretrain --objective sop: it is for --train_mode mrc and ner"),
    ("flag_pooling_in_sop_pretraining", {"pooling": "mean"},
     "--pooling mean does nothing with --train_mode pretrain --objective sop: it is for --train_mode ict and encoder"),
    ("flag_unpad_in_pretraining", {"unpad": "off"}, "--unpad off does nothing with --train_mode pretrain"),
    ("flag_objective_in_classify", {"train_mode": "classify", "train_file": "{d}/own_tok.dat", "corpus_path": None,
                                    "objective": "mlm"},
     "--objective mlm does nothing with --train_mode classify: it is for --train_mode pretrain; drop it"),
    ("flag_bad_choice", {"train_mode": "finetune"}, "argument --train_mode: invalid choice: 'finetune'"),
    ("flag_missing_model_name", {"model_name": None}, "the following arguments are required: --model_name"),
    ("flag_unknown", {"learning-rate": "1e-4"}, "unrecognized arguments: --learning-rate"),
    # flags, checked by validate_args
    ("flag_zero_lr", {"learning_rate": "0"}, "--learning_rate must be > 0, got 0.0"),
    ("flag_negative_batch", {"train_batch_size": "-4"}, "--train_batch_size must be >= 0, got -4"),
    ("flag_zero_max_bad_steps", {"max_bad_steps": "0"}, "--max_bad_steps must be > 0, got 0"),
    ("flag_mlm_probability", {"mlm_probability": "1.5"}, "--mlm_probability must be between 0 and 1, got 1.5"),
    ("flag_mlm_layout_without_mlm", {"objective": "ict", "mlm_separator": "wrap"},
     "--mlm_separator wrap shapes --objective mlm rows only (here: --train_mode pretrain, --objective ict)"),
    ("flag_fp16_and_bf16", {"fp16": "", "bf16": ""}, "--fp16 and --bf16 are exclusive"),
    ("flag_warmup_longer_than_schedule", {"warmup_steps": "500"}, "--warmup_steps (500) exceeds the schedule length (100 steps)"),
    ("flag_zero3_on_train_py", {"zero3": ""}, "--zero3 only works with train_zero_two.py"),
    ("flag_output_dir_is_a_file", {"output_dir": "{d}/not_a_dir"}, "exists and is not a directory"),
    # flags, checked against the model and data
    ("flag_seq_longer_than_positions", {"max_seq_length": "128"}, "--max_seq_length 128 exceeds the model's max_position_embedding 64"),
    ("flag_batch_larger_than_data", {"train_batch_size": "5000"}, "fewer than one global batch"),
    # model config JSON
    ("config_missing", {"model": "{d}/nope.json"}, "model config file '{d}/nope.json' does not exist"),
    ("config_not_json", {"model": "{d}/truncated.json"}, "--model {d}/truncated.json: "),
    ("config_unknown_key", {"model": "{d}/unknown_key.json"}, "unknown model config key(s) ['hidden_dim']"),
    ("config_bad_act_fn", {"model": "{d}/act_fn.json"}, "act_fn must be one of ('gelu', 'relu', 'swish', 'gelu_tanh'), got 'tanh'"),
    ("config_heads", {"model": "{d}/heads.json"}, "hidden_size (33) must be divisible by num_heads (2)"),
    ("config_layer_group", {"model": "{d}/layer_group.json"}, "num_hidden_layers (2) must be divisible by layer_group (3)"),
    # corpus
    ("corpus_missing", {"corpus_path": "{d}/nope.dat"}, "--corpus_path {d}/nope.dat: no such file"),
    ("corpus_empty", {"corpus_path": "{d}/empty.dat"}, "--corpus_path {d}/empty.dat: is empty"),
    ("corpus_binary", {"corpus_path": "{d}/binary.dat"}, "--corpus_path {d}/binary.dat: is not UTF-8 text"),
    ("corpus_cp949", {"corpus_path": "{d}/cp949.dat"}, "is not UTF-8 text (byte 0: invalid start byte); a binary file "
     "or another encoding? convert it with e.g. `iconv -f cp949 -t utf-8 {d}/cp949.dat > cp949.utf8.dat`"),
    ("corpus_directory", {"corpus_path": "{d}/corpus_dir.dat"}, "--corpus_path {d}/corpus_dir.dat: the directory holds no *.dat file"),
    # tokenizer
    ("tokenizer_missing", {"tokenizer": "{d}/no_tokenizer"}, "--tokenizer {d}/no_tokenizer: no tokenizer.json there"),
    ("tokenizer_broken", {"tokenizer": "{d}/broken_tokenizer"}, "tokenizer.json is not valid JSON"),
    ("tokenizer_vocab_mismatch", {"model": "{d}/vocab.json"}, "tokenizer has 2000 tokens but the model config has vocab_size=1000"),
    # checkpoint
    ("checkpoint_missing", {"checkpoint": "{d}/nope"}, "--checkpoint {d}/nope: no such file or directory"),
    ("checkpoint_not_a_checkpoint", {"checkpoint": "{d}/not_a_dir"}, "not a checkpoint (no meta.json)"),
    ("checkpoint_truncated_meta", {"checkpoint": "{d}/ckpt_meta/step-4"}, "meta.json is unreadable or incomplete"),
    ("checkpoint_truncated_shards", {"checkpoint": "{d}/ckpt_shards/step-4"}, "cannot load its model/optimizer state"),
    ("checkpoint_half_written", {"checkpoint": "{d}/ckpt_tmp/.step-6.tmp"}, ".step-6.tmp is an incomplete checkpoint left by a crash during a save"),
    ("tokenizer_auto_train_into_a_user_folder", {"corpus_path": "{d}/own_tok.dat", "tokenizer": None},
     "cannot train the tokenizer into {d}/own_tok.dat.tokenizer: {d}/own_tok.dat.tokenizer"),
    ("tokenizer_auto_trained_for_another_vocab", {"corpus_path": "{d}/auto_tok.dat", "tokenizer": None,
                                                  "model": "{d}/vocab.json"},
     "{d}/auto_tok.dat.tokenizer (trained automatically beside the corpus by an earlier run) has vocab 2000, "
     "morpheme none; this run asks for vocab 1000 (--model {d}/vocab.json), --morpheme none. Pass a tokenizer "
     "made for it with --tokenizer DIR"),
    ("tokenizer_auto_trained_without_morphemes", {"corpus_path": "{d}/auto_tok.dat", "tokenizer": None,
                                                  "morpheme": "mecab"},
     "has vocab 2000, morpheme none; this run asks for vocab 2000 (--model "),
    ("tokenizer_given_with_another_morpheme", {"morpheme": "mecab"},
     "--morpheme mecab chooses how a tokenizer trained here cuts words, but this run uses "),
    ("checkpoint_other_config", {"checkpoint": "{prev}/step-4", "model": "{d}/wider.json"},
     "was trained with another model config (hidden_size: checkpoint 32 vs --model 64)"),
    ("checkpoint_fresh_start_over_a_run", {"model_name": "prev"}, "{prev} already holds checkpoints (step-4 is the latest)"),
]


@pytest.mark.parametrize("case,flags,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_message_and_nothing_damaged(bad, monkeypatch, capsys, case, flags, message):
    fmt = {"d": bad["d"], "prev": bad["prev"]}
    flags = {k: (v.format(**fmt) if v else v) for k, v in flags.items()}
    message = message.format(**fmt)
    before, inputs = tree_digest(bad["prev"]), tree_digest(bad["d"])
    code, err = _run_main(_with(bad["base"], **flags), monkeypatch, capsys)
    assert code != 0 and code is not None
    assert message in err, err[-2000:]
    assert "Traceback" not in err
    assert tree_digest(bad["prev"]) == before, "the earlier run's files changed"
    assert tree_digest(bad["d"]) == inputs, "an input file changed"
    assert not (bad["out"] / "fresh").exists()
    assert sorted(p.name for p in bad["out"].iterdir()) == ["prev"]


def test_cases_cover_every_area():
    areas = {c[0].split("_")[0] for c in CASES}
    assert areas == {"flag", "config", "corpus", "tokenizer", "checkpoint"} and len(CASES) >= 15


@pytest.mark.parametrize("flags,message", [
    ({"model": "{d}/layer_group.json"}, "num_hidden_layers (2) must be divisible by layer_group (3)"),
    ({"checkpoint": "{d}/ckpt_meta/step-4"}, "meta.json is unreadable or incomplete"),
])
def test_bad_input_as_the_user_sees_it(bad, flags, message):
    """As a subprocess: exit code 1, the message on stderr, no traceback."""
    flags = {k: v.format(d=bad["d"]) for k, v in flags.items()}
    before = tree_digest(bad["prev"])
    proc = launch("train.py", _with(bad["base"], **flags), check=False)
    assert proc.returncode in (1, 2), proc.stderr[-2000:]  # 2: found by argument validation
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert tree_digest(bad["prev"]) == before
