"""Output heads and pooling.

Shapes: B batch, L sequence length, H hidden size, D embedding size, V vocabulary size,
M number of predicted (masked) tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .dropout import Dropout
from .activations import activation

IGNORE_INDEX = -100


class MLMHead(nn.Module):
    """BERT's MLM head (dense, activation, LayerNorm, decoder tied to the word embeddings),
    run only on the rows at masked positions. ModernBERT's has no dense or LayerNorm bias."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.embedding_dim, bias=config.has_bias)
        self.act = activation(config.act_fn)
        self.norm = nn.LayerNorm(config.embedding_dim, eps=config.LN_eps, bias=config.has_bias)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        """hidden (..., H), word_embeddings (V, D) -> logits (..., V)."""
        return F.linear(self.norm(self.act(self.dense(hidden))), word_embeddings, self.bias)

    def loss(self, hidden: Tensor, labels: Tensor, word_embeddings: Tensor,
             all_labelled: bool = False) -> dict[str, Tensor]:
        """hidden (B, L, H), labels (B, L) with IGNORE_INDEX where nothing is predicted.
        all_labelled: hidden (M, H) and labels (M,) are the predicted rows already (no selection,
        which would wait for the device)."""
        if all_labelled:
            h, target = hidden, labels
        else:
            labels = labels.reshape(-1)
            sel = (labels != IGNORE_INDEX).nonzero().squeeze(1)    # (M,)
            h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, sel)
            target = labels.index_select(0, sel)
        if target.shape[0] == 0:
            zero = hidden.sum() * 0.0
            return {"mlm_loss": zero, "mlm_acc": zero.detach()}
        logits = self(h, word_embeddings).float()                   # (M, V)
        loss = F.cross_entropy(logits, target)
        acc = (logits.detach().argmax(-1) == target).float().mean()
        return {"mlm_loss": loss, "mlm_acc": acc}


class Pooler(nn.Module):
    """BERT's pooler: dense + tanh on the [CLS] vector."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class PredictionHead(nn.Module):
    """ModernBERT's head before its classifiers (transformers' ModernBertPredictionHead): dense,
    activation, LayerNorm, without biases as in the encoder."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.has_bias)
        self.act = activation(config.act_fn)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.LN_eps, bias=config.has_bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.norm(self.act(self.dense(hidden)))


class SequenceClassifierHead(nn.Module):
    """The [CLS] vector pooled, dropout, linear classifier: SOP (2 labels) and sentence classification.
    BERT-family models pool with BERT's pooler (BertForSequenceClassification), ModernBERT with its
    prediction head (ModernBertForSequenceClassification, classifier_pooling "cls")."""

    def __init__(self, config: ModelConfig, num_labels: int):
        super().__init__()
        modern = config.model_type == "modernbert"
        self.pooler = None if modern else Pooler(config)
        self.head = PredictionHead(config) if modern else None
        self.dropout = Dropout(config.dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)

    def forward(self, hidden: Tensor) -> Tensor:
        pooled = self.pooler(hidden) if self.head is None else self.head(hidden[:, 0])
        return self.classifier(self.dropout(pooled))


class SpanHead(nn.Module):
    """MRC: start and end logits per token; padding positions can never be predicted. BERT-family:
    a linear layer (BertForQuestionAnswering); ModernBERT: its prediction head and dropout first
    (ModernBertForQuestionAnswering)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        modern = config.model_type == "modernbert"
        self.head = PredictionHead(config) if modern else None
        self.dropout = Dropout(config.dropout_prob) if modern else None
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.head is not None:
            hidden = self.dropout(self.head(hidden))
        logits = self.qa_outputs(hidden).float()                    # (B, L, 2)
        if attention_mask is not None:
            logits = logits.masked_fill(~attention_mask.bool().unsqueeze(-1),
                                        torch.finfo(logits.dtype).min)
        start, end = logits.unbind(-1)
        return start, end


class CharTagHead(nn.Module):
    """NER: `slots` tag logits per token, one per character of the token (data/ner.py), gathered
    into per-character emissions."""

    def __init__(self, config: ModelConfig, num_labels: int, slots: int):
        super().__init__()
        self.num_labels, self.slots = num_labels, slots
        self.dropout = Dropout(config.dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, slots * num_labels)

    def forward(self, hidden: Tensor, char_index: Tensor) -> Tensor:
        """hidden (B, L, H), char_index (B, N) = token position * slots + slot -> (B, N, C) float."""
        B, L, _ = hidden.shape
        logits = self.classifier(self.dropout(hidden)).float().view(B, L * self.slots, self.num_labels)
        return logits.gather(1, char_index.unsqueeze(-1).expand(-1, -1, self.num_labels))


def pool(hidden: Tensor, attention_mask: Tensor | None, pooling: str) -> Tensor:
    """hidden (B, L, H) -> (B, H): the [CLS] vector or the mean over real tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        if attention_mask is None:
            return hidden.mean(1)
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")


def contrastive_loss(query: Tensor, passages: Tensor, offset: int,
                     temperature: float) -> dict[str, Tensor]:
    """In-batch negatives: query i's positive is passages[offset + i]; every other row of
    passages (B', H), possibly gathered from all processes, is a negative. Cosine similarity."""
    q = F.normalize(query.float(), dim=-1)
    p = F.normalize(passages.float(), dim=-1)
    scores = q @ p.T / temperature                                  # (B, B')
    labels = torch.arange(q.shape[0], device=q.device) + offset
    loss = F.cross_entropy(scores, labels)
    acc = (scores.detach().argmax(-1) == labels).float().mean()
    return {"ict_loss": loss, "ict_acc": acc}
