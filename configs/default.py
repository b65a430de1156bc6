"""Every field of a famjax training config, with its meaning; presets import this and change what differs.

The defaults are the `passkey_tiny` preset: a 2-layer FAM model that learns PassKey (filler up to 90 words, 3-5
blocks of 32 tokens) on a 2-core CPU in a few minutes (word tokenizer, loss on the answer + 0.1 elsewhere).
`python -m famjax.main` uses it when no --config is given.
"""
import ml_collections
from ml_collections import config_dict

import famjax.data as fd


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = m = ml_collections.ConfigDict()
    m.vocab_size = 0  # tokens in the vocabulary; 0 = the data tokenizer's vocab_size (resolved at start)
    m.d_model = 128  # residual width d
    m.num_layers = 2  # decoder layers L
    m.num_heads = 4  # query heads H
    m.num_kv_heads = config_dict.placeholder(int)  # key/value heads (GQA); None = num_heads
    m.head_dim = config_dict.placeholder(int)  # per-head width; None = d_model // num_heads
    m.mlp_dim = 512  # FFN hidden width; None = 4 * d_model
    m.mlp_activation = "swiglu"  # swiglu | geglu | gelu
    m.norm = "rms"  # rms | layer
    m.norm_eps = 1e-6  # epsilon inside the norms
    m.rope_base = 10_000.0  # RoPE wavelength base (also sets the random position offset range)
    m.tie_embeddings = False  # LM head = embedding transposed
    m.embed_scale = False  # multiply embeddings by sqrt(d_model)
    m.dtype = "float32"  # compute dtype: float32 | bfloat16 (bf16 compute, parameters stay param_dtype)
    m.param_dtype = "float32"  # parameter storage dtype (keep float32 for training)
    m.scan_layers = True  # lax.scan over layers (compile time independent of depth)
    m.remat = "none"  # rematerialisation: none | full | dots | dots_no_batch
    m.attention_impl = "auto"  # xla | pallas (TPU kernel) | cudnn (GPU, full attention) | auto (by backend)
    m.fam_unroll = 1  # blocks per iteration of each layer's FAM loop over blocks (lax.scan unroll)
    m.fam_deferred_grads = True  # the FAM rows' weight gradients as one matmul after the loop (same math)
    m.fam_remat = "rerun"  # with remat, the FAM loop is rerun in the backward pass | keep: its residuals are kept
    m.attention = "fam"  # full | bswa | fam
    m.block_size = 32  # B: tokens per block
    m.memory_blocks = 0  # m: previous blocks each token attends to (besides the FAM)
    m.max_len = 4096  # KV-cache capacity for attention="full" streaming
    # Conventions of pretrained families (famjax.convert sets them; with train.init_from they come from the
    # checkpoint like every architecture field above).
    m.qkv_bias = False  # biases on the query/key/value projections (Qwen2)
    m.norm_offset = 0.0  # norms multiply by (norm_offset + scale) (Gemma: 1.0)
    m.post_norms = False  # sandwich norms after attention and FFN (Gemma 2)
    m.attn_softcap = 0.0  # c tanh(score / c) on attention scores; 0 = off (Gemma 2: 50)
    m.final_softcap = 0.0  # c tanh(logit / c) on the logits; 0 = off (Gemma 2: 30)
    m.query_scale = config_dict.placeholder(float)  # attention score scale; None = head_dim ** -0.5
    # LoRA (famjax/model/lora.py): rank-r adapters beside the targeted projections, y = x W + (alpha / r)(x A) B,
    # A ~ N(0, 1/in), B = 0 at the start (the model computes exactly its base). FAM rows use them too.
    m.lora_rank = 0  # r; 0 = no adapters (nothing added to the parameters or the computation)
    m.lora_alpha = 16.0  # the adapters' output scale is lora_alpha / lora_rank
    m.lora_dropout = 0.0  # dropout on the adapters' input during training steps (not at eval/inference)
    m.lora_targets = ("q", "k", "v", "o", "gate", "up", "down")  # projections with adapters (the paper: all)

    c.fam = f = ml_collections.ConfigDict()
    f.fam_len = 8  # F: feedback-memory rows per layer (ignored unless model.attention == "fam")
    f.rsp_prob = 0.0  # random state passing: probability a step starts from the saved final FAM (paper 0.8)
    f.rpo = True  # random position offset per training sequence (off at eval/inference); turning it off
    # did not speed up learning of the tiny model (500 steps, lr 2e-3: 1.4% exact, loss as with it on)
    f.rpo_zero_prob = 0.5  # probability a sequence's offset is 0 (spec: 0.5)
    # Switches for the paper's ablations (experiments/passkey); keep the defaults (docs/fam.md) otherwise.
    f.zero_residual = True  # the first FAM update (from the learned initial FAM) gets no residual
    f.positions = "block"  # FAM RoPE positions: "block" (the block's last F positions) | "zero" (all 0)
    f.stop_gradient = False  # True: no gradient through the FAM from one block to the next
    f.keep_norm = False  # True: each update rescales every FAM row to its previous norm (not in the paper)
    # Training-only state noise (not in the paper; famjax/train/perturb.py): after every block update each FAM
    # row gets eps x its RMS added, eps ~ N(0, noise^2) fresh per block plus, with drift, one N(0, drift^2)
    # direction per layer, row and FAM row repeated after every block (the slow drift of an old FAM). It asks
    # the memory to store what it keeps robustly; on PassKey it lengthened the hold (benchmarks/RESULTS.md).
    f.noise = 0.0
    f.drift = 0.0

    c.data = d = fd.default_config()  # see famjax/data/config.py for every field
    d.tokenizer.kind = "word"  # word-level PassKey vocabulary: ~5x shorter sequences than bytes
    # Shorter examples learn faster per step and cost less per step: filler 16-90 in 40 x 192 tokens reached
    # 82% at step 600, filler 16-180 in 32 x 256 37% at step 500 and 87% only at step 1200 (RESULTS.md).
    d.seq_len = 192  # tokens per row per step (multiple of block_size)
    d.batch_size = 40  # global rows per step
    d.passkey.train_filler_min = 16  # shortest filler (words)
    d.passkey.train_filler_max = 90  # longest filler: examples of 85-159 tokens (3-5 blocks) fit seq_len 192
    d.passkey.train_examples = 50_000  # more than the run reads: no example is seen twice
    d.passkey.loss_weight_other = 0.1  # loss on non-answer tokens (answer weight 1)
    d.passkey.eval_multipliers = (1, 2, 4, 8, 16)  # eval_xM splits prepared for the evals

    c.train = t = ml_collections.ConfigDict()
    # optimizer steps. A 10-variant sweep on an H100 (benchmarks/RESULTS.md "## PassKey") found batch 32 with
    # lr 3e-3 the fastest learner per step (lr 1e-3 / batch 16 learned 2-3x slower); with the shorter filler
    # above, 900 steps of the cosine reach ~92% at the training length (CPU runs, RESULTS.md).
    t.steps = 900
    t.seed = 0  # parameter init, RPO/RSP draws
    t.optimizer = "adamw"  # adamw | adafactor (the paper's)
    t.learning_rate = 3e-3  # peak learning rate (5e-3 learned no faster: 83% vs 82% at step 600)
    t.schedule = "cosine"  # cosine (to min_lr_ratio * lr at the end) | constant (after warmup)
    t.warmup_steps = 50  # linear warmup from 0
    t.min_lr_ratio = 0.1  # final LR / peak for the cosine schedule
    t.b1 = 0.9  # Adam/Adafactor first-moment decay
    t.b2 = 0.99  # Adam second-moment decay (Adafactor: decay rate)
    t.eps = 1e-8  # Adam epsilon
    t.weight_decay = 0.01  # decoupled weight decay (matrices only)
    t.grad_clip_norm = 1.0  # global-norm clipping; 0 = off
    t.grad_accum_steps = 1  # micro-batches per step (divides data.batch_size)
    t.z_loss = 0.0  # weight of log(Z)^2 (PaLM z-loss); 0 = off
    t.stream_state = "auto"  # carry model state across steps per row: auto (stream batching) | on | off
    t.log_every = 25  # console line + TensorBoard scalars every N steps
    t.peak_flops = 0.0  # peak FLOP/s of the whole job for MFU; 0 = measure a matmul at start
    t.debug_step_delay_s = 0.0  # sleep after every step (tests use it to kill a run mid-way); keep 0
    # Fine-tuning a pretrained checkpoint (docs/design.md, "Pretrained checkpoints").
    t.init_from = ""  # "" = initialise from train.seed; or a Hugging Face folder / .gguf file loaded with
    # famjax.convert.load_pretrained: the architecture fields of `model` then come from the checkpoint (set at
    # resolve), the config keeps attention, block_size, memory_blocks, max_len, dtype, param_dtype, scan_layers,
    # remat, the fam section's model switches and the lora_* fields; with model.lora_rank > 0 adapters are added
    # (seeded by train.seed)
    t.init_fam = ""  # the initial FAM table of train.init_from: "" = famjax.convert's default, or one of its
    # choices (bos | mean | random | zeros; docs/design.md, "Pretrained checkpoints"); seeded by train.seed
    t.trainable = "all"  # which parameters train: all | lora (LoRA adapters + fam_init) | lora_norms (+ every
    # norm's scale/bias). With lora*: gradients and optimizer state exist for those leaves only, the rest is the
    # frozen base of train.init_from (required), and checkpoints hold the trained leaves plus the base's path
    # and sha256; resuming on a base with another hash is refused.

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # sizes of the (data, fsdp, tensor) axes; one -1 fills with the devices left
    # Logical axis -> mesh axis (or tuple of axes, or None = replicated). "blocks" is sequential (the FAM
    # recurrence runs along it) and is never sharded; "layers" is scanned and stays whole on each device.
    c.mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("q_heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("fam", None),
        ("lora", None),  # LoRA rank r: small, replicated
        ("layers", None),
        ("blocks", None),
    )

    c.checkpoint = ck = ml_collections.ConfigDict()
    ck.enabled = True  # write checkpoints to <workdir>/checkpoints and resume from them
    ck.every_steps = 250  # save every N steps (and at the end, and on SIGTERM); 0 = only at the end
    ck.keep = 3  # checkpoints kept (older ones deleted)
    ck.async_save = True  # write in a background thread while training continues

    c.eval = e = ml_collections.ConfigDict()
    e.every_steps = 250  # evaluate every N steps (and at the end); 0 = only at the end
    e.batches = 8  # batches of data.eval_split per evaluation (PassKey validation: 8 x 40 rows, ~330 examples)
    return c
