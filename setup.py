"""salun_jax: SalUn (gradient-based weight saliency for machine unlearning) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="salun_jax",
    version="0.2.0",  # = salun_jax/version.py
    description="Machine unlearning with gradient-based weight saliency (SalUn) in JAX/Flax",
    packages=find_packages(include=["salun_jax", "salun_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "chex>=0.1.92",
        "tensorflow-datasets>=4.9.10",
        # tfds 4.9.10 imports it (builders' code_path); etils 1.15 does not bring it.
        "importlib_resources>=7.1.0",
        "ml_collections>=1.1.0",
        "absl-py",
        "numpy",
        "scikit-learn",
        "pillow",
        "matplotlib",
        "tqdm",
        "tensorboardX>=2.6.5",
        "safetensors>=0.8.0",
        "regex",
    ],
    # The oneDNN convolution handlers' source, compiled when the CPU wing is asked for oneDNN
    # (salun_jax.cpu.onednn).
    package_data={"salun_jax.cpu": ["onednn_conv.cc"]},
    extras_require={
        # Accelerators (README, Install): jax with its CUDA 12 plugin or libtpu at jax's version.
        # The pinned sets are requirements/cuda12.txt and requirements/tpu.txt.
        "cuda12": ["jax[cuda12]>=0.10.2"],
        "tpu": ["jax[tpu]>=0.10.2"],
        # experiments/bench_train.py --conv_impls times PyTorch's step beside ours when present.
        "bench": ["torch==2.13.0"],
        # The CPU wing's oneDNN convolutions (salun_jax.cpu.enable(conv="onednn")): oneDNN 3.2's
        # headers and library (x86-64 Linux wheels, 39 MB; pinned in requirements/cpu-onednn.txt).
        # Nothing is compiled at install: the handlers are built once when enabled.
        "cpu-onednn": [
            "onednn-devel-cpu-gomp==2023.2.0;"
            ' sys_platform == "linux" and platform_machine == "x86_64"',
            'onednn-cpu-gomp==2023.2.0; sys_platform == "linux" and platform_machine == "x86_64"',
        ],
    },
)
