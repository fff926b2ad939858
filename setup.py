"""The one thing pyproject.toml cannot declare: the pybind11 extension m2ort_fast._core (csrc/),
compiled through CMakeLists.txt."""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
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
            "-G",
            "Ninja",
        ]
        cmake_args += [a for a in os.environ.get("CMAKE_ARGS", "").split() if a]
        subprocess.run(["cmake", ext.source_dir, *cmake_args], cwd=build_temp, check=True)
        # the CPUs this process may use (a container's share), not the host's count
        jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", ".", "--config", config, "-j", str(jobs)], cwd=build_temp, check=True)


# Everything else (metadata, dependencies, packages and their folders, package data, the entry
# point) is in pyproject.toml.
setup(
    ext_modules=[CMakeExtension("m2ort_fast._core")],
    cmdclass={"build_ext": CMakeBuild},
)
