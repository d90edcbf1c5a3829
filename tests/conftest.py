"""Shared pytest fixtures. Keep them generic: other packages' tests use them too."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NSMC_CORPUS = REPO.parent / "shared" / "data" / "nsmc" / "reviews_corpus.txt"


def _corpus_slice(out: Path, num_lines: int) -> Path:
    if not NSMC_CORPUS.exists():
        pytest.skip(f"{NSMC_CORPUS} not available")
    with open(NSMC_CORPUS, "rb") as src, open(out, "wb") as dst:
        dst.writelines(itertools.islice(src, num_lines))
    return out


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """The first 3,000 lines of the NSMC pretraining corpus (.dat: blank line between documents)."""
    return _corpus_slice(tmp_path_factory.mktemp("corpus") / "tiny.dat", 3000)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_corpus, tmp_path_factory) -> Path:
    """A 2,000-token WordPiece vocabulary trained on tiny_corpus (plain pre-tokenization)."""
    from data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([tiny_corpus], vocab_size=2000, out_dir=out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from data.tokenizer import KoTokenizer

    return KoTokenizer.load(tiny_tokenizer_dir)
