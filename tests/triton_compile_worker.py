"""Compiles launches of Triton kernels for an NVIDIA architecture, without a GPU.

    python tests/triton_compile_worker.py < launches.json > results.json

Input: ``{"arch": 90, "launches": [{"label", "kernel": "module:function", "args": {name:
arg}, "num_warps"}]}``, as tests/test_triton_compile.py records them from the backend's
real launches; an arg is ``{"ptr": "fp32", "aligned": true}`` (a tensor: element type,
16-byte aligned address), ``{"int": 5}``, ``{"float": 0.5}``, ``{"bool": true}`` or
``{"constexpr": value}`` (a Triton dtype written ``{"dtype": "bf16"}``). They are
specialized as Triton's JIT does: aligned pointers and ints divisible by 16 marked so, an
int 1 made a constant, except for the kernel's ``do_not_specialize`` arguments. Output: one result per
launch, ``{"label", "ok", "error", "seconds", "cubin_bytes", "shared", "registers",
"spill_bytes"}`` (registers per thread and local-memory bytes, from the cuobjdump that
ships with Triton; None where it is missing).

Triton's interpreter, which runs the kernels in CI, executes them as NumPy code and so
never meets the compiler: a loop-carried variable that changes type, an op the backend
cannot lower or an illegal layout would first fail on a GPU machine. Here each launch goes
through the whole compiler (TTIR, TTGIR, LLVM IR, PTX and ptxas to a cubin) for the
target, which needs no driver. The kernels must be compiled functions, so this runs in
its own process with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # before triton decorates any kernel
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}


def _specialize(kernel, args: dict) -> tuple[dict, dict, dict]:
    """Signature, constants and attributes of a launch, as Triton's JIT would make them."""
    names = kernel.arg_names
    fixed = {names[d] if isinstance(d, int) else d for d in kernel.do_not_specialize}
    signature, constants, attrs = {}, {}, {}
    for name in names:
        arg = args[name]
        kind, value = next((k, v) for k, v in arg.items() if k != "aligned")
        divisible = False
        if kind == "constexpr":
            signature[name] = "constexpr"
            constants[name] = _DTYPES[value["dtype"]] if isinstance(value, dict) else value
        elif kind == "ptr":
            signature[name] = "*" + value
            divisible = arg["aligned"]
        elif kind == "int" and value == 1 and name not in fixed:
            signature[name], constants[name] = "constexpr", 1
        elif kind == "int":
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            divisible = value % 16 == 0 and name not in fixed
        else:
            signature[name] = {"float": "fp32", "bool": "i1"}[kind]
        if divisible:  # the format of triton's own AOT tool (triton/tools/compile.py)
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def _kernel(name: str):
    module, function = name.split(":")
    if module.endswith(".py"):  # a file (the tests plant one)
        spec = importlib.util.spec_from_file_location("planted_kernels", module)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return getattr(loaded, function)
    return getattr(importlib.import_module(module), function)


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """Registers per thread and local-memory (spill) bytes of a cubin's kernel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if found is None:
        return None, None
    return int(found[1]), int(found[2]) + int(found[3])


def compile_one(arch: int, launch: dict) -> dict:
    """Compile one launch; never raises (a failure is a result)."""
    start = time.perf_counter()
    result = {"label": launch["label"], "ok": False, "error": None, "cubin_bytes": 0, "shared": 0}
    result.update(registers=None, spill_bytes=None)
    try:
        kernel = _kernel(launch["kernel"])
        signature, constants, attrs = _specialize(kernel, launch["args"])
        src = ASTSource(kernel, signature=signature, constexprs=constants, attrs=attrs)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options={"num_warps": launch["num_warps"]}
        )
        result["cubin_bytes"] = len(compiled.asm["cubin"])
        result["shared"] = int(compiled.metadata.shared)
        result["ok"] = result["cubin_bytes"] > 0
        result["registers"], result["spill_bytes"] = _resource_usage(compiled.asm["cubin"])
    except Exception as exc:  # reported, not raised: the test names each failing launch
        lines = traceback.format_exception_only(type(exc), exc)
        result["error"] = "".join(lines).strip()[-2000:]
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def main() -> None:
    job = json.load(sys.stdin)
    arch, launches = int(job["arch"]), job["launches"]
    workers = max(1, min(len(launches), int(job.get("workers", os.cpu_count() or 1))))
    if workers == 1:
        results = [compile_one(arch, x) for x in launches]
    else:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(compile_one, [arch] * len(launches), launches))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
