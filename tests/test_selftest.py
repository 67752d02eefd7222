"""The self-test command, its report, ``backend="auto"``'s decision from it, and ``routedlora.info``.

No GPU here: ``auto``'s choice is tested on fabricated reports (and through its dispatcher
with a pretend GPU name), the command in its CPU mode (Triton interpreter, csrc emulator).
"""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from routedlora import backends, selftest
from routedlora.ops import TokenRows, torch_backend, triton_backend

ROOT = Path(__file__).resolve().parent.parent
GPU = "NVIDIA H100 80GB HBM3"


def report(checks=None, timings=None, gpu=GPU, versions=None, device_type="cuda"):
    """A report as the self-test writes it on a GPU (only the fields auto reads, plus a few)."""
    if checks is None:
        checks = [dict(name=f"op {b} model {dt} params h=1", kind="op", backend=b, dtype=dt, status="pass", error=None)
                  for b in ("triton", "cuda") for dt in ("bfloat16", "float16", "float32")]

    def t(**ms):
        return dict(backends={b: dict(median_ms=v) for b, v in ms.items()})

    if timings is None:
        timings = {"model": t(torch=1.0, triton=0.7, cuda=0.8), "design": t(torch=4.0, triton=3.0, cuda=2.0),
                   "decode": t(torch=0.05, triton=0.03, cuda=0.02)}
    return dict(schema=backends.REPORT_SCHEMA, versions=dict(versions or backends.current_versions()),
                device=dict(type=device_type, name=gpu, capability=[9, 0]), checks=checks, timings=timings)


def choose(rep, cls, dtype=torch.bfloat16, gpu=GPU):
    return backends.auto_choice(rep, gpu, cls, dtype)


# --- the decision -----------------------------------------------------------------------


def test_fresh_passing_report_picks_the_fastest_per_class():
    rep = report()
    assert choose(rep, "rows")[:1] == ("triton",)  # the model class's timings, not the design point's
    assert choose(rep, "decode")[:1] == ("cuda",)
    name, why, hint = choose(rep, "rows", torch.float32)
    assert name == "triton" and "model" in why and not hint
    del rep["timings"]["model"]
    assert choose(rep, "rows")[0] == "cuda"  # falls back to the design point's timings
    rep["timings"]["decode"]["backends"]["torch"]["median_ms"] = 0.001
    assert choose(rep, "decode")[:3] == ("torch", choose(rep, "decode")[1], False)  # torch measured fastest: no hint


def test_call_shape_class():
    assert backends.call_shape_class(8, 8) == "decode"  # one token per sequence
    assert backends.call_shape_class(64, 8) == "decode"
    assert backends.call_shape_class(65, 8) == "rows"
    assert backends.call_shape_class(16384, 64) == "rows"


@pytest.mark.parametrize("what", ["torch", "triton", "routedlora"])
def test_stale_versions_stay_on_torch(what):
    v = backends.current_versions()
    v[what] = "0.0.0-other"
    name, why, hint = choose(report(versions=v), "rows")
    assert name == "torch" and hint and what in why and "0.0.0-other" in why
    assert backends.report_status(report(versions=v), GPU)[0] == "stale"


def test_other_gpu_missing_report_cpu_report_stay_on_torch():
    name, why, hint = choose(report(gpu="NVIDIA A100-SXM4-80GB"), "rows")
    assert name == "torch" and hint and "A100" in why
    name, why, hint = backends.auto_choice(None, GPU, "rows", torch.bfloat16, missing="no self-test report at X")
    assert name == "torch" and hint and "no self-test report" in why
    assert choose(report(device_type="cpu"), "rows")[0] == "torch"
    assert backends.report_status(report(device_type="cpu"), GPU)[0] == "stale"
    assert backends.report_status(None, GPU)[0] == "none"


def test_failed_checks_exclude_their_backend():
    checks = report()["checks"]
    checks[0] = dict(checks[0], status="fail", error="AssertionError: relative error above 0.02")  # a triton check
    rep = report(checks=checks)
    assert backends.report_status(rep, GPU) == ("fail", "checks failed for backend(s) triton")
    name, why, hint = choose(rep, "rows")
    assert name == "cuda" and not hint  # triton (0.7) is out; cuda (0.8) beats torch (1.0)


def test_failed_check_of_one_backend_leaves_the_other():
    checks = report()["checks"]
    checks = [dict(c, status="fail") if c["backend"] == "triton" and c["dtype"] == "float32" else c for c in checks]
    rep = report(checks=checks)
    assert choose(rep, "rows")[0] == "cuda"  # triton (0.7) is out everywhere, cuda (0.8) beats torch (1.0)
    checks = [dict(c, status="fail") for c in checks]
    name, why, hint = choose(report(checks=checks), "rows")
    assert name == "torch" and hint and "no kernel backend passed" in why


def test_unchecked_dtype_stays_on_torch():
    rep = report(checks=[c for c in report()["checks"] if c["dtype"] == "bfloat16"])
    assert choose(rep, "rows", torch.bfloat16)[0] == "triton"
    assert choose(rep, "rows", torch.float16)[0] == "torch"
    assert choose(rep, "rows", torch.float64)[0] == "torch"


def test_report_files(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTEDLORA_CACHE_DIR", str(tmp_path))
    assert backends.report_path() == tmp_path / "selftest.json"
    rep, why = backends.read_report()
    assert rep is None and "no self-test report" in why
    (tmp_path / "selftest.json").write_text("{not json")
    assert "unreadable" in backends.read_report()[1]
    (tmp_path / "selftest.json").write_text(json.dumps(dict(report(), schema=0)))
    assert "schema" in backends.read_report()[1]
    (tmp_path / "selftest.json").write_text(json.dumps(report()))
    assert backends.read_report()[0]["device"]["name"] == GPU


# --- the dispatcher: resolved once per (device, class, dtype), logged once ----------------


@pytest.fixture
def pretend_gpu(tmp_path, monkeypatch):
    """``resolve_backend('auto', cuda:0)`` on this CPU machine: a GPU name, a cache dir, a fresh memo."""
    monkeypatch.setenv("ROUTEDLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: GPU)
    backends.reset_auto()
    yield tmp_path
    backends.reset_auto()


def plan_args(N, R, dtype=torch.float32):
    x = torch.randn(N, 16, dtype=dtype)
    A = torch.randn(1, 4, 16, 2, dtype=dtype)
    B = torch.randn(1, 4, 2, 8, dtype=dtype)
    return x, A, B, None, TokenRows.contiguous(R, N // R, "cpu"), "params", True


def test_auto_without_report_stays_on_torch_and_logs_once(pretend_gpu, caplog):
    caplog.set_level(logging.WARNING, logger="routedlora")
    auto = backends.resolve_backend("auto", torch.device("cuda", 0))
    assert backends.resolve_backend("auto", torch.device("cuda", 0)) is auto
    for N, R in ((64, 2), (4, 4), (64, 2), (8, 8)):
        assert auto.plan(*plan_args(N, R)) in torch_backend.ALGORITHMS.values()
    lines = [r.getMessage() for r in caplog.records if r.name == "routedlora"]
    assert len(lines) == 1, lines
    assert "python -m routedlora.selftest" in lines[0] and "no self-test report" in lines[0]
    assert str(pretend_gpu / "selftest.json") in lines[0]
    assert auto.choices == {("rows", "float32"): ("torch", auto.choices[("rows", "float32")][1]),
                            ("decode", "float32"): ("torch", auto.choices[("decode", "float32")][1])}


def test_auto_follows_a_passing_report_per_class_without_rereading(pretend_gpu, monkeypatch, caplog):
    timings = report()["timings"]
    timings["decode"]["backends"]["torch"]["median_ms"] = 0.001  # torch wins decode, triton the rows
    (pretend_gpu / "selftest.json").write_text(json.dumps(report(timings=timings)))
    reads = []
    real = backends.read_report
    monkeypatch.setattr(backends, "read_report", lambda *a: reads.append(1) or real(*a))
    caplog.set_level(logging.WARNING, logger="routedlora")
    auto = backends.resolve_backend("auto", "cuda:0")
    for _ in range(3):
        assert auto.plan(*plan_args(64, 2)) in triton_backend.ALGORITHMS.values()
        assert auto.plan(*plan_args(4, 4)) in torch_backend.ALGORITHMS.values()
    assert len(reads) == 1
    assert auto.choices[("rows", "float32")][0] == "triton" and auto.choices[("decode", "float32")][0] == "torch"
    assert not [r for r in caplog.records if r.name == "routedlora"]  # an informed choice: nothing to say


def test_auto_falls_back_when_the_chosen_backend_cannot_load(pretend_gpu, caplog):
    """The report says cuda is fastest, but this torch cannot build it: torch, said once."""
    (pretend_gpu / "selftest.json").write_text(json.dumps(report()))
    caplog.set_level(logging.WARNING, logger="routedlora")
    auto = backends.resolve_backend("auto", torch.device("cuda", 0))
    assert auto.plan(*plan_args(4, 4)) in torch_backend.ALGORITHMS.values()
    name, why = auto.choices[("decode", "float32")]
    assert name == "torch" and "'cuda' passed the self-test but is unusable now" in why
    assert len([r for r in caplog.records if r.name == "routedlora"]) == 1


def test_auto_on_cpu_is_torch_without_reading_anything(monkeypatch):
    monkeypatch.setattr(backends, "cached_report", lambda: pytest.fail("auto on CPU read the report"))
    assert backends.resolve_backend("auto", torch.device("cpu")) is torch_backend
    assert backends.resolve_backend("auto", None) is torch_backend
    assert backends.auto_resolves_to(torch.device("cpu"))[0] == "torch"


# --- the command ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """``python -m routedlora.selftest --shapes decode`` in a fresh process, as a user runs it."""
    tmp = tmp_path_factory.mktemp("selftest")
    env = dict(os.environ, ROUTEDLORA_CACHE_DIR=str(tmp / "cache"))
    env.pop("TRITON_INTERPRET", None)  # the command decides
    proc = subprocess.run([sys.executable, "-m", "routedlora.selftest", "--shapes", "decode", "--json",
                           str(tmp / "out.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return proc, tmp


def test_cpu_mode_runs_and_reports(cpu_run):
    proc, tmp = cpu_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "no CUDA device" in out and "no timings" in out and "CUDA graphs" in out
    assert "bfloat16" in out and "11584" in out
    assert "checks passed" in out and "FAIL" not in out
    rep = json.loads((tmp / "out.json").read_text())
    assert json.loads((tmp / "cache" / "selftest.json").read_text()) == rep
    assert rep["passed"] and rep["triton_interpreter"] and rep["device"]["type"] == "cpu"
    ops = [c for c in rep["checks"] if c["kind"] == "op"]
    assert {(c["combine"], c["heads"]) for c in ops} == {("params", 1), ("params", 4), ("outputs", 1)}
    assert {c["dtype"] for c in ops} == {"float32", "float16"}
    assert {c["backend"] for c in ops} >= {"triton"}
    assert all(c["shape_class"] == "decode" and c["status"] == "pass" for c in ops)
    assert rep["timings"] == {} and rep["fastest"] == {}


def test_report_schema(cpu_run):
    rep = json.loads((cpu_run[1] / "out.json").read_text())
    assert rep["schema"] == backends.REPORT_SCHEMA
    assert set(rep) >= {"created", "versions", "device", "checks", "not_checked", "timings", "fastest", "summary",
                        "passed", "tolerance", "shape_classes"}
    assert set(rep["versions"]) >= {"routedlora", "torch", "triton", "cuda", "python", "platform"}
    assert rep["versions"]["torch"] == torch.__version__
    for c in rep["checks"]:
        assert set(c) >= {"name", "kind", "backend", "dtype", "status", "error", "rel_err", "tolerance"}
        assert c["status"] in ("pass", "fail") and set(c["rel_err"]) == set(selftest.OUTPUTS)
    assert rep["shape_classes"]["decode"]["seq_len"] == 1
    assert rep["summary"] == dict(ran=len(rep["checks"]), passed=len(rep["checks"]), failed=0)
    # auto never follows a report made without CUDA
    assert backends.auto_choice(rep, rep["device"]["name"], "decode", torch.float32)[0] == "torch"


def test_failed_check_exits_1_with_the_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROUTEDLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(selftest.TOLERANCE, "float32", 0.0)  # no two summation orders agree to the bit
    monkeypatch.setattr(selftest, "load_emulator", lambda: (None, "not in this test"))
    assert selftest.main(["--shapes", "decode", "--dtypes", "float32"]) == 1
    out = capsys.readouterr().out
    assert "FAIL op triton decode float32" in out and "relative error above 0" in out
    rep = json.loads((tmp_path / "selftest.json").read_text())
    assert not rep["passed"] and rep["summary"]["failed"] >= 1
    bad = [c for c in rep["checks"] if c["status"] == "fail"]
    assert all(c["error"].startswith("relative error above") for c in bad)
    assert backends.report_status(rep, GPU)[0] == "fail"


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as e:
        selftest.main(["--shapes", "nonsense"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        selftest.main(["--d", "0"])
    assert e.value.code == 2


# --- routedlora.info ----------------------------------------------------------------------


def test_info_text_and_json(tmp_path):
    env = dict(os.environ, ROUTEDLORA_CACHE_DIR=str(tmp_path))
    (tmp_path / "selftest.json").write_text(json.dumps(report()))
    text = subprocess.run([sys.executable, "-m", "routedlora.info"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    for needle in ("routedlora:", f"torch:         {torch.__version__}", "triton:", "transformers:", "peft:",
                   "python:", "platform:", "devices:", "backends for", "self-test report: pass",
                   str(tmp_path / "selftest.json"), "backend='auto'"):
        assert needle in text.stdout, needle
    proc = subprocess.run([sys.executable, "-m", "routedlora.info", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    info = json.loads(proc.stdout)
    assert info["selftest"]["status"] == "pass" and info["selftest"]["path"] == str(tmp_path / "selftest.json")
    assert "torch" in info["backends"]["available"]
    if not torch.cuda.is_available():
        assert info["devices"]["cuda"] == [] and "cuda" in info["backends"]["unavailable"]
        assert {c["backend"] for c in info["auto"]["choices"].values()} == {"torch"}


@pytest.mark.parametrize("eager_first", [False, True])
def test_auto_under_torch_compile_fullgraph(pretend_gpu, eager_first):
    """The first choice may be met while dynamo traces: it is made eagerly and enters the graph as a constant."""
    (pretend_gpu / "selftest.json").write_text(json.dumps(report()))
    dev = torch.device("cuda", 0)
    args = plan_args(64, 2)

    def f(x):
        impl = backends.resolve_backend("auto", dev).plan(x, *args[1:])
        return x * (2 if impl in triton_backend.ALGORITHMS.values() else 3)

    if eager_first:
        f(args[0])
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(args[0])
    torch.testing.assert_close(out, args[0] * 2)  # triton: the model class's fastest
    assert backends._AUTO[0].choices[("rows", "float32")][0] == "triton"
