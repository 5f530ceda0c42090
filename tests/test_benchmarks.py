"""pytest-benchmark cases of the throughput benchmark, and checks of the benchmark itself.

Tiny sizes by default so the suite stays fast; ``FASTOPT_BENCH_PARAM_SET=16M`` (or any
name of ``bench.shapes``) times a real parameter set. Nothing here asserts on speed: a
shared CI machine cannot promise one. The throughput targets are checked by
``python -m bench.throughput``, which measures every provider side by side.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest
import torch

from bench import throughput
from bench.shapes import (
    PARAM_SETS,
    QUICK_PARAM_SETS,
    TINY_PARAM_SETS,
    gpt2_small_shapes,
    numel,
    resnet50_shapes,
)
from fastopt import backends

SETS = {**PARAM_SETS, **QUICK_PARAM_SETS, **TINY_PARAM_SETS}
PARAM_SET = os.environ.get("FASTOPT_BENCH_PARAM_SET", "tiny")
CPU = torch.device("cpu")
# torch.optim's fused CPU kernels (torch >= 2.4)
TORCH_FUSED_CPU = ("Adam", "AdamW", "SGD")


def _pairs():
    for case in throughput.CASES:
        providers = ["fastopt-cpp", "fastopt-torch"]
        if case.torch_cls is not None:
            providers.append("torch-foreach")
            if case.torch_cls in TORCH_FUSED_CPU:
                providers.append("torch-fused")
        for provider in providers:
            yield pytest.param(case, provider, id=f"{case.name}-{provider}")


@pytest.fixture(scope="module")
def shared_params():
    return throughput.make_params(SETS[PARAM_SET], CPU)


@pytest.mark.parametrize("case,provider", list(_pairs()))
def test_step_throughput(benchmark, shared_params, case, provider):
    if provider == "fastopt-cpp" and backends.unavailable_reason("cpp") is not None:
        pytest.fail(f"the C++ backend must be built: {backends.unavailable_reason('cpp')}")
    params, hvps = shared_params
    steps, notes = throughput.build_steps(case, params, hvps, CPU, compiled=False)
    assert provider in steps, notes.get(provider)
    benchmark.group = f"{PARAM_SET}-{case.name}"
    benchmark.extra_info["bytes_per_step"] = throughput.bytes_per_step(case, SETS[PARAM_SET])
    benchmark.pedantic(steps[provider], rounds=3, iterations=1, warmup_rounds=1)


def test_model_shapes_match_the_architectures():
    assert (len(resnet50_shapes()), numel(resnet50_shapes())) == (161, 25_557_032)
    assert (len(gpt2_small_shapes()), numel(gpt2_small_shapes())) == (148, 124_439_808)
    assert numel(PARAM_SETS["16M"]) == numel(PARAM_SETS["1000x16k"]) + 2**24 - 1000 * 2**14


def test_bytes_per_step_counts_each_stream():
    n = numel(TINY_PARAM_SETS["tiny"])
    by_name = throughput.CASE_BY_NAME
    # fp32: param r+w 8, grad 4, each state r+w 8
    assert throughput.bytes_per_step(by_name["adam"], TINY_PARAM_SETS["tiny"]) == 28 * n
    assert throughput.bytes_per_step(by_name["sgd_momentum"], TINY_PARAM_SETS["tiny"]) == 20 * n
    assert throughput.bytes_per_step(by_name["egd"], TINY_PARAM_SETS["tiny"]) == 24 * n  # + H u read
    assert throughput.bytes_per_step(by_name["adam_bf16_state"], TINY_PARAM_SETS["tiny"]) == 20 * n


def test_main_writes_table_csv_and_png(tmp_path, capsys):
    code = throughput.main(
        [
            "--param-sets", "tiny", "--optimizers", "adam,rmsprop,egd,adam_bf16_state",
            "--repeats", "2", "--warmup", "1", "--compiled", "none", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "speedup of fastopt-cpp" in out and "Targets (set for the full run's param sets" in out
    assert "indicative only" in out  # the tiny set is not what the targets are set for
    with open(tmp_path / "throughput_cpu_partial.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(throughput.CSV_COLUMNS) <= set(rows[0])
    providers = {(r["optimizer"], r["provider"]) for r in rows}
    assert ("adam", "fastopt-cpp") in providers and ("adam", "torch-fused") in providers
    assert ("adam", "roofline") in providers
    timed = [r for r in rows if r["provider"] == "fastopt-cpp"]
    assert len(timed) == 4 and all(float(r["ms_median"]) > 0 and float(r["gbps"]) > 0 for r in timed)
    compiled = [r for r in rows if r["provider"] == "torch-compiled" and r["optimizer"] == "adam"]
    assert compiled and compiled[0]["note"].startswith("not measured")
    assert (tmp_path / "throughput_cpu_partial.png").stat().st_size > 1000


def test_main_rejects_unknown_names(tmp_path):
    assert throughput.main(["--optimizers", "nope", "--out", str(tmp_path)]) == 2
    assert throughput.main(["--param-sets", "nope", "--out", str(tmp_path)]) == 2


def test_measure_reports_failures_instead_of_numbers():
    def broken():
        raise RuntimeError("compile failed here\nwith details")

    results = throughput.measure({"ok": lambda: None, "torch-compiled": broken}, 1, 3, CPU)
    assert len(results["ok"].times) == 3
    assert results["torch-compiled"].times == []
    assert results["torch-compiled"].note == "failed: RuntimeError: compile failed here"


# ---- the GPU benchmark's report, on made-up rows (its measurements need a GPU) --------------


def _gpu_rows(speedup: dict[tuple[str, str, str], float], roof: float) -> list[dict]:
    """Rows as gpu_throughput.run_set writes them: fastopt-triton at 1 ms everywhere, every
    other provider at ``speedup`` ms (default 2 ms), the primary's roofline fraction ``roof``."""
    from bench import gpu_throughput as g

    rows = []
    for opt in g.OPTIMIZERS:
        for pset in g.PARAM_SETS:
            for prov in (
                g.PRIMARY,
                "triton-kernel",
                "torch-forloop",
                "torch-foreach",
                "torch-fused",
                "torch-compiled",
            ):
                ms = 1.0 if prov == g.PRIMARY else speedup.get((opt, pset, prov), 2.0)
                rows.append(dict(optimizer=opt, param_set=pset, provider=prov, ms_median=ms, gbps=100.0,
                                 roofline_fraction=roof if prov == g.PRIMARY else roof / ms, tensors=3,
                                 elements=3e6))  # fmt: skip
    return rows


def test_gpu_targets_are_judged_from_the_rows():
    from bench import gpu_throughput as g

    # torch-fused 1.05x behind on ResNet-50 (target 1.1x), foreach 2.5x behind NAdam on GPT-2
    slow = {("adam", "resnet50", "torch-fused"): 1.05, ("nadam", "gpt2-small", "torch-foreach"): 2.5}
    lines = g.targets(_gpu_rows(slow, roof=0.93), tiny_ratio=1.5)
    by_label = {line.split("] ", 1)[1].rsplit(":", 1)[0]: line for line in lines}
    assert by_label["adam resnet50 vs torch-fused (>= 1.1x)"].startswith("[NOT met]")
    assert by_label["adam resnet50 vs torch-fused (>= 1.1x)"].endswith("1.05")
    assert by_label["adam gpt2-small vs torch-fused (>= 1.1x)"].startswith("[met]")
    assert by_label["adamw resnet50 vs torch-compiled (>= 1.0x)"].startswith("[met]")
    assert by_label["nadam gpt2-small vs torch-foreach (>= 3x)"].startswith("[NOT met]")
    assert by_label["radam 64M vs torch-foreach (>= 3x)"].startswith("[NOT met]")  # 2x everywhere
    assert (
        by_label["adam roofline fraction on 64M (>= 0.9)"]
        == "[met] adam roofline fraction on 64M (>= 0.9): 0.93"
    )
    assert by_label["bf16-state Adam 1000x64k vs torch-fused fp32 Adam (>= 1.3x)"].startswith("[met]")
    assert by_label["10,000 tiny tensors / one tensor, CUDA-graph step (< 2x)"].startswith("[met]")
    lines = g.targets(_gpu_rows({}, roof=0.5), tiny_ratio=None)
    assert all("tiny" not in line for line in lines)
    assert all(line.startswith("[NOT met]") for line in lines if "roofline" in line)


def test_gpu_table_prints_speedups(capsys):
    from bench import gpu_throughput as g

    rows = [r for r in _gpu_rows({("adam", "64M", "torch-fused"): 1.25}, roof=0.9) if r["param_set"] == "64M"]
    g.print_table(rows)
    out = capsys.readouterr().out
    adam = next(line for line in out.splitlines() if line.startswith("adam "))
    assert adam.split()[1:4] == ["1.000", "100", "0.90"] and "1.25x" in adam and "2.00x" in adam
    assert "cuda-kernel" in out and "-" in adam.split()  # a provider without rows shows "-"
    # fastopt's CUDA C++ backend and a bf16-state case's fp32-state twin have columns too
    heading = next(line for line in out.splitlines() if line.startswith("optimizer"))
    extra = [
        dict(rows[0], optimizer=g.BF16, provider=g.PRIMARY, ms_median=1.0),
        dict(rows[0], optimizer=g.BF16, provider="fastopt-cuda", ms_median=1.5),
        dict(rows[0], optimizer=g.BF16, provider=g.PRIMARY + "/fp32-state", ms_median=1.75),
    ]
    g.print_table(extra)
    bf16 = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(g.BF16)).split()
    columns = heading.split()
    assert bf16[columns.index("fastopt-cuda")] == "1.50x" and bf16[columns.index("fp32-state")] == "1.75x"


def test_gpu_benchmark_refuses_to_run_without_a_gpu(capsys, monkeypatch):
    from bench import gpu_throughput as g

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert g.main(["--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_graph_ratio_read_from_the_tiny_report():
    from bench import gpu_throughput as g

    table = (
        "provider                  10000x100 ms   1x1M ms   ratio\n"
        "triton-graph                  0.0300    0.0200    1.50\n"
        "triton-graph-unpacked         0.5000    0.0200   25.00\n"
    )
    assert g.graph_ratio(table) == 1.5
    assert g.graph_ratio(table + "fastopt-graph                 0.0420    0.0300    1.40\n") == 1.4
    # a failed capture is reported on a line of its own, which must not be read as a number
    failed = "fastopt-graph failed: RuntimeError: operation not permitted when stream is capturing\n"
    assert g.graph_ratio(failed + table) == 1.5
    assert g.graph_ratio(failed) is None
    assert g.graph_ratio("fastopt-graph failed: RuntimeError: boom\n" + table) == 1.5


def test_gpu_plan_measures_what_the_targets_lean_on_first():
    from bench import gpu_throughput as g

    sets = list(g.PARAM_SETS)
    cells = g.plan(g.OPTIMIZERS, sets, tiny=True)
    assert len(cells) == len(set(cells))
    # Adam and bf16-state Adam over every set, then the tiny-tensor ratio, then the rest
    head = [(o, s) for o in ("adam", g.BF16) for s in sets] + [g.TINY]
    assert cells[: len(head)] == head
    # every optimizer over every set, the 1B set only for those whose state fits beside it
    expected = {(o, s) for o in g.OPTIMIZERS for s in sets if s != "gpt2-1B" or o in g.BIG_OPTIMIZERS}
    assert set(cells) - {g.TINY} == expected
    rest = cells[len(head) :]
    assert [c[0] for c in rest] == sorted((c[0] for c in rest), key=g.OPTIMIZERS.index)
    assert g.TINY not in g.plan(["radam", "adam"], ["64M"], tiny=False)
    assert g.plan(["radam", "adam"], ["64M"], tiny=False) == [("adam", "64M"), ("radam", "64M")]


def test_gpu_benchmark_stops_at_its_budget_and_still_reports(capsys, monkeypatch, tmp_path):
    """Once the budget is spent no measurement starts; the table, the targets and the list
    of what was left out are printed from what was measured (no GPU: the measuring
    functions are stood in for)."""
    from bench import gpu_throughput as g

    measured = []
    real_png = g.write_png

    def fake_run_set(case, pset, shapes, bandwidth, rounds, meta, compile_ok=True):
        measured.append((case.name, pset))
        return [dict(optimizer=case.name, param_set=pset, provider=g.PRIMARY, ms_median=1.0, gbps=100.0,
                     roofline_fraction=0.95, tensors=1, elements=1e6)]  # fmt: skip

    checks = iter([False, False, True])  # spent from the third check on
    monkeypatch.setattr(g.Budget, "spent", lambda self: next(checks, True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(g, "copy_bandwidth", lambda: 3e12)
    monkeypatch.setattr(g, "set_copy_bandwidth", lambda shapes: 3e12)
    monkeypatch.setattr(g, "run_set", fake_run_set)
    monkeypatch.setattr(g, "run_tiny", lambda rounds, seconds: pytest.fail("the budget was spent before it"))
    monkeypatch.setattr(g, "write_png", lambda rows, path, title: None)
    sets, optimizers = "64M,resnet50", "rmsprop,adam"
    assert g.main(["--sets", sets, "--optimizers", optimizers, "--budget", "60", "--out", str(tmp_path)]) == 0
    assert measured == [("adam", "64M"), ("adam", "resnet50")]
    out = capsys.readouterr().out
    assert "not measured (budget 60 s): tiny, rmsprop+64M, rmsprop+resnet50, layout" in out
    assert "[met] adam roofline fraction on 64M (>= 0.9): 0.95" in out
    assert "rmsprop" not in out.split("not measured")[0]  # no rows for what did not run
    assert (tmp_path / "throughput_cuda_H100.csv").exists()
    # a budget spent before the first measurement: no rows, still a report and no error
    monkeypatch.setattr(g.Budget, "spent", lambda self: True)
    monkeypatch.setattr(g, "write_png", real_png)  # (matplotlib cannot draw no panels)
    assert g.main(["--sets", sets, "--optimizers", optimizers, "--budget", "0", "--out", str(tmp_path)]) == 0
    assert "(budget 0 s): adam+64M, adam+resnet50, tiny" in capsys.readouterr().out


def test_gpu_benchmark_reports_through_a_failed_cell_and_an_interrupt(capsys, monkeypatch, tmp_path):
    """A cell that raises (out of memory, say) is reported and the run goes on; a SIGTERM
    (the session's time limit) or Ctrl-C stops the measuring but not the report of what
    was measured. Little budget left: the torch.compile'd step is not started."""
    import signal

    from bench import gpu_throughput as g

    calls = []

    def fake_run_set(case, pset, shapes, bandwidth, rounds, meta, compile_ok=True):
        calls.append((case.name, pset, compile_ok))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)  # as `timeout` sends it
        return [dict(optimizer=case.name, param_set=pset, provider=g.PRIMARY, ms_median=1.0, gbps=100.0,
                     roofline_fraction=0.95, tensors=1, elements=1e6)]  # fmt: skip

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(g, "copy_bandwidth", lambda: 3e12)
    monkeypatch.setattr(g, "set_copy_bandwidth", lambda shapes: 3e12)
    monkeypatch.setattr(g, "run_set", fake_run_set)
    monkeypatch.setattr(g, "write_png", lambda rows, path, title: None)
    old = signal.getsignal(signal.SIGTERM)
    try:
        argv = [
            "--sets",
            "64M,resnet50",
            "--optimizers",
            "adam,rmsprop",
            "--experiments",
            "layout",
            "--budget",
            "60",
        ]
        assert g.main([*argv, "--out", str(tmp_path)]) == 0
    finally:
        signal.signal(signal.SIGTERM, old)
    out = capsys.readouterr().out
    assert calls == [("adam", "64M", False), ("adam", "resnet50", False), ("rmsprop", "64M", False)]
    assert "64M adam             failed: RuntimeError: CUDA out of memory" in out
    assert "interrupted: reporting what was measured" in out
    assert "not measured (budget 60 s): adam+64M (failed), the rest (interrupted), layout" in out
    table = out.split("interrupted: reporting")[1].split("not measured")[0]
    assert "== resnet50" in table and "== 64M" not in table  # the one cell measured
    assert (tmp_path / "throughput_cuda_H100.csv").read_text().count("\n") == 2  # header, the one row


def test_gpu_session_names_tests_that_exist():
    """bench/gpu_session.sh selects test files and test functions by name: a renamed one
    would stop the GPU session's pytest call with "not found", on the one machine where it
    cannot be fixed."""
    tests = Path(__file__).parent
    script = (tests.parent / "bench" / "gpu_session.sh").read_text()
    named = re.findall(r"tests/(test_\w+\.py)(?:::(\w+))?", script)
    assert len({f for f, _ in named}) >= 10 and any(fn for _, fn in named)
    for file, function in named:
        assert (tests / file).exists(), file
        source = (tests / file).read_text()
        assert not function or re.search(rf"^def {function}\(", source, re.MULTILINE), (file, function)


def test_failures_are_logged_as_they_happen(tmp_path):
    """bench/gpu_session.sh's failure log (tests/failure_log.py) gets each failure's message,
    and nothing of what passed or was skipped."""
    import subprocess
    import sys

    (tmp_path / "test_probe.py").write_text(
        "import pytest\n"
        "def test_passes():\n    assert True\n"
        "def test_fails():\n    assert 6 * 7 == 41, 'the planted failure'\n"
        "def test_skips():\n    pytest.skip('no')\n"
    )
    log = tmp_path / "failures.txt"
    env = dict(os.environ, FASTOPT_FAILURE_LOG=str(log), PYTHONPATH=os.path.dirname(__file__))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "failure_log", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    text = log.read_text()
    assert text.count("==== ") == 1 and "test_probe.py::test_fails (call)" in text
    assert "the planted failure" in text


def test_host_overhead_benchmark_writes_every_provider(tmp_path, capsys):
    from bench import host_overhead
    from fastopt.backends import triton_backend, triton_kernels

    before = (triton_kernels.step_kernel, triton_backend.unavailable_reason, triton_backend._device_ok)
    assert host_overhead.main(["--params", "30,70", "--rounds", "2", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "host_overhead_cpu.csv") as f:
        rows = list(csv.DictReader(f))
    measured = {(int(r["params"]), r["provider"]) for r in rows if r["us_per_step"]}
    expected = {
        "fastopt-cpp",
        "torch-fused",
        "torch-foreach",
        "fastopt-triton-host",
        "fastopt-triton-host-python",
        "fastopt-triton-host-new-table",
    }
    assert measured == {(n, name) for n in (30, 70) for name in expected}
    assert all(float(r["us_per_step"]) > 0 for r in rows)
    assert (tmp_path / "host_overhead_cpu.png").stat().st_size > 0
    assert "fastopt-triton-host" in capsys.readouterr().out
    # the stubbed launch is put back afterwards
    assert (
        triton_kernels.step_kernel,
        triton_backend.unavailable_reason,
        triton_backend._device_ok,
    ) == before
