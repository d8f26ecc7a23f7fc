"""Builds the image core's compiled loops (istasks/core/_kernels.pyx); everything else
about the package is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

# -ffp-contract=off: no fused multiply-add, so the doubles round as numpy's passes did
# (the kernels must match the spec comparisons bit for bit).
KERNELS = Extension(
    "istasks.core._kernels",
    ["istasks/core/_kernels.pyx"],
    extra_compile_args=["-O3", "-ffp-contract=off"],
)

setup(ext_modules=cythonize([KERNELS], language_level=3))
