"""famjax tools: command-line utilities above the trainer (aot: ahead-of-time TPU compile and memory check)."""
