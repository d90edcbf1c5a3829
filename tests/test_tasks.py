"""Fine-tuning tasks (classify, mrc, ict, encoder + search) through the real launchers, from a
tiny pretrain checkpoint; evaluation wiring against hand-computed EM/F1 and recall@k; clear
errors for a checkpoint whose model config or tokenizer does not match."""
from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.launch_util import tree_digest
from tests.trainer_util import launch, read_tsv, write_config

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
KORQUAD = SHARED / "korquad" / "KorQuAD_v1.0_dev.json"
NSMC_TRAIN = SHARED / "nsmc" / "sentiment_train.tsv"
NSMC_TEST = SHARED / "nsmc" / "sentiment_test.tsv"
pytestmark = pytest.mark.skipif(not (KORQUAD.exists() and NSMC_TRAIN.exists()), reason="../shared/data not available")

COMMON = ["--max_seq_length", "64", "--num_workers", "0", "--no_progress", "--logging_steps", "1",
          "--learning_rate", "5e-3", "--scheduler_num_steps", "100", "--save_steps", "0"]


def train_losses(run_dir: Path) -> list[float]:
    """loss.tsv holds training steps only (evaluation goes to eval.json and TensorBoard)."""
    rows = read_tsv(run_dir / "loss.tsv")
    assert all("loss" in row for row in rows)
    return [row["loss"] for row in rows]


def eval_line(stdout: str) -> dict[str, float]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("[eval] "))
    return {k: float(v) for k, v in re.findall(r"(\S+)=([-\d.]+)", line)}


def assert_falls(ls: list[float], name: str) -> None:
    assert all(math.isfinite(x) for x in ls), (name, ls)
    q = max(1, len(ls) // 4)
    assert sum(ls[-q:]) / q < sum(ls[:q]) / q - 0.05, f"{name}: loss did not fall: {ls}"


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir):
    """A 10-step tiny pretrain (step-10 and final/), a KorQuAD slice of 8 articles, an NSMC slice."""
    root = tmp_path_factory.mktemp("tasks")
    cfg = write_config(root / "tiny.json")
    out = root / "out"
    launch("train.py", ["--model_name", "pre", "--model", str(cfg), "--output_dir", str(out),
                        "--corpus_path", str(tiny_corpus), "--tokenizer", str(tiny_tokenizer_dir),
                        "--train_batch_size", "8", "--num_steps", "10", *COMMON])
    data = json.loads(KORQUAD.read_text(encoding="utf-8"))
    data["data"] = data["data"][:8]
    korquad = root / "korquad8.json"
    korquad.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return Namespace(root=root, cfg=cfg, out=out, pre=out / "pre", korquad=korquad, tokenizer=tiny_tokenizer_dir)


def run_task(env, name: str, args: list[str], nproc: int = 1, check: bool = True):
    return launch("train.py", ["--model_name", name, "--model", str(env.cfg), "--output_dir", str(env.out),
                               *COMMON, *args], nproc=nproc, check=check)


def test_classify_from_exported_checkpoint(env):
    """No --tokenizer: the checkpoint's is used. 32 rows, 48 steps: the model fits them (after a
    plateau at ln 2 of ~20 steps)."""
    proc = run_task(env, "cls", ["--train_mode", "classify", "--checkpoint", str(env.pre / "final"),
                                 "--train_file", str(NSMC_TRAIN), "--eval_file", str(NSMC_TEST),
                                 "--max_train_examples", "32", "--max_eval_examples", "50",
                                 "--train_batch_size", "16", "--num_steps", "48"])
    assert "initialised matching weights" in proc.stdout
    assert_falls(train_losses(env.out / "cls"), "classify")
    acc = eval_line(proc.stdout)["accuracy"]
    assert 0.0 <= acc <= 1.0 and acc * 50 == pytest.approx(round(acc * 50))
    assert json.loads((env.out / "cls" / "eval.json").read_text())["accuracy"] == pytest.approx(acc, abs=1e-4)
    final = env.out / "cls" / "final"
    assert (final / "tokenizer.json").read_text() == (env.tokenizer / "tokenizer.json").read_text()

    # --num_steps 0: evaluate the fine-tuned model only; same accuracy, nothing trained or exported
    proc = run_task(env, "cls_eval", ["--train_mode", "classify", "--checkpoint", str(final),
                                      "--train_file", str(NSMC_TRAIN), "--eval_file", str(NSMC_TEST),
                                      "--max_train_examples", "32", "--max_eval_examples", "50", "--num_steps", "0"])
    assert eval_line(proc.stdout)["accuracy"] == pytest.approx(acc, abs=1e-4)
    assert not (env.out / "cls_eval" / "final").exists() and not list((env.out / "cls_eval").glob("step-*"))
    # the same evaluation written into the fine-tuning run itself (its step-N deleted, final/ kept): its
    # loss.tsv and model stay as they were
    kept_run = env.out / "cls_kept"
    shutil.copytree(env.out / "cls", kept_run, ignore=shutil.ignore_patterns("step-*"))
    kept = {"loss.tsv": (kept_run / "loss.tsv").read_bytes(), "final": tree_digest(kept_run / "final")}
    proc = run_task(env, "cls_kept", ["--train_mode", "classify", "--checkpoint", str(kept_run / "final"),
                                      "--eval_file", str(NSMC_TEST), "--max_eval_examples", "50", "--num_steps", "0"])
    assert eval_line(proc.stdout)["accuracy"] == pytest.approx(acc, abs=1e-4)
    assert {"loss.tsv": (kept_run / "loss.tsv").read_bytes(), "final": tree_digest(kept_run / "final")} == kept
    # evaluating only, every weight must come from the checkpoint: a head of another size (other
    # labels) or none at all (a pretrained encoder) is refused instead of scored at random values
    for start, extra, said in [(final, ["--num_labels", "3"], "classifier_head.classifier.weight [3, 32] (checkpoint [2, 32])"),
                               (env.pre / "final", [], "classifier_head.classifier.weight [2, 32] (not taken from the checkpoint)")]:
        proc = run_task(env, "cls_refused", ["--train_mode", "classify", "--checkpoint", str(start), "--eval_file",
                                             str(NSMC_TEST), "--max_eval_examples", "50", "--num_steps", "0", *extra],
                        check=False)
        assert proc.returncode != 0 and said in proc.stderr and "evaluating only" in proc.stderr, proc.stderr[-2000:]
        assert "[eval]" not in proc.stdout
    # training, such a head starts fresh and the run says so
    proc = run_task(env, "cls_3", ["--train_mode", "classify", "--checkpoint", str(final), "--train_file",
                                   str(NSMC_TRAIN), "--max_train_examples", "32", "--max_eval_examples", "8",
                                   "--num_labels", "3", "--num_steps", "1", "--train_batch_size", "8"])
    assert ("left as initialised (this run trains them): classifier_head.classifier.weight [3, 32] "
            "(checkpoint [2, 32])") in proc.stdout

    # the fine-tuned classifier exports as BertForSequenceClassification: same logits on NSMC reviews
    transformers = pytest.importorskip("transformers")
    from trainer.export import build_ours, export, load_source

    summary = export(final, env.out / "cls_hf", do_verify=True)
    assert summary["architectures"] == ["BertForSequenceClassification"] and summary["not_exported"] == []
    reviews = [line.split("\t")[1] for line in NSMC_TEST.read_text(encoding="utf-8").splitlines()[1:5]]
    tok = transformers.AutoTokenizer.from_pretrained(env.out / "cls_hf", local_files_only=True)
    batch = tok(reviews, padding=True, truncation=True, max_length=64, return_tensors="pt")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(env.out / "cls_hf", local_files_only=True)
    with torch.no_grad():
        diff = (hf.eval()(**batch).logits - build_ours(load_source(final))(**batch)["logits"]).abs().max().item()
    assert diff < 1e-5 and max(summary["verify"].values()) < 1e-5


def test_classify_from_transformers_bert_folder(env):
    """A transformers BERT folder in the older pytorch_model.bin format (as klue/bert-base ships)
    starts a fine-tuning run: --model and --checkpoint take the folder, its tokenizer is used, the
    encoder starts from its weights."""
    from safetensors.torch import load_file

    from trainer.checkpoint import load_weights
    from trainer.export import export

    hf = env.root / "hf_bin"
    export(env.pre / "final", hf)
    torch.save(load_file(hf / "model.safetensors"), hf / "pytorch_model.bin")
    (hf / "model.safetensors").unlink()
    proc = launch("train.py", ["--model_name", "cls_hf", "--model", str(hf), "--checkpoint", str(hf),
                               "--output_dir", str(env.out), *COMMON, "--train_mode", "classify",
                               "--train_file", str(NSMC_TRAIN), "--max_train_examples", "8", "--train_batch_size", "4",
                               "--num_steps", "1", "--learning_rate", "1e-12", "--warmup_steps", "0"])
    assert "initialised matching weights" in proc.stdout
    before = load_weights(env.pre / "final" / "model.safetensors")
    after = load_weights(env.out / "cls_hf" / "final" / "model.safetensors")
    encoder = [k for k in before if k.startswith("encoder.")]
    assert encoder and all(torch.allclose(before[k], after[k], atol=1e-6) for k in encoder)
    assert (env.out / "cls_hf" / "final" / "tokenizer.json").is_file()


def test_classify_with_label_names(env, tmp_path):
    """NSMC rows labelled by name ("positive"/"negative", "중립" for a third class): numbered in sorted order,
    the same in the evaluation file, recorded in the checkpoint and exported as id2label; evaluating the
    model on rows of one class alone numbers them by the checkpoint's names, not by their own."""
    names = {"0": "negative", "1": "positive"}
    rows = [line.split("\t") for line in NSMC_TRAIN.read_text(encoding="utf-8").splitlines()[1:41]]
    train, evals = tmp_path / "train.tsv", tmp_path / "eval.tsv"
    train.write_text("id\tdocument\tlabel\n" + "".join(f"{i}\t{d}\t{names[lab] if n % 5 else '중립'}\n"
                                                     for n, (i, d, lab) in enumerate(rows[:32])), encoding="utf-8")
    evals.write_text("id\tdocument\tlabel\n" + "".join(f"{i}\t{d}\tpositive\n" for i, d, _ in rows[32:]),
                     encoding="utf-8")
    proc = run_task(env, "cls_names", ["--train_mode", "classify", "--checkpoint", str(env.pre / "final"),
                                       "--train_file", str(train), "--eval_file", str(evals),
                                       "--train_batch_size", "8", "--num_steps", "2", "--save_steps", "2"])
    assert "[classify] label names as classes (sorted): 0 negative, 1 positive, 2 중립" in proc.stdout
    assert "3 labels" in proc.stdout
    run = env.out / "cls_names"
    assert json.loads((run / "step-2" / "meta.json").read_text())["label_names"] == ["negative", "positive", "중립"]

    from trainer.export import export

    export(run / "final", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive", "2": "중립"}
    assert config["label2id"] == {"negative": 0, "positive": 1, "중립": 2}

    # rows of one class, numbered as the checkpoint's: ours, a step, the transformers export (its id2label)
    for start in (run / "final", run / "step-2", tmp_path / "hf"):
        model = ["--model", str(start)] if start.name == "hf" else []
        proc = run_task(env, f"cls_names_eval_{start.name}", ["--train_mode", "classify", "--checkpoint", str(start),
                                                              "--eval_file", str(evals), "--num_labels", "3",
                                                              "--num_steps", "0", *model])
        assert "label names as classes (the order of " in proc.stdout
        assert "label counts {1: 8}" in proc.stdout


def test_mrc_from_step_checkpoint(env):
    proc = run_task(env, "mrc", ["--train_mode", "mrc", "--checkpoint", str(env.pre / "step-10"),
                                 "--train_file", str(env.korquad), "--eval_fraction", "0.25",
                                 "--max_eval_examples", "30", "--doc_stride", "32", "--max_query_length", "16",
                                 "--train_batch_size", "16", "--num_steps", "16"])
    assert_falls(train_losses(env.out / "mrc"), "mrc")
    scores = eval_line(proc.stdout)
    predictions = json.loads((env.out / "mrc" / "predictions.json").read_text(encoding="utf-8"))
    from data.metrics import squad_em_f1
    from data.mrc import load_squad, split_by_article

    _, held_out = split_by_article(load_squad(env.korquad), 0.25, seed=42)
    held_out = held_out[:30]
    assert set(predictions) == {e.id for e in held_out}
    expected = squad_em_f1(predictions, held_out)
    assert scores["exact_match"] == pytest.approx(expected["exact_match"], abs=1e-3)
    assert scores["f1"] == pytest.approx(expected["f1"], abs=1e-3)


def test_mrc_evaluates_unanswerable_questions(env, tmp_path):
    """An evaluation file in SQuAD 2.0's layout (every third question made unanswerable): the run evaluates
    it (it crashed after training before), and its scores are the SQuAD 2.0 rule's over its predictions."""
    data = json.loads(env.korquad.read_text(encoding="utf-8"))
    data["data"] = data["data"][-2:]
    n = 0
    for article in data["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                if n % 3 == 0:
                    qa.update(is_impossible=True, plausible_answers=qa["answers"], answers=[])
                n += 1
    squad2 = tmp_path / "squad2.json"
    squad2.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    proc = run_task(env, "mrc2", ["--train_mode", "mrc", "--checkpoint", str(env.pre / "final"),
                                  "--train_file", str(env.korquad), "--eval_file", str(squad2), "--max_train_examples", "16",
                                  "--max_eval_examples", "24", "--doc_stride", "32", "--max_query_length", "16",
                                  "--train_batch_size", "8", "--num_steps", "2"])
    assert "[mrc] questions without an answer (SQuAD 2.0 style): 0 of 16 training, 8 of 24 evaluation" in proc.stdout
    from data.metrics import squad_em_f1
    from data.mrc import load_squad

    predictions = json.loads((env.out / "mrc2" / "predictions.json").read_text(encoding="utf-8"))
    expected = squad_em_f1(predictions, load_squad(squad2)[:24])
    assert eval_line(proc.stdout)["exact_match"] == pytest.approx(expected["exact_match"], abs=1e-3)
    assert expected["unanswerable"] == 8


@pytest.fixture(scope="module")
def ict_runs(env):
    """The same global batches: 2 processes x 4 pairs, and 1 process x 8 pairs."""
    args = ["--train_mode", "ict", "--checkpoint", str(env.pre / "final"), "--train_file", str(env.korquad),
            "--eval_fraction", "0.25", "--max_eval_examples", "24", "--max_query_length", "16",
            "--max_train_examples", "32", "--num_steps", "12"]
    two = run_task(env, "ict2", args + ["--train_batch_size", "4"], nproc=2)
    one = run_task(env, "ict1", args + ["--train_batch_size", "8"])
    return {"two": (env.out / "ict2", two), "one": (env.out / "ict1", one)}


def test_ict_negatives_come_from_every_process(ict_runs):
    """Each query of a 2 x 4 run scores 8 passages: the loss is the 1 x 8 run's, step by step; the
    barely pretrained encoder gives near-equal scores, so the first loss is close to ln 8, not ln 4."""
    two, one = train_losses(ict_runs["two"][0]), train_losses(ict_runs["one"][0])
    assert len(two) == len(one) == 12
    # equal up to float summation order, which the updates amplify slowly
    assert max(abs(a - b) for a, b in zip(two[:5], one[:5])) < 1e-4, (two, one)
    assert max(abs(a - b) for a, b in zip(two, one)) < 5e-3, (two, one)
    assert abs(two[0] - math.log(8)) < abs(two[0] - math.log(4)), two[0]
    assert_falls(two, "ict")
    # sharded evaluation (2 processes) ranks like the 1-process one
    r2, r1 = eval_line(ict_runs["two"][1].stdout), eval_line(ict_runs["one"][1].stdout)
    assert set(r2) == {"recall@1", "recall@5", "recall@20", "recall@100", "mrr"}
    assert r2 == pytest.approx(r1, abs=1e-3)


def test_encoder_and_search(env, ict_runs, tmp_path):
    """2 processes encode contiguous blocks; rows come back in file order; each text finds itself."""
    texts = [ln for ln in NSMC_TEST.read_text(encoding="utf-8").splitlines()[1:80]]
    rows = [(t.split("\t")[0], t.split("\t")[1]) for t in texts if t.split("\t")[1].strip()][:41]
    encode_file = tmp_path / "reviews.tsv"
    encode_file.write_text("id\ttext\n" + "".join(f"{i}\t{t}\n" for i, t in rows), encoding="utf-8")
    ckpt = ict_runs["one"][0] / "final"
    run_task(env, "enc", ["--train_mode", "encoder", "--checkpoint", str(ckpt), "--encode_file", str(encode_file),
                          "--eval_batch_size", "8", "--max_query_length", "64", "--num_steps", "1"], nproc=2)
    rd = env.out / "enc"
    vectors = np.load(rd / "vectors.npy")
    assert vectors.shape == (41, 32) and vectors.dtype == np.float32
    assert (rd / "ids.txt").read_text().splitlines() == [i for i, _ in rows]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not (rd / "final").exists()  # nothing trained, nothing exported
    # --pooling auto: the ict run from a pretrain-only checkpoint pooled by the mean, the encoder follows it
    assert json.loads((ckpt / "args.json").read_text())["pooling"] == "mean"
    assert json.loads((rd / "encoder.json").read_text())["pooling"] == "mean"

    from trainer.search import Searcher

    searcher = Searcher(rd)
    np.testing.assert_allclose(searcher.encode([t for _, t in rows]), vectors, atol=1e-5)
    hits = searcher.search([rows[7][1], rows[30][1]], top_k=3)
    assert [h[0].id for h in hits] == [rows[7][0], rows[30][0]]
    assert hits[0][0].text == rows[7][1] and hits[0][0].score == pytest.approx(1.0, abs=1e-5)
    # the same weights read from the run's last step-N checkpoint (DCP) instead of final/
    from_step = Searcher(rd, checkpoint=ict_runs["one"][0])
    np.testing.assert_allclose(from_step.encode([rows[7][1]]), vectors[7:8], atol=1e-5)
    out = launch("trainer/search.py", ["--vectors", str(rd), "--query", rows[3][1], "--top_k", "2"])
    first = out.stdout.splitlines()[1].split("\t")
    assert first[0] == "1" and first[2] == rows[3][0]
    # the same run name for another file: refused before any work, the vectors kept; the same inputs
    # again (1 process): written anew, equal
    other = tmp_path / "other.txt"
    other.write_text("".join(t + "\n" for _, t in rows[:5]), encoding="utf-8")
    before = {f: (rd / f).read_bytes() for f in ("vectors.npy", "ids.txt", "encoder.json")}
    base = ["--train_mode", "encoder", "--checkpoint", str(ckpt), "--eval_batch_size", "8", "--max_query_length", "64",
            "--num_steps", "1"]
    proc = run_task(env, "enc", [*base, "--encode_file", str(other)], check=False)
    assert proc.returncode != 0 and (f"{rd} already holds 41 vectors of {encode_file} (checkpoint {ckpt}), made with "
                                     f"other encode_file than this run's; they would be replaced") in proc.stderr
    assert {f: (rd / f).read_bytes() for f in before} == before
    run_task(env, "enc", [*base, "--encode_file", str(encode_file)])
    np.testing.assert_allclose(np.load(rd / "vectors.npy"), vectors, atol=1e-5)


def test_checkpoint_mismatch_errors(env, tmp_path, tiny_corpus):
    """Another model config, or another tokenizer than the checkpoint's: exit naming both and the fix."""
    other_cfg = write_config(tmp_path / "wider.json", hidden_size=48)
    base = ["--train_mode", "classify", "--train_file", str(NSMC_TRAIN), "--max_train_examples", "32",
            "--train_batch_size", "8", "--num_steps", "1"]
    for ckpt in (env.pre / "final",):  # a step-N checkpoint: the loop's _check_compatible, same message
        proc = launch("train.py", ["--model_name", "bad", "--model", str(other_cfg), "--output_dir", str(env.out),
                                   *COMMON, *base, "--checkpoint", str(ckpt)], check=False)
        assert proc.returncode != 0
        assert "another model config" in proc.stderr and "hidden_size: checkpoint 32 vs --model 48" in proc.stderr

    from data.tokenizer import train_tokenizer
    from trainer.args import parse_args
    from trainer.dist import DistContext
    from trainer.tasks.base import Task

    lines = tiny_corpus.read_text(encoding="utf-8").splitlines()
    other_corpus = tmp_path / "other.dat"
    other_corpus.write_text("\n".join(lines[1500:]) + "\n", encoding="utf-8")
    other_tok = tmp_path / "other_tok"
    train_tokenizer([other_corpus], vocab_size=2000, out_dir=other_tok)
    ctx = DistContext(0, 1, 0, torch.device("cpu"), "gloo")
    for ckpt in (env.pre / "final", env.pre / "step-10"):
        args = parse_args(0, ["--model_name", "x", "--model", str(env.cfg), "--output_dir", str(env.out), *COMMON,
                              *base, "--checkpoint", str(ckpt), "--tokenizer", str(other_tok)])
        with pytest.raises(SystemExit, match="is not the tokenizer .* trained with") as e:
            Task(args, ctx).load_tokenizer()
        assert str(other_tok) in str(e.value) and "Leave out --tokenizer" in str(e.value)
        args.tokenizer = str(env.tokenizer)  # the checkpoint's own tokenizer is fine
        assert Task(args, ctx).load_tokenizer().fingerprint
    args = parse_args(0, ["--model_name", "x", "--model", str(env.cfg), "--output_dir", str(env.out), *COMMON,
                          *base])
    with pytest.raises(SystemExit, match="needs a tokenizer"):
        Task(args, ctx).load_tokenizer()


# -- evaluation wiring against hand-computed values (fake engine, in process) ------------------

class FakeEngine:
    def __init__(self, model):
        self.model = model

    def train(self, mode: bool = True) -> None:
        pass

    def autocast(self):
        return contextlib.nullcontext()


def _bare_task(cls, tmp_path, **args):
    from trainer.dist import DistContext

    task = cls.__new__(cls)
    task.args = Namespace(eval_batch_size=2, no_progress=True, output_dir=str(tmp_path), model_name="m", **args)
    task.ctx = DistContext(0, 1, 0, torch.device("cpu"), "gloo")
    return task


def test_mrc_evaluate_hand_computed(tiny_tokenizer, tmp_path):
    """Two questions; the first answered exactly (EM 1, F1 1), the second "1989년" for the gold
    "1989년 2월 15일": char F1 = 2PR/(P+R) with P = 5/5, R = 5/10 -> 2/3. EM 50, F1 83.33."""
    from data.mrc import Answer, Example, MRCDataset, build_features
    from trainer.tasks.mrc import MRCTask

    filler = "이 문단은 창을 여러 개로 나누기 위한 긴 설명이다. " * 4
    c1 = filler + "대한민국의 수도는 서울특별시 이다."
    c2 = "임종석은 1989년 2월 15일 지명수배되었다. " + filler
    examples = [Example("q1", "대한민국의 수도는?", c1, [Answer("서울특별시", c1.index("서울특별시"))], "t1", "0-0"),
                Example("q2", "언제 수배되었나?", c2, [Answer("1989년 2월 15일", c2.index("1989년"))], "t2", "1-0")]
    feats = build_features(examples, tiny_tokenizer, max_seq_length=32, doc_stride=8, max_query_length=8)
    assert len(feats.features) > 4  # several windows, several batches of 2
    want = {"q1": (c1.index("서울특별시"), c1.index("서울특별시") + 5), "q2": (c2.index("1989년"), c2.index("1989년") + 5)}
    targets = {}
    for f in feats.features:
        s0, e0 = want[f.example_id]
        starts = [i for i, (s, _) in enumerate(f.token_offsets) if s == s0]
        ends = [i for i, (_, e) in enumerate(f.token_offsets) if e == e0]
        if starts and ends:
            targets[tuple(f.input_ids)] = (starts[0] + f.context_start, ends[0] + f.context_start)

    class Spans(torch.nn.Module):
        def forward(self, input_ids, attention_mask, **_):
            start, end = torch.zeros(input_ids.shape), torch.zeros(input_ids.shape)
            for r, (ids, m) in enumerate(zip(input_ids, attention_mask)):
                hit = targets.get(tuple(ids[m.bool()].tolist()))
                if hit:
                    start[r, hit[0]], end[r, hit[1]] = 10.0, 10.0
            return {"start_logits": start, "end_logits": end}

    task = _bare_task(MRCTask, tmp_path)
    task.eval_features, task.eval_dataset = feats, MRCDataset(feats)
    result = task.evaluate(FakeEngine(Spans()))
    assert result["exact_match"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx((100.0 + 200.0 / 3) / 2)
    predictions = json.loads((tmp_path / "m" / "predictions.json").read_text(encoding="utf-8"))
    assert predictions == {"q1": "서울특별시", "q2": "1989년"}


def test_ict_evaluate_hand_computed(tiny_tokenizer, tmp_path):
    """Gold passages at ranks 1, 2 and 3: recall@1 = 1/3, recall@5 = 1, MRR = (1 + 1/2 + 1/3) / 3."""
    from data.retrieval import RetrievalEvalSet
    from trainer.tasks.ict import ICTTask

    passages = ["첫 번째 문단", "두 번째 문단", "세 번째 문단"]
    queries = ["첫 질문", "둘째 질문", "셋째 질문"]
    vec = {**dict(zip(passages, [(1, 0, 0), (0, 1, 0), (0, 0, 1)])),
           **dict(zip(queries, [(1, 0.1, 0), (0.9, 0.5, 0), (0.9, 0.5, 0.1)]))}
    by_ids = {tuple([tiny_tokenizer.cls_id, *tiny_tokenizer.encode(t), tiny_tokenizer.sep_id]): v
              for t, v in vec.items()}

    class Lookup(torch.nn.Module):
        def forward(self, query_input_ids, query_attention_mask):
            return {"query_vectors": torch.tensor(
                [by_ids[tuple(ids[m.bool()].tolist())] for ids, m in zip(query_input_ids, query_attention_mask)])}

    task = _bare_task(ICTTask, tmp_path, max_seq_length=32, max_query_length=16)
    task.tokenizer = tiny_tokenizer
    task.eval_set = RetrievalEvalSet(["p0", "p1", "p2"], passages, ["", "", ""], ["q0", "q1", "q2"], queries,
                                     [0, 1, 2])
    result = task.evaluate(FakeEngine(Lookup()))
    assert result["recall@1"] == pytest.approx(1 / 3)
    assert result["recall@5"] == result["recall@20"] == result["recall@100"] == pytest.approx(1.0)
    assert result["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
