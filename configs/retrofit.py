"""Retrofit FAM into a pretrained decoder, the paper's main setting, at the paper's 1B shape of training.

Set the source: `--config.train.init_from=/path/to/hf_folder_or.gguf` (famjax.convert reads Llama / Mistral /
Qwen2 / SmolLM / Gemma 1-2 folders and Llama-architecture GGUF files; the architecture fields of `model` come from
it). Its attention becomes FAM (B 1024, m 3, F 64, as the paper's 1B run), LoRA rank 64 on every attention and
MLP projection plus the initial-FAM table train, the base stays frozen; Adafactor, constant LR 1e-4, RSP p 0.8,
RPO (docs/fam.md, "The paper's settings"). configs/smollm2_fam_lora.py is the same regime on the small model
that ships with famjax's tests, sized for a CPU.
"""
from famjax.train.config import sibling_config


def get_config():
    c = sibling_config(__file__, "paper_1b").get_config()
    c.train.update(learning_rate=1e-4, schedule="constant", trainable="lora")
    c.model.update(lora_rank=64, lora_alpha=64.0, lora_dropout=0.0)
    # train.init_from stays "" here: a run must name its pretrained source (validate says so).
    return c
