"""The progress-gated hand-over: the gate's rule, λ around it, its state, the teacher's bar and its seeds."""

from __future__ import annotations

import json

import pytest
import torch

from atod_fast.ops.schedule import AnnealSchedule
from atod_fast.trainer.config import ConfigError, load_train_config
from atod_fast.trainer.handover import HandoverController
from atod_fast.trainer.seeds import demo_seeds, eval_seeds, probe_seeds, train_seeds


def _ctl(**kw):
    base = dict(turn_horizon=5, max_steps=100, teacher_success=0.5, gate_window=3, gate_ratio=0.8)
    return HandoverController(**{**base, **kw})


def _feed(c, successes, distill=1.0, start=1):
    for i, s in enumerate(successes):
        c.observe(start + i, {"success_rate": s, "distill": distill})


def test_lambda_holds_at_lambda_max_until_the_gate():
    c = _ctl(lambda_max=0.9)
    turns = torch.arange(5)
    for step in range(1, 6):
        assert torch.equal(c.lam(step, turns), torch.full((5,), 0.9))
    _feed(c, [0.0, 0.1, 0.2, 0.3, 0.35])  # window means 0.1, 0.2, 0.283 < 0.4
    assert c.handover_step is None
    assert c.metrics()["handover_step"] is None and c.metrics()["gate_threshold"] == pytest.approx(0.4)


def test_gate_opens_on_the_window_mean_of_training_success():
    c = _ctl()  # bar: 0.8 × 0.5 = 0.4 over 3 steps
    _feed(c, [1.0, 1.0])  # a full window is needed, however good the first steps are
    assert c.handover_step is None
    _feed(c, [0.0], start=3)  # mean 0.667
    assert c.handover_step == 3
    _feed(c, [0.0, 0.0, 0.0], start=4)  # once open it stays open
    assert c.handover_step == 3

    c = _ctl()
    _feed(c, [0.3, 0.4, 0.49, 0.3])  # 0.397 (just under), then 0.397
    assert c.handover_step is None
    _feed(c, [0.42], start=5)  # 0.49, 0.3, 0.42: 0.4033
    assert c.handover_step == 5


def test_gate_on_divergence_is_optional():
    c = _ctl(gate_divergence=0.2)
    _feed(c, [0.0, 0.0, 0.0], distill=0.3)
    assert c.handover_step is None
    _feed(c, [0.0, 0.0, 0.0], distill=0.1, start=4)  # 0.3, 0.3, 0.1 -> 0.233; 0.3, 0.1, 0.1 -> 0.167 < 0.2
    assert c.handover_step == 5
    c = _ctl()  # null: the divergence alone never opens it
    _feed(c, [0.0] * 5, distill=0.0)
    assert c.handover_step is None


def test_after_the_gate_lambda_is_the_anneal_shifted_to_the_gate():
    c = _ctl(anneal_steps=20, lambda_max=0.9, lambda_min=0.1, value_warmup_steps=2)
    _feed(c, [1.0, 1.0, 1.0])
    assert c.handover_step == 3
    sched = AnnealSchedule(20, 5, lambda_max=0.9, lambda_min=0.1)
    turns = torch.arange(5)
    # Steps 4 and 5 warm the value head up (policy loss off); step 6 is the anneal's t = 0.
    assert [c.value_only(s) for s in range(1, 8)] == [False, False, False, True, True, False, False]
    assert torch.equal(c.lam(5, turns), torch.full((5,), 0.9))
    for step in (6, 7, 16, 25, 40):
        assert torch.equal(c.lam(step, turns), sched(step - 6, turns)), step
    # The learning rate is scaled from the first step after the gate.
    c.lr_scale = 0.1
    assert [c.lr_factor(s) for s in (1, 3, 4, 50)] == [1.0, 1.0, 0.1, 0.1]


def test_anneal_over_the_rest_of_the_run_by_default():
    c = _ctl(max_steps=40)
    _feed(c, [1.0, 1.0, 1.0, 1.0], start=7)  # opens after step 9: the anneal is steps 10..40
    assert c.handover_step == 9
    assert c.schedule().total_steps == 31
    assert float(c.lam(40, torch.tensor([0]))) == pytest.approx(float(c.schedule()(30, torch.tensor([0]))))


def test_state_dict_is_json_and_resumes_the_same_gate():
    a = _ctl()
    _feed(a, [0.3, 0.5])
    b = _ctl(teacher_success=0.9)  # a re-measured teacher does not move a resumed gate
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.threshold == pytest.approx(a.threshold)
    for c in (a, b):
        _feed(c, [0.45], start=3)  # 0.4167 >= 0.4
    assert a.handover_step == b.handover_step == 3
    assert json.loads(json.dumps(a.state_dict())) == a.state_dict()


@pytest.mark.parametrize("kw", [{"teacher_success": 1.5}, {"gate_window": 0}, {"lambda_min": 0.95}])
def test_bad_controller_arguments(kw):
    with pytest.raises(ValueError):
        _ctl(**kw)


def test_probe_seeds_are_disjoint_from_evaluation_training_and_demo_seeds():
    probe = set(probe_seeds(4096))
    assert len(probe) == 4096
    assert not probe & set(eval_seeds(100_000))
    assert not probe & set(demo_seeds(0, 10_000))
    assert not probe & {s for step in range(1, 300) for s in train_seeds(7, step, 64)}
    assert probe_seeds(3) == probe_seeds(3)


def test_teacher_success_is_measured_once_on_probe_seeds(tmp_path, monkeypatch):
    from atod_fast.trainer import teacher_success as ts

    calls = []

    def fake_eval(lm, tok, **kw):
        calls.append(kw)
        return {"success_rate": 0.375, "reward_mean": 0.375, "episodes": kw["episodes"]}

    monkeypatch.setattr(ts, "evaluate_model", fake_eval)
    monkeypatch.setenv("ATOD_FAST_CACHE", str(tmp_path / "cache"))
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    cfg = load_train_config(None, ["rollout.temperature=0.7"])
    assert ts.teacher_train_success(cfg, None, None, str(teacher_dir), torch.device("cpu")) == 0.375
    assert ts.teacher_train_success(cfg, None, None, str(teacher_dir), torch.device("cpu")) == 0.375
    assert len(calls) == 1
    kw = calls[0]
    assert kw["seeds"] == probe_seeds(ts.PROBE_EPISODES) and kw["temperature"] == 0.7  # training sampling
    # The built-in teacher's number sits beside it; another rollout setting is measured again.
    assert list(teacher_dir.glob("train_success-*.json"))
    other = load_train_config(None, ["rollout.temperature=1.0"])
    ts.teacher_train_success(other, None, None, str(teacher_dir), torch.device("cpu"))
    assert len(calls) == 2
    # A named teacher's number goes to the cache directory, not into the model's folder.
    named = load_train_config(None, [f"model.teacher={teacher_dir}"])
    ts.teacher_train_success(named, None, None, str(teacher_dir), torch.device("cpu"))
    assert list((tmp_path / "cache" / "teacher-success").glob("*.json"))


@pytest.mark.parametrize("override, needle", [
    ("schedule.handover=sometimes", "schedule.handover"),
    ("schedule.total_steps=50", "schedule.total_steps"),
    ("schedule.gate_window=0", "schedule.gate_window"),
    ("schedule.gate_ratio=-1", "schedule.gate_ratio"),
    ("schedule.gate_divergence=0", "schedule.gate_divergence"),
    ("optim.handover_lr_scale=0", "optim.handover_lr_scale"),
    ("ppo.value_warmup_steps=-1", "ppo.value_warmup_steps"),
])
def test_handover_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_train_config(None, [override])
    assert str(e.value).startswith(needle)


def test_handover_config_defaults():
    cfg = load_train_config(None, [])
    assert cfg.gated and cfg.schedule.handover == "auto"
    assert not load_train_config(None, ["schedule.handover=fixed"]).gated
    assert not load_train_config(None, ["schedule.mode=opd"]).gated
    with pytest.raises(ConfigError, match=r"schedule\.anneal_steps"):
        load_train_config(None, ["schedule.handover=fixed", "schedule.anneal_steps=10"])  # not its default
    load_train_config(None, ["schedule.handover=fixed", "schedule.total_steps=10"])
    load_train_config(None, ["schedule.mode=opd", "schedule.total_steps=10"])  # constant λ: nothing to anneal


# ---------------------------------------------------------------------------- end to end (tiny models, CPU)
TINY = [
    "sft.steps=20", "sft.episodes=64", "sft.batch_size=8", "sft.arch.hidden_size=32", "sft.arch.intermediate_size=64",
    "sft.arch.num_heads=2", "model.student_arch.hidden_size=32", "model.student_arch.intermediate_size=64",
    "model.student_arch.num_heads=2", "rollout.episodes_per_step=6", "eval.episodes=8", "logging.progress=false",
    "logging.tensorboard=false", "checkpoint.every=1", "checkpoint.keep_last=10", "eval.at_end=false",
]
# The gate opens after step 2 whatever the student does (bar 0); step 3 warms the value head up.
GATED = [*TINY, "schedule.gate_ratio=0", "schedule.gate_window=2", "ppo.value_warmup_steps=1",
         "schedule.anneal_steps=3", "optim.handover_lr_scale=0.5"]


def _weights(run, step):
    from safetensors.torch import load_file

    ckpt = run / "checkpoints" / f"step-{step:06d}"
    out = {f"lm.{k}": v for k, v in load_file(str(ckpt / "student" / "model.safetensors")).items()}
    out.update({f"v.{k}": v for k, v in load_file(str(ckpt / "value_head.safetensors")).items()})
    return out


def test_resume_across_the_gate_gives_the_same_run(tmp_path, private_cache):
    from atod_fast.cli import main
    from atod_fast.trainer.checkpoint import load_trainer_state
    from atod_fast.trainer.metrics import read_metrics

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--output-dir", str(a), "--max-steps", "6", *GATED]) == 0
    # Stopped before the gate, resumed across it and through the value warm-up, resumed again.
    assert main(["train", "--output-dir", str(b), "--max-steps", "1", *GATED]) == 0
    assert main(["train", "--output-dir", str(b), "--max-steps", "3", "--resume", "auto", *GATED]) == 0
    assert main(["train", "--output-dir", str(b), "--max-steps", "6", "--resume", "auto", *GATED]) == 0
    wa, wb = _weights(a, 6), _weights(b, 6)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la, lb = read_metrics(a), read_metrics(b)
    for key in ("loss", "lr", "lambda_mean", "handover_step", "value_loss"):
        assert [r[key] for r in la] == [r[key] for r in lb], key
    assert [r["handover_step"] for r in la] == [None, 2, 2, 2, 2, 2]
    lr = [r["lr"] for r in la]  # the LR the next step uses: halved from step 3 on
    assert lr[0] == pytest.approx(2e-3) and lr[1:] == pytest.approx([1e-3] * 5)
    assert [r["lambda_mean"] for r in la[:3]] == pytest.approx([0.9] * 3) and la[3]["lambda_mean"] < 0.9
    # The warm-up step moved the value head alone.
    w2, w3 = _weights(a, 2), _weights(a, 3)
    assert all(torch.equal(w2[k], w3[k]) for k in w2 if k.startswith("lm."))
    assert load_trainer_state(b / "checkpoints" / "step-000003")["lambda_controller"]["handover_step"] == 2
    assert load_trainer_state(b / "checkpoints" / "step-000001")["lambda_controller"]["handover_step"] is None
