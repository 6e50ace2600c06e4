"""tfusion: pretraining Transfusion models (text next-token + image diffusion) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="tfusion",
    version="0.1.0",
    description="Transfusion pretraining in JAX/Flax NNX: packed mixed-modality sequences, "
                "sharded from a laptop CPU to TPU pods and GPU clusters.",
    python_requires=">=3.10",
    packages=find_packages(include=["tfusion*", "data_pipelines*", "experiments*", "launch*"]),
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "grain>=0.2.12,<0.3",
        "tensorflow-datasets>=4.9,<5",
        "sentencepiece>=0.2,<0.3",
        "tokenizers>=0.19,<1",  # Hugging Face tokenizer.json (Llama 3, Qwen2, ...)
        "ml_collections>=1.0,<2",
        "absl-py>=2.0",
        "numpy>=1.26",
        "pillow>=10.0",
        "scikit-learn>=1.3",  # ships the bundled handwritten-digits set
        "array-record>=0.5",
        "pyarrow>=14",  # parquet shards (Hugging Face datasets' layout)
        "etils[epath]>=1.5",  # gs:// s3:// paths of data shards
        "fsspec>=2023.1",  # any other protocol:// of data shards (memory://, http://)
        "tensorboardX>=2.6",
        "tqdm>=4.60",
        "scipy>=1.10",  # Frechet distance, power-law fits
        "matplotlib>=3.7",  # scaling-law plots
        "pycocoevalcap>=1.2",  # CIDEr
    ],
    extras_require={
        # torch: the CPU build on disk here; an unpinned torch pulls a multi-GB CUDA build.
        "test": ["pytest>=8", "hypothesis>=6.100", "pytest-xdist>=3.5", "torch==2.13.0",
                 "diffusers>=0.30", "safetensors>=0.4",
                 # reference for the Hugging Face import/export parity tests (never imported
                 # by tfusion itself); 5.x shares diffusers' huggingface-hub >= 1.x
                 "transformers>=5,<6"],
        # lucidrains' PyTorch Transfusion, the throughput baseline of benchmarks/.
        "reference": ["torch==2.13.0", "transfusion-pytorch==0.20.0"],
        "tpu": ["jax[tpu]>=0.10,<0.11"],
        "cuda": ["jax[cuda12]>=0.10,<0.11"],
    },
    entry_points={
        "console_scripts": [
            "tfusion-train=launch.train:run",
        ],
    },
)
