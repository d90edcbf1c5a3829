"""Task models: a backbone (`.encoder`) plus task heads; forward takes the batch dict of
docs/interfaces.md as keyword arguments and returns a dict of `loss`, scalar metrics and outputs.

Shapes: B batch, L sequence length, H hidden size, V vocabulary size.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from .config import ModelConfig
from .encoder import EncoderOutput, QueryRows, TransformerEncoder, has_padding, init_weights
from .heads import (IGNORE_INDEX, CharTagHead, MLMHead, SequenceClassifierHead, SpanHead, contrastive_loss,
                    pool)
from .mix_lm import MixLMEncoder
from .modernbert import ModernBertEncoder
from .tied import TiedGrad

REGISTRY: dict[str, type[nn.Module]] = {"transformer": TransformerEncoder, "mix_lm": MixLMEncoder,
                                        "modernbert": ModernBertEncoder}

GatherFn = Callable[[Tensor], tuple[Tensor, int]]


def local_only(t: Tensor) -> tuple[Tensor, int]:
    """Default gather_fn: no other processes, the local rows start at 0."""
    return t, 0


def mlm_query_rows(mlm_labels: Tensor, cls: bool) -> QueryRows:
    """The rows the pretraining heads read: the labelled positions, and position 0 of every
    sequence when cls (SOP's [CLS]; `labelled` then names the rows that carry a label)."""
    need = mlm_labels != IGNORE_INDEX
    if cls:
        need[:, 0] = True
    rows = QueryRows.from_mask(need)
    if cls:
        rows = rows._replace(labelled=(rows.take(mlm_labels) != IGNORE_INDEX).nonzero().squeeze(1))
    return rows


def pretrain_hints(batch: dict[str, Tensor], objective: str) -> dict:
    """What PretrainModel's forward would otherwise read back from the device mid-step (each a GPU
    sync, which drains the queue of kernels): whether any sequence has padding, and the rows the
    heads read (QueryRows: the last layer computes only those where the encoder supports_query_rows,
    the MLM head selects them otherwise); for ICT whether each side has padding and the labelled
    positions of both sides (queries' then passages', flat). For the collate, on the host's copy of
    the batch; the forward then never waits for the GPU."""
    if objective == "ict":
        hints = {f"{side}_padded": has_padding(batch.get(side + "_attention_mask")) for side in ("query", "passage")}
        if batch.get("query_mlm_labels") is not None and batch.get("passage_mlm_labels") is not None:
            labels = torch.cat([batch["query_mlm_labels"].reshape(-1), batch["passage_mlm_labels"].reshape(-1)])
            hints["mlm_index"] = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        return hints
    if batch.get("mlm_labels") is None:
        return {}
    rows = mlm_query_rows(batch["mlm_labels"], objective == "sop")
    return {"padded": has_padding(batch.get("attention_mask"))} | {f"rows_{k}": v for k, v in rows._asdict().items() if v is not None}


class TaskModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = REGISTRY[config.model_type](config)

    def init_heads(self) -> None:
        for name, module in self.named_children():
            if name != "encoder":
                module.apply(lambda m: init_weights(m, self.config.initializer_range))

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               token_type_ids: Tensor | None = None, padded: bool | None = None) -> EncoderOutput:
        """padded: whether attention_mask has a 0 (None: read from it)."""
        return self.encoder(input_ids, attention_mask, token_type_ids, padded=padded)

    @property
    def word_embeddings(self) -> Tensor:
        return self.encoder.embeddings.word_embeddings.weight


class PretrainModel(TaskModel):
    """MLM plus SOP (objective "sop"), plus ICT (objective "ict", MLM on queries and passages),
    or MLM alone ("mlm")."""

    def __init__(self, config: ModelConfig, objective: str = "sop", temperature: float = 0.05,
                 pooling: str = "cls"):
        super().__init__(config)
        if objective not in ("sop", "ict", "mlm"):
            raise ValueError(f"objective must be 'sop', 'ict' or 'mlm', got {objective!r}")
        self.objective = objective
        self.temperature = temperature
        self.pooling = pooling
        self.mlm_head = MLMHead(config)
        self.sop_head = SequenceClassifierHead(config, 2) if objective == "sop" else None
        self.gather_fn: GatherFn = local_only
        self.init_heads()

    def forward(self, *args, **kwargs) -> dict[str, Tensor]:
        """See `_forward`. In training, the word embeddings and the MLM decoder share one weight
        gradient tensor for the step (models.tied)."""
        with self.encoder.embeddings.word_embeddings.linked() as tied:
            return self._forward(*args, tied=tied, **kwargs)

    def _forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                 token_type_ids: Tensor | None = None, mlm_labels: Tensor | None = None,
                 sop_labels: Tensor | None = None,
                 query_input_ids: Tensor | None = None, query_attention_mask: Tensor | None = None,
                 query_token_type_ids: Tensor | None = None, query_mlm_labels: Tensor | None = None,
                 passage_input_ids: Tensor | None = None,
                 passage_attention_mask: Tensor | None = None,
                 passage_token_type_ids: Tensor | None = None,
                 passage_mlm_labels: Tensor | None = None, tied: TiedGrad | None = None,
                 padded: bool | None = None, rows_index: Tensor | None = None, rows_slots: Tensor | None = None,
                 rows_positions: Tensor | None = None, rows_starts: Tensor | None = None,
                 rows_labelled: Tensor | None = None, query_padded: bool | None = None,
                 passage_padded: bool | None = None, mlm_index: Tensor | None = None) -> dict[str, Tensor]:
        """padded, rows_*, query_padded, passage_padded and mlm_index: pretrain_hints of the batch,
        computed on the host (without them the forward reads the same from the device: a GPU sync each)."""
        if self.objective == "ict":
            return self._forward_ict(query_input_ids, query_attention_mask, query_token_type_ids,
                                     query_mlm_labels, passage_input_ids, passage_attention_mask,
                                     passage_token_type_ids, passage_mlm_labels, tied, query_padded,
                                     passage_padded, mlm_index)
        # the heads read only the masked rows and [CLS]: the last layer computes just those
        supported = getattr(self.encoder, "supports_query_rows", False)
        rows = None
        if mlm_labels is not None and rows_index is not None:
            rows = QueryRows(rows_index, rows_slots, rows_positions, rows_starts, rows_labelled)
        elif mlm_labels is not None and supported:
            rows = mlm_query_rows(mlm_labels, self.sop_head is not None)
        sparse = supported and rows is not None      # the encoder returns (R, H) at the rows
        hidden, aux = self.encoder(input_ids, attention_mask, token_type_ids, rows if sparse else None,
                                   padded=padded)                 # (R, H) if sparse, else (B, L, H)
        out: dict[str, Tensor] = {"aux_loss": aux}
        losses = [aux]
        if mlm_labels is not None:
            if rows is None:
                out.update(self.mlm_head.loss(hidden, mlm_labels, self._decoder_weight(tied)))
            else:
                h, labels = hidden if sparse else rows.take(hidden), rows.take(mlm_labels)
                if rows.labelled is not None:
                    h, labels = h.index_select(0, rows.labelled), labels.index_select(0, rows.labelled)
                out.update(self.mlm_head.loss(h, labels, self._decoder_weight(tied), all_labelled=True))
            losses.append(out["mlm_loss"])
        if self.sop_head is not None:
            if sparse:                 # the [CLS] rows (each sequence's first), in batch order, as (B, 1, H)
                hidden = hidden.index_select(0, rows.starts).unsqueeze(1)
            logits = self.sop_head(hidden).float()
            out["sop_logits"] = logits
            if sop_labels is not None:
                out["sop_loss"] = F.cross_entropy(logits, sop_labels)
                out["sop_acc"] = (logits.detach().argmax(-1) == sop_labels).float().mean()
                losses.append(out["sop_loss"])
        if len(losses) > 1:
            out["loss"] = sum(losses)
        return out

    def _decoder_weight(self, tied: TiedGrad | None) -> Tensor:
        return self.word_embeddings if tied is None else tied.decoder_weight(self.word_embeddings)

    def _forward_ict(self, q_ids, q_mask, q_types, q_labels, p_ids, p_mask, p_types,
                     p_labels, tied: TiedGrad | None = None, q_padded: bool | None = None,
                     p_padded: bool | None = None, mlm_index: Tensor | None = None) -> dict[str, Tensor]:
        q_hidden, p_hidden, aux = encode_pair(self, q_ids, q_mask, q_types, p_ids, p_mask, p_types,
                                              q_padded, p_padded)
        out: dict[str, Tensor] = {"aux_loss": aux}
        q_vec, p_vec = pool(q_hidden, q_mask, self.pooling), pool(p_hidden, p_mask, self.pooling)
        out["query_vectors"], out["passage_vectors"] = q_vec, p_vec
        all_p, offset = self.gather_fn(p_vec)
        out.update(contrastive_loss(q_vec, all_p, offset, self.temperature))
        losses = [aux, out["ict_loss"]]
        if q_labels is not None and p_labels is not None:
            # One MLM head call over the masked rows of both sides.
            H = q_hidden.shape[-1]
            hidden = torch.cat([q_hidden.reshape(-1, H), p_hidden.reshape(-1, H)])
            labels = torch.cat([q_labels.reshape(-1), p_labels.reshape(-1)])
            if mlm_index is None:
                out.update(self.mlm_head.loss(hidden, labels, self._decoder_weight(tied)))
            else:
                out.update(self.mlm_head.loss(hidden.index_select(0, mlm_index), labels.index_select(0, mlm_index),
                                              self._decoder_weight(tied), all_labelled=True))
            losses.append(out["mlm_loss"])
        out["loss"] = sum(losses)
        return out


def encode_pair(model: TaskModel, q_ids, q_mask, q_types, p_ids, p_mask, p_types,
                q_padded: bool | None = None, p_padded: bool | None = None):
    """Queries and passages through the encoder: one call when their shapes allow. q_padded,
    p_padded: whether each side's mask has a 0 (None: read from it)."""
    if q_ids.shape[1] == p_ids.shape[1] and (q_mask is None) == (p_mask is None) \
            and (q_types is None) == (p_types is None):
        B = q_ids.shape[0]
        cat = lambda a, b: None if a is None else torch.cat([a, b])
        padded = None if q_padded is None or p_padded is None else q_padded or p_padded
        hidden, aux = model.encode(cat(q_ids, p_ids), cat(q_mask, p_mask), cat(q_types, p_types), padded)
        return hidden[:B], hidden[B:], aux
    q_hidden, q_aux = model.encode(q_ids, q_mask, q_types, q_padded)
    p_hidden, p_aux = model.encode(p_ids, p_mask, p_types, p_padded)
    return q_hidden, p_hidden, q_aux + p_aux


class MRCModel(TaskModel):
    """Extractive QA: start/end logits over the tokens of "[CLS] question [SEP] passage [SEP]"."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.span_head = SpanHead(config)
        self.init_heads()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, start_positions: Tensor | None = None,
                end_positions: Tensor | None = None) -> dict[str, Tensor]:
        hidden, aux = self.encode(input_ids, attention_mask, token_type_ids)
        start, end = self.span_head(hidden, attention_mask)
        out = {"start_logits": start, "end_logits": end, "aux_loss": aux}
        if start_positions is not None and end_positions is not None:
            # Positions outside the window (>= L) are ignored, as in HF.
            L = start.shape[1]
            sp, ep = start_positions.clamp(0, L), end_positions.clamp(0, L)
            start_loss = F.cross_entropy(start, sp, ignore_index=L)
            end_loss = F.cross_entropy(end, ep, ignore_index=L)
            out["start_loss"], out["end_loss"] = start_loss, end_loss
            s_ok, e_ok = start.detach().argmax(-1) == sp, end.detach().argmax(-1) == ep
            out["start_acc"], out["end_acc"] = s_ok.float().mean(), e_ok.float().mean()
            out["span_acc"] = (s_ok & e_ok).float().mean()
            out["loss"] = (start_loss + end_loss) / 2 + aux
        return out


class ICTModel(TaskModel):
    """Retrieval fine-tuning: query/passage vectors, in-batch (and gathered) negatives."""

    def __init__(self, config: ModelConfig, temperature: float = 0.05, pooling: str = "cls"):
        super().__init__(config)
        pool(torch.zeros(1, 1, 1), None, pooling)                   # validates pooling
        self.temperature = temperature
        self.pooling = pooling
        self.gather_fn: GatherFn = local_only

    def forward(self, query_input_ids: Tensor, passage_input_ids: Tensor | None = None,
                query_attention_mask: Tensor | None = None,
                passage_attention_mask: Tensor | None = None,
                query_token_type_ids: Tensor | None = None,
                passage_token_type_ids: Tensor | None = None,
                query_mlm_labels: Tensor | None = None,
                passage_mlm_labels: Tensor | None = None) -> dict[str, Tensor]:
        # *_mlm_labels are accepted so that pretraining ICT batches can be reused; not used.
        if passage_input_ids is None:
            # Encode one side only (evaluation: queries and passages share the encoder).
            hidden, aux = self.encode(query_input_ids, query_attention_mask, query_token_type_ids)
            return {"query_vectors": pool(hidden, query_attention_mask, self.pooling), "aux_loss": aux}
        q_hidden, p_hidden, aux = encode_pair(
            self, query_input_ids, query_attention_mask, query_token_type_ids,
            passage_input_ids, passage_attention_mask, passage_token_type_ids)
        q_vec = pool(q_hidden, query_attention_mask, self.pooling)
        p_vec = pool(p_hidden, passage_attention_mask, self.pooling)
        all_p, offset = self.gather_fn(p_vec)
        out = {"query_vectors": q_vec, "passage_vectors": p_vec, "aux_loss": aux}
        out.update(contrastive_loss(q_vec, all_p, offset, self.temperature))
        out["loss"] = out["ict_loss"] + aux
        return out


class EncoderModel(TaskModel):
    """One (B, H) vector per input, e.g. to precompute passage vectors for open-domain QA."""

    def __init__(self, config: ModelConfig, pooling: str = "cls", normalize: bool = False):
        super().__init__(config)
        pool(torch.zeros(1, 1, 1), None, pooling)
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> dict[str, Tensor]:
        hidden, aux = self.encode(input_ids, attention_mask, token_type_ids)
        vectors = pool(hidden, attention_mask, self.pooling)
        if self.normalize:
            vectors = F.normalize(vectors, dim=-1)
        return {"vectors": vectors, "aux_loss": aux}


class ClassifyModel(TaskModel):
    """Sentence (pair) classification, e.g. NSMC sentiment; num_labels 1 = regression (MSE)."""

    def __init__(self, config: ModelConfig, num_labels: int = 2):
        super().__init__(config)
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = num_labels
        self.classifier_head = SequenceClassifierHead(config, num_labels)
        self.init_heads()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None,
                labels: Tensor | None = None) -> dict[str, Tensor]:
        hidden, aux = self.encode(input_ids, attention_mask, token_type_ids)
        logits = self.classifier_head(hidden).float()
        out = {"logits": logits, "aux_loss": aux}
        if labels is not None:
            out["labels"] = labels
            if self.num_labels == 1:
                out["cls_loss"] = F.mse_loss(logits.squeeze(-1), labels.float())
            else:
                out["cls_loss"] = F.cross_entropy(logits, labels)
                out["acc"] = (logits.detach().argmax(-1) == labels).float().mean()
            out["loss"] = out["cls_loss"] + aux
        return out


class NERModel(TaskModel):
    """Character tagging (KLUE NER): per-character emissions from per-token slots (data/ner.py);
    cross-entropy, or with `crf` a linear-chain CRF (pytorch-crf) over the characters of a window,
    its negative log-likelihood per character as the loss and Viterbi decoding."""

    def __init__(self, config: ModelConfig, num_labels: int, slots: int, crf: bool = False):
        super().__init__(config)
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2 (O and at least one entity tag), got {num_labels}")
        self.tag_head = CharTagHead(config, num_labels, slots)
        self.init_heads()
        self.crf = None
        if crf:
            from torchcrf import CRF

            self.crf = CRF(num_labels, batch_first=True)   # its own init: uniform(-0.1, 0.1)

    def forward(self, input_ids: Tensor, char_index: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, char_labels: Tensor | None = None,
                char_mask: Tensor | None = None, decode: bool = False) -> dict[str, Tensor]:
        """char_index/char_labels/char_mask (B, N); decode adds char_tags (B, N): the predicted tag
        ids (Viterbi with the CRF, else arg max), 0 on padding."""
        hidden, aux = self.encode(input_ids, attention_mask, token_type_ids)
        emissions = self.tag_head(hidden, char_index)                  # (B, N, C)
        mask = torch.ones_like(char_index, dtype=torch.bool) if char_mask is None else char_mask.bool()
        out = {"char_logits": emissions, "aux_loss": aux}
        if char_labels is not None:
            # the mean over windows of each window's mean over its characters: N processes with B
            # windows each then train exactly like 1 process with N x B (a mean over all characters
            # would weight the processes by their character counts)
            counts = (char_labels != IGNORE_INDEX).sum(1).clamp_min(1)
            if self.crf is not None:
                nll = -self.crf(emissions, char_labels.clamp_min(0), mask=mask, reduction="none")
            else:
                nll = F.cross_entropy(emissions.transpose(1, 2), char_labels, ignore_index=IGNORE_INDEX,
                                      reduction="none").sum(1)
            out["tag_loss"] = (nll / counts).mean()
            ok = (emissions.detach().argmax(-1) == char_labels)[char_labels != IGNORE_INDEX]
            out["char_acc"] = ok.float().mean()
            out["loss"] = out["tag_loss"] + aux
        if decode:
            if self.crf is not None:
                tags = torch.zeros_like(char_index)
                for i, path in enumerate(self.crf.decode(emissions, mask=mask)):
                    tags[i, :len(path)] = torch.as_tensor(path, dtype=tags.dtype)
                out["char_tags"] = tags
            else:
                out["char_tags"] = emissions.argmax(-1).masked_fill(~mask, 0)
        return out


TASKS: dict[str, type[TaskModel]] = {
    "pretrain": PretrainModel, "mrc": MRCModel, "ict": ICTModel, "encoder": EncoderModel,
    "classify": ClassifyModel, "ner": NERModel,
}


def build_model(config: ModelConfig | str, task: str, **kwargs) -> TaskModel:
    """config: a ModelConfig, a config name ("bert-base") or a JSON path. kwargs go to the task
    model: pretrain(objective="sop"|"ict"|"mlm", temperature, pooling), ict(temperature, pooling),
    encoder(pooling="cls"|"mean", normalize), classify(num_labels; 1 = regression), ner(num_labels, slots,
    crf)."""
    if not isinstance(config, ModelConfig):
        from .config import load_config
        config = load_config(config)
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    return TASKS[task](config, **kwargs)
