"""The public model names other modules import; the architectures live in vptrain/models/
(gpt.py, llama.py). `layer_list` and `build_model` pick the architecture from the shape."""

from __future__ import annotations

from vptrain.config import ARCHS
from vptrain.models import build_model, layer_list
from vptrain.models.gpt import GPT, Block, FinalNorm, InputEmbedding, PositionEmbedding
from vptrain.models.llama import Llama
from vptrain.models.shape import (
    OutputHead,
    OutputLayer,
    TransformerShape,
    lm_loss,
    output_weight_rows,
    token_embedding_rows,
)

GPTShape = TransformerShape  # the name the engines and tests have imported since before llama

__all__ = [
    "ARCHS", "GPT", "Block", "FinalNorm", "GPTShape", "InputEmbedding", "Llama", "OutputHead", "OutputLayer",
    "PositionEmbedding", "TransformerShape", "build_model", "layer_list", "lm_loss", "output_weight_rows",
    "token_embedding_rows",
]
