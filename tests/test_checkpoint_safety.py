"""Checkpoints load without unpickling code: trainer state and RNG files are tensors and plain data only."""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from atod_fast.cli import main
from atod_fast.trainer.checkpoint import (
    _check_plain,
    load_rank_rng,
    load_trainer_state,
    rng_state,
    set_rng_state,
)
from atod_fast.trainer.config import ConfigError


class _WritesMarker:
    """Unpickled without restriction, this runs code: it writes ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({str(self.path)!r}, 'w').write('ran')",))


def _plant(path: Path, marker: Path) -> None:
    torch.save({"step": 1, "optimizer": {}, "payload": _WritesMarker(marker)}, path)
    # The planted file does run code when read with an ordinary unpickler.
    with open(path, "rb") as f:
        torch.load(f, weights_only=False)
    assert marker.read_text() == "ran"
    marker.unlink()


@pytest.fixture(scope="module")
def one_step_run(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt") / "run"
    assert main(["train", "--output-dir", str(run), "--max-steps", "1", *tiny_run]) == 0
    return run


def test_trainer_state_loads_with_weights_only(one_step_run):
    ckpt = one_step_run / "checkpoints" / "step-000001"
    st = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)  # no allowlist at all
    assert st["step"] == 1 and st["nonfinite_streak"] == 0
    # The AdamW state round-trips into a fresh optimizer over parameters of the same shapes.
    shapes = [s["exp_avg"].shape for _, s in sorted(st["optimizer"]["state"].items())]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = torch.optim.AdamW(params, lr=1.0)
    opt.load_state_dict(st["optimizer"])
    back = opt.state_dict()
    assert back["param_groups"][0]["betas"] == st["optimizer"]["param_groups"][0]["betas"]
    for i, s in st["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(back["state"][i][k], v), (i, k)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    np.random.seed(1)
    random.seed(2)
    torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (np.random.rand(4).tolist(), [random.random() for _ in range(4)], torch.rand(4))
    np.random.seed(9)
    random.seed(9)
    torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (np.random.rand(4).tolist(), [random.random() for _ in range(4)], torch.rand(4))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_checkpoints_written_before_still_resume_their_rng(tmp_path):
    """The former layout (NumPy's array and Python's tuple pickled as they are) loads through a narrow allowlist."""
    np.random.seed(5)
    random.seed(6)
    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(), "cuda": None}
    (tmp_path / "rng").mkdir()
    torch.save(old, tmp_path / "rng" / "rank-0.pt")
    expected = (np.random.rand(3).tolist(), random.random())
    np.random.seed(0)
    random.seed(0)
    set_rng_state(load_rank_rng(tmp_path, 0))
    assert (np.random.rand(3).tolist(), random.random()) == expected


def test_unloadable_state_is_refused_when_saving():
    with pytest.raises(TypeError, match=r"trainer_state\.controller\.obj: object is not plain data"):
        _check_plain({"step": 1, "controller": {"ema": torch.zeros(2), "obj": object()}}, "trainer_state")
    _check_plain({"step": 1, "x": [1, 2.0, "a", None, True, (torch.ones(1),)]}, "trainer_state")


def test_planted_pickle_is_refused_by_resume_and_never_runs(one_step_run, tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(one_step_run, run)
    ckpt = run / "checkpoints" / "step-000001"
    marker = tmp_path / "ran-code"
    _plant(ckpt / "trainer_state.pt", marker)

    with pytest.raises(ConfigError, match="refusing to load") as e:
        load_trainer_state(ckpt)
    assert "exec" in str(e.value) and not marker.exists()

    capsys.readouterr()
    assert main(["train", "--output-dir", str(run), "--max-steps", "2", "--resume", "auto", *tiny_run]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("atod-fast: error: --resume: refusing to load"), err
    assert "trainer_state.pt" in err and "Traceback" not in err
    assert not marker.exists()
    assert not (run / "checkpoints" / "step-000002").exists()


def test_planted_rank_rng_pickle_is_refused(tmp_path):
    (tmp_path / "rng").mkdir()
    marker = tmp_path / "ran-code"
    _plant(tmp_path / "rng" / "rank-0.pt", marker)
    with pytest.raises(ConfigError, match=r"--resume: refusing to load .*rank-0\.pt"):
        load_rank_rng(tmp_path, 0)
    assert not marker.exists()


def test_eval_never_runs_a_planted_pickle(one_step_run, tmp_path, capsys):
    """``atod-fast eval`` reads meta.json, config.yaml and the safetensors student: never the pickled state."""
    ckpt = tmp_path / "step-000001"
    shutil.copytree(one_step_run / "checkpoints" / "step-000001", ckpt)
    marker = tmp_path / "ran-code"
    _plant(ckpt / "trainer_state.pt", marker)
    assert main(["eval", "--checkpoint", str(ckpt), "--no-compare", "--episodes", "2", "--json"]) == 0
    assert not marker.exists()

    # A student whose weights are a pickle instead of safetensors is refused, the code not run.
    weights = ckpt / "student" / "model.safetensors"
    torch.save({"model.embed_tokens.weight": _WritesMarker(marker)}, ckpt / "student" / "pytorch_model.bin")
    weights.unlink()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ckpt), "--no-compare", "--episodes", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "atod-fast: error:" in err, err
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the control: a restricted load refuses the same file
        torch.load(ckpt / "student" / "pytorch_model.bin", weights_only=True)


def test_deepspeed_files_are_checked_before_deepspeed_reads_them(one_step_run, tmp_path):
    """DeepSpeed unpickles its own files without restriction: a file naming anything but its few classes is refused
    first, by the names it would import (read from the pickle, not unpickled)."""
    ckpt = tmp_path / "step-000001"
    shutil.copytree(one_step_run / "checkpoints" / "step-000001", ckpt)
    state = ckpt / "deepspeed" / "state"
    state.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19.8"}, state / "mp_rank_00_model_states.pt")
    assert load_trainer_state(ckpt)["step"] == 1  # tensors and plain data pass
    marker = tmp_path / "ran-code"
    _plant(state / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(ConfigError, match=r"--resume: refusing to hand .*optim_states\.pt to DeepSpeed: .*exec"):
        load_trainer_state(ckpt)
    assert not marker.exists()
