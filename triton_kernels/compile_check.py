"""Compile every Triton kernel variant the launchers use for real GPUs, without a GPU.

    python -m routedlora.triton_kernels.compile_check            # sm_80 and sm_90
    python -m routedlora.triton_kernels.compile_check --arch 90
    python -m routedlora.triton_kernels.compile_check --resources specs.json   # registers, spills, occupancy

Uses the ptxas shipped in the triton wheel. The interpreter tests check the math;
this checks the compiler. Run it in a process where triton was imported without
``TRITON_INTERPRET=1`` (the interpreter rewires triton's own library functions).
"""
import argparse
import concurrent.futures
import functools
import itertools
import os
import sys
import time

F32_PREC = "ieee"
TY = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}


def _compile(fn, pointers, floats, constexprs, arch, int_type="i32", num_warps=4, num_stages=3):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = int_type
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def signature(kernel: str, dtype: str):
    """``(kernel function, pointer types, float arguments)`` of a kernel whose data tensors are ``dtype``."""
    from routedlora.triton_kernels import routed_lora as K
    from routedlora.triton_kernels import routing as RK

    t = TY[dtype]
    return {
        "_shrink_kernel": (K._shrink_kernel, dict(X=t, M=t, IDX="*i64", WGT="*fp32", ORDER="*i64", SROWS="*i64",
                                                  OUT="*fp32", V="*fp32"), ("scale",)),
        "_expand_kernel": (K._expand_kernel, dict(U="*fp32", M=t, IDX="*i64", WGT="*fp32", ORDER="*i64",
                                                  SROWS="*i64", BASE=t, Y=t, X=t, WT=t, BIAS=t, UOUT="*fp32"),
                           ("scale",)),
        "_row_reduce_kernel": (K._row_reduce_kernel, dict(X=t, DU="*fp32", GRAD=t, U="*fp32", ORDER="*i64",
                                                          OFFS="*i64", G="*fp32", HH="*fp32"), ("scale",)),
        "_mix_grads_kernel": (K._mix_grads_kernel, dict(G="*fp32", HH="*fp32", A=t, B=t, DA=t, DB=t, IDX="*i64",
                                                        WGT="*fp32", DWP="*fp32"), ()),
        "_weight_grad_kernel": (K._weight_grad_kernel, dict(WIDE=t, VR="*fp32", IDX="*i64", WGT="*fp32",
                                                            RIDS="*i64", OUT=t), ("scale",)),
        "_segment_sum_kernel": (K._segment_sum_kernel, dict(P="*fp32", Q="*fp32", ORDER="*i64", OFFS="*i64",
                                                            OUT="*fp32"), ()),
        "_router_forward_kernel": (RK._router_forward_kernel, dict(LOGITS=t, ROWS_TASK="*i64", ROW_EX="*i64",
                                                                   SEED="*i64", IDX="*i64", W="*fp32"),
                                   ("inv_tau", "eps", "tiny")),
        "_router_backward_kernel": (RK._router_backward_kernel, dict(LOGITS=t, ROWS_TASK="*i64", ROW_EX="*i64",
                                                                     SEED="*i64", IDX="*i64", W="*fp32",
                                                                     DW="*fp32", DZ="*fp32"),
                                    ("inv_tau", "eps", "tiny")),
    }[kernel]


# H100 SXM per SM (CUDA occupancy calculator limits for compute capability 9.0)
SM_REGS, SM_WARPS, SM_BLOCKS, SM_SMEM, REG_UNIT = 65536, 64, 32, 228 * 1024, 256


def resources(spec: dict, arch: int = 90) -> dict:
    """Registers, spills, shared memory and occupancy of one launch variant, from ptxas -v.

    ``spec``: ``{"kernel", "dtype", "constexprs", "num_warps", "num_stages", "int_type"}``.
    """
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    fn, ptrs, floats = signature(spec["kernel"], spec["dtype"])
    warps = spec.get("num_warps", 4)
    compiled = _compile(fn, ptrs, floats, spec["constexprs"], arch, spec.get("int_type", "i32"), warps,
                        spec.get("num_stages", 3))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill_st, spill_ld = (int(v) for v in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                                    text).groups())
    smem = int(compiled.metadata.shared)
    return dict(registers=regs, spill_bytes=spill_st + spill_ld, **occupancy(regs, warps, smem))


def occupancy(registers: int, warps: int, shared_bytes: int) -> dict:
    """Blocks of ``warps`` warps resident per H100 SM, and the fraction of its 64 warps they fill."""
    per_warp = -(-registers * 32 // REG_UNIT) * REG_UNIT
    blocks = min(SM_REGS // (per_warp * warps), SM_WARPS // warps, SM_BLOCKS,
                 SM_SMEM // shared_bytes if shared_bytes else SM_BLOCKS)
    return dict(shared_bytes=shared_bytes, num_warps=warps, blocks_per_sm=blocks, occupancy=blocks * warps / SM_WARPS)


def router_variants(RK):
    for kind, noise, renorm, row_is_ex in [(0, False, True, True), (0, True, True, True), (0, True, True, False),
                                           (1, False, True, True), (2, False, True, True), (2, False, False, True)]:
        for dt in ("bfloat16", "float32"):
            consts = dict(KIND=kind, NOISE=noise, RENORM=renorm, BLOCK_M=8, ROW_IS_EXAMPLE=row_is_ex)
            for way in ("forward", "backward"):
                yield (f"router {way} kind={kind} noise={noise} renorm={renorm} row_is_example={row_is_ex} {dt}",
                       *signature(f"_router_{way}_kernel", dt), consts, "i32")
    yield ("uniform draws", RK._uniform_kernel, dict(SEED="*i64", OUT="*fp32"), ("eps",), dict(BLOCK_M=8), "i32")


def variants(K):
    """``(label, kernel, pointer types, float args, constexprs, int type)`` for every launched variant."""
    prec = lambda dt: F32_PREC if dt == "float32" else "tf32"  # noqa: E731
    for dt, mode, heads in itertools.product(TY, [0, 1, 2], [1, 4]):
        if mode == 1 and heads != 1:
            continue
        yield (f"shrink mode={mode} h={heads} {dt}", *signature("_shrink_kernel", dt),
               dict(H=heads, MODE=mode, PREC=prec(dt), BLOCK_N=64, BLOCK_D=64, BLOCK_R=16,
                    BLOCK_M=8 if mode == 2 else 1), "i32")
    for dt, mix, (has_base, linear, bias), store_u in itertools.product(
            TY, [True, False], [(True, False, False), (False, False, False), (False, True, True), (False, True, False)],
            [False, True]):
        yield (f"expand mix={mix} base={has_base} linear={linear} bias={bias} store_u={store_u} {dt}",
               *signature("_expand_kernel", dt),
               dict(MIX=mix, HAS_BASE=has_base, LINEAR=linear, HAS_BIAS=bias, STORE_U=store_u, PREC=prec(dt),
                    BLOCK_N=64, BLOCK_O=128, BLOCK_R=16, BLOCK_K=64), "i32")
    for dt in TY:
        yield (f"row_reduce {dt}", *signature("_row_reduce_kernel", dt),
               dict(PREC=prec(dt), BLOCK_N=64, BLOCK_W=128, BLOCK_R=16), "i32")
    for dt, slots in itertools.product(TY, [False, True]):
        yield (f"mix_grads slots={slots} {dt}", *signature("_mix_grads_kernel", dt),
               dict(SLOTS=slots, DW_A=not slots, DW_B=True, BLOCK_W=64, BLOCK_R=16, BLOCK_M=8, BLOCK_K=8 if not slots
                    else 2), "i32")
    for dt, shared in itertools.product(TY, [True, False]):
        yield (f"weight_grad shared_v={shared} {dt}", *signature("_weight_grad_kernel", dt),
               dict(SHARED_V=shared, PREC=prec(dt), BLOCK_N=64, BLOCK_W=64, BLOCK_R=16, BLOCK_M=8), "i32")
    yield ("shrink mode=0 h=2 bfloat16, 64-bit strides", *signature("_shrink_kernel", "bfloat16"),
           dict(H=2, MODE=0, PREC="tf32", BLOCK_N=16, BLOCK_D=64, BLOCK_R=128, BLOCK_M=1), "i64")
    yield ("shrink mode=0 h=64 bfloat16 (many heads)", *signature("_shrink_kernel", "bfloat16"),
           dict(H=64, MODE=0, PREC="tf32", BLOCK_N=64, BLOCK_D=64, BLOCK_R=16, BLOCK_M=1), "i32")
    yield ("segment_sum", *signature("_segment_sum_kernel", "float32"), dict(BLOCK_T=64, BLOCK_C=16), "i64")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else (os.cpu_count() or 1), help="compiler processes (default: the usable cores)")
    p.add_argument("--resources", metavar="SPECS_JSON",
                   help="instead: registers, spills, shared memory and occupancy of the launch variants in this "
                        "JSON list (sm_90), printed as a JSON list")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces triton's library functions)")
        return 2
    if args.resources:
        import json

        with open(args.resources) as f:
            specs = json.load(f)
        print(json.dumps([resources(spec) for spec in specs]))
        return 0
    labels = [v[0] for v in _all_variants()]
    jobs = [(arch, i) for arch in args.arch for i in range(len(labels))]
    failed = 0
    # one process per core: ~100 variants per architecture, each a few seconds of ptxas
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(jobs)))) as pool:
        for (arch, i), (seconds, status) in zip(jobs, pool.map(_compile_one, jobs)):
            failed += status != "ok"
            print(f"sm_{arch}  {labels[i]:48s} {seconds:5.1f}s  {status}", flush=True)
    print(f"{failed} failed" if failed else "all kernels compiled")
    return 1 if failed else 0


@functools.lru_cache(maxsize=None)
def _all_variants() -> list:
    """Every variant, once per process (the workers index into it)."""
    from routedlora.triton_kernels import routed_lora as K
    from routedlora.triton_kernels import routing as RK

    return list(itertools.chain(variants(K), router_variants(RK)))


def _compile_one(job) -> tuple:
    arch, i = job
    _, fn, ptrs, floats, consts, int_type = _all_variants()[i]
    t0 = time.time()
    try:
        _compile(fn, ptrs, floats, consts, arch, int_type)
        status = "ok"
    except Exception as e:  # report every failure, not only the first
        status = f"FAILED: {type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}"
    return time.time() - t0, status


if __name__ == "__main__":
    sys.exit(main())
