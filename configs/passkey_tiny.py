"""PassKey, tiny FAM (2 layers, d 128, B 32, F 8, m 0), word tokenizer, filler 16-90 words, 40 x 192 tokens per step.

`make train` runs this preset. The defaults in default.py are exactly this preset.

Measured on the 2-core CPU (2026-11-27, nothing else running): `make train` took 6 min 31 s in all (900 steps
of AdamW, lr 3e-3 cosine, RPO on, RSP off, at ~0.42 s/step, plus ~7 s of data preparation and four evals) and
reached 91.8% PassKey exact match at the training length (329 validation examples; 98.1% of answer tokens);
2.4% at step 250, 60% at 500, 87% at 750. The previous recipe (filler 16-180 in 32 x 256, 1200 steps) took
14.5 min for 87.3%. Shrink a smoke run with `make train TRAIN_ARGS="--config.train.steps=20"`.
"""
from famjax.train.config import sibling_config


def get_config():
    return sibling_config(__file__, "default").get_config()
