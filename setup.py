"""Build and install ssdoffload.

The native I/O engine (``csrc/``) is a plain CPython extension: it needs a C++17
compiler and the Python headers, but not torch, at build time.
"""
from setuptools import Extension, setup

native_engine = Extension(
    "ssdoffload.io._native",
    sources=["csrc/native_engine.cpp"],
    language="c++",
    extra_compile_args=["-O3", "-std=c++17", "-pthread", "-Wall", "-Wextra"],
    extra_link_args=["-pthread"],
)

setup(
    name="ssdoffload",
    version="0.1.0",
    description="Spill training activations to NVMe SSDs and reload them ahead of backward.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["ssdoffload", "ssdoffload.io", "ssdoffload.models", "ssdoffload.planner", "ssdoffload.bench", "ssdoffload.integrations"],
    package_dir={"ssdoffload.integrations": "integrations"},
    ext_modules=[native_engine],
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "gds": ["kvikio-cu13"],
        "deepspeed": ["deepspeed>=0.16"],
        "megatron": ["megatron-core>=0.12"],
        "bench": ["tqdm", "matplotlib"],
        "hf": ["transformers>=5.0", "accelerate>=1.0"],
        "lightning": ["lightning>=2.4"],
        "test": ["pytest", "hypothesis", "tqdm", "matplotlib", "deepspeed>=0.16", "megatron-core>=0.12",
                 "transformers>=5.0", "accelerate>=1.0", "lightning>=2.4"],
    },
    entry_points={"console_scripts": ["ssdoffload=ssdoffload.__main__:main"]},
)
