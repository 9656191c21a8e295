"""Central finite-difference check of a meta-objective w.r.t. ω's meta-parameters (shared by tests)."""

from __future__ import annotations

import torch


def fd_check(omega, objective, names, h=1e-6, entries=2, rtol=1e-5, atol=1e-9):
    """Central finite differences of ``objective()`` w.r.t. a few entries of each named meta-parameter."""
    params = dict(omega.named_parameters())
    targets = [params[n] for n in names]
    grads = torch.autograd.grad(objective(), targets)
    for name, p, g in zip(names, targets, grads, strict=True):
        assert bool(torch.isfinite(g).all()), name
        assert g.abs().max() > 0, f"meta-gradient w.r.t. {name} is zero: the check could not fail"
        flat = p.data.view(-1)
        for i in range(min(entries, flat.numel())):
            orig = flat[i].item()
            with torch.no_grad():
                flat[i] = orig + h
                up = objective().item()
                flat[i] = orig - h
                down = objective().item()
                flat[i] = orig
            fd = (up - down) / (2 * h)
            an = g.reshape(-1)[i].item()
            assert abs(fd - an) <= atol + rtol * abs(an), f"{name}[{i}]: autograd {an:.10g} vs FD {fd:.10g}"
