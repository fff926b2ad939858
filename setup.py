"""Build m2ort-fast: the Python package plus the pybind11 extension m2ort_fast._core (csrc/),
compiled through CMakeLists.txt."""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path = ROOT):
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    """Configure and build the extension with CMake, placing it where setuptools expects it."""

    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        config = "Debug" if self.debug else "Release"
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={config}",
            "-G", "Ninja",
        ]
        cmake_args += [a for a in os.environ.get("CMAKE_ARGS", "").split() if a]
        subprocess.run(["cmake", ext.source_dir, *cmake_args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", config, "-j", str(os.cpu_count() or 2)],
                       cwd=build_temp, check=True)


PACKAGE_DIRS = {"m2ort_fast": "m2ort_fast", "m2ort_fast.kernels": "kernels", "m2ort_fast.export": "export"}
packages = ["m2ort_fast", *[f"m2ort_fast.{p}" for p in find_packages("m2ort_fast")]]
packages += ["m2ort_fast.kernels", "m2ort_fast.export"]

setup(
    name="m2ort-fast",
    version="0.1.0",
    description="Optimized, compiled inference engine for M2ORT spatial-transcriptomics prediction from H&E slides",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=PACKAGE_DIRS,
    package_data={"m2ort_fast": ["assets/*"]},
    ext_modules=[CMakeExtension("m2ort_fast._core")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        # torch is pinned in the README's install command (torch==2.13.0, the CPU wheel); any
        # release from 2.11 works, which is what the GPU image has.
        "torch>=2.11",
        "numpy>=1.26",
        "safetensors>=0.4",
        "pillow>=10",
        "tifffile>=2024.1",
        "imagecodecs>=2024.1",
        "tiffslide>=2.4",
        "openslide-python>=1.3",
        "openslide-bin>=4.0",
        "anndata>=0.10",
        "h5py>=3.10",
        "pandas>=2.0",
        "matplotlib>=3.8",
        "scipy>=1.11",
        "tqdm>=4.66",
        "nvtx>=0.2.10",
        "onnx>=1.17",
        "onnxruntime>=1.20",
        "onnxscript>=0.2",
        # libjpeg-turbo in strict mode: the tile check before any reader decodes (slide._TileVerifier)
        "simplejpeg>=1.7",
        # cuCIM itself is installed with --no-deps (its full dependency set is ~1.7 GB); these are
        # the two of its dependencies its reader needs.
        "click",
        "lazy-loader",
    ],
    extras_require={
        # the Triton kernels' CPU tests run in Triton's interpreter; 3.7.1 is the version measured here
        # atheris: the fuzz target of tests/fuzz (its wheels are for Linux x86_64)
        "test": ["pytest>=8", "triton==3.7.1", "threadpoolctl>=3",
                 "atheris>=2.3; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    },
    entry_points={"console_scripts": ["m2ort-fast=m2ort_fast.cli:main"]},
)
