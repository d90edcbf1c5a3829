"""Pretraining samples from a CorpusCache: MLM always, plus SOP or ICT.

Shape letters: B batch, L sequence length (padded), N samples, U units.

The sample index is built once at init with numpy over the cache offsets:
- units: sentences; a sentence longer than max_seq_length - 3 tokens is cut into pieces of
  at most that length (counted in `stats["split_sentences"]`, never a crash or a silent drop);
- sop: consecutive units of one document packed greedily up to max_seq_length - 3 tokens; at
  __getitem__ the group is split at a random unit boundary (inside the unit when the group
  has one) into A and B, swapped with p=0.5 (sop_label 1 = swapped). Groups never cross
  documents. Groups of a single token are dropped and counted (`stats["dropped_short"]`);
- mlm: units packed across documents up to max_seq_length - 2, [EOD] after each document's
  last unit;
- ict: documents packed into passages as for sop (max_seq_length - 2); every unit of a
  passage with at least two units is a query; the passage keeps the query with p=0.1.
Samples are [CLS] A [SEP] (B [SEP]); token_type_ids 0 for A, 1 for B. MLM: 15% of the
non-special tokens (at least one), 80% [MASK], 10% a random non-special token, 10% unchanged;
whole-word masking selects whole words ("##" pieces with their head). Everything random in a
sample comes from np.random.default_rng([seed, epoch, index]).

set_epoch() changes masking and SOP splits; call it before creating the DataLoader iterator
(workers copy the dataset when they start, so not with persistent_workers).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from data.corpus import CorpusCache
from data.tokenizer import KoTokenizer

logger = logging.getLogger(__name__)

OBJECTIVES = ("sop", "ict", "mlm")
ICT_KEEP_QUERY = 0.1
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


class PretrainDataset(torch.utils.data.Dataset):
    def __init__(self, cache: CorpusCache, tokenizer: KoTokenizer, max_seq_length: int,
                 objective: str = "sop", mlm_probability: float = 0.15, whole_word_mask: bool = False,
                 seed: int = 0):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if max_seq_length < 8:
            raise ValueError(f"max_seq_length={max_seq_length} is too small for pretraining samples (need >= 8)")
        if not 0.0 <= mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in [0, 1), got {mlm_probability}")
        built_with = cache.manifest["tokenizer"]["fingerprint"]
        if built_with != tokenizer.fingerprint:
            raise ValueError(f"cache {cache.path} was built with tokenizer {built_with}, not {tokenizer.fingerprint}; "
                             f"open the cache with data.corpus.load_or_build(corpus, tokenizer)")
        self.tokens = cache.tokens
        self.max_seq_length = max_seq_length
        self.objective = objective
        self.mlm_probability = mlm_probability
        self.whole_word_mask = whole_word_mask
        self.seed = seed
        self.epoch = 0
        self.cls_id, self.sep_id, self.mask_id, self.eod_id, self.pad_id = (
            tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.eod_id, tokenizer.pad_id)
        self.special = tokenizer.is_special()
        self.word_start = tokenizer.is_word_start()
        self.random_ids = np.flatnonzero(~self.special)

        # units: sentences, overlong ones cut into pieces of <= max_seq_length - 3 tokens
        piece = max_seq_length - 3
        so = np.asarray(cache.sent_offsets, dtype=np.int64)
        lengths = np.diff(so)
        n_pieces = np.maximum(1, -(-lengths // piece))
        first_unit = np.concatenate([[0], np.cumsum(n_pieces)])
        within = np.arange(first_unit[-1]) - np.repeat(first_unit[:-1], n_pieces)
        self.unit_offsets = np.concatenate([np.repeat(so[:-1], n_pieces) + within * piece, so[-1:]])
        doc_units = first_unit[np.asarray(cache.doc_offsets, dtype=np.int64)]
        self.unit_is_doc_end = np.zeros(first_unit[-1], dtype=bool)
        self.unit_is_doc_end[doc_units[1:] - 1] = True
        self.stats = {"sentences": int(len(lengths)), "split_sentences": int((n_pieces > 1).sum()),
                      "extra_pieces": int((n_pieces - 1).sum())}

        U = self.unit_offsets
        if objective == "mlm":
            cum = np.concatenate([[0], np.cumsum(np.diff(U) + self.unit_is_doc_end)])
            starts = np.arange(0, len(U) - 1, _MLM_BLOCK_UNITS)
            self.groups = _greedy_pack(cum, starts, np.minimum(starts + _MLM_BLOCK_UNITS, len(U) - 1),
                                       max_seq_length - 2)
        elif objective == "sop":
            groups = _greedy_pack(U, doc_units[:-1], doc_units[1:], max_seq_length - 3)
            short = U[groups[:, 1]] - U[groups[:, 0]] < 2
            self.stats["dropped_short"] = int(short.sum())
            self.groups = groups[~short]
        else:
            groups = _greedy_pack(U, doc_units[:-1], doc_units[1:], max_seq_length - 2)
            size = groups[:, 1] - groups[:, 0]
            self.stats["units_without_context"] = int((size == 1).sum())
            groups = groups[size >= 2]
            size = groups[:, 1] - groups[:, 0]
            self.ict_group = np.repeat(np.arange(len(groups)), size)
            self.ict_unit = np.arange(len(self.ict_group)) - np.repeat(np.cumsum(size) - size, size) \
                + groups[self.ict_group, 0]
            self.groups = groups
        self.stats["samples"] = len(self)
        if self.stats["split_sentences"]:
            logger.info("%d sentences longer than %d tokens were cut into pieces (%d extra)",
                        self.stats["split_sentences"], piece, self.stats["extra_pieces"])
        if len(self) == 0:
            raise ValueError(f"no {objective} samples in {cache.path} with max_seq_length={max_seq_length} "
                             f"({self.stats}); ict and sop need documents of at least two sentences/tokens")

    def __len__(self) -> int:
        return len(self.ict_unit) if self.objective == "ict" else len(self.groups)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _span(self, a: int, b: int) -> np.ndarray:
        return np.asarray(self.tokens[self.unit_offsets[a]:self.unit_offsets[b]], dtype=np.int64)

    def mask_tokens(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """MLM-mask a sequence that already holds its special tokens; returns (inputs, labels)."""
        ids = ids.copy()
        labels = np.full_like(ids, -100)
        cand = ~self.special[ids]
        n_cand = int(cand.sum())
        if self.mlm_probability == 0 or n_cand == 0:
            return ids, labels
        k = max(1, int(round(self.mlm_probability * n_cand)))
        if self.whole_word_mask:
            word = np.cumsum(self.word_start[ids] | ~cand) - 1
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

    def _single(self, body: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return self.mask_tokens(np.concatenate([[self.cls_id], body, [self.sep_id]]), rng)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        if self.objective == "ict":
            u, g = int(self.ict_unit[i]), int(self.ict_group[i])
            gs, ge = (int(x) for x in self.groups[g])
            keep = bool(rng.random() < ICT_KEEP_QUERY)
            passage = self._span(gs, ge) if keep else np.concatenate([self._span(gs, u), self._span(u + 1, ge)])
            q_ids, q_labels = self._single(self._span(u, u + 1), rng)
            p_ids, p_labels = self._single(passage, rng)
            return {"query_input_ids": q_ids, "query_mlm_labels": q_labels,
                    "passage_input_ids": p_ids, "passage_mlm_labels": p_labels, "query_kept": keep}
        s, e = (int(x) for x in self.groups[i])
        if self.objective == "mlm":
            body = self._span(s, e)
            ends = np.flatnonzero(self.unit_is_doc_end[s:e]) + s + 1
            body = np.insert(body, self.unit_offsets[ends] - self.unit_offsets[s], self.eod_id)
            ids, labels = self._single(body, rng)
            return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "mlm_labels": labels}
        body = self._span(s, e)
        if e - s >= 2:
            cut = int(self.unit_offsets[rng.integers(s + 1, e)] - self.unit_offsets[s])
        else:
            cut = int(rng.integers(1, len(body)))
        a, b = body[:cut], body[cut:]
        swapped = bool(rng.random() < 0.5)
        if swapped:
            a, b = b, a
        ids = np.concatenate([[self.cls_id], a, [self.sep_id], b, [self.sep_id]])
        tt = np.zeros_like(ids)
        tt[len(a) + 2:] = 1
        ids, labels = self.mask_tokens(ids, rng)
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
