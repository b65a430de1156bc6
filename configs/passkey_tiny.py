"""PassKey, tiny FAM (2 layers, d 128, B 32, F 8, m 0), word tokenizer, 32 x 256 tokens per step.

`make train` runs this preset. The defaults in default.py are exactly this preset.

Measured on the 2-core CPU (2026-11-26): `make train` took 14.5 min in all (1200 steps of AdamW, lr 3e-3
cosine, RPO on, RSP off, at ~0.75 s/step, plus data preparation and evals) and reached 87.3% PassKey exact
match at the training length (275 validation examples; 96.7% of answer tokens); 37% at step 500, 68% at 750,
84% at 1000. The old recipe (batch 16, lr 1e-3 constant) had 42.6% after 1500 steps. Shrink a smoke run with
`make train TRAIN_ARGS="--config.train.steps=20"`.
"""
from famjax.train.config import sibling_config


def get_config():
    return sibling_config(__file__, "default").get_config()
