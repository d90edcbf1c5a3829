"""Inputs users bring to the pretraining data path that the other data tests do not cover: shard
names holding glob characters, symlinked shard directories, JSON-lines shards already named .dat,
transformers tokenizer folders with an empty or lowercasing vocabulary, and a tokenizer path that
names a file of the tokenizer folder. On slices of NSMC (tiny_corpus)."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from data.corpus import _cli as corpus_cli
from data.corpus import load_or_build
from data.spec import SpecError, resolve
from data.tokenizer import KoTokenizer, TokenizerError, missing_tokenizer_hint


def _lines(tiny_corpus, n):
    return b"".join(tiny_corpus.read_bytes().splitlines(keepends=True)[:n])


def test_existing_names_with_glob_characters_are_paths(tiny_corpus, tmp_path):
    """`wiki[ko].dat` or a folder `set[1]` exist: the part names them, as a comma or `:NUMBER` inside an
    existing name is part of the name (it was taken as a pattern matching nothing)."""
    (tmp_path / "wiki[ko].dat").write_bytes(_lines(tiny_corpus, 50))
    (tmp_path / "set[1]").mkdir()
    (tmp_path / "set[1]" / "s.dat").write_bytes(_lines(tiny_corpus, 40))
    (tmp_path / "other.dat").write_bytes(_lines(tiny_corpus, 30))
    assert resolve(str(tmp_path / "wiki[ko].dat")).shards == (tmp_path / "wiki[ko].dat",)
    assert resolve(str(tmp_path / "set[1]")).shards == (tmp_path / "set[1]" / "s.dat",)
    spec = resolve(f"{tmp_path / 'wiki[ko].dat'}:0.3,{tmp_path / 'other.dat'}:0.7")
    assert [p.weight for p in spec.parts] == [0.3, 0.7]
    # still a pattern where no such path exists; and an explicitly named empty file is still refused
    assert resolve(str(tmp_path / "[wo]ther.dat")).shards == (tmp_path / "other.dat",)
    (tmp_path / "e[1].dat").write_bytes(b"")
    with pytest.raises(SpecError, match=r"e\[1\]\.dat: is empty"):
        resolve(str(tmp_path / "e[1].dat"))


def test_directory_follows_symlinked_subdirectories_once(tiny_corpus, tmp_path):
    """A directory spec takes every *.dat under it, also under a symlinked subdirectory (as the glob
    `dir/**/*.dat` does; it was silently left out), and a symlink loop neither hangs nor repeats."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "y.dat").write_bytes(_lines(tiny_corpus, 40))
    corp = tmp_path / "corp"
    corp.mkdir()
    (corp / "own.dat").write_bytes(_lines(tiny_corpus, 30))
    (corp / "sub").symlink_to(other, target_is_directory=True)
    assert resolve(str(corp / "**" / "*.dat")).shards == (corp / "own.dat", corp / "sub" / "y.dat")
    assert resolve(str(corp)).shards == (corp / "own.dat", corp / "sub" / "y.dat")
    (corp / "up").symlink_to(corp, target_is_directory=True)  # a loop
    assert resolve(str(corp)).shards == (corp / "own.dat", corp / "sub" / "y.dat")


def test_json_lines_hint_never_writes_onto_its_input(tmp_path, monkeypatch):
    """The jq command printed for a JSON-lines shard named `dump.dat` wrote `> dump.dat`: run as shown,
    the shell empties the shard before jq reads it."""
    shard = tmp_path / "dump.dat"
    shard.write_text('{"id": 1, "text": "영화 좋아요"}\n{"id": 2, "text": "별로"}\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match="holds JSON lines") as e:
        resolve("dump.dat")
    command = str(e.value).split("`")[1]
    assert command.startswith("jq -r '.text, \"\"' dump.dat > ") and not command.endswith("> dump.dat")
    with pytest.raises(SpecError, match=r"> dump\.dat`"):  # another name keeps its plain .dat target
        (tmp_path / "dump.jsonl").write_bytes(shard.read_bytes())
        resolve(str(tmp_path / "dump.jsonl"))


def _folder_of(tokenizer_dir, out, vocab):
    """A transformers-style tokenizer.json: our WordPiece with another vocabulary."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in vocab]
    out.mkdir()
    (out / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return out


def test_tokenizer_of_special_tokens_only_is_refused(tiny_tokenizer_dir, tmp_path):
    """transformers 5's `BertTokenizerFast(vocab_file=...)` saves a tokenizer.json of its five special
    tokens alone: every text became [UNK] and pretraining ran on nothing but [UNK]."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    folder = _folder_of(tiny_tokenizer_dir, tmp_path / "specials_only", {t: i for i, t in enumerate(specials)})
    with pytest.raises(TokenizerError, match=r"specials_only/tokenizer.json: its vocabulary holds only the special "
                                             r"tokens .*no piece of text"):
        KoTokenizer.load(folder)


def test_build_warns_when_most_tokens_are_unknown(tiny_tokenizer_dir, tiny_tokenizer, tiny_corpus, tmp_path, caplog):
    """A vocabulary that misses the corpus's text (a lowercasing, accent-stripping transformers folder
    turns Hangul into jamo) gave a cache of mostly [UNK] without a word; the build now says so and the
    manifest counts them. Our own tokenizer on its corpus stays quiet."""
    keep = {t: i for t, i in tiny_tokenizer.tokenizer.get_vocab().items() if i < 40}  # specials + a few pieces
    folder = _folder_of(tiny_tokenizer_dir, tmp_path / "narrow", keep)
    shard = tmp_path / "c.dat"
    shard.write_bytes(_lines(tiny_corpus, 300))
    narrow = KoTokenizer.load(folder)
    with caplog.at_level(logging.WARNING, logger="data.corpus"):
        cache = load_or_build(shard, narrow, progress=False, num_workers=1)
    unknown = int((np.asarray(cache.tokens) == narrow.unk_id).sum())
    assert cache.manifest["counts"]["unknown"] == unknown > 0.5 * cache.num_tokens
    assert any("are [UNK]" in r.getMessage() and str(shard) in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data.corpus"):
        ours = load_or_build(shard, tiny_tokenizer, progress=False, num_workers=1)
    assert ours.manifest["counts"]["unknown"] == int((np.asarray(ours.tokens) == tiny_tokenizer.unk_id).sum())
    assert not [r for r in caplog.records if "[UNK]" in r.getMessage()]


def test_tokenizer_path_naming_a_file_of_the_folder(tiny_tokenizer_dir, tiny_corpus, tmp_path, capsys):
    """`--tokenizer tok/vocab.txt` was read as JSON ("not valid JSON; train the tokenizer again") and
    `python -m data.corpus build --tokenizer tok/tokenizer.json` said "no tokenizer.json there": both
    name the folder to pass."""
    tok = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, tok)
    with pytest.raises(FileNotFoundError, match=rf"pass the folder that holds it: --tokenizer {tok}\b"):
        KoTokenizer.load(tok / "vocab.txt")
    assert f"pass the folder that holds it: --tokenizer {tok}" in missing_tokenizer_hint(tok / "vocab.txt")
    assert KoTokenizer.load(tok / "tokenizer.json").fingerprint == KoTokenizer.load(tok).fingerprint
    shard = tmp_path / "c.dat"
    shard.write_bytes(_lines(tiny_corpus, 100))
    assert corpus_cli(["build", "--corpus_path", str(shard), "--tokenizer", str(tok / "tokenizer.json"),
                       "--no_progress", "--num_workers", "1"]) == 0
    assert "1 shard cache(s) ready" in capsys.readouterr().out


def test_vocab_only_folder_hint_keeps_korean_cased(tiny_tokenizer_dir, tmp_path):
    """A folder of vocab.txt alone (no tokenizer_config.json, no config.json): AutoTokenizer cannot tell
    its class (transformers 5 fails asking for sentencepiece) and BertTokenizerFast's defaults lowercase and
    strip accents (Hangul to jamo, all [UNK]); the hint names the cased BertTokenizerFast, which works."""
    pytest.importorskip("transformers")
    folder = tmp_path / "vocab_only"
    folder.mkdir()
    shutil.copy(tiny_tokenizer_dir / "vocab.txt", folder / "vocab.txt")
    hint = missing_tokenizer_hint(folder)
    code = hint.split("`python -c \"")[1].split("\"`")[0]
    assert "do_lower_case=False" in code and "strip_accents=False" in code
    exec(code, {})  # the command as printed (absolute paths here)
    tok = KoTokenizer.load(f"{folder}.tokenizer")
    ours = KoTokenizer.load(tiny_tokenizer_dir)
    text = "태어나 처음으로 가슴아리는 영화였다"
    assert tok.convert_ids_to_tokens(tok.encode(text)) == ours.convert_ids_to_tokens(ours.encode(text))


def test_classic_mac_line_endings_are_refused(tiny_corpus, tmp_path):
    """Lines ended by a carriage return alone were read as one line (one sentence, one document: the
    tokenizer trained and the cache built on it without a word); CRLF stays accepted, read as LF."""
    text = _lines(tiny_corpus, 200)
    mac = tmp_path / "mac.dat"
    mac.write_bytes(text.replace(b"\n", b"\r"))
    with pytest.raises(SpecError, match=r"mac.dat: ends its lines with a carriage return alone .*`tr '\\r' '\\n' < "):
        resolve(str(mac))
    crlf = tmp_path / "crlf.dat"
    crlf.write_bytes(text.replace(b"\n", b"\r\n"))
    assert resolve(str(crlf)).shards == (crlf,)


def test_blank_only_shard_is_empty(tmp_path):
    """A shard of blank lines only is empty: skipped in a directory (as a zero-byte one) instead of stopping
    the run part-way through the cache build ('has no tokens'); named alone, refused at once."""
    (tmp_path / "a.dat").write_text("첫 문장\n둘째 문장\n", encoding="utf-8")
    (tmp_path / "b.dat").write_text("\n  \n\r\n\t\n", encoding="utf-8")
    assert [p.name for p in resolve(str(tmp_path)).shards] == ["a.dat"]
    with pytest.raises(SpecError, match=r"b\.dat: is empty \(blank lines only\)"):
        resolve(str(tmp_path / "b.dat"))
