"""Regenerate the gRPC Python code from ``protos/`` (``python -m recsys.protogen``; ``make proto`` calls it).

``protoc -I protos`` with ``package recsys.v1`` writes ``recsys/v1/recommender_pb2.py`` (+ ``_grpc.py``,
``.pyi``) inside our own ``recsys`` package, and the generated ``_grpc`` module imports
``from recsys.v1 import recommender_pb2``, which resolves to it. The generated files are committed; a test
regenerates them into a temporary directory and fails when they drift from the ``.proto``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTOS = ("recsys/v1/recommender.proto",)
# what protoc writes for each .proto (relative to the output root)
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

# Lines that name the generator's version: they differ between grpcio-tools releases without any change in the
# .proto, so the drift check ignores them.
_VERSION_LINES = re.compile(
    r"^(# Protobuf Python Version:.*|GRPC_GENERATED_VERSION = .*|\s*\d+,\s*$|\s*_runtime_version\.Domain\..*)$",
    re.MULTILINE,
)


def generated_files(out_dir: str | Path) -> list[Path]:
    """Paths of the generated modules under ``out_dir``."""
    out_dir = Path(out_dir)
    return [out_dir / (proto[: -len(".proto")] + suffix) for proto in PROTOS for suffix in SUFFIXES]


def generate(out_dir: str | Path = ROOT, *, proto_root: str | Path = PROTO_ROOT) -> list[Path]:
    """Run ``grpc_tools.protoc`` on every proto under ``proto_root``, writing into ``out_dir``; returns the files."""
    try:
        import grpc_tools  # grpcio-tools: optional (dev dependency)
        from grpc_tools import protoc
    except ModuleNotFoundError as e:  # pragma: no cover - dev dependency
        raise RuntimeError("regenerating the gRPC code needs grpcio-tools (pip install grpcio-tools)") from e
    out_dir = Path(out_dir)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    for proto in PROTOS:
        (out_dir / proto).parent.mkdir(parents=True, exist_ok=True)
        argv = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            proto,
        ]
        rc = protoc.main(argv)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc} on {proto!r}")
    return generated_files(out_dir)


def normalise(text: str) -> str:
    """Generated code with the generator-version lines removed (what the drift check compares)."""
    return _VERSION_LINES.sub("", text)


def drift(out_dir: str | Path = ROOT) -> list[str]:
    """Names of committed generated files that differ from a fresh generation (empty list: no drift)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(tmp)
        stale = []
        for new, old in zip(fresh, generated_files(out_dir), strict=True):
            if not old.exists() or normalise(new.read_text()) != normalise(old.read_text()):
                stale.append(str(old.relative_to(out_dir)))
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys.protogen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report drift; exit 1 if the code is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = drift()
        for name in stale:
            print(f"stale generated file: {name} (run `make proto`)", file=sys.stderr)
        return 1 if stale else 0
    for path in generate():
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
