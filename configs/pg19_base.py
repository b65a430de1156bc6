"""A base-size FAM LM on PG-19 (long books as document streams; SentencePiece tokenizer).

Needs the tfds pg19 dataset prepared under data.data_dir and a SentencePiece model at data.tokenizer.path.
Shape close to the paper's small models: 12 layers, d 768, B 1024, m 1, F 64.
"""
from famjax.train.config import sibling_config


def get_config():
    c = sibling_config(__file__, "default").get_config()
    c.model.update(d_model=768, num_layers=12, num_heads=12, mlp_dim=3072, block_size=1024, memory_blocks=1,
                   dtype="bfloat16", remat="dots", vocab_size=0)
    c.fam.update(fam_len=64, rsp_prob=0.8, rpo=True)
    c.data.dataset = "pg19"
    c.data.tokenizer.kind = "sentencepiece"
    c.data.tokenizer.path = "~/famjax_data/spm/pg19_32k.model"  # set to your SentencePiece model
    c.data.batching = "stream"
    c.data.seq_len = 4096
    c.data.batch_size = 64
    c.train.update(steps=100_000, optimizer="adafactor", learning_rate=1e-3, schedule="cosine",
                   warmup_steps=2000, b2=0.99, weight_decay=0.0, log_every=100)
    c.mesh.shape = (-1, 1, 1)
    c.checkpoint.every_steps = 1000
    c.eval.update(every_steps=2000, batches=32)
    return c
