"""TRL's ``GKDTrainer`` with its loss swapped for ``atod_loss`` (distillation alone, from hidden states).

TRL's GKD computes the student's and the teacher's full ``[B, T, V]`` logits and their generalized
JSD (``GKDTrainer.generalized_jsd_loss``). ``AtodGKDTrainer`` overrides ``compute_loss`` only: the
student's last hidden states and LM head go to ``atod_loss`` with no old log-probs, no advantages
(so no PPO term and λ = 1), TRL's ``beta`` as ``jsd_beta`` (0 and 1 included: forward and reverse KL)
and the shifted labels' 0/1 mask; the teacher comes as hidden states + head (``teacher="hidden"``:
no ``[B, T, V]`` tensor at all on the chunked backends) or as its logits (``teacher="logits"``).
Generation (``lmbda``, ``seq_kd``) stays TRL's. Like TRL's loss, the divergence is taken at
temperature 1 (GKD's ``temperature`` is the sampling temperature).

Runs on the CPU with tiny random-init Llamas built in-process (no download):

    python examples/trl_gkd.py --steps 2 --beta 0.5 --teacher hidden

It prints TRL's loss and ``atod_loss`` on the same batch (for β = 0, 0.3, 0.5, 1 and both teacher
inputs), then trains; the last line is a JSON summary (tests/test_trl_gkd.py reads it). Run it from
outside the repository's root: the root's ``kernels/`` folder would hide the Hugging Face ``kernels``
package that trl imports.
Single process: under DDP, call the wrapped model's forward rather than its decoder.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from datasets import Dataset
from trl.experimental.gkd import GKDConfig, GKDTrainer

from atod_fast import atod_loss
from atod_fast.trainer.config import TinyArch
from atod_fast.trainer.models import build_tokenizer, tiny_llama


class AtodGKDTrainer(GKDTrainer):
    """``GKDTrainer`` whose loss is ``atod_loss(divergence="jsd", jsd_beta=beta)`` from hidden states."""

    def __init__(self, *args, teacher: str = "hidden", atod_backend: str = "auto", **kwargs):
        if teacher not in ("hidden", "logits"):
            raise ValueError(f"teacher must be 'hidden' or 'logits', got {teacher!r}")
        super().__init__(*args, **kwargs)
        self.teacher_input = teacher
        self.atod_backend = atod_backend

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, attn = inputs["input_ids"], inputs["attention_mask"]
        student = self.accelerator.unwrap_model(model)
        # Row (b, i) predicts token i + 1, as in TRL's shift; -100 labels (prompt, padding) are masked out.
        h = student.get_decoder()(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
        labels = inputs["labels"][:, 1:]
        mask = attn[:, 1:] * (labels != -100)  # an integer 0/1 mask, as atod_loss accepts it
        head = student.get_output_embeddings()
        self.teacher_model.eval()
        with torch.no_grad():
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            if self.teacher_input == "logits":
                zt = teacher(input_ids=ids, attention_mask=attn).logits[:, :-1]
                teacher_kw = dict(teacher_logits=zt.reshape(-1, zt.shape[-1]))
            else:
                ht = teacher.get_decoder()(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
                t_head = teacher.get_output_embeddings()
                teacher_kw = dict(teacher_hidden=ht.reshape(-1, ht.shape[-1]), teacher_weight=t_head.weight,
                                  teacher_bias=t_head.bias)
        # TRL divides the masked sum by num_items_in_batch when the Trainer passes it (gradient accumulation),
        # else by the number of masked-in tokens: atod_loss's normalizer and its default.
        normalizer = num_items_in_batch if num_items_in_batch is not None and num_items_in_batch > 0 else None
        out = atod_loss(
            h.reshape(-1, h.shape[-1]), head.weight, labels.reshape(-1), loss_mask=mask.reshape(-1),
            student_bias=head.bias, divergence="jsd", jsd_beta=self.beta, normalizer=normalizer,
            backend=self.atod_backend, **teacher_kw,
        )
        return (out.loss, out) if return_outputs else out.loss

    def trl_loss(self, inputs, num_items_in_batch=None) -> torch.Tensor:
        """TRL's own loss on ``inputs`` (GKDTrainer.compute_loss), for comparison."""
        return GKDTrainer.compute_loss(self, self.model, inputs, num_items_in_batch=num_items_in_batch)


def tiny_setup(seed: int = 0):
    """(tokenizer, student, teacher, dataset): random-init Llamas over a tokenizer fitted to a toy chat set."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(32):
        a, b = (int(x) for x in torch.randint(0, 50, (2,), generator=g))
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    corpus = [m["content"] for r in rows for m in r["messages"]]
    tok = build_tokenizer(corpus, 300)
    student = tiny_llama(TinyArch(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok, seed=seed)
    teacher = tiny_llama(TinyArch(hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96), tok,
                         seed=seed + 1)
    with torch.no_grad():  # random init gives near-uniform next-token distributions: sharpen both
        student.get_decoder().norm.weight.mul_(20.0)  # (the heads are tied to the embeddings: scale the norm)
        teacher.get_decoder().norm.weight.mul_(40.0)
    return tok, student, teacher, Dataset.from_list(rows)


def make_trainer(out_dir: str, *, steps: int, beta: float, lmbda: float, teacher: str, backend: str, seed: int = 0):
    tok, student, teacher_model, data = tiny_setup(seed)
    args = GKDConfig(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                     beta=beta, lmbda=lmbda, max_new_tokens=8, max_length=64, temperature=0.9, logging_steps=1,
                     report_to="none", save_strategy="no", use_cpu=True, seed=seed, bf16=False)
    return AtodGKDTrainer(model=student, teacher_model=teacher_model, args=args, train_dataset=data,
                          processing_class=tok, teacher=teacher, atod_backend=backend)


def compare_on_one_batch(trainer: AtodGKDTrainer, betas=(0.0, 0.3, 0.5, 1.0)) -> list[dict]:
    """TRL's loss and atod_loss on the first training batch for each β and teacher input, normalized both
    ways (by num_items_in_batch as the Trainer passes it, and by the masked-in tokens). The trainer's
    β and teacher input are restored."""
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v.to(trainer.args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    n_items = 2 * (batch["labels"][:, 1:] != -100).sum()  # e.g. two accumulation steps
    saved = trainer.beta, trainer.teacher_input
    rows = []
    with torch.no_grad():
        for teacher in ("hidden", "logits"):
            for beta in betas:
                trainer.beta, trainer.teacher_input = beta, teacher
                for n in (None, n_items):
                    rows.append(dict(beta=beta, teacher=teacher, num_items=None if n is None else int(n),
                                     trl=float(trainer.trl_loss(batch, num_items_in_batch=n)),
                                     atod=float(trainer.compute_loss(trainer.model, batch, num_items_in_batch=n))))
    trainer.beta, trainer.teacher_input = saved
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--beta", type=float, default=0.5, help="TRL's GKD beta: 0 forward KL, 1 reverse KL")
    p.add_argument("--lmbda", type=float, default=0.0, help="TRL's on-policy fraction (student generations)")
    p.add_argument("--teacher", choices=("hidden", "logits"), default="hidden")
    p.add_argument("--backend", default="auto", help="atod_loss backend")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = make_trainer(out_dir, steps=a.steps, beta=a.beta, lmbda=a.lmbda, teacher=a.teacher,
                               backend=a.backend)
        comparisons = compare_on_one_batch(trainer)
        for c in comparisons:
            print(f"one batch, beta {c['beta']}, teacher {c['teacher']}, num_items_in_batch {c['num_items']}: "
                  f"TRL {c['trl']:.6f}, atod_loss {c['atod']:.6f}")
        before = trainer.model.get_output_embeddings().weight.detach().clone()
        trainer.train()
        moved = float((trainer.model.get_output_embeddings().weight.detach() - before).abs().max())
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    summary = dict(comparisons=comparisons, train_losses=losses, head_moved=moved, beta=a.beta, teacher=a.teacher)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
