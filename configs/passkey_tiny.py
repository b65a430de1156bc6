"""PassKey, tiny FAM (2 layers, d 128, B 32, F 8, m 0): learns the task on a CPU in a few minutes.

`make train` runs this preset. The defaults in default.py are exactly this preset.
"""
from famjax.train.config import sibling_config


def get_config():
    return sibling_config(__file__, "default").get_config()
