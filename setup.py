"""famjax: TransformerFAM (Feedback Attention Memory) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="famjax",
    version="0.1.0",
    description="TransformerFAM (Feedback Attention Memory, arXiv 2404.09173) in JAX/Flax NNX",
    packages=find_packages(include=["famjax", "famjax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "absl-py",
        "numpy",
        "tensorflow-datasets>=4.9.8",
        "array-record",
        "grain>=0.2.10",
        "tensorboardX",
        "tqdm",
        "matplotlib",
        "sentencepiece",
        "tokenizers",
    ],
    extras_require={
        # `make test` installs dev: it runs the Hugging Face and GGUF conversion tests, so it includes hf (and
        # accelerate, which transformers needs to load a GGUF; the SmolLM2 GGUF comes from the Makefile).
        "dev": ["pytest>=8", "pytest-xdist", "ruff", "torch==2.13.0", "transformers>=5", "safetensors", "gguf",
                "accelerate"],
        # tfrecord-format catalog datasets through tfds.load.
        "tf": ["tensorflow-cpu"],
        # Loading Hugging Face checkpoints for retrofitting, and parity tests.
        "hf": ["torch==2.13.0", "transformers>=5", "safetensors", "gguf"],
        # PyTorch peer in benchmarks/ (the CPU wheel of this version ships on the dev machines).
        "bench": ["torch==2.13.0", "transformers"],
        "notebooks": ["jupyter"],
    },
)
