"""The feed-forward activations by config name (act_fn), shared by the encoder layers, the Switch
MoE experts and the heads."""
from __future__ import annotations

from functools import partial

import torch.nn.functional as F


def activation(name: str):
    return {"gelu": F.gelu, "relu": F.relu, "swish": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh")}[name]
