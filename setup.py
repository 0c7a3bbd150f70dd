"""Build of the one compiled module, ``recsys._hnsw`` (everything else is in pyproject.toml).

``recsys._hnsw`` wraps the vendored hnswlib 0.8.0 headers (recsys/csrc/hnswlib/) with an exclusion filter done
inside the graph search (see recsys/csrc/hnsw_ext.cpp). Flags follow hnswlib's own setup.py -- ``-O3`` and
``-march=native`` when the compiler accepts it -- so plain queries are not slower than the hnswlib package.

Environment:
    RECSYS_PORTABLE_BUILD=1   drop ``-march=native`` (images built on one CPU and run on another).

The extension is optional: if it cannot be compiled (no C++ compiler), the install still succeeds with a warning
and ``recsys.retrieval.HnswIndex`` falls back to the hnswlib package with over-fetch (``HnswIndex.native_filter`` is
False).
"""

import os
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


class BuildExt(build_ext):
    """Adds ``-march=native`` where the compiler takes it (hnswlib's rule) unless RECSYS_PORTABLE_BUILD is set."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix" and not os.environ.get("RECSYS_PORTABLE_BUILD"):
            from pybind11.setup_helpers import has_flag

            if has_flag(self.compiler, "-march=native"):
                for ext in self.extensions:
                    ext.extra_compile_args.append("-march=native")
            else:
                print("recsys._hnsw: the compiler refuses -march=native; building without it", file=sys.stderr)
        super().build_extensions()


ext_modules = [
    Pybind11Extension(
        "recsys._hnsw",
        ["recsys/csrc/hnsw_ext.cpp"],
        include_dirs=["recsys/csrc"],
        cxx_std=17,
        extra_compile_args=["-O3"] if sys.platform != "win32" else ["/O2"],
        optional=True,  # no compiler: install anyway, recsys.retrieval falls back to the hnswlib package
    ),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
