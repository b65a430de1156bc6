"""Flax NNX modules of famjax: one model code path for full / BSWA / FAM attention."""
from famjax.model.config import ModelConfig
from famjax.model.lm import FamLM
from famjax.model.state import FamState, LayerCache

__all__ = ["FamLM", "FamState", "LayerCache", "ModelConfig"]
