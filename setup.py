"""Builds the host-side C++ extension `internvl_engine._C` from csrc/ (metadata lives in pyproject.toml)."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "internvl_engine._C",
        sources=["csrc/bindings.cpp", "csrc/tile_normalize.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
