"""Retrofit experiment (issue 21): a pretrained model switched to FAM / BSWA, LoRA + RSP fine-tuned, streamed."""
