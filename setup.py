"""uwrt: a low-latency inference runtime for credit-underwriting decisions.

Dependencies are pinned in requirements/cpu.txt (CPU profile) and requirements/gpu.txt (GPU
profile); install one of them first (see README). install_requires only names the packages so
that `pip install -e .` never drags in an unpinned (CUDA) torch.
"""
from setuptools import find_packages, setup

setup(
    name="uwrt",
    version="0.1.0",
    description="Low-latency inference runtime for credit-underwriting decisions",
    python_requires=">=3.11",
    packages=find_packages(include=["runtime", "runtime.*", "kernels", "kernels.*", "uwrt_demo", "uwrt_demo.*", "bench", "bench.*"]),
    # torch and xgboost are deliberately absent: the right build (CPU vs CUDA, xgboost-cpu vs
    # xgboost) comes from the profile's requirements file, never from an unpinned resolve.
    install_requires=[
        "numpy", "safetensors", "protobuf", "grpcio", "grpcio-health-checking", "grpcio-reflection",
    ],
    entry_points={"console_scripts": ["uwrt=runtime.cli:main"]},
)
