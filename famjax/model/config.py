"""ModelConfig: every architectural choice of a famjax model, validated on construction."""
import dataclasses
import math
import numbers

import jax.numpy as jnp

ATTENTION_MODES = ("full", "bswa", "fam")
NORMS = ("rms", "layer")
MLP_ACTIVATIONS = ("swiglu", "geglu", "gelu")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
FAM_REMAT = ("rerun", "keep", "offload")
FAM_POSITIONS = ("block", "zero")
ATTENTION_IMPLS = ("xla", "pallas", "cudnn", "auto")
DTYPES = ("float32", "bfloat16", "float16")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # every attention and MLP projection


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only LM with full, block-sliding-window (BSWA) or FAM attention."""
    vocab_size: int = 256             # tokens in the vocabulary
    d_model: int = 128                # residual width d
    num_layers: int = 2               # decoder layers L
    num_heads: int = 4                # query heads H
    num_kv_heads: int | None = None   # key/value heads (GQA/MQA); None = num_heads (MHA)
    head_dim: int | None = None       # per-head width; None = d_model // num_heads
    mlp_dim: int | None = None        # FFN hidden width; None = 4 * d_model
    mlp_activation: str = "swiglu"    # "swiglu" | "geglu" | "gelu"
    norm: str = "rms"                 # "rms" (RMSNorm) | "layer" (LayerNorm)
    norm_eps: float = 1e-6            # epsilon inside the norms
    rope_base: float = 10_000.0       # RoPE wavelength base
    tie_embeddings: bool = False      # LM head = embedding matrix transposed
    embed_scale: bool = False         # multiply token embeddings by sqrt(d_model) (Gemma)
    dtype: str = "float32"            # compute dtype of activations and matmuls
    param_dtype: str = "float32"      # storage dtype of parameters
    scan_layers: bool = True          # lax.scan over layers (compile time independent of depth)
    remat: str = "none"               # rematerialisation per layer: "none" | "full" | "dots" | "dots_no_batch"
    attention_impl: str = "auto"      # "xla" | "pallas" (Pallas kernel: Mosaic on TPU, Triton on GPU, CPU: TPU's
                                      # in interpret mode) | "cudnn" (GPU; full attention) | "auto": pallas on
                                      # TPU, cudnn on GPU, xla elsewhere
    fam_unroll: int = 1               # blocks per iteration of the FAM's loop over blocks (lax.scan unroll)
    fam_deferred_grads: bool = True   # training: the F rows' weight gradients as one matmul after the loop
    fam_remat: str = "rerun"          # with remat: the backward pass "rerun"s each layer's FAM loop, or "keep"s
                                      # what the loop stacked in the forward (fewer kernels and FLOPs, more
                                      # memory), or "offload"s it to host memory (keep's work, rerun's device
                                      # memory, host transfers); keep and offload need fam_deferred_grads
    attention: str = "fam"            # "full" (causal) | "bswa" | "fam" (BSWA + feedback memory)
    block_size: int = 64              # B: tokens per block (bswa, fam)
    memory_blocks: int = 1            # m: previous blocks each token sees (bswa, fam)
    fam_len: int = 8                  # F: feedback rows per layer (fam; 0 = BSWA)
    max_len: int = 4096               # KV-cache capacity for streaming with attention="full"
    # FAM switches for the paper's ablations; the defaults are the model of docs/fam.md.
    fam_zero_residual: bool = True    # the first update from the initial FAM gets no residual
    fam_positions: str = "block"      # "block": the last F positions of the block read | "zero": all 0
    fam_stop_gradient: bool = False   # True: no gradient through the FAM from one block to the next
    fam_keep_norm: bool = False       # True: every update keeps each FAM row's norm (not in the paper; bounds it)
    # Conventions of pretrained families (famjax.convert); the defaults are the model of docs/fam.md.
    qkv_bias: bool = False            # biases on the query/key/value projections, added before RoPE (Qwen2)
    norm_offset: float = 0.0          # every norm multiplies by (norm_offset + scale), in float32; scale starts at
                                      # 1 - norm_offset (Gemma stores w and uses 1 + w: 1.0)
    post_norms: bool = False          # sandwich norms (Gemma 2): A = X + PostAttnNorm(Attn(Norm1(X))),
                                      # out = A + PostFFNNorm(FFN(Norm2(A))); FAM rows get them too
    attn_softcap: float = 0.0         # c > 0: every scaled attention score s -> c tanh(s / c), before mask and
                                      # softmax (Gemma 2: 50); 0 = off
    final_softcap: float = 0.0        # c > 0: logits -> c tanh(logits / c), in float32 (Gemma 2: 30); 0 = off
    query_scale: float | None = None  # attention score scale; None = head_dim ** -0.5
                                      # (Gemma 2: query_pre_attn_scalar ** -0.5)
    # LoRA (famjax.model.lora): unmerged rank-r adapters beside the targeted kernels, y = x W + s (x A) B with
    # s = lora_alpha / lora_rank; B starts at 0, so a fresh adapter changes nothing. FAM rows use them too.
    lora_rank: int = 0                # r; 0 = no adapters (no parameters, no computation)
    lora_alpha: float = 16.0          # the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0         # dropout on the adapters' input, only in calls given a dropout_key
    lora_targets: tuple = LORA_TARGETS  # projections that get adapters: q, k, v, o, gate, up, down ("gate" is
                                      # skipped by the ungated "gelu" MLP)

    def __post_init__(self):
        errors = []

        def check(ok, message):
            if not ok:
                errors.append(message)

        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "block_size", "max_len"):
            value = getattr(self, name)
            check(isinstance(value, int) and value > 0, f"{name} must be an integer > 0, got {value!r}")
        for name in ("memory_blocks", "fam_len"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 0, f"{name} must be an integer >= 0, got {value!r}")
        check(isinstance(self.fam_unroll, int) and not isinstance(self.fam_unroll, bool) and self.fam_unroll > 0,
              f"fam_unroll must be an integer > 0, got {self.fam_unroll!r}")
        for name, allowed in (("attention", ATTENTION_MODES), ("norm", NORMS),
                              ("mlp_activation", MLP_ACTIVATIONS), ("remat", REMAT_POLICIES),
                              ("dtype", DTYPES), ("param_dtype", DTYPES), ("fam_positions", FAM_POSITIONS),
                              ("attention_impl", ATTENTION_IMPLS), ("fam_remat", FAM_REMAT)):
            value = getattr(self, name)
            check(value in allowed, f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        for name in ("fam_zero_residual", "fam_stop_gradient", "fam_keep_norm", "fam_deferred_grads", "qkv_bias",
                     "post_norms"):
            value = getattr(self, name)
            check(isinstance(value, bool), f"{name} must be True or False, got {value!r}")

        def real(value):
            return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        check(real(self.norm_offset), f"norm_offset must be a finite number, got {self.norm_offset!r}")
        for name in ("attn_softcap", "final_softcap"):
            value = getattr(self, name)
            check(real(value) and value >= 0, f"{name} must be a finite number >= 0 (0 = off), got {value!r}")
        check(self.query_scale is None or (real(self.query_scale) and self.query_scale > 0),
              f"query_scale must be a finite number > 0 or None (head_dim ** -0.5), got {self.query_scale!r}")
        check(isinstance(self.lora_rank, int) and not isinstance(self.lora_rank, bool) and self.lora_rank >= 0,
              f"lora_rank must be an integer >= 0 (0 = no LoRA), got {self.lora_rank!r}")
        check(real(self.lora_alpha) and self.lora_alpha > 0,
              f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        check(real(self.lora_dropout) and 0 <= self.lora_dropout < 1,
              f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        targets = self.lora_targets
        if isinstance(targets, str) or not isinstance(targets, (tuple, list)):
            errors.append(f"lora_targets must be a tuple of names from {', '.join(LORA_TARGETS)}, got {targets!r}")
        else:
            bad = [t for t in targets if t not in LORA_TARGETS]
            check(not bad, f"lora_targets: unknown projection(s) {bad}; allowed {', '.join(LORA_TARGETS)}")
            check(len(set(targets)) == len(targets), f"lora_targets has duplicates: {tuple(targets)!r}")
            check(bool(targets) or not self.lora_rank, "lora_targets must name at least one projection")
        if errors:
            raise ValueError("; ".join(errors))

        heads = self.num_heads
        if self.head_dim is None:
            check(self.d_model % heads == 0,
                  f"num_heads must divide d_model (or set head_dim): {self.d_model} % {heads} != 0")
        elif not (isinstance(self.head_dim, int) and self.head_dim > 0):
            errors.append(f"head_dim must be an integer > 0 or None, got {self.head_dim!r}")
        kv = heads if self.num_kv_heads is None else self.num_kv_heads
        check(isinstance(kv, int) and kv > 0 and heads % kv == 0,
              f"num_kv_heads must be > 0 and divide num_heads={heads}, got {self.num_kv_heads!r}")
        mlp = 4 * self.d_model if self.mlp_dim is None else self.mlp_dim
        check(isinstance(mlp, int) and mlp > 0, f"mlp_dim must be an integer > 0 or None, got {mlp!r}")
        check(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps!r}")
        check(self.rope_base > 0, f"rope_base must be > 0, got {self.rope_base!r}")
        check(self.fam_remat == "rerun" or self.fam_deferred_grads,
              f"fam_remat={self.fam_remat!r} needs fam_deferred_grads=True (it keeps what ops.deferred_scan's loop "
              "stacks)")
        if errors:
            raise ValueError("; ".join(errors))
        head_dim = self.d_model // heads if self.head_dim is None else self.head_dim
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        object.__setattr__(self, "num_kv_heads", kv)
        object.__setattr__(self, "head_dim", head_dim)
        object.__setattr__(self, "mlp_dim", mlp)
        for name in ("norm_offset", "attn_softcap", "final_softcap", "lora_alpha", "lora_dropout"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.query_scale is not None:
            object.__setattr__(self, "query_scale", float(self.query_scale))

    @property
    def num_fam(self) -> int:
        """F actually used: fam_len in "fam" mode, 0 otherwise."""
        return self.fam_len if self.attention == "fam" else 0

    def lora_on(self, target: str) -> bool:
        """Whether projection `target` ("q", ..., "down") carries a LoRA adapter."""
        return bool(self.lora_rank) and target in self.lora_targets

    @property
    def lora_scale(self) -> float:
        """The adapters' output scale lora_alpha / lora_rank (0 without LoRA)."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "ModelConfig":
        """Returns a copy with some fields changed (and validated again)."""
        return dataclasses.replace(self, **changes)
