"""What the teacher and a compare grid's final students do on the held-out games of the TextWorldExpress coin
grid: what each turn's reply says, grouped (look around, inventory, take coin, move DIRECTION, anything else), and
the wins.

Usage: python textworld_express_actions.py GRID_DIR OUT.json (textworld_express/actions.json was written by it).
It replays the grid's own held-out evaluation (same games, same sampling seed), so its wins match results.json.
"""
import collections, json, sys
import torch
from unittest import mock
import atod_fast.trainer.evaluation as ev
from atod_fast.trainer.models import load_causal_lm

grid = sys.argv[1]
res = json.load(open(f"{grid}/results.json"))
kw = res["env"]["kwargs"]
models = {"teacher": res["teacher"]["path"]}
for m in res["runs"]:
    for s in res["runs"][m]:
        models[f"{m}/seed{s}"] = f"{grid}/runs/{m}/seed{s}/checkpoints/step-{res['max_steps']:06d}/student"


def kind(action: str) -> str:
    """The reply as the game reads it (lower case, single spaces, no final period), grouped; a move to a direction
    with no room, or taking the coin where there is none, still counts as move or take coin."""
    a = " ".join(action.lower().split()).rstrip(".")
    if a in ("look around", "inventory", "take coin"):
        return a
    return "move" if a in ("move north", "move south", "move east", "move west") else "anything else"


out = {}
for name, path in models.items():
    lm, tok = load_causal_lm(path, dtype="float32")
    got = []
    real = ev.rollout_stats
    with mock.patch.object(ev, "rollout_stats", lambda t: (got.extend(t), real(t))[1]):
        ev.evaluate_model(lm, tok, env_name="textworld_express", env_kwargs=kw, episodes=res["eval_episodes"],
                          max_turns=None, max_new_tokens=8, max_episode_tokens=1024, temperature=1.0,
                          device=torch.device("cpu"))
    per_turn = collections.defaultdict(collections.Counter)
    for t in got:
        for i, a in enumerate(t.actions):
            per_turn[i + 1][kind(a)] += 1
    out[name] = {"wins": sum(t.success for t in got), "episodes": len(got),
                 "actions_per_turn": {str(k): dict(v) for k, v in sorted(per_turn.items())}}
    print(name, out[name], flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
