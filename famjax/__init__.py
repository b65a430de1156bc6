"""famjax: TransformerFAM (Feedback Attention Memory, arXiv 2404.09173) in JAX / Flax NNX.

    import famjax
    model = famjax.FamLM(famjax.ModelConfig(...), rngs=flax.nnx.Rngs(0))
    state = model.init_state(batch_size=2)
    logits, state = model(tokens, state)
"""
from famjax.model import FamLM, FamState, LayerCache, ModelConfig

__all__ = ["FamLM", "FamState", "LayerCache", "ModelConfig"]
__version__ = "0.1.0"
