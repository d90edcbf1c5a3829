"""More bad input (issue 11, points 6-8): one clear line naming the problem and the fix, no
traceback, nothing written, for the training entry point, the tokenizer CLI, the export CLI and
trainer.plot. Rows of docs/operations.md, "Bad input".

As in `tests/test_bad_input.py` (whose helpers run `trainer.loop.main` in this process), an
earlier run 'prev' (trained here in-process, no extra interpreter) has its files hashed before and
after each case; every case fails before training starts.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.launch_util import train_args, tree_digest
from tests.test_bad_input import DIST_ENV, _run_main, _with
from tests.trainer_util import REPO, TINY_CONFIG, write_config

SHARED = REPO.parent / "shared" / "data"
NSMC_TRAIN = SHARED / "nsmc" / "sentiment_train.tsv"
KORQUAD = SHARED / "korquad" / "KorQuAD_v1.0_dev.json"


@pytest.fixture(scope="module")
def more(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir):
    """An earlier run 'prev' (4 steps) and a directory of malformed inputs."""
    from trainer.loop import main

    root = tmp_path_factory.mktemp("bad_input_more")
    cfg = write_config(root / "tiny.json")
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        for name in DIST_ENV:
            mp.setenv(name, "")
            mp.delenv(name)
        main(0, train_args(tiny_corpus, tiny_tokenizer_dir, cfg, out, "prev", "--num_steps", "4"))
    assert not torch.distributed.is_initialized()
    tok = tiny_tokenizer_dir
    d = root / "more"
    d.mkdir()
    # tokenizers
    (d / "not_a_tokenizer").mkdir()
    (d / "not_a_tokenizer" / "tokenizer.json").write_text('{"vocab": {"a": 0}}')
    raw = json.loads((tok / "tokenizer.json").read_text())
    vocab = raw["model"]["vocab"]
    vocab["[MASKED]"] = vocab.pop("[MASK]")  # no token to mask with
    for t in raw["added_tokens"]:
        t["content"] = "[MASKED]" if t["content"] == "[MASK]" else t["content"]
    (d / "no_mask").mkdir()
    (d / "no_mask" / "tokenizer.json").write_text(json.dumps(raw))
    (d / "old_bert").mkdir()  # a model folder from before tokenizer.json: vocab.txt only
    (d / "old_bert" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n가\n")
    shutil.copytree(tok, d / "damaged_pre")
    (d / "damaged_pre" / "pretokenizer.json").write_text('{"morph')
    shutil.copytree(tok, d / "unknown_morpheme")
    (d / "unknown_morpheme" / "pretokenizer.json").write_text('{"morpheme": "okt"}')
    # compressed corpus shards, alone and as a directory's only shards
    import gzip

    (d / "corpus.dat.gz").write_bytes(gzip.compress("영화가 정말 재미있다\n\n".encode() * 100, mtime=0))
    (d / "dump.jsonl").write_text("".join(json.dumps({"id": i, "text": "영화가 정말 재미있다"}, ensure_ascii=False) + "\n"
                                          for i in range(50)), encoding="utf-8")
    (d / "utf16.txt").write_bytes("영화가 정말 재미있다\n\n".encode("utf-16") * 20)
    (d / "gz_shards").mkdir()
    (d / "gz_shards" / "part-0.dat.gz").write_bytes((d / "corpus.dat.gz").read_bytes())
    # model configs
    write_config(d / "string_value.json", dropout_prob="0.1")
    write_config(d / "null_value.json", initializer_range=None)
    (d / "list.json").write_text("[" + json.dumps(TINY_CONFIG) + "]")
    (d / "nan_init.json").write_text(json.dumps(TINY_CONFIG | {"initializer_range": float("nan")}))
    (d / "nan_ln_eps.json").write_text(json.dumps(TINY_CONFIG | {"LN_eps": float("nan")}))
    (d / "inf_capacity.json").write_text(json.dumps(TINY_CONFIG | {"capacity_factor": float("inf")}))
    write_config(d / "type_vocab_1.json", type_vocab_size=1)
    write_config(d / "vocab_4.json", vocab_size=4)
    # a damaged export of prev (its own final/ stays intact)
    shutil.copytree(out / "prev" / "final", d / "final_damaged")
    weights = d / "final_damaged" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    # a transformers BERT folder whose config we cannot compute (relative position embeddings)
    (d / "hf_relative").mkdir()
    (d / "hf_relative" / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 2000, "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
        "position_embedding_type": "relative_key"}))
    shutil.copy2(out / "prev" / "final" / "model.safetensors", d / "hf_relative" / "model.safetensors")
    # a transformers BERT folder whose tokenizer is vocab.txt alone (older uploads ship no tokenizer.json)
    from trainer.export import export

    export(out / "prev" / "final", d / "hf_vocab_only")
    (d / "hf_vocab_only" / "tokenizer.json").unlink()
    # classification TSVs
    if NSMC_TRAIN.exists():
        rows = NSMC_TRAIN.read_text(encoding="utf-8").splitlines()[1:201]
        (d / "no_label.tsv").write_text("id\tdocument\tsentiment\n" + "\n".join(rows) + "\n")
        (d / "stray_label.tsv").write_text("id\tdocument\tlabel\n" + "\n".join(rows) + "\n999\t오타\t7\n")
        (d / "one_class.tsv").write_text("id\tdocument\tlabel\n" + "\n".join(
            r.rsplit("\t", 1)[0] + "\t0" for r in rows) + "\n")
    (d / "58k.json").write_text(json.dumps({"data": ["x" * 58000]}))  # 58 KB on one line
    # KorQuAD with every answer_start moved off its answer
    if KORQUAD.exists():
        squad = json.loads(KORQUAD.read_text(encoding="utf-8"))
        squad["data"] = squad["data"][:3]
        for article in squad["data"]:
            for para in article["paragraphs"]:
                for qa in para["qas"]:
                    for a in qa["answers"]:
                        a["answer_start"] = max(0, a["answer_start"] - 7)
        (d / "shifted.json").write_text(json.dumps(squad, ensure_ascii=False), encoding="utf-8")
    # a TensorBoard log with one tag, for trainer.plot
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(root / "tb_run" / "tensorboard"))
    for step in range(1, 31):
        writer.add_scalar("train/loss", 10.0 / step, step)
    writer.close()
    return {"root": root, "out": out, "prev": out / "prev", "m": d, "tb_run": root / "tb_run",
            "base": train_args(tiny_corpus, tiny_tokenizer_dir, cfg, out, "fresh", "--num_steps", "6")}


def _argv(base: list[str], flags: dict) -> list[str]:
    """_with, plus list values for flags taking several (--adam_betas)."""
    argv = _with(base, **{k: (None if isinstance(v, list) else v) for k, v in flags.items()})
    for k, v in flags.items():
        if isinstance(v, list):
            argv += [f"--{k}", *v]
    return argv


CLASSIFY = {"train_mode": "classify", "num_steps": "2", "eval_fraction": "0.1"}
# (case id, flags (None = drop the flag, a list = several values), expected message); {m} = inputs
CASES = [
    ("flag_adam_beta_above_1", {"adam_betas": ["1.5", "0.9"]},
     "--adam_betas: beta1 must be in [0, 1), got 1.5; the usual values are --adam_betas 0.9 0.999"),
    ("flag_adam_beta2_is_1", {"adam_betas": ["0.9", "1"]}, "--adam_betas: beta2 must be in [0, 1), got 1.0"),
    ("flag_negative_seed", {"seed": "-1"}, "--seed must be between 0 and 4294967295 (2^32 - 1, what numpy accepts), got -1"),
    ("flag_seed_2_64", {"seed": str(2**64)}, f"--seed must be between 0 and 4294967295 (2^32 - 1, what numpy accepts), got {2**64}"),
    ("flag_nan_max_grad_norm", {"max_grad_norm": "nan"}, "--max_grad_norm must be a finite number, got nan"),
    ("flag_inf_max_grad_norm", {"max_grad_norm": "inf"}, "--max_grad_norm must be a finite number, got inf"),
    ("flag_nan_adam_epsilon", {"adam_epsilon": "nan"}, "--adam_epsilon must be a finite number, got nan"),
    ("flag_inf_learning_rate", {"learning_rate": "inf"}, "--learning_rate must be a finite number, got inf"),
    ("flag_nan_weight_decay", {"weight_decay": "nan"}, "--weight_decay must be a finite number, got nan"),
    ("flag_nan_mlm_probability", {"mlm_probability": "nan"}, "--mlm_probability must be a finite number, got nan"),
    ("flag_inf_temperature", {"temperature": "inf"}, "--temperature must be a finite number, got inf"),
    ("flag_num_labels_one", {"num_labels": "1"}, "--num_labels must be 0 (= from the labels in the data) or >= 2, got 1"),
    ("flag_num_labels_not_classify", {"num_labels": "3"}, "--num_labels is for --train_mode classify"),
    ("config_string_value", {"model": "{m}/string_value.json"},
     'dropout_prob must be a number, got "0.1" (JSON string); write it as "dropout_prob": 0.1'),
    ("config_null_value", {"model": "{m}/null_value.json"},
     'initializer_range must be a number, got null (JSON null); write it as "initializer_range": 0.02'),
    ("config_list_top_level", {"model": "{m}/list.json"},
     'a model config must be a JSON object {"key": value, ...}, got a JSON list at the top level'),
    ("config_nan_initializer_range", {"model": "{m}/nan_init.json"},
     'initializer_range must be a finite number, got nan; use e.g. "initializer_range": 0.02'),
    ("config_nan_LN_eps", {"model": "{m}/nan_ln_eps.json"}, 'LN_eps must be a finite number, got nan'),
    ("config_inf_capacity_factor", {"model": "{m}/inf_capacity.json"}, "capacity_factor must be a finite number, got inf"),
    ("config_type_vocab_size_1_sop", {"model": "{m}/type_vocab_1.json"},
     'type_vocab_size 1 gives one segment type, but --train_mode pretrain marks the two segments of --objective sop '
     'as types 0 and 1; set "type_vocab_size": 2 or use --objective mlm'),
    ("config_type_vocab_size_1_mrc", {"model": "{m}/type_vocab_1.json", "train_mode": "mrc", "train_file": "{m}/58k.json"},
     "--train_mode mrc marks question and context as types 0 and 1"),
    ("config_vocab_size_4", {"model": "{m}/vocab_4.json"},
     "vocab_size=4 is too small: a tokenizer holds the 6 special tokens"),
    ("corpus_gzip", {"corpus_path": "{m}/corpus.dat.gz"},
     "corpus.dat.gz: is gzip-compressed; corpus shards are read as plain UTF-8 text (their caches index the "
     "file's bytes): decompress it first (`gunzip -k "),
    ("corpus_directory_of_gzip_shards", {"corpus_path": "{m}/gz_shards"},
     "the directory holds no *.dat file (searched recursively); it holds compressed shards (part-0.dat.gz): "
     "decompress them"),
    ("corpus_utf16", {"corpus_path": "{m}/utf16.txt"},
     "utf16.txt: is UTF-16 text (it starts with a UTF-16 byte order mark), not UTF-8: convert it with `iconv -f utf-16 "
     "-t utf-8 "),
    ("corpus_json_lines", {"corpus_path": "{m}/dump.jsonl"},
     "dump.jsonl: holds JSON lines (its first line is an object with the key(s) ['id', 'text']), not text: its "
     "lines would be trained on as they are, braces, keys and escapes included; write the text out first, one "
     "sentence per line and a blank line between documents, e.g. `jq -r '.text, \"\"' "),
    ("model_hub_id", {"model": "klue/bert-base", "checkpoint": "klue/bert-base"},
     "'klue/bert-base' looks like a Hugging Face Hub id, and runs read local folders only: download it first "
     "(`huggingface-cli download klue/bert-base --local-dir klue-bert-base`) and pass that folder"),
    ("tokenizer_json_not_a_tokenizer", {"tokenizer": "{m}/not_a_tokenizer"},
     "tokenizer.json is JSON but not a tokenizer (no \"model\" object"),
    ("tokenizer_without_mask", {"tokenizer": "{m}/no_mask"},
     "the tokenizer has no mask ([MASK] or <mask>) token: a BERT-style model needs pad, cls, sep and mask tokens"),
    ("checkpoint_transformers_folder_without_tokenizer_json",
     {"checkpoint": "{m}/hf_vocab_only", "model": "{m}/hf_vocab_only", "tokenizer": None},
     "has no tokenizer.json: it is a transformers tokenizer without tokenizer.json: write one into a new folder"),
    ("tokenizer_damaged_pretokenizer", {"tokenizer": "{m}/damaged_pre"},
     "damaged_pre/pretokenizer.json is damaged (Unterminated string"),
    ("tokenizer_unknown_morpheme", {"tokenizer": "{m}/unknown_morpheme"},
     "pretokenizer.json: unknown \"morpheme\" 'okt' (expected null or one of ('mecab', 'kiwi'))"),
    ("checkpoint_damaged_safetensors", {"checkpoint": "{m}/final_damaged"},
     "final_damaged/model.safetensors: damaged or not a safetensors file"),
    ("checkpoint_transformers_config_we_cannot_compute", {"checkpoint": "{m}/hf_relative"},
     "hf_relative/model.safetensors: this BERT config has no equivalent here: position_embedding_type "
     "'relative_key' (only absolute)"),
    ("model_transformers_config_we_cannot_compute", {"model": "{m}/hf_relative"},
     "position_embedding_type 'relative_key' (only absolute)"),
    ("classify_no_label_column", CLASSIFY | {"train_file": "{m}/no_label.tsv"},
     "lacks the column(s) ['label']; the file must be tab-separated with the header line 'id\\tdocument\\tlabel' "
     "(rename the columns in the first line"),
    ("classify_wrong_format", CLASSIFY | {"train_file": "{m}/58k.json"},
     "58k.json: JSON, but not a list of objects (got ['xxxxx"),
    ("classify_stray_label", CLASSIFY | {"train_file": "{m}/stray_label.tsv"},
     "no rows with label(s) [2, 3, 4, 5, 6]; that would train a 8-class head. label 7 is on the row(s) with id '999'"),
    ("classify_label_above_num_labels", CLASSIFY | {"train_file": "{m}/stray_label.tsv", "num_labels": "2"},
     "label 7 is outside 0..1 (--num_labels 2)"),
    ("classify_one_class", CLASSIFY | {"train_file": "{m}/one_class.tsv"},
     "every row has label 0 (label counts {0: 200}): a classifier needs at least 2 classes"),
    ("mrc_answers_do_not_match", {"train_mode": "mrc", "train_file": "{m}/shifted.json", "num_steps": "2",
                                  "max_seq_length": "64", "doc_stride": "32", "max_query_length": "16"},
     "do not match the context at answer_start"),
]


@pytest.mark.parametrize("case,flags,message", CASES, ids=[c[0] for c in CASES])
def test_more_bad_input(more, monkeypatch, capsys, case, flags, message):
    if case.startswith("classify") and not NSMC_TRAIN.exists() or case.startswith("mrc") and not KORQUAD.exists():
        pytest.skip("shared data not available")
    fmt = {"m": more["m"]}
    flags = {k: ([x.format(**fmt) for x in v] if isinstance(v, list) else v.format(**fmt) if v else v)
             for k, v in flags.items()}
    if flags.get("train_mode", "pretrain") != "pretrain":  # the base is a pretraining run's
        flags = {"corpus_path": None} | flags
    before, inputs = tree_digest(more["prev"]), tree_digest(more["m"])
    code, err = _run_main(_argv(more["base"], flags), monkeypatch, capsys)
    assert code != 0 and code is not None
    assert message in err, err[-2000:]
    assert "Traceback" not in err and len(err) < 4000, err[-2000:]  # one message, not a dump of the file
    assert tree_digest(more["prev"]) == before, "the earlier run's files changed"
    assert tree_digest(more["m"]) == inputs, "an input file changed"
    assert sorted(p.name for p in more["out"].iterdir()) == ["prev"]


def test_device_cuda_without_a_gpu(more, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    code, err = _run_main(_argv(more["base"], {"device": "cuda"}), monkeypatch, capsys)
    assert code == 2 and "--device cuda: CUDA is not available here" in err and "use --device cpu" in err
    assert "Traceback" not in err and not (more["out"] / "fresh").exists()


def test_classify_num_labels_accepts_an_absent_class(tiny_tokenizer):
    """A gap is refused without --num_labels (above) and allowed with it: the head gets the classes asked for."""
    from data.classification import ClassificationExample, resolve_num_labels

    rows = [ClassificationExample(str(i), "좋다", label) for i, label in enumerate([0, 1, 0, 3])]
    with pytest.raises(ValueError, match=r"label counts \{0: 2, 1: 1, 3: 1\}, no rows with label\(s\) \[2\]"):
        resolve_num_labels({"train": rows})
    assert resolve_num_labels({"train": rows}, num_labels=4) == 4
    assert resolve_num_labels({"train": rows[:3]}) == 2


def test_mrc_few_misaligned_answers_warn(tiny_tokenizer):
    """Below the threshold the run goes on with a warning naming the count and an example."""
    from data.mrc import Answer, Example, build_features, check_answer_alignment

    context = "한국어 기계 독해 데이터는 문단과 질문과 답으로 이루어진다."
    good = [Example(f"q{i}", "무엇으로 이루어지나", context, [Answer("문단과", context.index("문단과"))], "t", "0-0")
            for i in range(9)]
    shifted = Example("q9", "무엇으로 이루어지나", context, [Answer("문단과", 0)], "t", "0-0")
    warning = check_answer_alignment(build_features(good + [shifted], tiny_tokenizer, 64, 32, 16), "train.json")
    assert warning.startswith("train.json: 1 of 10 answers (10.0%) do not match the context at answer_start")
    assert "question 'q9'" in warning and f"the text occurs at character {context.index('문단과')}" in warning
    assert check_answer_alignment(build_features(good, tiny_tokenizer, 64, 32, 16), "train.json") is None
    with pytest.raises(ValueError, match=r"3 of 10 answers \(30.0%\) do not match"):
        check_answer_alignment(build_features(good[:7] + [shifted] * 3, tiny_tokenizer, 64, 32, 16), "train.json")


# --- the tokenizer CLI: python -m data.tokenizer ----------------------------------------
TOKENIZER_CLI = [
    ("missing_input", "train --input {m}/nope.dat --vocab_size 2000 --out {tmp}/t", 2, "--input: {m}/nope.dat: no such file"),
    ("input_directory_without_dat", "train --input {m} --vocab_size 2000 --out {tmp}/t", 2,
     "--input: {m}: the directory holds no *.dat file"),
    ("vocab_size_4", "train --input {corpus} --vocab_size 4 --out {tmp}/t", 2,
     "--vocab_size: vocab_size=4 is too small: a tokenizer holds the 6 special tokens"),
    ("num_threads_0", "train --input {corpus} --vocab_size 2000 --out {tmp}/t --num_threads 0", 2,
     "--num_threads must be >= 1, got 0"),
    ("out_is_a_file", "train --input {corpus} --vocab_size 2000 --out {corpus}", 2, "exists and is not a directory"),
    ("out_under_a_file", "train --input {corpus} --vocab_size 2000 --out {corpus}/tok", 2, "is a file, not a directory"),
    ("out_holds_a_tokenizer", "train --input {corpus} --vocab_size 2000 --out {m}/no_mask", 2,
     "already holds a tokenizer (tokenizer.json) that this would replace; pick a new directory or add --overwrite "
     "to replace it"),
    ("out_holds_a_vocab_txt", "train --input {corpus} --vocab_size 2000 --out {m}/old_bert", 2,
     "--out {m}/old_bert: already holds tokenizer files (vocab.txt) that this would replace; pick a new directory "
     "or add --overwrite to replace them"),
    ("encode_missing_tokenizer", "encode --tokenizer {m}/nope 안녕", 1, "no tokenizer.json at {m}/nope; train one with"),
    ("encode_not_a_tokenizer", "encode --tokenizer {m}/not_a_tokenizer 안녕", 1, "is JSON but not a tokenizer"),
    ("encode_without_mask", "encode --tokenizer {m}/no_mask 안녕", 1, "the tokenizer has no mask ([MASK] or <mask>) token"),
    ("encode_damaged_pretokenizer", "encode --tokenizer {m}/damaged_pre 안녕", 1, "pretokenizer.json is damaged"),
]


@pytest.mark.parametrize("case,command,code,message", TOKENIZER_CLI, ids=[c[0] for c in TOKENIZER_CLI])
def test_tokenizer_cli_errors(more, tiny_corpus, tmp_path, capsys, case, command, code, message):
    from data.tokenizer import main

    fmt = {"m": more["m"], "tmp": tmp_path, "corpus": tiny_corpus}
    inputs = tree_digest(more["m"])
    with pytest.raises(SystemExit) as exc:
        main(command.format(**fmt).split())
    err = capsys.readouterr().err
    assert exc.value.code == code and message.format(**fmt) in err, err[-2000:]
    assert "Traceback" not in err
    assert tree_digest(more["m"]) == inputs and not (tmp_path / "t").exists()


def test_export_cli_damaged_safetensors(more, tmp_path, capsys):
    from trainer.export import main

    with pytest.raises(SystemExit) as exc:
        main([str(more["m"] / "final_damaged"), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err
    assert f"{more['m'] / 'final_damaged' / 'model.safetensors'}: damaged or not a safetensors file" in err
    assert not (tmp_path / "hf").exists()


# --- trainer.plot --------------------------------------------------------------------------
def test_plot_errors_and_truncated_event_file(more, tmp_path, capsys, caplog):
    from trainer.plot import main

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(list(map(str, argv)))
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        err = out.err + caplog.text  # warnings go through logging (stderr for a user)
        caplog.clear()
        assert "Traceback" not in err
        return code, out.out, err

    logs = more["tb_run"] / "tensorboard"
    events = sorted(logs.glob("events.out.tfevents.*"))
    assert events
    cut = tmp_path / "cut"  # every event file cut in the middle of a record
    shutil.copytree(logs, cut)
    for f in sorted(cut.glob("events.out.tfevents.*")):
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) * 2 // 3 + 3])
    code, out, err = run(cut, "--out", tmp_path / "png")
    assert code == 0 and "is damaged after" in err and "truncated record" in err and str(cut) in err
    assert (tmp_path / "png" / "loss.png").is_file() and "loss.png" in out
    empty = tmp_path / "cut_to_nothing"
    shutil.copytree(logs, empty)
    for f in sorted(empty.glob("events.out.tfevents.*")):
        f.write_bytes(f.read_bytes()[:20])
    code, _, err = run(empty, "--out", tmp_path / "png2")
    assert code == 1 and "no scalars could be read from" in err and "is damaged after 0 readable record(s)" in err
    assert not (tmp_path / "png2").exists()
    for argv, expected_code, message in [
        ((tmp_path / "nope", "--out", tmp_path / "p"), 1, "nope: no such directory; pass a run directory"),
        ((more["m"], "--out", tmp_path / "p"), 1, "no TensorBoard event files"),
        ((more["tb_run"], "--out", events[0]), 2, "is a file, not a directory; pick another --out"),
        ((more["tb_run"], cut, "--names", "a", "--out", tmp_path / "p"), 2, "--names: 1 name(s) for 2 run(s)"),
        ((more["tb_run"], "--out", tmp_path / "p", "--smooth", "1"), 2, "--smooth must be in [0, 1), got 1.0"),
    ]:
        code, _, err = run(*argv)
        assert code == expected_code and message in err, (argv, err[-1000:])
    assert not (tmp_path / "p").exists()
