"""The model architectures, one file each (gpt.py, llama.py), each a list of pipeline layers with
one interface: `layer_list(shape, with_vocab=..., head=...)` and a single-process nn.Sequential.
The engines build stages from `layer_list`, which picks the file by `shape.arch`."""

from __future__ import annotations

import torch.nn as nn

from vptrain.config import ARCHS
from vptrain.models import gpt, llama
from vptrain.models.shape import LayerList, OutputLayer, TransformerShape

_MODULES = {"gpt": gpt, "llama": llama}
_MODELS: dict[str, type[nn.Sequential]] = {"gpt": gpt.GPT, "llama": llama.Llama}
assert set(_MODULES) == set(ARCHS)


def layer_list(shape: TransformerShape, *, with_vocab: bool = True, head: type[nn.Module] = OutputLayer) -> LayerList:
    return _MODULES[shape.arch].layer_list(shape, with_vocab=with_vocab, head=head)


def build_model(shape: TransformerShape) -> nn.Sequential:
    """The whole model in one process: gpt.GPT or llama.Llama."""
    return _MODELS[shape.arch](shape)
