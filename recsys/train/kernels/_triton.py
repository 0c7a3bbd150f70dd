"""What the Triton modules (recsys.train.kernels.fused_loss, recsys.train.kernels.triton_optim) share: whether kernels run in the interpreter.

``TRITON_INTERPRET=1`` (set before triton is imported) runs kernels with NumPy on CPU; the tests use it to check the
kernels without a GPU. Importing this module fixes one incompatibility of Triton 3.6's interpreter with NumPy >= 2.4.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

if INTERPRET:
    from triton.runtime import interpreter as _interpreter

    _patch_lang_tensor = _interpreter._patch_lang_tensor

    def _patch_lang_tensor_np24(tensor, scope) -> None:  # noqa: ANN001 - the interpreter's own signature
        # The interpreter holds scalars as 1-element 1-d arrays and converts them with int(), which NumPy >= 2.4
        # refuses ("only 0-dimensional arrays ..."): every range() over a kernel argument would fail.
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interpreter._patch_lang_tensor = _patch_lang_tensor_np24


def kernel_report(fn, ptr_types: dict[str, str], constexprs: dict, *, num_warps: int = 4, num_stages: int = 3,
                  arch: int = 90) -> dict:  # fmt: skip
    """Compile one ``@triton.jit`` kernel ahead of time for NVIDIA compute capability ``arch`` (no GPU needed:
    Triton's own LLVM and ptxas) and read the cubin with the ``cuobjdump`` that ships with Triton.

    Args: ``ptr_types`` maps pointer arguments to Triton types ("*bf16", "*i64", ...; other arguments are i32),
    ``constexprs`` the constexpr arguments. Every other argument is specialized as a launch would for 16-aligned
    pointers and sizes that are multiples of 16. Returns shared (bytes), regs and stack (bytes per thread; > 0 means
    spills to local memory), and counts of a few SASS instructions (HGMMA: Hopper's wgmma tensor cores; HMMA: mma;
    MUFU.EX2: exponentials; LDGSTS / LDG.E.128: async / 16-byte loads; LDG.E.U16: 2-byte loads; STL / LDL: local
    memory). Raises what Triton raises when the kernel does not compile; not under TRITON_INTERPRET.
    """
    import triton  # triton: optional
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRET:
        raise RuntimeError("kernel_report needs the compiled kernels; unset TRITON_INTERPRET")
    names = fn.arg_names
    sig = {a: "constexpr" if a in constexprs else ptr_types.get(a, "i32") for a in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if a not in constexprs}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(k.asm["cubin"])
        res = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
        sass = subprocess.run([str(cuobjdump), "--dump-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    row = {"shared": int(k.metadata.shared), "regs": None, "stack": None}
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    if m:
        row["regs"], row["stack"] = int(m.group(1)), int(m.group(2))
    for op in ("HGMMA", "HMMA", "MUFU.EX2", "LDGSTS", "LDG.E.128", "LDG.E.U16", "STL", "LDL"):
        row[op] = len(re.findall(rf"\b{re.escape(op)}\b", sass))
    return row
