"""biofm_jax: pre-train multimodal biomedical foundation models in JAX.

Version ranges are the ones the test suite has been run against; widen a range only
after `make test` passes on the new version.
"""
from setuptools import find_packages, setup

setup(
    name="biofm_jax",
    version="0.1.0",
    description="JAX library for pre-training multimodal biomedical foundation models",
    python_requires=">=3.10",
    packages=find_packages(include=["biofm_jax", "biofm_jax.*"]),
    install_requires=[
        "jax>=0.10.2,<0.11",
        "jaxlib>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "einops>=0.8,<0.9",
        "tensorflow-datasets>=4.9.10,<5",
        "ml-collections>=1.1,<2",
        "numpy>=2.0,<3",
        "pyarrow>=18,<27",
        "meds>=0.4.1,<0.5",
        "tensorboardX>=2.6,<3",
        "absl-py>=2.1,<3",
        "scipy>=1.11,<2",
        "pydicom>=3.0,<4",
        # pixel decoders pydicom uses for compressed transfer syntaxes archives hold: JPEG
        # baseline/extended/lossless (libjpeg), JPEG 2000 (openjpeg), RLE, JPEG-LS (CharLS)
        "pylibjpeg>=2.1,<3", "pylibjpeg-libjpeg>=2.5,<3", "pylibjpeg-openjpeg>=2.6,<3", "pylibjpeg-rle>=2.2,<3",
        "pyjpegls>=1.5,<2",
        "nibabel>=5.2,<6",
        "pillow>=10,<14",
        "scikit-learn>=1.8,<2",  # l1_ratio=1.0 alone selects L1 (the expression baseline) from 1.8
        "anndata>=0.10,<0.13",
        "scikit-misc>=0.5,<0.6",  # the loess of Seurat v3 highly-variable genes (modalities/omics/hvg.py), as scanpy
        "flatbuffers>=24,<26",  # jax.export serialisation (biofm_jax.export)
        "pandas>=2.0,<3",
        "matplotlib>=3.8,<4",  # validation report plots
        "lifelines>=0.29,<0.31",  # C-index and Kaplan-Meier estimates in reports
        "wfdb>=4.3,<5",  # ECG waveforms in PhysioNet's WFDB format (modalities/ecg)
    ],
    extras_require={
        "dev": ["pytest>=8,<10", "pytest-xdist>=3.5,<4",
                # checks the registry's typed contracts (make typecheck, mypy.ini)
                "mypy>=1.13,<3",
                # the test suite executes notebooks/
                "nbformat>=5.9,<6", "nbclient>=0.10,<0.12", "ipykernel>=6.29,<8",
                # the TPU compiler, so tests/test_scaling.py compiles for a TPU slice
                "jax[tpu]>=0.10.2,<0.11",
                # the MEDS tools tests/test_meds_tools.py runs against the library: ACES labels,
                # meds-evaluation scoring, meds-testing-helpers data (they add polars 1.x and hydra,
                # and change no pinned version above)
                "es-aces>=0.7.3,<0.8", "meds-evaluation>=0.0.6,<0.1", "meds-testing-helpers>=0.3.1,<0.4",
                # TileDB-SOMA experiments (tests/test_soma.py); it brings scanpy, which
                # tests/test_omics_data.py checks the highly-variable genes against
                "tiledbsoma>=2.3,<2.4",
                # Apache Beam, for experiments/index_meds.py --engine=beam (tests/test_event_store.py):
                # it takes protobuf 6, pyarrow 25 and pillow 12, inside the ranges above
                "apache-beam>=2.77,<2.78",
                # public weights (tests/test_public_weights.py): the small random ESM-2 the parity
                # tests build with transformers in torch, on the CPU. torch is pinned to the
                # CPU build this machine keeps on disk; a range would fetch a CUDA build.
                "safetensors>=0.4,<1", "torch==2.13.0", "transformers>=5.24,<6"],
        # Importing public models' weights (experiments/import_weights.py): safetensors only,
        # no torch (biofm_jax/weights)
        "weights": ["safetensors>=0.4,<1"],
        # Indexing MEDS on a Beam runner (DirectRunner here; Flink, Spark or Dataflow on a cluster)
        "beam": ["apache-beam>=2.77,<2.78"],
        # Single-cell atlases as TileDB-SOMA experiments (CELLxGENE Census): modalities/omics/soma.py
        "soma": ["tiledbsoma>=2.3,<2.4"],
        # Only benchmarks/peer.py uses these (the PyTorch / Hugging Face BERT peer); tested with
        # torch 2.13.0+cpu and transformers 5.24.0.
        "peer": ["torch>=2.13,<2.14", "transformers>=5.24,<6"],
        # The TPU compiler, for experiments/compile.py --topology=v5p-256 etc. on a CPU machine:
        # jax's own extra picks the libtpu its version was built with (0.0.42.* for jax 0.10.2).
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        # NVIDIA GPUs (CUDA 12 wheels of jax's own release): make bench-accelerator
        "cuda": ["jax[cuda12]>=0.10.2,<0.11"],
    },
)
