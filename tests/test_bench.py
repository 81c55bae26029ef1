"""`geomcompile bench`: CLI end to end on a tiny synthetic workload, byte counting, skips, timing stats."""
import json

import pytest
import torch

from geomcompile.bench import traffic
from geomcompile.bench.timing import Timing, count_launches
from geomcompile.bench.workloads import SyntheticStack
from geomcompile.cli import main
from geomcompile.runtime import triton_backend

TINY = ["bench", "--model", "synthetic", "--synthetic", "1x4", "--steps", "3", "--warmup", "1",
        "--train-steps", "2", "--train-warmup", "1", "--batch-size", "2", "--no-progress"]
ROW_FIELDS = {"workload", "phase", "geometry", "variant", "status", "reason", "notes"}
TIMED_FIELDS = {"median_ms", "p10_ms", "p90_ms", "q1_ms", "q3_ms", "iqr_ms", "n", "bytes_per_step", "gb_per_s",
                "launches_per_step", "x_plain", "x_copy", "base_optimizer"}


@pytest.fixture
def no_triton(monkeypatch):
    """Triton unavailable whatever this machine has (TRITON_INTERPRET may be set by other tests)."""
    monkeypatch.setattr(triton_backend, "triton_problem", lambda params: "no GPU in this test")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_backend, "triton_problem", lambda params: "no GPU in this test")
        code = main(TINY + ["--geometry", "channel_directed,psi", "--backends", "eager,triton",
                            "--json", str(out / "r.json"), "--png", str(out / "r.png")])
    assert code == 0
    return json.loads((out / "r.json").read_text()), out


def test_json_has_the_documented_fields(tiny_run):
    result, _ = tiny_run
    for key in ("schema", "date", "command", "torch", "device", "settings", "counting", "workloads", "results",
                "load_average"):
        assert key in result, key
    assert result["device"]["type"] == "cpu" and result["device"]["name"]
    assert result["command"].startswith("geomcompile bench --model synthetic")
    assert result["settings"]["steps"] == 3 and result["settings"]["train_steps"] == 2
    variants = {(r["phase"], r["geometry"], r["variant"]) for r in result["results"]}
    assert ("optimizer_step", None, "plain") in variants and ("optimizer_step", None, "copy") in variants
    assert ("train_step", "psi", "eager") in variants and ("optimizer_step", "channel_directed", "eager") in variants
    for row in result["results"]:
        assert ROW_FIELDS <= row.keys()
        if row["status"] == "ok":
            assert TIMED_FIELDS <= row.keys(), row["variant"]
            assert row["n"] == (3 if row["phase"] == "optimizer_step" else 2)
            assert 0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
            assert row["launches_per_step"] > 0


def test_png_is_written(tiny_run):
    _, out = tiny_run
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unavailable_backend_is_a_skipped_row_with_the_reason(tiny_run, capsys):
    result, _ = tiny_run
    skipped = [r for r in result["results"] if r["variant"] == "triton"]
    assert skipped and all(r["status"] == "skipped" for r in skipped)
    assert all("no GPU in this test" in r["reason"] for r in skipped)
    assert {r["phase"] for r in skipped} == {"optimizer_step", "train_step"}


def test_bytes_in_the_json_match_a_hand_count(tiny_run):
    # synthetic 1x4: conv 4x4x3x3 = 144, BN weight + bias 4 + 4, Linear 10x4 = 40 + bias 10: 202 elements.
    # SGD momentum moves 5 x 4 bytes per element; channel_directed (conv + linear, 184 elements) reads
    # each gradient element once more; psi adds nothing.
    result, _ = tiny_run
    rows = {(r["geometry"], r["variant"]): r for r in result["results"] if r["phase"] == "optimizer_step"}
    assert rows[(None, "plain")]["bytes_per_step"] == 5 * 4 * 202 == 4040
    assert rows[("channel_directed", "eager")]["bytes_per_step"] == 4040 + 4 * 184
    assert rows[("psi", "eager")]["bytes_per_step"] == 4040
    assert rows[(None, "copy")]["bytes_per_step"] == 2 * 3 * 4 * 202      # 3 lists of 202 fp32 elements, read + write
    plain = rows[(None, "plain")]
    assert plain["gb_per_s"] == pytest.approx(4040 / (plain["median_ms"] * 1e-3) / 1e9)


def test_step_bytes_by_hand():
    conv, linear, bias = torch.zeros(4, 2, 3, 3), torch.zeros(3, 4), torch.zeros(3)
    assert traffic.step_bytes([conv, linear, bias], "sgd_momentum").bytes == 5 * 4 * (72 + 12 + 3)
    assert traffic.step_bytes([conv, linear, bias], "adam").bytes == 7 * 4 * 87
    with_cd = traffic.step_bytes([conv, linear, bias], "sgd_momentum", {"channel_directed": [conv, linear]})
    assert with_cd.bytes == 5 * 4 * 87 + 1 * 4 * 84 and with_cd.modelled
    half = traffic.step_bytes([conv.half()], "sgd", {"some_new_geometry": [conv.half()]})
    assert half.bytes == 3 * 2 * 72 and not half.modelled
    assert traffic.copy_lists(with_cd.bytes, 4 * 87) == 3          # 5-6 accesses per element: 3 lists
    assert traffic.copy_lists(7 * 4 * 87, 4 * 87) == 4


def test_table_on_stdout_names_every_variant(capsys, no_triton):
    main(TINY + ["--geometry", "psi", "--backends", "eager,triton", "--train-steps", "0"])
    out = capsys.readouterr().out
    assert "synthetic-1x4 (202 parameters in 5 tensors): optimizer step" in out
    for label in ("plain SGD (foreach)", "psi eager", "copy bound"):
        assert label in out
    assert "psi triton" in out and "skipped: backend 'triton' cannot run here: no GPU in this test" in out
    assert "full training step: not run" in out


def test_compile_row_reports_its_compile_time(tmp_path):
    """The one compiling bench test: psi on the tiny stack compiles in seconds."""
    assert main(TINY + ["--geometry", "psi", "--backends", "compile", "--train-steps", "0",
                        "--json", str(tmp_path / "c.json")]) == 0
    result = json.loads((tmp_path / "c.json").read_text())
    row = next(r for r in result["results"] if r["variant"] == "compile")
    assert row["status"] == "ok" and row["compile_s"] > 0
    assert any("backend compile: torch.compile" in n for n in row["notes"])


def test_bad_arguments_are_errors_that_say_what_to_pass(capsys):
    assert main(["bench", "--model", "synthetic", "--synthetic", "4by4", "--no-progress"]) == 2
    assert "COUNTxCHANNELS" in capsys.readouterr().err
    assert main(["bench", "--backends", "eager,cuda", "--no-progress"]) == 2
    assert "unknown backend" in capsys.readouterr().err
    assert main(["bench", "--geometry", "nope", "--model", "synthetic", "--synthetic", "1x4", "--steps", "1",
                 "--no-progress"]) == 2
    assert "unknown geometry 'nope'" in capsys.readouterr().err


def test_timing_statistics():
    t = Timing([float(v) for v in range(1, 101)])      # 1..100 ms
    s = t.summary()
    assert s["median_ms"] == 50.5 and s["p10_ms"] == pytest.approx(10.9) and s["p90_ms"] == pytest.approx(90.1)
    assert s["iqr_ms"] == pytest.approx(75.25 - 25.75) and s["n"] == 100


def test_cpu_launch_count_is_operator_calls():
    xs, ys = [torch.ones(3) for _ in range(4)], [torch.ones(3) for _ in range(4)]
    assert count_launches(lambda: torch._foreach_add_(xs, ys), torch.device("cpu")) == 1
    assert count_launches(lambda: [x.add_(y) for x, y in zip(xs, ys)], torch.device("cpu")) == 4


def test_synthetic_stack_is_what_the_docs_say():
    model = SyntheticStack(2, 4)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(4, 4, 3, 3), (4,), (4,), (4, 4, 3, 3), (4,), (4,), (10, 4), (10,)]
    assert model(torch.randn(2, 4, 8, 8)).shape == (2, 10)


# ---- --host-overhead ---------------------------------------------------------------------------------
def test_host_overhead_json_structure(tmp_path, capsys):
    """Structure only (no timing thresholds): every subject x backend x grads mode has a row; the
    triton rows ran with launches stubbed (launches counted, no kernel ran), the others say why not;
    torch's foreach step is beside them."""
    path = tmp_path / "host.json"
    code = main(["bench", "--host-overhead", "--model", "synthetic", "--synthetic", "1x4", "--steps", "3",
                 "--warmup", "1", "--geometry", "psi:sgd_momentum,channel_directed:adam", "--no-progress",
                 "--json", str(path)])
    assert code == 0
    result = json.loads(path.read_text())
    assert result["schema"] == "geomcompile-host-overhead/1"
    rows = {(r["geometry"], r["optimizer"], r["variant"], r["grads"]): r for r in result["results"]}
    for geometry, optimizer in (("psi", "sgd_momentum"), ("channel_directed", "adam")):
        for grads in ("cached", "fresh"):
            assert rows[(geometry, optimizer, "torch foreach", grads)]["n"] == 3
            for backend in ("eager", "compile"):
                row = rows[(geometry, optimizer, backend, grads)]
                assert row["status"] == "not applicable" and row["reason"]
            row = rows[(geometry, optimizer, "triton", grads)]
            assert row["status"] == "ok", row["reason"]
            assert row["n"] == 3 and row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"]
            assert row["launches_per_step"] >= 1 and row["pre_step_median_ms"] is not None
            assert row["python_calls_per_step"] > 0
            # the stack's conv feeds a BN with running statistics, which must follow psi's rescale:
            # the backend renormalises it with psi's eager post_step (stubbed and counted here)
            assert row["eager_fallbacks_per_step"] == (1 if geometry == "psi" else 0)
            foreach = rows[(geometry, optimizer, "torch foreach", grads)]
            assert row["x_torch_foreach"] == row["median_ms"] / foreach["median_ms"]
    # fresh gradients change every pointer at every step: the step plan patches them into its tables
    # and is replayed; only the first two steps (optimizer state created, then present) decide anew
    for geometry, optimizer in (("psi", "sgd_momentum"), ("channel_directed", "adam")):
        fresh, cached = rows[(geometry, optimizer, "triton", "fresh")], rows[(geometry, optimizer, "triton", "cached")]
        assert fresh["plan_builds"] == cached["plan_builds"] == 2
        assert fresh["table_patches"] > 0 and cached["table_patches"] == 0
    out = capsys.readouterr().out
    assert "host time per optimizer step" in out and "torch foreach" in out


def test_host_overhead_bad_arguments(capsys):
    assert main(["bench", "--host-overhead", "--device", "cuda"]) == 2
    assert "--host-overhead runs on CPU" in capsys.readouterr().err
    assert main(["bench", "--host-overhead", "--model", "synthetic", "--geometry", "psi:lbfgs"]) == 2
    assert "unknown optimizer" in capsys.readouterr().err


# ---- benchmarks/gpu.sh ---------------------------------------------------------------------------------
GPU_SH = __import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"


def test_gpu_script_parses_and_asks_for_its_folder():
    import subprocess
    assert subprocess.run(["bash", "-n", str(GPU_SH)]).returncode == 0
    run = subprocess.run(["bash", str(GPU_SH)], capture_output=True, text=True)
    assert run.returncode == 2 and "usage: bash benchmarks/gpu.sh OUT_DIR" in run.stderr


def test_gpu_parity_part_runs_on_cpu():
    """The parity part of gpu.sh on CPU (kernels interpreted): psi's in-kernel and eager-fallback
    renormalisations and channel_directed, fp32 over several steps, bf16 one step."""
    from geomcompile.bench.gpu import _parity_case
    for geometry, dtype in (("psi", torch.float32), ("channel_directed sobolev", torch.bfloat16)):
        case = _parity_case(torch.device("cpu"), geometry, "sgd_momentum", dtype, channels_last=False)
        assert case["ok"], case
        assert case["worst_error_over_tolerance"] <= 1.0
        assert any("fused" in n for n in case["triton_notes"]), case["triton_notes"]


def test_gpu_eigh_part_runs_on_cpu():
    """gpu.sh's check of spectral's Jacobi kernel against torch's eigh (interpreted here): the errors
    are measured and within 20 n eps; no timing off CUDA."""
    from geomcompile.bench.gpu import eigh_parity
    result = eigh_parity(torch.device("cpu"), quick=True)
    assert result["failed"] == 0 and len(result["rows"]) == 2, result
    for row in result["rows"]:
        assert set(row["errors_in_n_eps"]) == {"eigenvalues", "residual", "orthonormality"}
        assert all(0 <= e <= 20 for e in row["errors_in_n_eps"].values()) and "jacobi_ms" not in row, row


def test_gpu_main_needs_cuda_or_a_dry_run(tmp_path, capsys):
    from geomcompile.bench.gpu import main as gpu_main
    assert gpu_main(["--out", str(tmp_path), "--device", "cpu"]) == 2
    assert "add --quick" in capsys.readouterr().err
