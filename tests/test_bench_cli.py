"""mixops-bench runs end to end on a CPU: presets build, timing runs, results are written."""
import json

import pytest
import torch

from mixops.bench import cli, presets


def test_every_preset_case_builds_and_matches_official():
    """Each case's mixops path computes what its official path computes (tiny batch)."""
    for name, cases in presets.presets(torch.device("cpu"), [1]).items():
        case = cases[-1]  # the smallest stage: cheap to build
        built = case.build(torch.device("cpu"), torch.float32)
        with torch.no_grad():
            a = built.official(*built.inputs)
            b = built.mixops(*built.inputs)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{name} {case.name}")
        # only the bare gather is pure data movement
        assert built.flops > 0 or name.endswith("-gather"), name
        if built.peer is not None:  # the peer does the same amount of work as the case
            with torch.no_grad():
                assert built.peer.fn(*built.peer.inputs).numel() == a.numel()


def test_default_presets_exist():
    table = presets.presets(torch.device("cpu"))
    assert set(presets.DEFAULT) <= set(table)
    # the GPU batch list has the prime batch that exposes torchvision's chunking
    gpu = presets.presets(torch.device("cuda"))
    assert {c.batch for c in gpu["activemlp-t"]} == {128, 127, 1}


def test_smoke_run_writes_results(tmp_path, capsys):
    rc = cli.main(["repmlp-t224", "--smoke", "--out", str(tmp_path), "--backends", "official,compile,triton"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out and "unavailable" in out
    (js,) = tmp_path.glob("*.json")
    data = json.loads(js.read_text())
    rows = data["results"]
    assert data["meta"]["timing"].startswith("wall clock")
    assert {(r["mode"], r["backend"]) for r in rows} == {
        (m, b) for m in ("fwd", "fwd+bwd") for b in ("official", "compile", "triton")
    }
    for r in rows:
        if r["backend"] == "triton":
            assert r["status"].startswith("unavailable")
        else:
            assert r["status"] == "ok", r
            assert r["median_ms"] > 0 and r["rel_err_vs_official"] < 1e-4
    assert (tmp_path / js.name.replace(".json", ".md")).exists()


def test_peer_is_timed_and_compared(tmp_path):
    """A branch case times the plain matmul of the same M, N, K and reports % of it."""
    rc = cli.main(["morphmlp-s-branch", "--smoke", "--out", str(tmp_path), "--backends", "official"])
    assert rc == 0
    (js,) = tmp_path.glob("*.json")
    rows = json.loads(js.read_text())["results"]
    peers = [r for r in rows if r["backend"] == "peer:matmul"]
    assert {r["mode"] for r in peers} == {"fwd", "fwd+bwd"}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in peers)
    for r in rows:
        if r["backend"] == "official":
            peer = next(p for p in peers if p["mode"] == r["mode"])
            assert r["pct_peer"] == pytest.approx(100 * peer["median_ms"] / r["median_ms"])


def test_list_and_bad_arguments(capsys):
    assert cli.main(["--list"]) == 0
    assert "activemlp-t  (default)" in capsys.readouterr().out
    assert cli.main(["no-such-preset", "--smoke"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["--backends", "official,fastest"])
