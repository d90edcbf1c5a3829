"""Pretraining samples from a corpus (data.corpus.Corpus: shard caches side by side): MLM always,
plus SOP or ICT.

Shape letters: B batch, L sequence length (padded), N samples, U units.

The sample index is built with numpy over the cache offsets, shard by shard, into memory-mapped
files `<first shard>.<hash>.index/` beside the caches (hash of the shard caches, objective,
max_seq_length, split and weights): built once under a file lock (by the first process of a
node, or of the job on a shared file system) and shared by every process through the page cache,
so per-process memory does not grow with the corpus. Groups never cross shards.
- units: sentences; a sentence longer than max_seq_length - 3 tokens is cut into pieces of
  at most that length (counted in `stats["split_sentences"]`, never a crash or a silent drop);
- sop: consecutive units of one document packed greedily up to max_seq_length - 3 tokens; at
  __getitem__ the group is split at a random unit boundary (inside the unit when the group
  has one) into A and B, swapped with p=0.5 (sop_label 1 = swapped). Groups never cross
  documents. Groups of a single token are dropped and counted (`stats["dropped_short"]`);
- mlm: the units of each run of (kept) documents of a shard rendered as one stream, laid out by
  mlm_separator: "sep" (default) [SEP] after every unit, "wrap" every unit as [CLS] unit [SEP]
  (run_mlm's layout), "eod" units run together; in every layout [EOD] after a document's last
  unit. mlm_packing "full" (default) cuts the stream into rows of exactly max_seq_length
  ([CLS] + stream, or the stream alone for "wrap"; units cut at row edges; a run's last row
  under 1/8 full is dropped, counted in `stats["dropped_tail_tokens"]`), "units" packs whole
  units greedily (bench/quality.py measured full rows with [SEP] best per step: docs/tasks.md);
- ict: documents packed into passages as for sop (max_seq_length - 2); every unit of a
  passage with at least two units is a query; the passage keeps the query with p=0.1.
split="train"/"eval" leaves out / keeps only the documents held out for validation
(`held_out_documents`: a hash of shard name and document position below eval_fraction).
A weighted corpus spec blends its parts Megatron-style (`_blend`): sample i of the data set is
sample blend[i] of the parts' samples, each part holding its weight's share.
Samples are [CLS] A [SEP] (B [SEP]); token_type_ids 0 for A, 1 for B. MLM: 15% of the
non-special tokens (at least one), 80% [MASK], 10% a random non-special token, 10% unchanged;
whole-word masking selects whole words ("##" pieces with their head). Everything random in a
sample comes from np.random.default_rng([seed, epoch, index]).

set_epoch() changes masking and SOP splits; call it before creating the DataLoader iterator
(workers copy the dataset when they start, so not with persistent_workers).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from data.corpus import CacheWriteError, Corpus, CorpusCache, FileArray, _file_lock, cache_home
from data.tokenizer import KoTokenizer

logger = logging.getLogger(__name__)

OBJECTIVES = ("sop", "ict", "mlm")
MLM_SEPARATORS = ("eod", "sep", "wrap")
MLM_PACKINGS = ("units", "full")
ICT_KEEP_QUERY = 0.1
_WRITE_CHUNK = 1 << 20  # unit offsets shifted to corpus coordinates and written this many at a time
_MLM_BLOCK_UNITS = 256  # mlm packs inside blocks of this many units, so packing is vectorised


def _greedy_pack(cum: np.ndarray, starts: np.ndarray, ends: np.ndarray, budget: int) -> np.ndarray:
    """Greedy packing of units [starts[k], ends[k]) into groups of cost <= budget.

    cum: (U + 1,) cumulative cost; every single unit must cost <= budget.
    Returns (N, 2) int64 [start, end) unit ranges, sorted. One round per group of the
    longest block, each round vectorised over all blocks.
    """
    s = starts.astype(np.int64)
    e = ends.astype(np.int64)
    keep = s < e
    s, e = s[keep], e[keep]
    out_s, out_e = [], []
    while len(s):
        j = np.searchsorted(cum, cum[s] + budget, side="right") - 1
        j = np.clip(j, s + 1, e)
        out_s.append(s)
        out_e.append(j)
        more = j < e
        s, e = j[more], e[more]
    if not out_s:
        return np.zeros((0, 2), dtype=np.int64)
    groups = np.stack([np.concatenate(out_s), np.concatenate(out_e)], axis=1)
    return groups[np.argsort(groups[:, 0], kind="stable")]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def held_out_documents(shard_name: str, num_documents: int, fraction: float) -> np.ndarray:
    """(D,) bool: the documents of a shard held out for validation, by a hash of (shard file name,
    document position): the same split in every run, at any process count, after any resume,
    and a document keeps its side when shards are added or the corpus is moved."""
    if fraction <= 0:
        return np.zeros(num_documents, dtype=bool)
    seed = int.from_bytes(hashlib.sha256(shard_name.encode()).digest()[:8], "little")
    h = _splitmix64(np.arange(num_documents, dtype=np.uint64) + np.uint64(seed))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def _runs(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of the runs of True in a bool array."""
    k = np.concatenate([[False], keep, [False]]).astype(np.int8)
    d = np.diff(k)
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


def _mlm_layout(separator: str, packing: str) -> tuple[int, int, int]:
    """(extra tokens per unit, row prefix, row suffix) of an mlm row layout; budget = L - prefix - suffix."""
    if separator not in MLM_SEPARATORS or packing not in MLM_PACKINGS:
        raise ValueError(f"mlm separator must be one of {MLM_SEPARATORS} and packing one of {MLM_PACKINGS}, "
                         f"got {separator!r}, {packing!r}")
    return {"eod": 0, "sep": 1, "wrap": 2}[separator], int(separator != "wrap"), int(separator == "eod")


def _mlm_groups(cum: np.ndarray, doc_units: np.ndarray, keep_doc: np.ndarray, budget: int,
                packing: str) -> tuple[np.ndarray, np.ndarray, int]:
    """mlm rows of one shard: (N, 2) unit ranges, (N,) rendered tokens skipped at the start of each
    row's first unit (full packing), tokens dropped in runt rows. cum: (U + 1,) rendered cost."""
    rs, re_ = _runs(keep_doc)
    s, e = doc_units[rs], doc_units[re_]
    if packing == "units":  # greedy whole units, inside blocks of _MLM_BLOCK_UNITS units (vectorised)
        n_blocks = -(-(e - s) // _MLM_BLOCK_UNITS)
        first = np.repeat(np.cumsum(n_blocks) - n_blocks, n_blocks)
        starts = np.repeat(s, n_blocks) + (np.arange(n_blocks.sum()) - first) * _MLM_BLOCK_UNITS
        ends = np.minimum(starts + _MLM_BLOCK_UNITS, np.repeat(e, n_blocks))
        groups = _greedy_pack(cum, starts, ends, budget)
        return groups, np.zeros(len(groups), dtype=np.int64), 0
    # full rows: each run of kept documents rendered as one stream, cut every `budget` tokens
    lo, hi = cum[s], cum[e]
    n_rows = -(-(hi - lo) // budget)
    first = np.repeat(np.cumsum(n_rows) - n_rows, n_rows)
    v = np.repeat(lo, n_rows) + (np.arange(n_rows.sum(), dtype=np.int64) - first) * budget
    end = np.minimum(v + budget, np.repeat(hi, n_rows))
    # a run's last row with under budget/8 tokens is dropped (it would be mostly padding)
    runt = (end - v < budget // 8) & (np.repeat(n_rows, n_rows) > 1) & (end == np.repeat(hi, n_rows))
    dropped = int((end - v)[runt].sum())
    v, end = v[~runt], end[~runt]
    u0 = np.searchsorted(cum, v, side="right") - 1
    u1 = np.searchsorted(cum, end, side="left")
    return np.stack([u0, u1], axis=1).astype(np.int64), (v - cum[u0]).astype(np.int64), dropped


def _units(so: np.ndarray, do: np.ndarray, piece: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """A shard's units (its sentences, those longer than `piece` tokens cut into pieces): (U + 1,)
    token offsets (the last: the shard's end), (U,) bool "last unit of its document", (D + 1,)
    unit offsets of the documents, and the counts. Written for memory: besides the offsets, U and
    the flags, one (S + 1,) array of unit numbers and one temporary of that size."""
    so = np.asarray(so, dtype=np.int64)
    S = len(so) - 1
    lengths = np.diff(so)
    long = np.flatnonzero(lengths > piece)
    k = -(-lengths[long] // piece) - 1  # extra pieces of each long sentence
    del lengths
    # first_unit[i]: the unit number of sentence i's first piece (i + the extra pieces before it)
    first_unit = np.repeat(np.concatenate([[0], np.cumsum(k)]),
                           np.diff(np.concatenate([[0], long + 1, [S + 1]])))
    first_unit += np.arange(S + 1, dtype=np.int64)
    U = np.empty(first_unit[-1] + 1, dtype=np.int64)
    U[first_unit] = so
    within = np.arange(int(k.sum()), dtype=np.int64) - np.repeat(np.cumsum(k) - k, k) + 1
    U[np.repeat(first_unit[long], k) + within] = np.repeat(so[long], k) + within * piece
    doc_units = first_unit[np.asarray(do, dtype=np.int64)]
    is_end = np.zeros(len(U) - 1, dtype=bool)
    is_end[doc_units[1:] - 1] = True
    return U, is_end, doc_units, {"sentences": int(S), "split_sentences": int(len(long)),
                                  "extra_pieces": int(k.sum())}


def _rendered_cost(U: np.ndarray, is_end: np.ndarray, extra: int) -> np.ndarray:
    """(U + 1,) cumulative cost of the units in an mlm row: their tokens, `extra` per unit and one
    per document end (computed in place: one array)."""
    cum = np.empty(len(U), dtype=np.int64)
    cum[0] = 0
    np.subtract(U[1:], U[:-1], out=cum[1:])
    cum[1:] += extra
    cum[1:] += is_end
    return np.cumsum(cum, out=cum)


def _shard_index(so: np.ndarray, do: np.ndarray, objective: str, max_seq_length: int,
                 keep_doc: np.ndarray, mlm_separator: str = "sep",
                 mlm_packing: str = "full") -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The sample index of one shard in its own coordinates (units, token offsets, groups); about
    25-34 bytes per sentence at its peak."""
    U, is_end, doc_units, stats = _units(so, do, max_seq_length - 3)
    stats["documents"] = int(keep_doc.sum())
    out = {"unit_offsets": U, "unit_is_doc_end": is_end}
    if objective == "mlm":
        extra, prefix, suffix = _mlm_layout(mlm_separator, mlm_packing)
        cum = _rendered_cost(U, is_end, extra)
        out["groups"], out["mlm_skip"], stats["dropped_tail_tokens"] = _mlm_groups(
            cum, doc_units, keep_doc, max_seq_length - prefix - suffix, mlm_packing)
    elif objective == "sop":
        groups = _greedy_pack(U, doc_units[:-1][keep_doc], doc_units[1:][keep_doc], max_seq_length - 3)
        short = U[groups[:, 1]] - U[groups[:, 0]] < 2
        stats["dropped_short"] = int(short.sum())
        out["groups"] = groups[~short]
    else:
        groups = _greedy_pack(U, doc_units[:-1][keep_doc], doc_units[1:][keep_doc], max_seq_length - 2)
        size = groups[:, 1] - groups[:, 0]
        stats["units_without_context"] = int((size == 1).sum())
        groups = groups[size >= 2]
        size = groups[:, 1] - groups[:, 0]
        out["ict_group"] = np.repeat(np.arange(len(groups)), size)
        out["ict_unit"] = np.arange(len(out["ict_group"])) - np.repeat(np.cumsum(size) - size, size) \
            + groups[out["ict_group"], 0]
        out["groups"] = groups
    return out, stats


def blend_counts(part_ranges: list[tuple[int, int]], weights: list[float]) -> list[int]:
    """The samples `_blend` gives each part: round(w_i / sum(w) * N) of the N samples."""
    n = sum(e - s for s, e in part_ranges)
    return [int(round(share * n)) for share in np.asarray(weights, dtype=np.float64) / sum(weights)]


def _blend(part_ranges: list[tuple[int, int]], weights: list[float], seed: int) -> np.ndarray:
    """Megatron-style blending: part i gets round(w_i / sum(w) * N) of the N samples, drawn from its
    own samples (whole seeded permutations, repeated when the part is too small)."""
    wants = blend_counts(part_ranges, weights)
    out = np.empty(sum(wants), dtype=np.int64)  # filled in place: no list of per-repeat arrays
    at = 0
    for i, ((s, e), want) in enumerate(zip(part_ranges, wants)):
        rng = np.random.default_rng([seed, 7919, i])
        for r in range(-(-want // max(1, e - s))):  # a part's share of 0 samples draws nothing
            take = min(e - s, want - r * (e - s))
            out[at:at + take] = s + rng.permutation(e - s)[:take]
            at += take
    return out


_INDEX_VERSION = 1
_INDEX_ARRAYS = ("unit_offsets", "unit_is_doc_end", "groups", "ict_group", "ict_unit", "mlm_skip", "blend")


def _index_key(corpus: Corpus, objective: str, max_seq_length: int, split: str, fraction: float,
               seed: int, mlm_layout: tuple[str, str]) -> str:
    key = {"v": _INDEX_VERSION, "caches": [c.path.name for c in corpus.caches], "objective": objective,
           **({"mlm_layout": list(mlm_layout)} if objective == "mlm" else {}),
           "L": max_seq_length, "split": split, "fraction": fraction if split != "all" else 0,
           "weights": [p.weight for p in corpus.spec.parts] if corpus.spec.weighted else None,
           "blend_seed": seed if corpus.spec.weighted else None}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def build_index(corpus: Corpus, objective: str, max_seq_length: int, split: str = "all",
                fraction: float = 0.0, seed: int = 0,
                mlm_layout: tuple[str, str] = ("sep", "full")) -> tuple[Path, dict]:
    """Build (once: a file lock keeps the other processes of the node, or of every node on a shared
    file system, waiting for it) the memory-mappable sample index; returns its directory and stats.

    The arrays are written shard by shard, so building needs the memory of the largest shard only
    (about 30-40 bytes per sentence, `_shard_index`)."""
    first = corpus.caches[0].path
    d = cache_home(first.parent, f"{first.name.rsplit('.', 2)[0]}."
                                  f"{_index_key(corpus, objective, max_seq_length, split, fraction, seed, mlm_layout)}.index")
    meta = d / "index.json"
    if meta.exists():
        return d, json.loads(meta.read_text())
    with _file_lock(d.with_name(d.name + ".lock")):
        if meta.exists():
            return d, json.loads(meta.read_text())
        tmp = d.with_name(f"{d.name}.tmp-{os.uname().nodename}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        files: dict = {}
        try:
            tmp.mkdir(parents=True)
            stats: dict[str, int] = {}
            files = {k: open(tmp / f"{k}.bin", "wb") for k in _INDEX_ARRAYS[:-1]}
            unit_base = group_base = 0
            samples_per_shard = []
            for k, cache in enumerate(corpus.caches):
                so, do = cache.read_offsets()
                held = held_out_documents(Path(cache.manifest["corpus"]["path"]).name, cache.num_documents, fraction)
                keep = {"all": np.ones_like(held), "train": ~held, "eval": held}[split]
                arrays, st = _shard_index(so, do, objective, max_seq_length, keep, *mlm_layout)
                del so, do
                for name, v in st.items():
                    stats[name] = stats.get(name, 0) + v
                U = arrays["unit_offsets"]
                for i in range(0, len(U) - 1, _WRITE_CHUNK):  # no whole-shard temporary
                    (U[i:min(i + _WRITE_CHUNK, len(U) - 1)] + corpus.token_base[k]).tofile(files["unit_offsets"])
                arrays["unit_is_doc_end"].tofile(files["unit_is_doc_end"])
                (arrays["groups"] + unit_base).tofile(files["groups"])
                if objective == "ict":
                    (arrays["ict_group"] + group_base).tofile(files["ict_group"])
                    (arrays["ict_unit"] + unit_base).tofile(files["ict_unit"])
                if objective == "mlm":
                    arrays["mlm_skip"].tofile(files["mlm_skip"])
                samples_per_shard.append(len(arrays["ict_unit"] if objective == "ict" else arrays["groups"]))
                unit_base += len(U) - 1
                group_base += len(arrays["groups"])
            np.array([corpus.num_tokens], dtype=np.int64).tofile(files["unit_offsets"])
            for f in files.values():
                f.close()
            stats.update(units=unit_base, groups=group_base, samples_per_shard=samples_per_shard)
            if corpus.spec.weighted:
                cum = np.concatenate([[0], np.cumsum(samples_per_shard)])
                part = corpus.part_of_shard
                ranges = [(int(cum[np.flatnonzero(part == i)[0]]), int(cum[np.flatnonzero(part == i)[-1] + 1]))
                          for i in range(len(corpus.spec.parts))]
                empty = [corpus.spec.parts[i].text for i, (s, e) in enumerate(ranges) if e == s]
                if empty:
                    raise ValueError(f"corpus part(s) {empty} give no {objective} samples (split {split}); a weighted "
                                     f"part needs samples: drop it or give it more text")
                weights = [p.weight for p in corpus.spec.parts]
                n = sum(e - s for s, e in ranges)
                starved = [p.text for p, want in zip(corpus.spec.parts, blend_counts(ranges, weights)) if want == 0]
                if starved:  # e.g. 0.001 beside 1000: the blend rounds its share of the samples to none
                    logger.warning("corpus part(s) %s get 0 of the %d %s samples at weights %s (a share below "
                                   "half a sample): they are not trained on; raise their weight (or drop them)",
                                   starved, n, objective, weights)
                _blend(ranges, weights, seed).tofile(tmp / "blend.bin")
            (tmp / "index.json").write_text(json.dumps(stats))
            if d.exists():
                shutil.rmtree(d)
            os.rename(tmp, d)
        except OSError as e:  # a full disk (numpy's tofile says only "N requested and M written")
            _discard(tmp, files)
            raise CacheWriteError(d.parent, f"the sample index of {corpus.path}", e) from None
        except BaseException:
            _discard(tmp, files)
            raise
    return d, stats


def _discard(tmp: Path, files: dict) -> None:
    """A failed index build: its open files closed (a removed file still holds its disk space while
    open) and its directory removed."""
    for f in files.values():
        with contextlib.suppress(OSError):
            f.close()
    shutil.rmtree(tmp, ignore_errors=True)


def _open_index(d: Path, objective: str, weighted: bool) -> dict[str, np.ndarray]:
    specs = {"unit_offsets": (np.int64, 1), "unit_is_doc_end": (np.bool_, 1), "groups": (np.int64, 2),
             "ict_group": (np.int64, 1), "ict_unit": (np.int64, 1), "mlm_skip": (np.int64, 1),
             "blend": (np.int64, 1)}
    out = {}
    for name, (dtype, width) in specs.items():
        f = d / f"{name}.bin"
        if ((name.startswith("ict_") and objective != "ict") or (name == "mlm_skip" and objective != "mlm")
                or (name == "blend" and not weighted)):
            continue
        out[name] = FileArray(f, dtype, width)
    return out


class PretrainDataset(torch.utils.data.Dataset):
    def __init__(self, cache: Corpus | CorpusCache, tokenizer: KoTokenizer, max_seq_length: int,
                 objective: str = "sop", mlm_probability: float = 0.15, whole_word_mask: bool = False,
                 seed: int = 0, split: str = "all", eval_fraction: float = 0.0, mlm_separator: str = "sep",
                 mlm_packing: str = "full"):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        _, self._mlm_prefix, self._mlm_suffix = _mlm_layout(mlm_separator, mlm_packing)
        if max_seq_length < 8:
            raise ValueError(f"max_seq_length={max_seq_length} is too small for pretraining samples (need >= 8)")
        if not 0.0 <= mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in [0, 1), got {mlm_probability}")
        if split not in ("all", "train", "eval"):
            raise ValueError(f"split must be all, train or eval, got {split!r}")
        corpus = Corpus.of(cache)
        if corpus.tokenizer_fingerprint != tokenizer.fingerprint:
            raise ValueError(f"cache {corpus.caches[0].path} was built with tokenizer {corpus.tokenizer_fingerprint}, "
                             f"not {tokenizer.fingerprint}; open the corpus with data.corpus.open_corpus(spec, tokenizer)")
        if corpus.max_token_id >= tokenizer.vocab_size:
            raise ValueError(f"the corpus caches of {corpus.path} hold token id {corpus.max_token_id}, beyond the "
                             f"tokenizer's {tokenizer.vocab_size} ids; delete those caches to rebuild them")
        self.corpus = corpus
        self.max_seq_length = max_seq_length
        self.objective = objective
        self.mlm_probability = mlm_probability
        self.whole_word_mask = whole_word_mask
        self.seed = seed
        self.epoch = 0
        self.vocab_size = tokenizer.vocab_size
        self.cls_id, self.sep_id, self.mask_id, self.eod_id, self.pad_id = (
            tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.eod_id, tokenizer.pad_id)
        self.special = tokenizer.is_special()
        self.word_start = tokenizer.is_word_start()
        self.random_ids = np.flatnonzero(~self.special)

        self.mlm_separator, self.mlm_packing = mlm_separator, mlm_packing
        self.index_dir, stats = build_index(corpus, objective, max_seq_length, split, eval_fraction, seed,
                                            (mlm_separator, mlm_packing))
        arrays = _open_index(self.index_dir, objective, corpus.spec.weighted)
        self.unit_offsets, self.unit_is_doc_end, self.groups = (
            arrays["unit_offsets"], arrays["unit_is_doc_end"], arrays["groups"])
        self.ict_group, self.ict_unit = arrays.get("ict_group"), arrays.get("ict_unit")
        self.blend = arrays.get("blend")
        self.mlm_skip = arrays.get("mlm_skip")
        self.stats = {k: v for k, v in stats.items() if k not in ("units", "groups", "samples_per_shard")}
        self.samples_per_shard = stats["samples_per_shard"]
        self.stats["samples"] = len(self)
        if self.stats["split_sentences"]:
            logger.info("%d sentences longer than %d tokens were cut into pieces (%d extra)",
                        self.stats["split_sentences"], max_seq_length - 3, self.stats["extra_pieces"])
        if len(self) == 0:
            what = {"all": "", "train": " outside the held-out documents", "eval": " in the held-out documents"}[split]
            few = ""
            if split != "all" and corpus.num_documents < 10:
                few = (f"; the whole corpus has {corpus.num_documents} document(s) in {corpus.num_sentences} lines, and "
                       f"documents are held out whole: documents are separated by blank lines (a corpus of one "
                       f"document per line needs its sentences on lines of their own and a blank line after each "
                       f"document), or leave --eval_fraction out")
            raise ValueError(f"no {objective} samples{what} of {corpus.path} with max_seq_length={max_seq_length} "
                             f"({self.stats}); ict and sop need documents of at least two sentences/tokens{few}")


    def __len__(self) -> int:
        if self.blend is not None:
            return len(self.blend)
        return len(self.ict_unit) if self.objective == "ict" else len(self.groups)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _span(self, a: int, b: int) -> np.ndarray:
        start = int(self.unit_offsets[a])
        ids = self.corpus.span(start, int(self.unit_offsets[b]))
        if len(ids) and int(ids.max()) >= self.vocab_size:  # a damaged tokens.bin: name it, not an IndexError later
            cache = self.corpus.caches[self.corpus.shard_of_token(start)].path
            raise ValueError(f"corpus cache {cache} is damaged (token id {int(ids.max())} >= vocab size "
                             f"{self.vocab_size}); delete that directory and it will be rebuilt")
        return ids

    def mask_tokens(self, ids: np.ndarray, rng: np.random.Generator,
                    starts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """MLM-mask a sequence that already holds its special tokens; returns (inputs, labels).
        starts (bool, like ids): the tokens that begin a corpus line, word starts for whole-word
        masking whatever the token (a byte-level BPE without prefix space marks no line's first word)."""
        ids = ids.copy()
        labels = np.full_like(ids, -100)
        cand = ~self.special[ids]
        n_cand = int(cand.sum())
        if self.mlm_probability == 0 or n_cand == 0:
            return ids, labels
        k = max(1, int(round(self.mlm_probability * n_cand)))
        if self.whole_word_mask:
            first = self.word_start[ids] | ~cand
            if starts is not None:
                first |= starts
            word = np.cumsum(first) - 1
            sizes = np.bincount(word[cand], minlength=word[-1] + 1)
            words = rng.permutation(np.flatnonzero(sizes))
            take = max(1, int(np.searchsorted(np.cumsum(sizes[words]), k, side="right")))
            chosen = np.zeros(len(sizes), dtype=bool)
            chosen[words[:take]] = True
            sel = np.flatnonzero(cand & chosen[word])
        else:
            sel = np.sort(rng.choice(np.flatnonzero(cand), size=k, replace=False))
        labels[sel] = ids[sel]
        r = rng.random(len(sel))
        ids[sel[r < 0.8]] = self.mask_id
        rand = sel[(r >= 0.8) & (r < 0.9)]
        ids[rand] = rng.choice(self.random_ids, size=len(rand))
        return ids, labels

    def _single(self, body: np.ndarray, rng: np.random.Generator,
                starts: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        edges = None if starts is None else np.concatenate([[False], starts, [False]])
        return self.mask_tokens(np.concatenate([[self.cls_id], body, [self.sep_id]]), rng, edges)

    def _starts(self, s: int, e: int) -> np.ndarray | None:
        """Over _span(s, e): True at the first token of each unit (line); None without whole-word
        masking (nothing reads it)."""
        if not self.whole_word_mask:
            return None
        rel = np.asarray(self.unit_offsets[s:e]) - int(self.unit_offsets[s])
        out = np.zeros(int(self.unit_offsets[e]) - int(self.unit_offsets[s]), dtype=bool)
        out[rel[rel < len(out)]] = True
        return out

    def _mlm_row(self, s: int, e: int, skip: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Units [s, e) rendered in the mlm layout (separators, [EOD] after a document's last unit),
        `skip` rendered tokens dropped at the start, cut to the row budget, with [CLS]/[SEP] edges;
        and the row's line starts (see _starts)."""
        body = self._span(s, e)
        rel = np.asarray(self.unit_offsets[s:e + 1]) - int(self.unit_offsets[s])
        n = e - s
        # at a boundary: the unit's [SEP], then [EOD] when it ends a document, then the next unit's [CLS]
        pos, rank, val = [], [], []
        if self.mlm_separator == "wrap":
            pos.append(rel[:-1]); rank.append(np.full(n, 2)); val.append(np.full(n, self.cls_id))
        if self.mlm_separator != "eod":
            pos.append(rel[1:]); rank.append(np.zeros(n, dtype=np.int64)); val.append(np.full(n, self.sep_id))
        ends = np.flatnonzero(self.unit_is_doc_end[s:e])
        pos.append(rel[ends + 1]); rank.append(np.ones(len(ends), dtype=np.int64))
        val.append(np.full(len(ends), self.eod_id))
        pos, rank, val = np.concatenate(pos), np.concatenate(rank), np.concatenate(val)
        order = np.lexsort((rank, pos))
        stream = np.insert(body, pos[order], val[order].astype(body.dtype))
        prefix, suffix = self._mlm_prefix, self._mlm_suffix
        cut = slice(skip, skip + self.max_seq_length - prefix - suffix)
        ids = np.concatenate([[self.cls_id] * prefix, stream[cut], [self.sep_id] * suffix]).astype(np.int64)
        starts = self._starts(s, e)
        if starts is not None:
            starts = np.concatenate([np.zeros(prefix, dtype=bool), np.insert(starts, pos[order], False)[cut],
                                     np.zeros(suffix, dtype=bool)])
        return ids, starts

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        if self.blend is not None:  # a weighted corpus: position i draws sample blend[i]
            i = int(self.blend[i])
        if self.objective == "ict":
            u, g = int(self.ict_unit[i]), int(self.ict_group[i])
            gs, ge = (int(x) for x in self.groups[g])
            keep = bool(rng.random() < ICT_KEEP_QUERY)
            passage = self._span(gs, ge) if keep else np.concatenate([self._span(gs, u), self._span(u + 1, ge)])
            starts = self._starts(gs, ge)
            if starts is not None and not keep:
                a, b = (int(self.unit_offsets[x]) - int(self.unit_offsets[gs]) for x in (u, u + 1))
                starts = np.concatenate([starts[:a], starts[b:]])
            q_ids, q_labels = self._single(self._span(u, u + 1), rng, self._starts(u, u + 1))
            p_ids, p_labels = self._single(passage, rng, starts)
            return {"query_input_ids": q_ids, "query_mlm_labels": q_labels,
                    "passage_input_ids": p_ids, "passage_mlm_labels": p_labels, "query_kept": keep}
        s, e = (int(x) for x in self.groups[i])
        if self.objective == "mlm":
            ids, starts = self._mlm_row(s, e, int(self.mlm_skip[i]))
            ids, labels = self.mask_tokens(ids, rng, starts)
            return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "mlm_labels": labels}
        body = self._span(s, e)
        if e - s >= 2:
            cut = int(self.unit_offsets[rng.integers(s + 1, e)] - self.unit_offsets[s])
        else:
            cut = int(rng.integers(1, len(body)))
        a, b = body[:cut], body[cut:]
        flags = self._starts(s, e)
        fa, fb = (None, None) if flags is None else (flags[:cut], flags[cut:])
        swapped = bool(rng.random() < 0.5)
        if swapped:
            a, b, fa, fb = b, a, fb, fa
        ids = np.concatenate([[self.cls_id], a, [self.sep_id], b, [self.sep_id]])
        tt = np.zeros_like(ids)
        tt[len(a) + 2:] = 1
        starts = None if flags is None else np.concatenate([[False], fa, [False], fb, [False]])
        ids, labels = self.mask_tokens(ids, rng, starts)
        return {"input_ids": ids, "token_type_ids": tt, "mlm_labels": labels, "sop_label": int(swapped)}

    def _pad(self, seqs: list[np.ndarray], value: int) -> tuple[torch.Tensor, int]:
        longest = max(len(s) for s in seqs)
        width = min(self.max_seq_length, -(-longest // 8) * 8)
        out = np.full((len(seqs), width), value, dtype=np.int64)
        for r, s in enumerate(seqs):
            out[r, :len(s)] = s
        return torch.from_numpy(out), width

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """Pad to the longest sample rounded up to a multiple of 8 (at most max_seq_length)."""
        batch: dict[str, torch.Tensor] = {}
        prefixes = ("query_", "passage_") if self.objective == "ict" else ("",)
        for p in prefixes:
            ids = [s[p + "input_ids"] for s in samples]
            batch[p + "input_ids"], _ = self._pad(ids, self.pad_id)
            batch[p + "attention_mask"], _ = self._pad([np.ones_like(x) for x in ids], 0)
            if p + "token_type_ids" in samples[0]:
                batch[p + "token_type_ids"], _ = self._pad([s[p + "token_type_ids"] for s in samples], 0)
            batch[p + "mlm_labels"], _ = self._pad([s[p + "mlm_labels"] for s in samples], -100)
        if self.objective == "sop":
            batch["sop_labels"] = torch.tensor([s["sop_label"] for s in samples], dtype=torch.int64)
        return batch
