"""Build script for the compiled CPU backend `pecm._C` (metadata lives in pyproject.toml).

A CMake-driven extension in the style of pybind11's cmake_example: `pip install .`,
`pip install -e .` and `python setup.py build_ext --inplace` all run CMake on CMakeLists.txt and
place `_C*.so` inside the `pecm` package. The top-level `kernels/` directory (Triton kernels) is
installed as the subpackage `pecm.kernels`. Package data: the shipped ROCO sample
(`pecm/data/roco_sample/`), the `pecm serve` page (`pecm/serve/static/`) and `pecm/py.typed`; MANIFEST.in
lists what the sdist adds (csrc/, CMakeLists.txt, ...).

Version: `pecm/_version.py` holds the one number; pyproject.toml reads it, and it is passed to CMake as
`-DPECM_VERSION=...` so `pecm._C.__version__ == pecm.__version__`.

Environment: PECM_NO_CPP=1 skips the extension (pure-Python install; the "cpp" backend is then
unavailable); CMAKE_BUILD_PARALLEL_LEVEL sets the build parallelism; CMAKE_ARGS adds CMake options.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def package_version() -> str:
    """`__version__` from pecm/_version.py, read without importing pecm (whose deps may be absent at build time)."""
    text = (ROOT / "pecm" / "_version.py").read_text(encoding="utf-8")
    m = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M)
    if not m:
        raise RuntimeError('pecm/_version.py: no __version__ = "..." line')
    return m.group(1)


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str = "") -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        ext_fullpath = Path.cwd() / self.get_ext_fullpath(ext.name)
        extdir = ext_fullpath.parent.resolve()
        cfg = "Debug" if int(os.environ.get("DEBUG", 0)) else "Release"
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPECM_VERSION={package_version()}",
        ]
        try:
            import pybind11

            cmake_args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            pass
        if "CMAKE_ARGS" in os.environ:
            cmake_args += [a for a in os.environ["CMAKE_ARGS"].split(" ") if a]
        try:
            import ninja  # noqa: F401

            cmake_args.append("-GNinja")
        except ImportError:
            pass
        build_args = []
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ and hasattr(self, "parallel") and self.parallel:
            build_args.append(f"-j{self.parallel}")
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, *build_args], cwd=build_temp, check=True)


ext_modules = [] if os.environ.get("PECM_NO_CPP") == "1" else [CMakeExtension("pecm._C", sourcedir=str(ROOT))]

setup(
    packages=find_packages(include=["pecm", "pecm.*"]) + ["pecm.kernels"],
    package_dir={"pecm.kernels": "kernels"},
    package_data={
        "pecm": ["py.typed"],
        "pecm.serve": ["static/*.html", "static/*.js", "static/*.css"],
        "pecm.data": ["roco_sample/*.jsonl", "roco_sample/*.tsv", "roco_sample/*.md", "roco_sample/images/*.jpg"],
    },
    include_package_data=False,
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
