"""What routedlora sees on this machine: the first thing to paste into a bug report.

``python -m routedlora.info [--json]``: versions (routedlora, torch, triton, transformers,
peft, CUDA and nvcc, Python, platform), devices, which backends can run and why not, the
self-test report's status (none / stale / fail / pass, and its path) and what
``backend="auto"`` resolves to. Builds nothing, runs no kernel.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from typing import List, Optional


def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
    except Exception as exc:  # not installed, or broken: say which
        return None if isinstance(exc, ImportError) else f"import failed: {type(exc).__name__}: {exc}"
    return getattr(mod, "__version__", "unknown")


def _nvcc_version(nvcc: Optional[str]) -> Optional[str]:
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{nvcc} (--version failed: {exc})"
    release = [line for line in out.splitlines() if "release" in line]
    return f"{nvcc} ({release[-1].strip() if release else 'version unknown'})"


def collect() -> dict:
    import torch

    import routedlora
    from . import backends, cuda_build
    from .ops import triton_backend

    info = dict(versions=dict(
        routedlora=routedlora.__version__, torch=torch.__version__, triton=_version("triton"),
        transformers=_version("transformers"), peft=_version("peft"), torch_cuda=torch.version.cuda,
        torch_hip=getattr(torch.version, "hip", None), nvcc=_nvcc_version(cuda_build.find_nvcc()),
        python=platform.python_version(), platform=platform.platform()))
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(dict(index=i, name=p.name, capability=f"{p.major}.{p.minor}",
                                memory_gb=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count))
    info["devices"] = dict(cuda=devices, cuda_available=torch.cuda.is_available(), cpu=platform.machine())
    device = torch.device("cuda") if devices else torch.device("cpu")

    why_not = {}
    if not triton_backend.is_available(device):
        why_not["triton"] = ("the triton package is not installed" if info["versions"]["triton"] is None else
                             "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter, "
                             "slow, for tests)")
    reason = cuda_build.unavailable_reason(device)
    if reason is not None:
        why_not["cuda"] = reason
    elif cuda_build._failure is not None:
        why_not["cuda"] = cuda_build._failure
    info["backends"] = dict(device=str(device), available=list(backends.available_backends(device)),
                            unavailable=why_not)

    path = backends.report_path()
    report, missing = backends.read_report(path)
    status, why = backends.report_status(report, missing=missing)
    rep = dict(path=str(path), status=status, why=why)
    if report is not None:
        rep.update(created=report.get("created"), device=report.get("device", {}).get("name"),
                   summary=report.get("summary"), fastest=report.get("fastest"),
                   failed=[c.get("name") for c in report.get("checks", []) if c.get("status") == "fail"])
    info["selftest"] = rep

    auto = {}
    for cls in ("rows", "decode"):
        for dt in ((torch.bfloat16, torch.float16, torch.float32) if devices else (torch.float32,)):
            name, reason = backends.auto_resolves_to(device, cls, dt)
            auto[f"{cls} {str(dt).replace('torch.', '')}"] = dict(backend=name, why=reason)
    info["auto"] = dict(device=str(device), tokens_per_row_decode_max=backends.DECODE_TOKENS_PER_ROW, choices=auto)
    return info


def render(info: dict) -> str:
    lines: List[str] = ["routedlora info", ""]
    v = info["versions"]
    for key in ("routedlora", "torch", "triton", "transformers", "peft", "torch_cuda", "torch_hip", "nvcc", "python",
                "platform"):
        if key == "torch_hip" and v.get(key) is None:
            continue
        lines.append(f"{key + ':':14} {v.get(key) if v.get(key) is not None else 'not installed' if key in ('triton', 'transformers', 'peft') else 'none'}")
    lines += ["", "devices:"]
    cuda = info["devices"]["cuda"]
    if not cuda:
        lines.append(f"  no CUDA device visible (cpu: {info['devices']['cpu']})")
    for d in cuda:
        lines.append(f"  cuda:{d['index']} {d['name']} (compute capability {d['capability']}, "
                     f"{d['memory_gb']} GiB, {d['sms']} SMs)")
    b = info["backends"]
    lines += ["", f"backends for {b['device']} tensors: {', '.join(b['available'])}"]
    for name, why in b["unavailable"].items():
        lines.append(f"  {name}: unavailable: {why}")
    s = info["selftest"]
    lines += ["", f"self-test report: {s['status']} ({s['why']})", f"  path: {s['path']}"]
    if s.get("created"):
        lines.append(f"  written {s['created']} on {s.get('device')}: {s.get('summary')}")
    if s.get("failed"):
        lines.append(f"  failed checks: {', '.join(s['failed'])}")
    if s.get("fastest"):
        lines.append("  fastest passing backend: " + ", ".join(f"{c} {n}" for c, n in s["fastest"].items()))
    a = info["auto"]
    lines += ["", f"backend='auto' on {a['device']} (decode: <= {a['tokens_per_row_decode_max']} tokens per routing "
              f"row; rows: more):"]
    for key, choice in a["choices"].items():
        lines.append(f"  {key}: {choice['backend']} ({choice['why']})")
    if s["status"] != "pass" and info["devices"]["cuda"]:
        lines.append("  to let auto pick the kernels: python -m routedlora.selftest")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m routedlora.info", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1, default=str) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
