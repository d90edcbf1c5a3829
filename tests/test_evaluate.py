"""trainer.evaluate: two checkpoints -> results.json + a Markdown table; an interrupted
evaluation resumes without redoing finished runs; torchrun with 2 processes gives the 1-process
numbers; a transformers BERT folder scores like the checkpoint it was exported from; bad inputs
stop it before any run."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.pretrain_util import KLUE, tiny_pretrain
from tests.trainer_util import REPO

pytestmark = pytest.mark.skipif(not (KLUE / "sts_train.json").exists(), reason="../shared/data/klue not available")
# tiny recipes: every task of the runs below fine-tunes 6 steps on 32 examples
TINY = ["--set", "all.max_seq_length=64", "--set", "all.num_steps=6", "--set", "all.warmup_steps=0",
        "--set", "all.train_batch_size=8", "--set", "all.learning_rate=5e-3", "--set", "all.max_train_examples=32",
        "--set", "all.max_eval_examples=24", "--set", "ner.doc_stride=32", "--no_progress"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir):
    return tiny_pretrain(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir)


def evaluate(args: list[str], nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """python -m trainer.evaluate, or under torchrun with nproc processes."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    cmd = [*run, "-m", "trainer.evaluate", *args, *TINY]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def first(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "ev"
    proc = evaluate([str(env.pre / "final"), str(env.pre / "step-10"), "--tasks", "sts,ner", "--seeds", "2",
                     "--output_dir", str(out)])
    return out, proc


def test_two_checkpoints_write_the_table(first):
    out, proc = first
    results = json.loads((out / "results.json").read_text())
    assert list(results["checkpoints"]) == ["pre/final", "pre/step-10"]
    assert sorted(results["runs"]) == sorted(f"{c}|{t}|{s}" for c in ("pre/final", "pre/step-10")
                                             for t in ("sts", "ner") for s in (42, 43))
    table = (out / "results.md").read_text()
    assert table in proc.stdout
    assert table.splitlines()[0] == "| task | metric | pre/final | pre/step-10 |"
    rows = {tuple(c.strip() for c in ln.split("|")[1:3]): ln for ln in table.splitlines()[2:]}
    assert set(rows) == {("sts", "pearson"), ("ner", "entity_f1"), ("ner", "char_f1")}
    # mean ± std over the 2 seeds; final/ and step-10 hold the same weights: the same numbers
    cells = [c.strip() for c in rows[("sts", "pearson")].split("|")[3:5]]
    assert cells[0] == cells[1] and re.fullmatch(r"-?[\d.e-]+ ± [\d.e-]+ \(2\)", cells[0]), cells
    vals = [results["runs"][f"pre/final|sts|{s}"]["metrics"]["pearson"] for s in (42, 43)]
    assert float(cells[0].split()[0]) == pytest.approx(sum(vals) / 2, rel=1e-3)
    # weights of the fine-tunes are removed; their logs and predictions stay
    run = out / "runs" / "pre_final" / "ner-seed42"
    assert (run / "eval.json").is_file() and (run / "predictions.tsv").is_file() and not (run / "final").exists()


def test_interrupted_evaluation_resumes(env, first, tmp_path):
    """Finished runs in results.json are kept and not redone; the run that was cut off (its
    directory is there, it is not in results.json) starts again."""
    out = tmp_path / "ev"
    shutil.copytree(first[0], out)
    results = json.loads((out / "results.json").read_text())
    del results["runs"]["pre/final|ner|43"]                  # as if killed during this run
    (out / "results.json").write_text(json.dumps(results))
    (out / "runs" / "pre_final" / "ner-seed43" / "partial").write_text("left by the killed run")
    proc = evaluate([str(env.pre / "final"), str(env.pre / "step-10"), "--tasks", "sts,ner", "--seeds", "2",
                     "--output_dir", str(out)])
    ran = re.findall(r"^\[evaluate\] (\S+): --", proc.stdout, re.M)
    assert ran == ["pre/final|ner|43"]
    assert "8 runs (7 already in" in proc.stdout
    again = json.loads((out / "results.json").read_text())
    for key, run in results["runs"].items():
        assert again["runs"][key] == run
    assert again["runs"]["pre/final|ner|43"]["metrics"] == pytest.approx(
        json.loads((first[0] / "results.json").read_text())["runs"]["pre/final|ner|43"]["metrics"], abs=1e-6)
    assert not (out / "runs" / "pre_final" / "ner-seed43" / "partial").exists()
    # another recipe for a finished run is refused, nothing is run
    proc = evaluate([str(env.pre / "final"), "--tasks", "sts", "--output_dir", str(out), "--set", "sts.num_steps=7"],
                    check=False)
    assert proc.returncode != 0 and "--num_steps: 6 -> 7" in proc.stderr and "[evaluate] pre" not in proc.stdout


@pytest.mark.slow
def test_two_processes_equal_one(env, first, tmp_path):
    """torchrun -m trainer.evaluate: the global batch of 8 is 4 per process; the numbers are the
    1-process ones."""
    proc = evaluate([str(env.pre / "final"), "--tasks", "sts,ner", "--seeds", "1", "--output_dir", str(tmp_path)],
                    nproc=2)
    two = json.loads((tmp_path / "results.json").read_text())
    one = json.loads((first[0] / "results.json").read_text())
    assert two["processes"] == 2 and "--train_batch_size 4" in proc.stdout
    for key in ("pre/final|sts|42", "pre/final|ner|42"):
        assert two["runs"][key]["metrics"] == pytest.approx(one["runs"][key]["metrics"], abs=2e-3), key


@pytest.mark.slow
def test_transformers_bert_folder(env, first, tmp_path):
    """Our BERT export (a transformers folder) is converted back and scores as final/ did."""
    from trainer.export import export

    summary = export(env.pre / "final", tmp_path / "hf")
    assert summary["target"] == "bert"
    evaluate([str(tmp_path / "hf"), "--tasks", "sts", "--output_dir", str(tmp_path / "ev")])
    hf = json.loads((tmp_path / "ev" / "results.json").read_text())
    ours = json.loads((first[0] / "results.json").read_text())
    assert list(hf["checkpoints"]) == ["hf"]
    assert hf["runs"]["hf|sts|42"]["metrics"] == pytest.approx(ours["runs"]["pre/final|sts|42"]["metrics"], abs=1e-4)


def test_bad_inputs_stop_before_any_run(env, tmp_path, monkeypatch, capsys, tiny_corpus):
    from tests.test_bad_input import DIST_ENV
    from trainer.evaluate import main

    for name in DIST_ENV:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    ckpt = tmp_path / "final"
    shutil.copytree(env.pre / "final", ckpt)
    from data.tokenizer import train_tokenizer

    train_tokenizer([tiny_corpus], vocab_size=1000, out_dir=tmp_path / "tok1000")
    wrong = tmp_path / "wrong_tok"
    shutil.copytree(ckpt, wrong)
    shutil.copy2(tmp_path / "tok1000" / "tokenizer.json", wrong / "tokenizer.json")
    bad_sts = tmp_path / "sts.json"
    bad_sts.write_text(json.dumps([{"guid": "a", "sentence1": "x", "sentence2": "y", "labels": {"label": 7}}]))
    not_ner = KLUE.parent / "nsmc" / "sentiment_test.tsv"
    from trainer.export import export

    export(ckpt, tmp_path / "hf_vocab_only")  # a transformers folder as older uploads ship it: vocab.txt alone
    (tmp_path / "hf_vocab_only" / "tokenizer.json").unlink()
    cases = [
        ([str(tmp_path / "hf_vocab_only"), "--tasks", "sts"], "it is a transformers tokenizer without tokenizer.json: "
         "write one into a new folder with `python -c \"from transformers import AutoTokenizer"),
        ([str(wrong), "--tasks", "sts"], "mismatched tokenizer: tokenizer has 1000 tokens"),
        ([str(ckpt), "--tasks", "sts", "--set", f"sts.train_file={bad_sts}"], "STS similarities are numbers from 0 to 5"),
        ([str(ckpt), "--tasks", "ner", "--set", f"ner.train_file={not_ner}"], "expected KLUE NER TSV"),
        ([str(ckpt), "--tasks", "sts", "--set", "sts.train_batch_size=7"], None),  # valid on 1 process
        ([str(ckpt), "--tasks", "sts", "--set", "sts.num_steps=-1"],
         "task sts: its recipe is not valid: --num_steps must be >= 0, got -1; fix it with --set sts.FLAG=VALUE"),
        ([str(tmp_path / "nothing"), "--tasks", "sts"], "no such file or directory"),
        ([str(ckpt), "--tasks", "pos"], "not in suite korean"),
    ]
    for argv, message in cases:
        if message is None:
            continue
        out = tmp_path / "ev"
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--output_dir", str(out), *TINY])
        err = capsys.readouterr().err + str(exc.value.code)
        assert exc.value.code and message in err, (argv, err[-1500:])
        assert "usage: train.py" not in err, err[-1500:]  # one line, not the launcher's usage text
        assert not (out / "runs").exists() and not (out / "results.json").exists()
    # an --output_dir holding a results.json / results.md of the user's: refused, nothing written
    for files, message in (({"results.json": '{"accuracy": 0.9}', "results.md": "# mine"},
                            "results.json there was not written by trainer.evaluate (no 'runs' record) and would "
                            "be replaced; pick another --output_dir"),
                           ({"results.md": "# mine"}, "results.md there was not written by trainer.evaluate (no "
                                                      "results.json beside it)")):
        out = tmp_path / f"theirs{len(files)}"
        out.mkdir()
        for name, text in files.items():
            (out / name).write_text(text)
        with pytest.raises(SystemExit) as exc:
            main([str(ckpt), "--tasks", "sts", "--output_dir", str(out), *TINY])
        assert message in str(exc.value.code)
        assert {x.name: x.read_text() for x in out.iterdir()} == files


def test_recipe_warmup_follows_a_shortened_num_steps():
    """--set TASK.num_steps without warmup_steps keeps the recipes' 10% warm-up (a 10-step check run
    would otherwise stop at 'warmup exceeds the schedule'); a warm-up given wins in any order."""
    from trainer.evaluate import RECIPES, parse

    a = parse(["ckpt", "--set", "all.num_steps=10", "--set", "sts.num_steps=55", "--set", "ner.warmup_steps=3"])
    assert a.recipes["nsmc"]["warmup_steps"] == 1 and a.recipes["sts"]["warmup_steps"] == 5
    assert a.recipes["ner"]["warmup_steps"] == "3" and a.recipes["ner"]["num_steps"] == "10"
    a = parse(["ckpt", "--set", "all.warmup_steps=0", "--set", "all.num_steps=6"])
    assert all(r["warmup_steps"] == "0" for r in a.recipes.values())
    a = parse(["ckpt"])  # untouched recipes keep theirs
    assert all(a.recipes[t]["warmup_steps"] == RECIPES[t]["warmup_steps"] for t in RECIPES)
