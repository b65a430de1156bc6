"""The paper's 1B shape: 18 layers, d 1536, 12 heads, FFN x8, B 1024, m 3, F 64, train length 8.5k tokens.

Training recipe of the paper (docs/fam.md, "The paper's settings and its PassKey task"): Adafactor (b1 0.9,
b2 0.99), constant LR 1e-4, batch 128, RSP p 0.8, RPO on. Meant for accelerators: bf16 compute, remat, fsdp
over all devices.

Remat is "full": compiled for 32 TPU v5p chips (`python -m famjax.tools.aot --config=configs/paper_1b.py
--topology=v5p:2x4x4`, benchmarks/RESULTS.md), the step needs 64.2 GiB of the 95 per chip; with "dots" (every
matmul output kept, the attention scores included) it needs more than 245 GiB. On 16 chips (v5p-32, 32
TensorCores) add --config.train.grad_accum_steps=2 (78.0 GiB).
"""
from famjax.train.config import sibling_config


def get_config():
    c = sibling_config(__file__, "default").get_config()
    c.model.update(vocab_size=256_000, d_model=1536, num_layers=18, num_heads=12, mlp_dim=8 * 1536,
                   block_size=1024, memory_blocks=3, dtype="bfloat16", remat="full", mlp_activation="geglu",
                   tie_embeddings=True, embed_scale=True)
    c.fam.update(fam_len=64, rsp_prob=0.8, rpo=True)
    c.data.dataset = "pg19"
    c.data.tokenizer.kind = "sentencepiece"
    c.data.tokenizer.path = "~/famjax_data/spm/gemma_256k.model"  # set to the tokenizer of your model
    c.data.batching = "stream"
    c.data.seq_len = 9216  # paper: 8.5k tokens; rows must be whole blocks (data layer), so 9 x 1024
    c.data.batch_size = 128
    c.train.update(steps=50_000, optimizer="adafactor", learning_rate=1e-4, schedule="constant",
                   warmup_steps=1000, b1=0.9, b2=0.99, weight_decay=0.0, log_every=50)
    c.mesh.shape = (1, -1, 1)  # fsdp over every device
    c.checkpoint.every_steps = 1000
    c.eval.update(every_steps=5000, batches=16)
    return c
