"""PassKey, tiny FAM (2 layers, d 128, B 32, F 8, m 0), word tokenizer, 16 x 256 tokens per step.

`make train` runs this preset. The defaults in default.py are exactly this preset.

Measured on the shared 2-core CPU (2026-11-26): 1500 steps (AdamW 1e-3 constant, RPO on, RSP off) take
~15-26 min depending on load (0.6-1.3 s/step) and reach 42.6% PassKey exact match at the training length
(141 validation examples; 84% of answer tokens right). It does NOT learn the task in a few minutes: after
300-500 steps (~5 min) every variant tried was at 0-2% exact match (RPO off + lr 2e-3; RPO off + lr 3e-3 +
other-token loss weight 0.02; the same with seq_len 128 and filler 16-56). Shrink a smoke run with
`make train TRAIN_ARGS="--config.train.steps=20"`.
"""
from famjax.train.config import sibling_config


def get_config():
    return sibling_config(__file__, "default").get_config()
