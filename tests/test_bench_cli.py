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
        assert built.flops > 0 or case.preset.endswith("-gather"), name
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


def test_smoke_reports_no_percent_of_ceiling(tmp_path):
    """Smoke-sized ceilings fit in the caches: they are no ceiling, so no '% of' is derived from them."""
    assert cli.main(["activemlp-t-gather", "--smoke", "--out", str(tmp_path), "--backends", "official"]) == 0
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert data["meta"]["ceilings"]["is_ceiling"] is False
    assert all(r["pct_copy"] is None and r["pct_matmul"] is None for r in data["results"])


def test_results_are_written_after_every_case(tmp_path, monkeypatch):
    """A run stopped part way (a time limit) leaves the cases it finished, marked incomplete."""
    real = cli.run_case
    done = []

    def second_case_never_ends(case, *args):
        if done:
            raise KeyboardInterrupt
        done.append(case)
        return real(case, *args)

    monkeypatch.setattr(cli, "run_case", second_case_never_ends)
    monkeypatch.setenv("MIXOPS_COMMIT", "0123abc")
    with pytest.raises(KeyboardInterrupt):
        cli.main(["morphmlp-s", "--smoke", "--max-cases", "2", "--out", str(tmp_path), "--backends", "official"])
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert data["meta"]["complete"] is False and data["meta"]["commit"] == "0123abc"
    assert {r["case"] for r in data["results"]} == {done[0].name}
    assert next(tmp_path.glob("*.md")).exists() and not list(tmp_path.glob("*.png"))


def test_headline_preset_is_the_design_targets():
    gpu = presets.presets(torch.device("cuda"))
    by_preset = {}
    for c in gpu["headline"]:
        by_preset.setdefault(c.preset, set()).add((c.name, c.batch))
        # each headline case is its own preset's case
        assert (c.name, c.batch) in {(o.name, o.batch) for o in gpu[c.preset]}
    assert {p: {b for _, b in cases} for p, cases in by_preset.items()} == {
        "morphmlp-s": {128}, "morphmlp-s-branch": {128}, "activemlp-t": {128, 127}, "activemlp-t-gather": {128},
        "dynamixer-op": {128}, "uniformer-s-win": {8}, "repmlp-t224": {128},
    }
    sizes = {"activemlp-t": 8, "dynamixer-op": 2, "uniformer-s-win": 1}
    assert all(len(cases) == sizes.get(p, 4) for p, cases in by_preset.items())
    assert [c.batch for c in gpu["headline"]][-4:] == [127] * 4  # the slowest cases last
    assert {c.batch for c in presets.presets(torch.device("cuda"), [64])["headline"]} == {64}
    cpu = presets.presets(torch.device("cpu"))["headline"]
    assert [(c.preset, c.name[:2], c.batch) for c in cpu] == [
        ("morphmlp-s", "s4", 1), ("activemlp-t", "s4", 1), ("morphmlp-s-branch", "s4", 1), ("activemlp-t-gather", "s4", 1),
        ("dynamixer-op", "S ", 1), ("uniformer-s-win", "32", 1), ("repmlp-t224", "s4", 1),
    ]
