"""``atod-fast compare`` on a tiny grid: outputs, shared config, resume, bad input."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from atod_fast.cli import main
from atod_fast.cli.compare import METHODS, Grid
from atod_fast.trainer.config import ConfigError, load_train_config
from atod_fast.trainer.metrics import read_metrics

TINY = [
    "sft.steps=20", "sft.episodes=64", "sft.batch_size=8", "sft.arch.hidden_size=32", "sft.arch.intermediate_size=64",
    "sft.arch.num_heads=2", "model.student_arch.hidden_size=32", "model.student_arch.intermediate_size=64",
    "model.student_arch.num_heads=2", "rollout.episodes_per_step=6", "logging.tensorboard=false",
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATOD_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))


def _config_without_schedule(run: Path) -> dict:
    d = asdict(load_train_config(str(run / "config.yaml")))
    del d["schedule"], d["output_dir"]
    return d


def test_tiny_grid_writes_results_and_methods_differ_only_in_schedule(tmp_path, capsys):
    out = tmp_path / "grid"
    args = ["compare", "--output-dir", str(out), "--methods", "teacher,opd,atod", "--seeds", "3", "--max-steps", "2",
            "--eval-every", "1", "--eval-episodes", "6", "--jobs", "2", *TINY]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| opd |" in printed and "| atod |" in printed and "| teacher |" in printed

    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]) == {"opd", "atod"} and not res["failed"]
    for m in ("opd", "atod"):
        run = res["runs"][m]["3"]
        assert [s for s, _ in run["curve"]] == [0, 1, 2]  # step 0 is the initial student
        assert all(0.0 <= y <= 1.0 for _, y in run["curve"])
        assert run["final"] == run["curve"][-1][1]
        rows = read_metrics(out / "runs" / m / "seed3")
        assert [r["heldout_success_rate"] for r in rows] == [y for _, y in run["curve"][1:]]
        assert [r["heldout_reward_mean"] for r in rows] == [y for _, y in run["reward_curve"][1:]]
        assert run["final_reward"] == run["reward_curve"][-1][1]
        assert [s for s, _ in run["reward_curve"]] == [0, 1, 2]
        assert res["summary"][m]["final"]["n"] == 1
    # The initial student is one model per seed, whatever the method.
    assert res["runs"]["opd"]["3"]["curve"][0] == res["runs"]["atod"]["3"]["curve"][0]
    assert res["teacher"]["episodes"] == 6 and res["wall_s"] > 0 and res["machine"]["cpu_count"] >= 1
    md = (out / "results.md").read_text()
    assert [ln.split(" |")[0] for ln in md.splitlines() if ln.startswith("| ")] == [
        "| method", "| teacher", "| opd", "| atod"]
    assert "commit" in md and "Wall time" in md and "final held-out reward" in md
    assert [c["runs_trained"] for c in res["invocations"]] == [2]
    for png in ("success_vs_step.png", "final_success.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Same config everywhere but the schedule; and the schedules really differ.
    a, b = out / "runs" / "opd" / "seed3", out / "runs" / "atod" / "seed3"
    assert _config_without_schedule(a) == _config_without_schedule(b)
    assert load_train_config(str(a / "config.yaml")).schedule.mode == "opd"
    assert load_train_config(str(b / "config.yaml")).schedule.mode == "atod"
    lam = [read_metrics(r)[0]["lambda_mean"] for r in (a, b)]
    # atod holds λ at lambda_max until its hand-over gate opens (a 2-step run never reaches it)
    assert lam[0] == 1.0 and lam[1] == pytest.approx(0.9)
    assert [r["handover_step"] for r in read_metrics(b)] == [None, None]

    # Running it again trains nothing and gives the same table.
    mtime = (a / "metrics.jsonl").stat().st_mtime_ns
    assert main(args) == 0
    assert "2 of 2 runs already finished" in capsys.readouterr().out
    assert (a / "metrics.jsonl").stat().st_mtime_ns == mtime
    again = json.loads((out / "results.json").read_text())
    assert again["runs"]["opd"]["3"]["curve"] == res["runs"]["opd"]["3"]["curve"]
    # The report keeps the time of the invocation that trained the runs, and each run's own time.
    assert [c["runs_trained"] for c in again["invocations"]] == [2, 0]
    assert again["invocations"][0] == res["invocations"][0]
    assert again["runs"]["atod"]["3"]["wall_s"] == res["runs"]["atod"]["3"]["wall_s"] > 0
    assert f"{res['wall_s'] / 60:.1f} min (2 runs trained" in (out / "results.md").read_text()


def test_methods_are_schedules_and_advantages_only():
    for name, (_, overrides) in METHODS.items():
        if overrides is not None:
            assert all(o.startswith(("schedule.", "ppo.advantage=")) for o in overrides), name
    cfgs = {m: load_train_config(None, o) for m, (_, o) in METHODS.items() if o is not None}
    modes = {m: c.schedule for m, c in cfgs.items()}
    assert modes["opd"].mode == "opd" and modes["ppo"].mode == "rl"
    assert modes["atod-no-turn"].turn_decay == "constant" and modes["atod-linear"].time_decay == "linear"
    assert modes["atod-adaptive"].turn_weighting == "adaptive" and modes["atod"].turn_weighting == "position"
    assert cfgs["atod-grpo"].ppo.advantage == "grpo" and cfgs["atod"].ppo.advantage == "gae"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"methods": ["opd", "sft"]}, "--methods"),
    ({"seeds": []}, "--seeds"),
    ({"max_steps": 0}, "--max-steps"),
    ({"overrides": ["schedule.mode=rl"]}, "schedule.mode"),
    ({"overrides": ["seed=3"]}, "--seeds"),
])
def test_bad_grid_is_a_clear_error(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Grid(output_dir=tmp_path, **kwargs)


def test_cli_reports_bad_seeds(tmp_path, capsys):
    assert main(["compare", "--output-dir", str(tmp_path), "--seeds", "a,b"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_eval_every_is_validated():
    with pytest.raises(ConfigError, match=r"eval\.every: expected an integer >= 0"):
        load_train_config(None, ["eval.every=-1"])
    assert load_train_config(None, []).eval.every == 0  # off unless asked for: train runs as before
