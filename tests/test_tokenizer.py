import importlib.util
import json
import pickle

import numpy as np
import pytest

from data.tokenizer import SPECIAL_TOKENS, KoTokenizer, check_vocab_size, main, train_tokenizer

TEXT = "태어나 처음으로 가슴아리는 영화였다. 20년이상 지났지만.."


@pytest.fixture(scope="module")
def mecab_tokenizer(tiny_corpus, tmp_path_factory):
    pytest.importorskip("mecab")
    out = tmp_path_factory.mktemp("tok_mecab")
    main(["train", "--input", str(tiny_corpus), "--vocab_size", "2000", "--out", str(out), "--morpheme", "mecab"])
    return out


def test_special_tokens_and_exact_vocab(tiny_tokenizer, tiny_tokenizer_dir):
    tok = tiny_tokenizer
    assert tok.vocab_size == 2000
    assert tok.convert_ids_to_tokens(range(6)) == SPECIAL_TOKENS
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.eod_id) == (0, 1, 2, 3, 4, 5)
    vocab = (tiny_tokenizer_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 2000 and vocab == tok.convert_ids_to_tokens(range(2000))
    assert json.loads((tiny_tokenizer_dir / "pretokenizer.json").read_text())["morpheme"] is None


def test_vocab_txt_is_bert_compatible(tiny_tokenizer, tiny_tokenizer_dir):
    from transformers import BertTokenizer

    bert = BertTokenizer(str(tiny_tokenizer_dir / "vocab.txt"), do_lower_case=False, strip_accents=False,
                         tokenize_chinese_chars=False)
    assert bert.encode(TEXT, add_special_tokens=False) == tiny_tokenizer.encode(TEXT)


def test_never_lowercases_and_offsets(tiny_tokenizer):
    ids, offsets = tiny_tokenizer.encode_with_offsets(TEXT)
    assert ids == tiny_tokenizer.encode(TEXT) == tiny_tokenizer.encode_batch([TEXT])[0]
    toks = tiny_tokenizer.convert_ids_to_tokens(ids)
    for t, (a, b) in zip(toks, offsets):
        if t != "[UNK]":
            assert TEXT[a:b] == t.removeprefix("##")
    assert tiny_tokenizer.decode(ids).replace(" ", "") == TEXT.replace(" ", "")


def test_special_strings_in_text_are_not_special_ids(tiny_tokenizer):
    ids = tiny_tokenizer.encode("좋아요 [MASK] [SEP] [EOD]")
    assert not set(ids) & {2, 3, 4, 5}


def test_is_word_start_and_special_masks(tiny_tokenizer):
    toks = tiny_tokenizer.convert_ids_to_tokens(range(tiny_tokenizer.vocab_size))
    ws = tiny_tokenizer.is_word_start()
    assert ws.shape == (2000,) and ws.dtype == bool
    assert all(ws[i] == (not t.startswith("##")) for i, t in enumerate(toks))
    assert tiny_tokenizer.is_special()[:6].all() and not tiny_tokenizer.is_special()[6:].all()


def test_pads_with_unused_when_trainer_stops_short(tmp_path):
    src = tmp_path / "small.dat"
    src.write_text("가나 다라\n마바 사아\n\n가나 마바\n", encoding="utf-8")
    tok = train_tokenizer([src], vocab_size=300, out_dir=tmp_path / "tok")
    assert tok.vocab_size == 300
    first_unused = int(np.argmax(tok.is_special()[6:])) + 6
    assert tok.convert_ids_to_tokens([first_unused, 299]) == ["[unused0]", f"[unused{299 - first_unused}]"]
    assert KoTokenizer.load(tmp_path / "tok").vocab_size == 300
    assert tok.is_special().sum() > 6
    assert tok.encode("가나 마바") and tok.unk_id not in tok.encode("가나 마바")


def test_check_vocab_size_message(tiny_tokenizer):
    check_vocab_size(tiny_tokenizer, 2000)
    with pytest.raises(ValueError, match=r"2000.*vocab_size=32000.*--vocab_size 32000"):
        check_vocab_size(tiny_tokenizer, 32000)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.dat"):
        train_tokenizer([tmp_path / "missing.dat"], 100, tmp_path / "t")
    empty = tmp_path / "empty.dat"
    empty.write_bytes(b"\n\n  \n")
    with pytest.raises(ValueError, match=r"is empty \(blank lines only\)"):
        train_tokenizer([empty], 100, tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        KoTokenizer.load(tmp_path / "nothing")


@pytest.mark.skipif(importlib.util.find_spec("kiwipiepy") is not None, reason="kiwipiepy installed")
def test_kiwi_missing_says_how_to_install(tmp_path):
    src = tmp_path / "a.dat"
    src.write_text("가나\n", encoding="utf-8")
    with pytest.raises(ImportError, match="pip install kiwipiepy"):
        train_tokenizer([src], 100, tmp_path / "t", morpheme="kiwi")


def test_mecab_morpheme_mode(mecab_tokenizer):
    tok = KoTokenizer.load(mecab_tokenizer)  # the pre-tokenizer comes back from pretokenizer.json
    assert tok.morpheme == "mecab" and tok.vocab_size == 2000
    plain_same_vocab = KoTokenizer(tok.tokenizer, None)
    assert tok.fingerprint != plain_same_vocab.fingerprint  # the pre-tokenizer is part of the cache key
    ids, offsets = tok.encode_with_offsets(TEXT)
    toks = tok.convert_ids_to_tokens(ids)
    # particles and endings are cut off their stems: 처음|##으로, 영화|##였|##다
    assert toks[toks.index("처음") + 1] == "##으로"
    assert toks[toks.index("영화") + 1] == "##였"
    for t, (a, b) in zip(toks, offsets):  # offsets index the original text
        if t != "[UNK]":
            assert TEXT[a:b] == t.removeprefix("##")
    assert tok.decode(ids) == TEXT
    assert tok.encode_batch([TEXT, "좋아요"]) == [ids, tok.encode("좋아요")]
    clone = pickle.loads(pickle.dumps(tok))  # DataLoader workers / process pools
    assert clone.encode(TEXT) == ids


def test_mecab_starts_read_from_the_lattice_equal_mecab_parse(tiny_corpus, monkeypatch):
    """The morpheme starts come from python-mecab-ko's lattice (skipping the Morpheme and Feature
    objects MeCab.parse builds: 1.9x faster pre-tokenization), equal to MeCab.parse's spans on real
    reviews and odd text; without the lattice helper (another package version) MeCab.parse is used."""
    mecab = pytest.importorskip("mecab")
    import data.tokenizer as tok_mod
    from data.tokenizer import MorphemeSplitter

    lines = [ln for ln in tiny_corpus.read_text(encoding="utf-8").splitlines() if ln.strip()][:1500]
    lines += ["  a  b ", "😀 이모지 🇰🇷 국기", "\t탭\t문자", "ㅋ" * 3000, "한글English123혼합", "\u200b제로폭", "𠀀 확장한자",
              "(괄호)\"따옴표\"…말줄임", "ｆｕｌｌ　ｗｉｄｔｈ　전각"]
    reference = mecab.MeCab()
    splitter = MorphemeSplitter("mecab")
    expect = [[m.span.start for m in reference.parse(ln)] for ln in lines]
    assert [splitter.starts(ln) for ln in lines] == expect
    split = [splitter.split(ln) for ln in lines]
    monkeypatch.setattr(tok_mod, "_mecab_lattice", lambda text: None)
    assert [splitter.starts(ln) for ln in lines] == expect
    assert [splitter.split(ln) for ln in lines] == split


def test_morpheme_offsets_with_odd_spacing(mecab_tokenizer):
    tok = KoTokenizer.load(mecab_tokenizer)
    text = "  영화가\t정말   좋았어요!!  "
    ids, offsets = tok.encode_with_offsets(text)
    pieces = [text[a:b] for a, b in offsets]
    assert "".join(pieces) == "".join(text.split())
    assert np.all(np.diff([a for a, _ in offsets]) > 0)



@pytest.mark.parametrize("form", ["nfd", "bom", "zero_width", "soft_hyphen_and_tab"])
def test_morpheme_mode_reads_text_as_the_normalizer_leaves_it(mecab_tokenizer, tiny_corpus, form):
    """The analyzer cut decomposed (NFD) Hangul where the NFC text has other morphemes (91 of 300
    NSMC lines got other ids), and a BOM or zero-width joiner before a word made its first morpheme a
    continuation ("##영화"), one inside a word a lone "##". It reads the normalized text now: the ids
    are those of the clean line, the offsets still index the original text."""
    import unicodedata

    tok = KoTokenizer.load(mecab_tokenizer)
    lines = [ln for ln in tiny_corpus.read_text(encoding="utf-8").splitlines() if ln.strip()][-120:]
    change = {"nfd": lambda t: unicodedata.normalize("NFD", t), "bom": lambda t: "\ufeff" + t,
              "zero_width": lambda t: t.replace(" ", " \u200d").replace("다", "\u200b다"),
              "soft_hyphen_and_tab": lambda t: t.replace(" ", "\t\u00ad")}[form]
    for clean in lines:
        text = change(clean)
        ids, offsets = tok.encode_with_offsets(text)
        assert ids == tok.encode(clean) == tok.encode(text) == tok.encode_batch([text])[0], text
        for piece, (a, b) in zip(tok.convert_ids_to_tokens(ids), offsets):
            if piece != "[UNK]":  # the piece is the original text's span, normalized
                assert tok.tokenizer.normalizer.normalize_str(text[a:b]) == piece.removeprefix("##")


ODD_LINES = [
    "탭\t이 있는 줄", "전각\u3000공백", "제어\x07문자", "널\x00문자", "대체\ufffd문자", "폭 없는\u200d결합",
    "\u1100\u1161\u11a8 풀어 쓴 한글", "e\u0301 결합 부호", "이모지 😀 줄", "漢字 섞인 줄", "사용자 영역 \ue000",
    "미할당 \u0378", "줄\u2028구분", "ＦＵＬＬＷＩＤＴＨ 전각 영문", "ﬁ 합자", "  앞뒤 공백  ", "", "[MASK] [SEP]",
]


@pytest.mark.parametrize("normalizer", ["ours", "lowercase_chinese", "nfkc", "strip"])
def test_batch_encoding_bypass_gives_the_ids_of_the_full_tokenizer(tiny_tokenizer, normalizer):
    """encode_batch skips the normalizer for lines it would leave unchanged: the ids must be those
    of the full tokenizer, line by line, on real reviews and on lines each normalizer changes."""
    from tokenizers import Tokenizer, normalizers

    from data.tokenizer import NormalizerBypass
    from tests.conftest import NSMC_CORPUS

    raw = Tokenizer.from_str(tiny_tokenizer.tokenizer.to_str())
    raw.normalizer = {
        "ours": raw.normalizer,
        "lowercase_chinese": normalizers.Sequence([normalizers.BertNormalizer(
            lowercase=True, strip_accents=False, handle_chinese_chars=True), normalizers.NFC()]),
        "nfkc": normalizers.NFKC(),
        "strip": normalizers.Sequence([normalizers.Strip(), normalizers.NFC()]),
    }[normalizer]
    tok = KoTokenizer(raw)
    lines = NSMC_CORPUS.read_text(encoding="utf-8").splitlines()[3000:6000] + ODD_LINES
    want = [tok.tokenizer.encode(t, add_special_tokens=False).ids for t in lines]
    assert tok.encode_batch(lines) == want and tok._bypass is None  # a few texts: not worth setting up
    flat_want = ([i for w in want for i in w], [len(w) for w in want])
    assert tuple(x.tolist() for x in tok.encode_batch_flat(lines)) == flat_want
    tok.prepare_batch_encoding()
    assert tok.encode_batch(lines) == want
    # flat, and the unchanged lines joined (JoinedEncoder) where the bypass is set up
    assert tuple(x.tolist() for x in tok.encode_batch_flat(lines)) == flat_want
    bypass = NormalizerBypass.of(tok.tokenizer)
    if normalizer == "strip":
        assert bypass is None  # not a per-character map: every line takes the full path
        return
    unchanged = [bypass.unchanged(t) for t in lines]
    assert bypass.unchanged_mask(lines) == unchanged
    assert bypass.unchanged_mask(["줄\n바꿈", "좋다"]) == [bypass.unchanged("줄\n바꿈"), True]
    assert sum(unchanged) > 2500  # the bypass is taken for most clean text ...
    for t, same in zip(lines, unchanged):  # ... and only where the normalizer is the identity
        assert not same or tok.tokenizer.normalizer.normalize_str(t) == t, repr(t)
    assert pickle.loads(pickle.dumps(tok)).encode_batch(ODD_LINES) == want[-len(ODD_LINES):]


@pytest.mark.parametrize("pre", ["bert", "whitespace"])
def test_joined_encoding_gives_each_texts_own_ids(tiny_tokenizer, pre):
    """JoinedEncoder encodes groups of texts joined by a one-character word none of them holds and
    cuts at its id: each text's ids are its own encoding, also where the texts hold the first
    candidates (another is picked), where they hold every candidate (text by text) and for lines
    that give no ids."""
    from tokenizers import Tokenizer, pre_tokenizers

    from data.tokenizer import JoinedEncoder
    from tests.conftest import NSMC_CORPUS

    bare = Tokenizer.from_str(tiny_tokenizer.tokenizer.to_str())
    bare.normalizer = None
    bare.encode_special_tokens = True
    if pre == "whitespace":  # the morpheme tokenizers' pre-tokenizer
        bare.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    enc = JoinedEncoder.of(bare)
    assert enc is not None and len(enc.candidates) > 50
    # reviews after the tokenizer's training slice (every word of the vocabulary occurs in that one)
    lines = [t for t in NSMC_CORPUS.read_text(encoding="utf-8").splitlines()[3000:5000] if t.strip()]
    assert all(len(c) == 1 or c.isalnum() for _, c in enc.candidates)
    first = " ".join(c for _, c in enc.candidates[:20])   # texts holding the first candidates
    lines += [first, "", "   ", f"{first}영화", "[MASK]", "[SEP] 좋다", "!?", "##"]
    want = [e.ids for e in bare.encode_batch(lines, add_special_tokens=False)]
    flat_want = ([i for w in want for i in w], [len(w) for w in want])
    assert tuple(x.tolist() for x in enc.encode_flat(lines)) == flat_want
    assert enc._pick >= 20 and enc.candidates[enc._pick][1] not in "\n".join(lines)
    # texts holding every candidate: encoded one by one
    every = " ".join(c for _, c in enc.candidates)
    got = enc.encode_flat(lines[:10] + [every])
    assert tuple(x.tolist() for x in got) == ([i for w in want[:10] for i in w] + bare.encode(every, add_special_tokens=False).ids,
                                              [len(w) for w in want[:10]] + [len(bare.encode(every, add_special_tokens=False).ids)])
    assert [x.tolist() for x in enc.encode_flat([])] == [[], []]


def test_joined_encoding_only_where_it_is_exact(tiny_tokenizer):
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers

    from data.tokenizer import JoinedEncoder

    def variant(change):
        t = Tokenizer.from_str(tiny_tokenizer.tokenizer.to_str())
        t.normalizer = None
        change(t)
        return t

    assert JoinedEncoder.of(variant(lambda t: None)) is not None
    assert JoinedEncoder.of(tiny_tokenizer.tokenizer) is None  # a normalizer could act across the joint
    assert JoinedEncoder.of(variant(lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Metaspace()))) is None
    assert JoinedEncoder.of(variant(lambda t: t.add_tokens([AddedToken("영화 좋다")]))) is None
    assert JoinedEncoder.of(variant(lambda t: t.enable_truncation(16))) is None
