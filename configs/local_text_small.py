"""A small FAM LM on a folder of local text files (byte tokenizer, document streams across steps).

Set --config.data.local_text.path=/path/to/texts. Long documents are read as streams: each row follows one
document across steps and the FAM state is carried between steps (no gradient across steps).
"""
from famjax.train.config import sibling_config


def get_config():
    c = sibling_config(__file__, "default").get_config()
    c.model.update(d_model=256, num_layers=4, num_heads=4, mlp_dim=1024, block_size=64, memory_blocks=1)
    c.fam.fam_len = 16
    c.data.dataset = "local_text"
    c.data.tokenizer.kind = "byte"
    c.data.local_text.path = ""  # required: folder of .txt files
    c.data.batching = "stream"
    c.data.seq_len = 256
    c.data.batch_size = 16
    c.data.passkey.loss_weight_other = 1.0  # (unused for text) plain LM loss
    c.train.update(steps=5000, learning_rate=1e-3, warmup_steps=200, stream_state="auto")
    c.checkpoint.every_steps = 500
    c.eval.update(every_steps=500, batches=16)
    return c
