"""Retrofit FAM into a pretrained decoder (the paper's main setting). PLACEHOLDER: filled by the retrofit issue.

The fields under `retrofit` are declared here so configs stay stable; the trainer does not read them yet.
The model section must match the pretrained checkpoint's architecture; F and B are FAM's additions.
"""
import ml_collections

from famjax.train.config import sibling_config


def get_config():
    c = sibling_config(__file__, "paper_1b").get_config()
    c.retrofit = r = ml_collections.ConfigDict()
    r.source = ""  # pretrained checkpoint (e.g. a Hugging Face model id or local path); set by the retrofit issue
    r.source_format = "hf"  # hf | orbax: how to read `source`
    r.lora_rank = 64  # LoRA rank on attention and FFN (paper: 64); 0 = full fine-tuning
    r.train_only = ("lora", "fam_init")  # parameter groups trained; the rest frozen
    c.train.update(learning_rate=1e-4, schedule="constant")
    return c
