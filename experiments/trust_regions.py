"""experiments/trust_regions.py: each objective's trust region as one picture, docs/trust_regions.png.

For one token with ratio rho in [0, 3], it plots the push a gradient step gives that token,
w(rho) = -(1 / |A|) d loss_t / d rho: w > 0 raises pi_theta(o_t), w < 0 lowers it, |w| = 1 is the
plain policy gradient and w = 0 means the token no longer moves. Left panel A > 0, right panel
A < 0. The curves are computed with autograd through the loss functions of maspo.LOSSES (the
picture is the code), at their default settings (maspo.DEFAULTS):
  GRPO (eps 0.2, dual clip c = 3), Clip-Higher (eps_high 0.28), DAC at p_old = 0.1, SAPO,
  BAPO at its start bounds (c_low, c_high) = (0.6, 1.2) (its search only widens them),
  MASPO at p_old = 1, 0.1, 0.01 (the mass-adaptive limiter widens the gate for rare tokens) with
  |A| = 1, and at p_old = 1 with |A| = 10 (the risk controller: wider for a confident positive,
  narrower for a strong negative). Entropy-Adv is GRPO's curve (it changes A, not the region).

Run: python experiments/trust_regions.py            (a second; needs matplotlib)
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import maspo  # noqa: E402

RHO = torch.linspace(0.0, 3.0, 1201, dtype=torch.float64)                # the x axis

# label -> (objective, p_old, |A|, extra arguments, line style)
CURVES = {
    "GRPO": ("grpo", 0.5, 1.0, {}, dict(color="black", lw=4.0, alpha=0.35)),
    "Clip-Higher": ("clip_higher", 0.5, 1.0, {}, dict(color="tab:gray", lw=2.2, ls="--")),
    "DAC, p_old = 0.1": ("dac", 0.1, 1.0, {}, dict(color="tab:green", lw=2.0)),
    "SAPO": ("sapo", 0.5, 1.0, {}, dict(color="tab:purple", lw=2.0)),
    "BAPO, start bounds": ("bapo", 0.5, 1.0, {"bounds": torch.tensor([maspo.BAPO_LOW[0], maspo.BAPO_HIGH[0]])},
                           dict(color="tab:orange", lw=1.6, ls="-.")),
    "MASPO, p_old = 1": ("maspo", 1.0, 1.0, {}, dict(color="tab:blue", lw=2.4)),
    "MASPO, p_old = 0.1": ("maspo", 0.1, 1.0, {}, dict(color="tab:blue", lw=1.6, ls="--")),
    "MASPO, p_old = 0.01": ("maspo", 0.01, 1.0, {}, dict(color="tab:blue", lw=1.2, ls=":")),
    "MASPO, p_old = 1, |A| = 10": ("maspo", 1.0, 10.0, {}, dict(color="tab:red", lw=1.6, ls="--")),
}


def push(loss, p_old, A, **extra):
    """w(rho) = -(1 / |A|) d loss_t / d rho for tokens at RHO, by autograd through maspo.LOSSES."""
    rho = RHO.clone().requires_grad_(True)                                # [T], one token per rho
    cfg = maspo.resolve(maspo.LossConfig(loss=loss))
    A_t = torch.full_like(RHO, A)
    loss_t, _, _ = maspo.LOSSES[loss](rho, A_t, torch.full_like(RHO, p_old), torch.ones_like(RHO), cfg, **extra)
    loss_t.sum().backward()                                               # tokens are independent
    return -rho.grad / abs(A)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "trust_regions.png"), help="PNG to write")
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharex=True)
    for ax, sign, title in ((axes[0], 1.0, "A > 0 (a correct answer)"), (axes[1], -1.0, "A < 0 (a wrong answer)")):
        for label, (loss, p_old, A, extra, style) in CURVES.items():
            ax.plot(RHO, push(loss, p_old, sign * A, **extra), label=label, **style)
        ax.axvline(1.0, color="0.8", lw=0.8, zorder=0)
        ax.axhline(0.0, color="0.8", lw=0.8, zorder=0)
        ax.set(title=title, xlabel="rho = pi_theta / pi_old", xlim=(0, 3),
               ylim=(-0.05, 1.08) if sign > 0 else (-1.08, 0.05))
    axes[0].set_ylabel("w = -(1/|A|) d loss_t / d rho")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Per-token push of one gradient step, w = -(1/|A|) d loss_t / d rho: w > 0 raises pi(o_t), "
                 "w < 0 lowers it, |w| = 1 is the plain policy gradient, w = 0 stops the token", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
