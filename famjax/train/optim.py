"""Optimizers (AdamW, Adafactor) with warmup + cosine/constant schedules and global-norm clipping."""
from __future__ import annotations

import jax
import optax


def schedule(train_cfg) -> optax.Schedule:
    """Returns the learning rate per step: linear warmup from 0, then cosine decay or constant."""
    lr, warmup, steps = float(train_cfg.learning_rate), int(train_cfg.warmup_steps), int(train_cfg.steps)
    if train_cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        after = optax.cosine_decay_schedule(lr, decay_steps=max(steps - warmup, 1),
                                            alpha=float(train_cfg.min_lr_ratio))
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _decay_mask(params):
    # Decay matrices only: norms' scales/biases (1-D) are not decayed.
    return jax.tree.map(lambda p: p.ndim >= 2 and p.shape[-1] > 1, params)


def _decay_mask_by_name(params):
    # As _decay_mask, and never a norm's scale/bias (stacked over layers they are [L, d] matrices): used for
    # the frozen-base runs (train.trainable != "all"), where lora_norms trains pretrained norms.
    def keep(path, p):
        names = [str(getattr(k, "key", "")) for k in path]
        return p.ndim >= 2 and p.shape[-1] > 1 and not any(n == "final_norm" or n.startswith("norm") for n in names)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    """Returns clip(global norm) -> AdamW or Adafactor, with the schedule of `schedule(train_cfg)`."""
    lr = schedule(train_cfg)
    mask = _decay_mask if train_cfg.get("trainable", "all") == "all" else _decay_mask_by_name
    if train_cfg.optimizer == "adamw":
        opt = optax.adamw(lr, b1=float(train_cfg.b1), b2=float(train_cfg.b2), eps=float(train_cfg.eps),
                          weight_decay=float(train_cfg.weight_decay), mask=mask)
    elif train_cfg.optimizer == "adafactor":
        # The paper: Adafactor with momentum b1 and decay b2; weight decay as a decoupled rate.
        opt = optax.adafactor(lr, decay_rate=float(train_cfg.b2), momentum=float(train_cfg.b1) or None,
                              weight_decay_rate=float(train_cfg.weight_decay) or None,
                              multiply_by_parameter_scale=False, clipping_threshold=None)
    else:
        raise ValueError(f"train.optimizer must be adamw or adafactor, got {train_cfg.optimizer!r}")
    if float(train_cfg.grad_clip_norm) > 0:
        opt = optax.chain(optax.clip_by_global_norm(float(train_cfg.grad_clip_norm)), opt)
    return opt
