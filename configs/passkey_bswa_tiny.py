"""PassKey, tiny BSWA baseline: passkey_tiny without the feedback memory (same B, m 0).

With m = 0 each token sees only its own block, so the key is out of reach once it is in an earlier block:
this model should stay at chance, which is the paper's point.
"""
from famjax.train.config import sibling_config


def get_config():
    c = sibling_config(__file__, "default").get_config()
    c.model.attention = "bswa"  # block sliding window attention, no FAM
    c.fam.rpo = True  # same training recipe as the FAM run
    return c
