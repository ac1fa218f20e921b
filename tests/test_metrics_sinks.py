"""Metric sinks: metrics.jsonl, TensorBoard and Weights & Biases (offline: files only, no network)."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from atod_fast.cli import main
from atod_fast.trainer.config import ConfigError, LoggingConfig
from atod_fast.trainer.metrics import WANDB_ID_FILE, MetricsWriter, read_metrics, scalars


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    """W&B in offline mode, with its settings, cache and credentials kept away from the user's home."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_API_KEY", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_NAME"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "wandb-home"
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("NETRC", str(home / "netrc"))


def wandb_records(run_file: Path):
    """The records of a ``run-ID.wandb`` file: a LevelDB-style log (32 KiB blocks, 7-byte record headers) of
    W&B's protobuf ``Record`` messages after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", run_file
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a whole record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def wandb_run(run_dir: Path) -> dict:
    """What the offline W&B files under ``run_dir/wandb`` hold for the run id stored in the run dir."""
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    files = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    out = {"id": run_id, "files": files, "history": [], "project": None, "name": None, "config": {}}
    for f in files:
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in rec.history.item})
            elif kind == "run":
                out["project"], out["name"] = rec.run.project, rec.run.display_name
                out["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
            elif kind == "config":  # W&B may write the config in a record of its own, after the run record
                out["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
    return out


def test_scalars_expand_lists_and_drop_what_cannot_be_plotted():
    m = {"step": 3, "loss": 0.5, "nonfinite": False, "kl": float("nan"), "lambda_turn": [0.9, 0.1], "env": "x"}
    assert scalars(m) == {"loss": 0.5, "lambda_turn/0": 0.9, "lambda_turn/1": 0.1}


def test_wandb_sink_writes_offline_files(wandb_offline, tmp_path):
    logging_cfg = LoggingConfig(wandb=True, wandb_project="atod-unit", wandb_run_name="unit")
    w = MetricsWriter(tmp_path, tensorboard=False, wandb=logging_cfg, run_config={"seed": 7})
    w.write({"step": 1, "loss": 0.25, "lambda_turn": [0.5]})
    w.write({"step": 2, "loss": 0.125, "lambda_turn": [0.4]})
    w.close()
    got = wandb_run(tmp_path)
    assert len(got["files"]) == 1
    assert (got["project"], got["name"], got["config"]["seed"]) == ("atod-unit", "unit", 7)
    assert [(h["_step"], h["loss"], h["lambda_turn/0"]) for h in got["history"]] == [(1, 0.25, 0.5), (2, 0.125, 0.4)]
    assert [m["loss"] for m in read_metrics(tmp_path)] == [0.25, 0.125]


def _train(args: list[str]) -> int:
    """``atod-fast`` in its own process, as users run it: W&B keeps process-wide state (its service, its
    settings) that earlier in-process runs of other tests may have set up differently."""
    return subprocess.run([sys.executable, "-m", "atod_fast", *args], timeout=600).returncode


def test_two_training_steps_with_the_wandb_sink_offline(wandb_offline, tiny_run, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--output-dir", str(run), *tiny_run, "logging.tensorboard=true", "logging.wandb=true",
            "logging.wandb_project=atod-test", "logging.wandb_run_name=two-steps"]
    assert _train([*args, "--max-steps", "2"]) == 0
    rows = read_metrics(run)
    got = wandb_run(run)
    assert len(got["files"]) == 1 and got["files"][0].stat().st_size > 0
    assert (got["project"], got["name"]) == ("atod-test", "two-steps")
    assert got["config"]["max_steps"] == 2 and got["config"]["logging"]["wandb"] is True
    # Every sink got the same steps: W&B's history holds metrics.jsonl's values.
    assert [h["_step"] for h in got["history"]] == [r["step"] for r in rows] == [1, 2]
    for h, r in zip(got["history"], rows, strict=True):
        for k in ("loss", "reward_mean", "lambda_mean", "tokens_per_s"):
            assert h[k] == pytest.approx(r[k], rel=1e-12), k
        assert [h[f"lambda_turn/{i}"] for i in range(len(r["lambda_turn"]))] == pytest.approx(r["lambda_turn"])
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    # Resumed, the run continues under the same W&B id.
    assert _train([*args, "--max-steps", "3", "--resume", "auto"]) == 0
    again = wandb_run(run)
    assert again["id"] == got["id"] and len(again["files"]) == 2
    assert [h["_step"] for h in again["history"]] == [1, 2, 3]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


def test_wandb_without_the_package_is_one_config_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb looks like
    assert main(["train", "logging.wandb=true", "--output-dir", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("atod-fast: error: logging.wandb:") and "atod-fast[wandb]" in err
    with pytest.raises(ConfigError, match=r"^logging\.wandb: .*atod-fast\[wandb\]"):
        MetricsWriter(Path("unused"), tensorboard=False, wandb=LoggingConfig(wandb=True))


def test_wandb_online_without_credentials_is_one_config_error(wandb_offline, monkeypatch, tmp_path):
    # A process of its own: W&B reads WANDB_MODE once per process, and this one has run offline.
    monkeypatch.setenv("WANDB_MODE", "online")
    code = ("from pathlib import Path; from atod_fast.trainer.config import LoggingConfig; "
            "from atod_fast.trainer.metrics import MetricsWriter; "
            f"MetricsWriter(Path({str(tmp_path)!r}), tensorboard=False, wandb=LoggingConfig(wandb=True))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert re.search(r"ConfigError: logging\.wandb: W&B could not start a run: .*WANDB_MODE=offline", res.stderr), \
        res.stderr[-2000:]
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("override, needle", [
    ("logging.wandb_project=a/b", "logging.wandb_project"),
    ("logging.wandb=maybe", "logging.wandb"),
])
def test_wandb_keys_are_validated(override, needle, capsys):
    assert main(["train", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"atod-fast: error: {needle}") and len(err.splitlines()) == 1
