"""Run one atod_loss forward+backward at N=4096, H=64, V=65536 and print its peak extra RSS in bytes.

Used by test_loss_memory.py in a fresh process per backend, so that one backend's freed pages
or allocator caches cannot hide another's peak. Linux only (/proc/self/status).
"""

import sys

import torch

from atod_fast import atod_loss


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(backend, n=4096, h=64, v=65536):
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(n, h, generator=g).requires_grad_()
    ws = (torch.randn(v, h, generator=g) / 8).requires_grad_()
    ht, wt = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / 8
    tgt = torch.randint(0, v, (n,), generator=g)
    old, adv, lam = torch.full((n,), -11.0), torch.randn(n, generator=g), torch.rand(n, generator=g)
    mask = torch.rand(n, generator=g) > 0.1
    # A small call first, so that code loaded lazily on first use is not counted as the loss's memory.
    atod_loss(hs[:4], ws[:256], tgt[:4] % 256, old[:4], adv[:4], lam[:4], mask[:4], teacher_hidden=ht[:4],
              teacher_weight=wt[:256], backend=backend).loss.backward()
    hs.grad = ws.grad = None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    except OSError:
        pass
    base = status("VmRSS:")
    out = atod_loss(hs, ws, tgt, old, adv, lam, mask, teacher_hidden=ht, teacher_weight=wt, backend=backend)
    out.loss.backward()
    print(status("VmHWM:") - base, out.loss.item())


if __name__ == "__main__":
    main(sys.argv[1])
