"""uwrt: a low-latency inference runtime for credit-underwriting decisions.

Dependencies are pinned in requirements/cpu.txt (CPU profile) and requirements/gpu.txt (GPU
profile); install one of them first (see README). install_requires only names the packages so
that `pip install -e .` never drags in an unpinned (CUDA) torch.

One installed package, `uwrt`, whose subpackages are the repository's top-level folders
(`package_dir`): uwrt.runtime = runtime/, uwrt.kernels = kernels/, uwrt.bench = bench/,
uwrt.demo = demo/. No generic top-level names (`runtime`, `kernels`, `bench`) reach
site-packages. Tool configuration (ruff, mypy, pytest) lives in pyproject.toml.
"""
from setuptools import find_packages, setup

FOLDERS = {"runtime": "runtime", "kernels": "kernels", "bench": "bench", "demo": "demo"}


def _packages() -> tuple[list[str], dict[str, str]]:
    packages, package_dir = ["uwrt"], {"uwrt": "uwrt"}
    for name, folder in FOLDERS.items():
        for sub in [""] + ["." + p for p in find_packages(where=folder)]:
            packages.append(f"uwrt.{name}{sub}")
            package_dir[f"uwrt.{name}{sub}"] = folder + sub.replace(".", "/")
    return packages, package_dir


PACKAGES, PACKAGE_DIR = _packages()

setup(
    name="uwrt",
    version="0.1.0",
    description="Low-latency inference runtime for credit-underwriting decisions",
    python_requires=">=3.11",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"uwrt.runtime.trees": ["*.c", "*.h"], "uwrt.runtime.pb": ["*.pyi"]},
    # torch and xgboost are deliberately absent: the right build (CPU vs CUDA, xgboost-cpu vs
    # xgboost) comes from the profile's requirements file, never from an unpinned resolve.
    install_requires=[
        "numpy", "safetensors", "cryptography", "protobuf", "grpcio", "grpcio-health-checking", "grpcio-reflection",
    ],
    entry_points={"console_scripts": ["uwrt=uwrt.runtime.cli.main:entry"]},
)
