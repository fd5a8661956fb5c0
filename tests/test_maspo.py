"""Tests of maspo.py: the math against the MASPO paper's worked numbers and hand-computed values,
SAPO and BAPO against their authors' code (formulas and search written out here), and autograd
checks of every objective's gradient. Expected values are written with the `math` module from the
formulas, never read back from maspo.py. Run: python -m pytest tests/test_maspo.py -q
"""
import dataclasses
import inspect
import math
import re
import subprocess
import sys

import pytest
import torch

import maspo
from maspo import LossConfig, policy_loss

D = torch.float64


def grads(rho, A, p_old, cfg, mask=None, **kw):
    """d loss / d logp for one sequence of tokens with ratios rho, advantages A, old probs p_old."""
    old_logp = torch.tensor(p_old, dtype=D).log()
    logp = (old_logp + torch.tensor(rho, dtype=D).log()).clone().requires_grad_(True)
    mask = torch.ones_like(old_logp) if mask is None else torch.tensor(mask, dtype=D)
    loss, metrics = policy_loss(logp[None], old_logp[None], torch.tensor(A, dtype=D)[None],
                                mask[None], cfg, **kw)
    loss.backward()
    return logp.grad, loss.item(), metrics


def maspo_F(rho, A, p_old, sigma_base=1.0, alpha=0.3, sigma_high=10.0, beta=0.03, lo=0.1, hi=10.0):
    """The paper's gate, written out for one token with the math module."""
    m = min(max(sigma_base / p_old ** alpha, sigma_base), sigma_high)
    if A > 0 and rho > 1:
        sigma = m * min(max(1 + beta * A, lo), hi)
    elif A < 0 and rho < 1:
        sigma = m * min(max(1 / (1 - beta * A), lo), hi)
    else:
        return 1.0
    return math.exp(-(rho - 1) ** 2 / (2 * sigma ** 2))


def close(a, b, tol=1e-9):
    return torch.allclose(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), atol=tol, rtol=tol)


def test_import_without_vllm():
    code = "import sys, maspo; assert 'vllm' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=maspo.__file__.rsplit("/", 1)[0])

# ---------------------------------------------------------------------------------------------
# Config: one clip pair, per-objective defaults, one commented line per field


def test_defaults_table_fills_only_what_is_unset():
    expected = {"maspo": (None, None, "token-mean"), "grpo": (0.2, 0.2, "token-mean"),
                "clip_higher": (0.2, 0.28, "token-mean"), "dac": (0.16, 0.2, "token-mean"),
                "sapo": (None, None, "seq-mean-token-mean"), "bapo": (None, None, "token-mean"),
                "entropy_adv": (0.2, 0.2, "token-mean")}
    assert set(expected) == set(maspo.LOSSES)
    for name, (low, high, agg) in expected.items():
        cfg = maspo.resolve(LossConfig(loss=name))
        assert (cfg.clip_low, cfg.clip_high, cfg.agg) == (low, high, agg), name
    cfg = maspo.resolve(LossConfig(loss="sapo", agg="token-mean", clip_high=0.3))
    assert (cfg.agg, cfg.clip_high) == ("token-mean", 0.3)               # set values win
    assert LossConfig().clip_low is None                                  # resolve returns a copy


def test_one_clip_pair_serves_grpo_clip_higher_and_dac():
    rho, A, q = [1.25, 1.3, 0.75, 0.85], [1.0, 1.0, -1.0, -1.0], [0.5] * 4
    g_ch, _, _ = grads(rho, A, q, LossConfig(loss="clip_higher"))
    g_grpo, _, _ = grads(rho, A, q, LossConfig(loss="grpo", clip_high=0.28))
    assert close(g_ch, g_grpo) and close(g_ch, [-1.25 / 4, 0, 0, 0.85 / 4])
    # DAC reads the same pair as the eps of |(r - 1) r q| <= eps: eps_high 0.28 at q = 0.1 ->
    # r_high = 1/2 + sqrt(1 + 4 * 0.28 / 0.1) / 2 = 2.2096
    r_low, r_high = maspo.dac_bounds(torch.tensor([0.1], dtype=D),
                                     maspo.resolve(LossConfig(loss="dac", clip_low=0.2, clip_high=0.28)))
    assert close(r_high, [0.5 + 0.5 * math.sqrt(1 + 11.2)]) and close(r_low, [0.5])


def test_every_field_has_a_one_line_comment_with_its_default():
    source = inspect.getsource(LossConfig)
    comments = dict(re.findall(r"^\s+(\w+):[^\n#]*#\s*(.*)$", source, re.M))
    fields = [f.name for f in dataclasses.fields(LossConfig)]
    assert len(fields) <= 19 and set(comments) == set(fields)
    assert all("default" in comments[name] for name in fields if name != "loss")

# ---------------------------------------------------------------------------------------------
# group advantages


def test_group_advantages_one_correct_of_eight_and_all_equal():
    R = torch.tensor([0, 0, 1, 0, 0, 0, 0, 0] + [1] * 8 + [0] * 8, dtype=torch.float32)
    A = maspo.group_advantages(R, 8)
    std = math.sqrt((0.875 ** 2 + 7 * 0.125 ** 2) / 7)                   # unbiased: 0.3536
    assert abs(A[2].item() - 2.475) < 1e-3 and abs(A[2].item() - 0.875 / (std + 1e-6)) < 1e-5
    assert torch.allclose(A[[0, 1, 3, 4, 5, 6, 7]], torch.tensor(-0.125 / (std + 1e-6)))
    assert abs(A[0].item() + 0.354) < 1e-3
    assert torch.equal(A[8:], torch.zeros(16))                            # no signal in equal groups


def test_group_advantages_unscaled_and_group_of_one():
    R = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    assert torch.allclose(maspo.group_advantages(R, 4, scale_by_std=False),
                          torch.tensor([0.5, 0.5, -0.5, -0.5, 0.75, -0.25, -0.25, -0.25]))
    assert torch.allclose(maspo.group_advantages(R, 4)[:4], torch.tensor([1, 1, -1, -1]) * 0.5 / math.sqrt(1 / 3))
    one = maspo.group_advantages(torch.tensor([1.0, 0.0, 1.0]), 1)        # mean 0, std 1
    assert torch.allclose(one, torch.tensor([1.0, 0.0, 1.0]) / (1 + 1e-6), atol=0, rtol=1e-7)
    with pytest.raises(ValueError, match="multiple of group_size"):
        maspo.group_advantages(torch.zeros(7), 4)

# ---------------------------------------------------------------------------------------------
# MASPO


def test_worked_numbers_m():
    cfg = LossConfig()
    for p_old, m in ((1.0, 1.0), (0.01, 3.981), (1e-4, 10.0)):          # 1e-4: 15.8 clamped to 10
        *_, metrics = grads([1.0], [1.0], [p_old], cfg)
        assert abs(metrics["m_mean"] - m) < 1e-3
    assert abs(0.01 ** -0.3 - 3.981) < 1e-3 and 1e-4 ** -0.3 > 15.8


def test_worked_numbers_gate_k_pos_k_neg():
    A_pos, A_neg = 2.475, -0.354
    k_pos, k_neg = 1.07425, 1 / 1.01062                                   # the paper: 1.074 and 1/1.0106
    _, _, met = grads([2.0], [A_pos], [1.0], LossConfig())               # m = 1 at p_old = 1
    assert abs(met["gate_mean"] - math.exp(-1 / (2 * k_pos ** 2))) < 1e-4
    _, _, met = grads([0.5], [A_neg], [1.0], LossConfig())
    assert abs(met["gate_mean"] - math.exp(-0.25 / (2 * k_neg ** 2))) < 1e-4
    _, _, met = grads([2.0], [A_pos], [1.0], LossConfig(beta_pos=0.0))   # rho = 2, m = 1: exp(-0.5)
    assert abs(met["gate_mean"] - 0.607) < 1e-3 and met["gate_low_frac"] == 0.0


def test_gradient_per_quadrant_is_minus_A_F_rho_over_N():
    rho = [1.5, 0.7, 0.6, 1.8, 2.5, 0.9]
    A = [2.475, 2.475, -0.354, -0.354, 5.0, -3.0]
    p_old = [0.01, 0.2, 0.5, 0.9, 0.3, 1e-3]
    mask = [1, 1, 1, 1, 1, 0]                                             # last token is padding
    g, loss, met = grads(rho, A, p_old, LossConfig(), mask=mask)
    F = [maspo_F(r, a, q) for r, a, q in zip(rho, A, p_old)]
    assert F[1] == F[3] == 1.0 and F[0] < 1 and F[2] < 1 and F[4] < 0.9  # gated quadrants gated
    expected = [-a * f * r / 5 * w for a, f, r, w in zip(A, F, rho, mask)]
    assert close(g, expected)
    assert abs(loss - sum(expected)) < 1e-12                             # loss value -A F rho / N too
    assert abs(met["gate_mean"] - sum(F[:5]) / 5) < 1e-9


def test_gate_uses_detached_ratio():
    rho, A, q = 2.0, 1.0, 1.0
    g, _, _ = grads([rho], [A], [q], LossConfig())
    F = maspo_F(rho, A, q)
    sigma = 1.0 * (1 + 0.03 * A)
    live = -A * rho * (F + rho * F * -(rho - 1) / sigma ** 2)           # if F were differentiated
    assert close(g, [-A * F * rho]) and abs(g.item() - live) > 0.1


def test_ungated_quadrants_are_plain_policy_gradient():
    rho, A = [0.1, 5.0, 30.0], [2.0, -1.5, -0.5]                          # far past any clip / dual clip
    g, loss, _ = grads(rho, A, [0.5, 0.5, 0.01], LossConfig())
    assert close(g, [-a * r / 3 for a, r in zip(A, rho)])
    assert abs(loss - sum(-a * r / 3 for a, r in zip(A, rho))) < 1e-12


def test_each_clamp_binds():
    # sigma_high: p_old = 1e-6 gives 1e-6^-0.3 = 63 -> m = 10
    _, _, met = grads([3.0], [0.5], [1e-6], LossConfig(beta_pos=0.0))
    assert abs(met["gate_mean"] - math.exp(-4 / (2 * 10.0 ** 2))) < 1e-9 and met["m_mean"] == 10.0
    # adv_high: k_pos = 1 + 0.03 * 1000 = 31 -> 10; adv_low: k_neg = 1 / 31 -> 0.1
    _, _, met = grads([3.0], [1000.0], [1.0], LossConfig())
    assert abs(met["gate_mean"] - math.exp(-4 / (2 * 10.0 ** 2))) < 1e-9
    _, _, met = grads([0.9], [-1000.0], [1.0], LossConfig())
    assert abs(met["gate_mean"] - math.exp(-0.5)) < 1e-9                 # unclamped: exp(-4.8)
    # k_neg, k_pos inside their range are not clamped
    _, _, met = grads([0.9], [-10.0], [1.0], LossConfig())
    assert abs(met["gate_mean"] - math.exp(-0.01 / (2 * (1 / 1.3) ** 2))) < 1e-9


def test_alpha_zero_and_beta_zero_switch_components_off():
    gate = lambda rho, A, q, **kw: grads([rho], [A], [q], LossConfig(**kw))[2]["gate_mean"]  # noqa: E731
    assert gate(3.0, 0.5, 1e-4) > gate(3.0, 0.5, 1.0) + 0.1              # limiter on by default
    assert abs(gate(3.0, 0.5, 1e-4, alpha=0.0) - gate(3.0, 0.5, 1.0, alpha=0.0)) < 1e-12
    assert abs(gate(3.0, 0.5, 1.0, alpha=0.0, beta_pos=0.0) - math.exp(-2)) < 1e-12
    assert gate(2.0, 20.0, 1.0) > gate(2.0, 0.1, 1.0) + 0.05             # controller on by default
    assert abs(gate(2.0, 20.0, 1.0, beta_pos=0.0) - gate(2.0, 0.1, 1.0, beta_pos=0.0)) < 1e-12
    assert abs(gate(0.5, -20.0, 1.0, beta_neg=0.0) - gate(0.5, -0.1, 1.0, beta_neg=0.0)) < 1e-12
    assert gate(0.5, -20.0, 1.0) < gate(0.5, -0.1, 1.0) - 0.05


def test_infinite_sigma_base_is_plain_policy_gradient():
    rho, A, q = [1.7, 0.4, 0.3, 2.9], [1.0, 1.0, -2.0, -2.0], [0.9, 0.1, 0.01, 0.5]
    plain = [-a * r / 4 for a, r in zip(A, rho)]
    g, _, met = grads(rho, A, q, LossConfig(sigma_base=math.inf, sigma_high=math.inf))
    assert close(g, plain) and met["gate_mean"] == 1.0
    g, _, _ = grads(rho, A, q, LossConfig(sigma_base=1e6, sigma_high=1e6))
    assert close(g, plain, 1e-9)
    with pytest.raises(ValueError, match="sigma_base"):
        grads(rho, A, q, LossConfig(sigma_base=20.0))

# ---------------------------------------------------------------------------------------------
# Baselines


def test_grpo_clip_and_dual_clip():
    rho = [1.1, 1.3, 0.9, 0.7, 2.0, 3.5, 0.5]
    A = [1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0]
    live = [1, 0, 1, 0, 1, 0, 1]                                          # clip 0.2, dual clip c = 3
    g, loss, met = grads(rho, A, [0.5] * 7, LossConfig(loss="grpo"))
    assert close(g, [-a * r * k / 7 for a, r, k in zip(A, rho, live)])
    assert abs(met["gate_low_frac"] - 3 / 7) < 1e-12 and abs(met["gate_mean"] - 4 / 7) < 1e-12
    # loss values: clipped tokens hold the bound; the dual-clipped one holds -A c = 3
    values = [-1.1, -1.2, 0.9, 0.8, 2.0, 3.0, -0.5]
    assert abs(loss - sum(values) / 7) < 1e-12
    g, _, _ = grads([1.25, 1.3], [1.0, 1.0], [0.5, 0.5], LossConfig(loss="clip_higher"))  # 1 + 0.28
    assert close(g, [-1.25 / 2, 0.0])


def test_dac_bounds_match_the_table_and_cut_the_gradient():
    cfg = LossConfig(loss="dac")
    r_low, r_high = maspo.dac_bounds(torch.tensor([0.9, 0.1, 0.01, 1e-4], dtype=D), maspo.resolve(cfg))
    assert close(r_low[:3], [0.769, 0.5, 0.5], 1e-3) and close(r_high[:3], [1.187, 2.0, 5.0], 1e-3)
    assert r_high[3].item() == 10.0                                       # 45.2 capped at r_max
    g, _, _ = grads([1.9, 2.1, 0.8, 0.75, 4.9, 5.1], [1, 1, -1, -1, 1, 1],
                    [0.1, 0.1, 0.9, 0.9, 0.01, 0.01], cfg)
    assert close(g, [x / 6 for x in (-1.9, 0.0, 0.8, 0.0, -4.9, 0.0)])


@pytest.mark.parametrize("A", [1.3, -0.7])
def test_sapo_gradient_weight_is_sech2_times_rho(A):
    rho = [0.3, 0.9, 1.0, 1.6, 3.0]
    tau = 1.0 if A > 0 else 1.05
    g, _, met = grads(rho, [A] * 5, [0.5] * 5, LossConfig(loss="sapo"))
    sech2 = [1 / math.cosh(tau * (r - 1) / 2) ** 2 for r in rho]
    assert close(g, [-A * s * r / 5 for s, r in zip(sech2, rho)])
    assert abs(met["gate_mean"] - sum(sech2) / 5) < 1e-12


def test_sapo_aggregates_seq_mean_token_mean_like_verl():
    """verl's SAPO: loss = mean over sequences of the token-mean of -A (4 / tau) sigmoid(tau (r - 1)),
    tau = 1 where A > 0, 1.05 otherwise; d/dlogp = -A * 4 s (1 - s) * r / (L_i * S)."""
    rho = [[0.5, 1.3, 2.0], [0.9, 1.0, 1.0]]
    A, mask = [0.8, -1.2], [[1, 1, 1], [1, 0, 0]]                          # lengths L = 3 and 1, S = 2
    sig = lambda x: 1 / (1 + math.exp(-x))                                # noqa: E731
    tau = [1.0, 1.05]
    value = [[-A[i] * (4 / tau[i]) * sig(tau[i] * (r - 1)) for r in rho[i]] for i in range(2)]
    expected = (sum(value[0]) / 3 + value[1][0] / 1) / 2
    grad = [[-A[i] * 4 * sig(tau[i] * (r - 1)) * (1 - sig(tau[i] * (r - 1))) * r * m / (sum(mask[i]) * 2)
             for r, m in zip(rho[i], mask[i])] for i in range(2)]
    old = torch.full((2, 3), 0.5, dtype=D).log()
    logp = (old + torch.tensor(rho, dtype=D).log()).requires_grad_(True)
    loss, _ = policy_loss(logp, old, torch.tensor(A, dtype=D), torch.tensor(mask, dtype=D),
                          LossConfig(loss="sapo"))
    loss.backward()
    assert abs(loss.item() - expected) < 1e-12 and close(logp.grad, grad, 1e-12)
    token_mean = (sum(value[0]) + value[1][0]) / 4                       # what token-mean would give
    assert abs(expected - token_mean) > 0.1
    loss, _ = policy_loss(logp, old, torch.tensor(A, dtype=D), torch.tensor(mask, dtype=D),
                          LossConfig(loss="sapo", agg="token-mean"))
    assert abs(loss.item() - token_mean) < 1e-12                          # agg, when set, overrides


def official_bapo(rho, A, mask, rho_0=0.5):
    """WooooDyy/BAPO recipe/bapo/policy_loss.py's search, transcribed with python floats: clipped
    values min(r, c_high) where A >= 0, max(r, c_low) where A < 0; c_low first, then c_high; target
    positive / (negative + 1e-8); start, step, maximum (0.6, 0.05, 0.9) and (1.2, 0.05, 3.0)."""
    def pos_neg(lo, hi):
        x = [a * (min(r, hi) if a >= 0 else max(r, lo)) * m for r, a, m in zip(rho, A, mask)]
        pos, neg = sum(v for v in x if v > 0), sum(-v for v in x if v < 0)
        return math.inf if neg <= 0 else pos / (neg + 1e-8)
    lo, hi = 0.6, 1.2
    value = pos_neg(lo, hi)
    while value < rho_0 and lo < 0.9:
        lo = min(lo + 0.05, 0.9)
        value = pos_neg(lo, hi)
    while value < rho_0 and hi < 3.0:
        hi = min(hi + 0.05, 3.0)
        value = pos_neg(lo, hi)
    return lo, hi


def bapo_inputs(rho, A, mask=None):
    old = torch.full((1, len(rho)), 0.5, dtype=D).log()
    logp = (old + torch.tensor([rho], dtype=D).log()).requires_grad_(True)
    mask = torch.ones_like(old) if mask is None else torch.tensor([mask], dtype=D)
    return logp, old, torch.tensor([A], dtype=D), mask


def test_bapo_search_by_hand():
    """One positive token at r = 2 and negatives at 0.7, 0.8, 1.02 (all |A| = 1, rho_0 = 0.5).
    Start (0.6, 1.2): pos = min(2, 1.2) = 1.2, neg = 0.7 + 0.8 + 1.02 = 2.52, 1.2 / 2.52 = 0.476 < 0.5.
    c_low 0.65 .. 0.9 only adds to neg (0.9 + 0.9 + 1.02 = 2.82); then c_high: 1.4 / 2.82 = 0.496,
    1.45 / 2.82 = 0.514 -> (0.9, 1.45). Each departure picks elsewhere: clipped tokens counted 0 ->
    (0.9, 2.0); c_high first -> (0.6, 1.3) (1.3 / 2.52 = 0.516); a positive share >= 0.5 -> (0.9, 3.0)."""
    rho, A = [2.0, 0.7, 0.8, 1.02], [1.0, -1.0, -1.0, -1.0]
    logp, old, adv, mask = bapo_inputs(rho, A)
    stats = maspo.bapo_stats(logp, old, adv, mask)
    path = maspo.bapo_path().tolist()
    assert path[0] == [0.6, 1.2] and path[6] == [0.9, 1.2] and path[7] == [0.9, 1.25] and path[-1] == [0.9, 3.0]
    assert close(stats[0], [1.2, 2.52], 1e-12) and close(stats[path.index([0.9, 1.45])], [1.45, 2.82], 1e-12)
    assert close(stats[6], [1.2, 2.82], 1e-12)                           # c_low 0.9: the 0.7, 0.8 count 0.9
    assert close(maspo.bapo_pick(stats), [0.9, 1.45], 1e-12)
    assert official_bapo(rho, A, [1] * 4) == pytest.approx((0.9, 1.45))
    loss, met = policy_loss(logp, old, adv, mask, LossConfig(loss="bapo"))  # no bounds: searched locally
    loss.backward()
    assert (met["bapo_c_low"], met["bapo_c_high"]) == pytest.approx((0.9, 1.45))
    # r = 2 > 1.45 (A > 0), 0.7 and 0.8 < 0.9 (A < 0): clipped; only r = 1.02 keeps its gradient
    assert close(logp.grad, [[0, 0, 0, 1.02 / 4]], 1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_bapo_pick_equals_the_authors_search(seed, monkeypatch):
    g = torch.Generator().manual_seed(seed)
    n = 40
    rho = (0.3 + 3.2 * torch.rand(n, generator=g, dtype=D)).tolist()
    A = (torch.randn(n, generator=g, dtype=D) + 0.4 * (seed % 3 - 1)).tolist()
    mask = (torch.rand(n, generator=g) > 0.2).to(D).tolist()
    logp, old, adv, m = bapo_inputs(rho, A, mask)
    for rho_0 in (0.5, 1.0, 2.0):
        monkeypatch.setattr(maspo, "BAPO_RHO_0", rho_0)
        bounds = maspo.bapo_pick(maspo.bapo_stats(logp, old, adv, m))
        assert tuple(bounds.tolist()) == pytest.approx(official_bapo(rho, A, mask, rho_0), abs=1e-9)


def test_bapo_statistics_summed_over_ranks_pick_one_pair_for_all():
    """The tokens of test_bapo_search_by_hand split over two ranks: rank 0 alone would keep the
    start (1.2 / 0.7 >= 0.5), rank 1 alone (no positive) the widest pair; the summed statistics
    give the whole batch's (0.9, 1.45), which both ranks then use."""
    rank0, rank1 = bapo_inputs([2.0, 0.7], [1.0, -1.0]), bapo_inputs([0.8, 1.02], [-1.0, -1.0])
    cfg = LossConfig(loss="bapo")
    s0, s1 = maspo.bapo_stats(*rank0), maspo.bapo_stats(*rank1)
    assert s0.shape == s1.shape == (len(maspo.bapo_path()), 2) and s0.dtype == D
    assert close(maspo.bapo_pick(s0), [0.6, 1.2]) and close(maspo.bapo_pick(s1), [0.9, 3.0])
    bounds = maspo.bapo_pick(s0 + s1)                                     # all_reduce(SUM), then pick
    assert close(bounds, [0.9, 1.45], 1e-12)
    grads_by_rank = []
    for logp, old, adv, mask in (rank0, rank1):
        loss, met = policy_loss(logp, old, adv, mask, cfg, bapo_bounds=bounds, num_tokens=4)
        loss.backward()
        assert (met["bapo_c_low"], met["bapo_c_high"]) == pytest.approx((0.9, 1.45))
        grads_by_rank.append(logp.grad[0].tolist())
    assert grads_by_rank == [[0.0, 0.0], [0.0, pytest.approx(1.02 / 4)]]
    with pytest.raises(ValueError, match="bapo_bounds"):
        policy_loss(*rank0, LossConfig(loss="grpo"), bapo_bounds=bounds)


def test_entropy_advantage_shaping_then_grpo():
    A, H = [2.0, 2.0, -1.0, 0.0], [1.0, 10.0, 1.0, 5.0]
    shaped = [2.4, 3.0, -0.6, 0.0]                                        # A + min(0.4 H, |A| / 2)
    cfg = LossConfig(loss="entropy_adv")
    Ht = torch.tensor([H], dtype=D, requires_grad=True)
    A_shaped = maspo.entropy_advantage(torch.tensor([A], dtype=D), Ht, cfg)
    assert close(A_shaped, [shaped], 1e-12) and not A_shaped.requires_grad  # sg(H)
    g, _, _ = grads([1.0] * 4, A_shaped[0].tolist(), [0.5] * 4, cfg)
    assert close(g, [-a / 4 for a in shaped])
    H2 = torch.tensor([[1.0, 10.0], [1.0, 0.5]], dtype=D)
    per_seq = maspo.entropy_advantage(torch.tensor([2.0, -1.0], dtype=D), H2, cfg)
    assert close(per_seq, [[2.4, 3.0], [-0.6, -0.8]], 1e-12)             # A [B] broadcast over tokens


@pytest.mark.parametrize("kappa", [1.01, 2.0, 5.0])
def test_entropy_advantage_never_flips_the_sign_and_is_zero_at_zero(kappa):
    torch.manual_seed(9)
    A = torch.randn(64, 16, dtype=D) * torch.tensor([0.0, 1e-3, 1.0, 30.0], dtype=D).repeat(16)[:64, None]
    H = 50 * torch.rand(64, 16, dtype=D)                                  # large entropies: the cap binds
    cfg = LossConfig(loss="entropy_adv", ent_adv_a=3.0, ent_adv_kappa=kappa)
    A_shaped = maspo.entropy_advantage(A, H, cfg)
    assert (A_shaped[A == 0] == 0).all() and (A == 0).sum() == 16 * 16
    assert (torch.sign(A_shaped) == torch.sign(A)).all()
    assert (A_shaped[A < 0] <= A[A < 0] * (1 - 1 / kappa) * (1 - 1e-12)).all()  # at most |A| / kappa closer to 0
    with pytest.raises(ValueError, match="kappa"):
        maspo.entropy_advantage(A, H, LossConfig(ent_adv_kappa=1.0))      # A + |A| = 0 would cancel A < 0


@pytest.mark.parametrize("name", sorted(maspo.LOSSES))
def test_every_objective_is_plain_policy_gradient_on_policy(name):
    A = [1.5, -0.5, 0.8]
    g, _, met = grads([1.0] * 3, A, [0.3, 0.05, 0.9], LossConfig(loss=name))
    assert close(g, [-a / 3 for a in A]) and met["gate_mean"] == 1.0
    assert {"gate_mean", "gate_low_frac", "approx_kl", "ratio_min", "ratio_max", "ratio_dev_mean",
            "ratio_dev_frac", "m_mean"} <= set(met) and all(isinstance(v, float) for v in met.values())


def test_unknown_names_and_bad_shapes():
    with pytest.raises(ValueError, match="maspo"):
        grads([1.0], [1.0], [0.5], LossConfig(loss="ppo"))
    with pytest.raises(ValueError, match="token-mean"):
        grads([1.0], [1.0], [0.5], LossConfig(agg="mean"))
    with pytest.raises(ValueError, match=r"adv must be \[B\] or \[B, T\]"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3), LossConfig())

# ---------------------------------------------------------------------------------------------
# Aggregation, micro-batches, KL, metrics


def test_aggregation_modes_on_a_ragged_mask():
    per_token = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 100.0, 100.0]]          # padding holds garbage
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=D)
    expected = {"token-mean": 21 / 6, "seq-mean-token-mean": (10 / 4 + 11 / 2) / 2,
                "seq-mean-token-sum-norm": 21 / (2 * 4)}
    for agg, value in expected.items():
        # GRPO at rho = 1 has loss_t = -A: per-token advantages give these per-token losses
        logp = torch.zeros(2, 4, dtype=D)
        loss, _ = policy_loss(logp, logp, -torch.tensor(per_token, dtype=D), mask,
                              LossConfig(loss="grpo", agg=agg))
        assert abs(loss.item() - value) < 1e-12, agg
    loss, _ = policy_loss(logp, logp, -torch.tensor(per_token, dtype=D), mask,
                          LossConfig(loss="grpo", agg="seq-mean-token-sum-norm"), norm_len=8)
    assert abs(loss.item() - 21 / 16) < 1e-12


@pytest.mark.parametrize("agg", maspo.AGG_MODES)
def test_micro_batches_with_global_counts_equal_one_batch(agg):
    torch.manual_seed(3)
    lens = [5, 2, 7, 3]
    seqs = [torch.randn(n, dtype=D).requires_grad_(True) for n in lens]   # log pi_theta per sequence
    olds = [s.detach() + 0.3 * torch.randn(n, dtype=D) for s, n in zip(seqs, lens)]
    refs = [s.detach() - 0.5 * torch.randn(n, dtype=D) for s, n in zip(seqs, lens)]  # pi_ref for the k3 KL
    adv = torch.tensor([1.2, -0.4, 0.7, -1.1], dtype=D)
    cfg = LossConfig(agg=agg, kl_coef=0.2)  # the KL term is normalised like the policy loss

    def pad(xs):                                                          # pad to this batch's own T
        T = max(len(x) for x in xs)
        out = torch.stack([torch.cat([x, x.new_zeros(T - len(x))]) for x in xs])
        mask = torch.stack([torch.arange(T) < len(x) for x in xs]).to(D)
        return out, mask

    def grad_of(parts, **kw):
        for s in seqs:
            s.grad = None
        for idx in parts:
            logp, mask = pad([seqs[i] for i in idx])
            old, _ = pad([olds[i] for i in idx])
            ref, _ = pad([refs[i] for i in idx])
            policy_loss(logp, old, adv[idx], mask, cfg, ref_logp=ref, **kw)[0].backward()
        return [s.grad.clone() for s in seqs]

    whole = grad_of([[0, 1, 2, 3]], norm_len=10)
    split = grad_of([[0, 1], [2, 3]], num_tokens=sum(lens), num_seqs=4, norm_len=10)
    assert all(close(a, b, 1e-12) for a, b in zip(whole, split))
    local = grad_of([[0, 1], [2, 3]], norm_len=10)                        # local counts differ
    assert agg == "seq-mean-token-sum-norm" or not all(close(a, b, 1e-6) for a, b in zip(whole, local))


def test_k3_kl_to_reference():
    logp = torch.zeros(1, 1, dtype=D, requires_grad=True)
    ref = torch.full((1, 1), 0.5, dtype=D)
    cfg = LossConfig(kl_coef=0.1)
    loss, met = policy_loss(logp, logp.detach(), torch.zeros(1, dtype=D), torch.ones(1, 1, dtype=D),
                            cfg, ref_logp=ref)
    loss.backward()
    k3 = math.exp(0.5) - 0.5 - 1                                          # e^d - d - 1, d = ref - logp
    assert abs(loss.item() - 0.1 * k3) < 1e-12 and abs(met["kl_ref"] - k3) < 1e-12
    assert abs(logp.grad.item() - 0.1 * (1 - math.exp(0.5))) < 1e-12
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 1), cfg)


def test_log_ratio_clamp_caps_rho_and_cuts_the_gradient():
    """log rho = +-25 is clamped to +-20: the loss holds -A e^(+-20) and the token gets no gradient
    (MASPO leaves A < 0, rho > 1 and A > 0, rho < 1 ungated, so only the clamp can cut it)."""
    logp = torch.tensor([[25.0, -25.0, 0.3]], dtype=D).requires_grad_(True)
    old = torch.zeros(1, 3, dtype=D)
    A = torch.tensor([[-1.0, 2.0, -0.5]], dtype=D)
    loss, met = policy_loss(logp, old, A, torch.ones(1, 3, dtype=D), LossConfig())
    loss.backward()
    expected = (math.exp(20) - 2 * math.exp(-20) + 0.5 * math.exp(0.3)) / 3
    assert abs(loss.item() - expected) < 1e-9 * expected
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[0, 1].item() == 0.0
    assert abs(logp.grad[0, 2].item() - 0.5 * math.exp(0.3) / 3) < 1e-12   # -A rho / N
    assert met["ratio_max"] == pytest.approx(math.exp(20)) and met["ratio_min"] == pytest.approx(math.exp(-20))


def test_kl_clamp_caps_k3_at_10_and_cuts_its_gradient():
    """d = log pi_ref - log pi_theta: d = 3 gives k3 = e^3 - 4 = 16.09 -> 10, no gradient; d = 2
    gives 3.389 and gradient kl_coef (1 - e^2) / N; d = 30 is clamped to 20 first, then capped."""
    logp = torch.zeros(1, 3, dtype=D, requires_grad=True)
    ref = torch.tensor([[3.0, 2.0, 30.0]], dtype=D)
    loss, met = policy_loss(logp, logp.detach(), torch.zeros(1, dtype=D), torch.ones(1, 3, dtype=D),
                            LossConfig(kl_coef=0.5), ref_logp=ref)
    loss.backward()
    k3 = [10.0, math.exp(2) - 3, 10.0]
    assert math.exp(3) - 4 > 10 and abs(met["kl_ref"] - sum(k3) / 3) < 1e-12
    assert abs(loss.item() - 0.5 * sum(k3) / 3) < 1e-12
    assert close(logp.grad, [[0.0, 0.5 * (1 - math.exp(2)) / 3, 0.0]], 1e-12)
    # |d| far past 20 (exp(800) overflows): still capped, still finite, still no gradient
    logp = torch.zeros(1, 2, dtype=D, requires_grad=True)
    loss, met = policy_loss(logp, logp.detach(), torch.zeros(1, dtype=D), torch.ones(1, 2, dtype=D),
                            LossConfig(kl_coef=0.5), ref_logp=torch.tensor([[800.0, -800.0]], dtype=D))
    loss.backward()
    assert met["kl_ref"] == 10.0 and loss.item() == 5.0 and torch.equal(logp.grad, torch.zeros(1, 2, dtype=D))


def test_metrics_over_response_tokens_only():
    rho = [1.5, 0.5, 1.1, 50.0, 0.01]                                     # the last two are padding
    g, _, met = grads(rho, [1.0, 1.0, -1.0, 1.0, 1.0], [0.5] * 5, LossConfig(loss="grpo"), mask=[1, 1, 1, 0, 0])
    live = rho[:3]
    assert met["ratio_min"] == pytest.approx(0.5) and met["ratio_max"] == pytest.approx(1.5)
    assert met["approx_kl"] == pytest.approx(sum(r - 1 - math.log(r) for r in live) / 3)
    assert met["ratio_dev_mean"] == pytest.approx((0.5 + 0.5 + 0.1) / 3)
    assert met["ratio_dev_frac"] == pytest.approx(2 / 3) and met["gate_low_frac"] == pytest.approx(1 / 3)
    assert met["m_mean"] == 0.0 and g[3].item() == g[4].item() == 0.0

# ---------------------------------------------------------------------------------------------
# Edge cases: A = 0, bounds hit exactly, clamps from their other side, settings, empty masks, dtypes


def test_group_advantages_accept_integer_rewards_and_refuse_bad_shapes():
    ints = maspo.group_advantages(torch.tensor([1, 0, 0, 1, 1, 1, 1, 0]), 4)   # int64 rewards: no truncation
    assert ints.dtype == torch.float32
    assert torch.allclose(ints, maspo.group_advantages(torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 0]), 4))
    assert abs(ints[0].item() - 0.5 / (math.sqrt(1 / 3) + 1e-6)) < 1e-6
    with pytest.raises(ValueError, match="1-D"):
        maspo.group_advantages(torch.zeros(2, 4), 4)                      # [prompts, G] is not accepted
    with pytest.raises(ValueError, match="group_size=0"):
        maspo.group_advantages(torch.zeros(4), 0)


def test_set_clip_bounds_override_the_objective_defaults():
    """clip_low / clip_high set by the user reach the loss (resolve fills only what is None)."""
    rho, A = [0.75, 1.25], [-1.0, 1.0]
    g, _, _ = grads(rho, A, [0.5, 0.5], LossConfig(loss="grpo"))         # 0.75 < 0.8 and 1.25 > 1.2: both cut
    assert close(g, [0.0, 0.0])
    g, _, _ = grads(rho, A, [0.5, 0.5], LossConfig(loss="grpo", clip_low=0.3, clip_high=0.3))
    assert close(g, [0.75 / 2, -1.25 / 2])


def test_clamps_bind_from_their_other_side():
    """m >= sigma_base binds for alpha < 0 (p_old^-alpha < 1); k_pos >= adv_low binds for adv_low > 1;
    k_neg <= adv_high binds for adv_high < 1 (k_neg = 1 / (1 + beta |A|) < 1)."""
    *_, met = grads([2.0], [1.0], [0.01], LossConfig(alpha=-0.5, sigma_base=2.0))
    assert met["m_mean"] == 2.0                                           # unclamped: 2 * 0.01^0.5 = 0.2
    assert abs(met["gate_mean"] - math.exp(-1 / (2 * (2 * 1.03) ** 2))) < 1e-12
    *_, met = grads([2.0], [1.0], [1.0], LossConfig(adv_low=1.5))        # k_pos = max(1.03, 1.5)
    assert abs(met["gate_mean"] - math.exp(-1 / (2 * 1.5 ** 2))) < 1e-12
    *_, met = grads([0.5], [-1.0], [1.0], LossConfig(adv_low=0.1, adv_high=0.5))  # k_neg = min(1 / 1.03, 0.5)
    assert abs(met["gate_mean"] - math.exp(-0.25 / (2 * 0.5 ** 2))) < 1e-12


@pytest.mark.parametrize("name", sorted(maspo.LOSSES))
def test_zero_advantage_tokens_get_no_gradient_and_no_gate(name):
    """A = 0 (a group with equal rewards): no gradient at any ratio, and the gate metric reads
    "ungated" (F = 1; SAPO: sech^2(tau (rho - 1) / 2) with tau_neg, its tau for A <= 0). BAPO with
    no signal at all keeps its starting bounds (no negative contribution counts as reached)."""
    rho = [0.3, 0.7, 1.0, 1.5, 4.0]
    g, loss, met = grads(rho, [0.0] * 5, [0.5, 0.01, 0.9, 0.5, 0.2], LossConfig(loss=name))
    assert close(g, [0.0] * 5) and loss == 0.0
    F = [1 / math.cosh(1.05 * (r - 1) / 2) ** 2 for r in rho] if name == "sapo" else [1.0] * 5
    assert abs(met["gate_mean"] - sum(F) / 5) < 1e-12
    assert met["gate_low_frac"] == pytest.approx(sum(f < 0.5 for f in F) / 5)
    if name == "bapo":
        assert (met["bapo_c_low"], met["bapo_c_high"]) == pytest.approx((0.6, 1.2))


@pytest.mark.parametrize("name", ["grpo", "clip_higher", "dac", "bapo"])
def test_clip_gate_is_one_exactly_where_the_gradient_survives(name):
    """F of the clip objectives is the indicator "this token's gradient survives", checked against
    autograd, with ratios exactly on the bounds (a bound itself keeps its gradient: torch.clamp and
    the min are inclusive) and small |A| on both sides of 1."""
    cfg = maspo.resolve(LossConfig(loss=name))
    lo, hi = (0.8, 1.2) if name != "clip_higher" else (0.8, 1.28)
    rho = torch.tensor([0.5, lo, 0.9, 1.0, hi, 2.0, 3.0, 3.5] * 4, dtype=D, requires_grad=True)
    A = torch.tensor([a for a in (-2.0, -0.5, 0.5, 2.0) for _ in range(8)], dtype=D)
    p_old, mask = torch.full_like(A, 0.5), torch.ones_like(A)
    kw = {"bounds": torch.tensor([lo, hi], dtype=D)} if name == "bapo" else {}
    loss_t, F, _ = maspo.LOSSES[name](rho, A, p_old, mask, cfg, **kw)
    loss_t.sum().backward()
    assert torch.equal(F, (rho.grad != 0).to(D))
    if name == "grpo":  # the bounds and c themselves keep their gradient
        assert F[8:16].tolist() == [0, 1, 1, 1, 1, 1, 1, 0] and F[16:24].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]


def test_dual_clip_must_exceed_one_and_binds_where_set():
    with pytest.raises(ValueError, match="clip_c"):
        grads([1.0], [-1.0], [0.5], LossConfig(loss="grpo", clip_c=1.0))
    g, _, _ = grads([1.4, 1.6], [-1.0, -1.0], [0.5, 0.5], LossConfig(loss="grpo", clip_c=1.5))
    assert close(g, [1.4 / 2, 0.0])                                      # rho > c = 1.5: dual-clipped


def test_dac_metrics_are_the_mean_bounds_over_response_tokens():
    q = [0.9, 0.1, 0.01]
    *_, met = grads([1.0] * 4, [1.0] * 4, q + [1e-4], LossConfig(loss="dac"), mask=[1, 1, 1, 0])  # last: padding
    r_low = [0.5 + 0.5 * math.sqrt(max(1 - 4 * 0.16 / x, 0)) for x in q]
    r_high = [min(0.5 + 0.5 * math.sqrt(1 + 4 * 0.2 / x), 10.0) for x in q]
    assert abs(met["dac_r_low_mean"] - sum(r_low) / 3) < 1e-12
    assert abs(met["dac_r_high_mean"] - sum(r_high) / 3) < 1e-12


def test_bapo_path_is_the_authors_grid():
    """c_low from a^- = 0.6 to b^- = 0.9 in steps of 0.05 at c_high = a^+ = 1.2, then c_high from
    1.25 to b^+ = 3.0 in steps of 0.05 at c_low = 0.9: 7 + 36 candidates, each once."""
    expected = [(round(0.6 + 0.05 * k, 9), 1.2) for k in range(7)] + [(0.9, round(1.2 + 0.05 * k, 9)) for k in range(1, 37)]
    assert maspo.bapo_path().tolist() == [list(x) for x in expected]


def test_bapo_stats_take_per_sequence_or_per_token_advantages():
    rho = [[2.0, 0.7, 0.8], [1.02, 1.5, 0.4]]
    old = torch.full((2, 3), 0.5, dtype=D).log()
    logp, mask = old + torch.tensor(rho, dtype=D).log(), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=D)
    adv = torch.tensor([1.0, -0.5], dtype=D)
    per_seq = maspo.bapo_stats(logp, old, adv, mask)
    assert torch.allclose(per_seq, maspo.bapo_stats(logp, old, adv[:, None].expand(2, 3), mask), atol=1e-12)
    assert close(per_seq[0], [1.2 + 0.7, 0.5 * (1.02 + 1.5 + 0.6)], 1e-12)  # at (0.6, 1.2)


def test_bapo_pick_is_scale_free_and_follows_the_authors_threshold():
    """The pick compares positive / (negative + 1e-8) with rho_0: it does not depend on the scale of
    A (down to the 1e-8), and as in the authors' loop (`while value < rho_0`) a value of exactly
    rho_0 counts as reached, one just below it (the + 1e-8) does not."""
    rho, A = [2.0, 0.7, 0.8, 1.02], [1.0, -1.0, -1.0, -1.0]
    for scale in (1e-3, 1.0, 1e3):
        bounds = maspo.bapo_pick(maspo.bapo_stats(*bapo_inputs(rho, [a * scale for a in A])))
        assert close(bounds, [0.9, 1.45], 1e-12), scale
    for A in ([0.5, -1.0], [0.5, -(1 - 1e-8)]):                           # 0.5 / (1 + 1e-8) < 0.5; 0.5 / 1 = 0.5
        bounds = maspo.bapo_pick(maspo.bapo_stats(*bapo_inputs([1.0, 1.0], A)))
        assert tuple(bounds.tolist()) == pytest.approx(official_bapo([1.0, 1.0], A, [1, 1]))
    assert official_bapo([1.0, 1.0], [0.5, -1.0], [1, 1]) == pytest.approx((0.9, 3.0))
    assert official_bapo([1.0, 1.0], [0.5, -(1 - 1e-8)], [1, 1]) == pytest.approx((0.6, 1.2))


def test_input_errors_name_what_is_wrong():
    z = torch.zeros(2, 3)
    for logp, old, mask in ((z, torch.zeros(2, 4), z), (z, z, torch.ones(3, 3)), (torch.zeros(3), torch.zeros(3), torch.ones(3))):
        with pytest.raises(ValueError, match=r"must all be \[B, T\]; got"):
            policy_loss(logp, old, torch.zeros(logp.shape[0]), mask, LossConfig())
    with pytest.raises(ValueError, match="unknown agg 'mean'"):
        maspo.aggregate(z, torch.ones(2, 3), "mean")
    for name in ("num_tokens", "num_seqs"):
        with pytest.raises(ValueError, match=f"{name} must be > 0"):
            policy_loss(z, z, torch.zeros(2), torch.ones(2, 3), LossConfig(), **{name: 0})
    # a rank's share of the global count may be fractional (1 token over 2 ranks: 0.5)
    loss, _ = policy_loss(z, z, torch.ones(2), torch.ones(2, 3), LossConfig(loss="grpo"), num_tokens=0.5)
    assert loss.item() == pytest.approx(-6 / 0.5)


def test_no_response_tokens_give_zero_loss_and_neutral_metrics():
    """A micro-batch whose mask is all 0 (an empty or fully truncated share): loss 0, no gradient, the
    ratio metrics neutral (1.0), and BAPO's bounds reported as given."""
    logp = torch.tensor([[0.3, -0.2]], dtype=D, requires_grad=True)
    bounds = torch.tensor([0.75, 1.6], dtype=D)
    loss, met = policy_loss(logp, torch.zeros(1, 2, dtype=D), torch.ones(1, dtype=D), torch.zeros(1, 2, dtype=D),
                            LossConfig(loss="bapo"), bapo_bounds=bounds)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(1, 2, dtype=D))
    assert met["ratio_min"] == met["ratio_max"] == 1.0 and met["gate_mean"] == 0.0
    assert (met["bapo_c_low"], met["bapo_c_high"]) == (0.75, 1.6)


def test_float32_log_probs_with_float64_advantages_and_mask():
    """The trainer's dtypes: float32 log-probs; advantages, mask and BAPO's bounds may come as
    float64. The loss stays in the log-probs' dtype and equals the float64 computation."""
    torch.manual_seed(11)
    logp64, old64 = torch.randn(3, 5, dtype=D), torch.randn(3, 5, dtype=D)
    adv, mask = torch.tensor([1.3, -0.6, 0.2], dtype=D), (torch.rand(3, 5) > 0.3).to(D)
    for name in ("maspo", "bapo"):
        kw = {"bapo_bounds": torch.tensor([0.8, 1.3], dtype=D)} if name == "bapo" else {}
        loss32, _ = policy_loss(logp64.float(), old64.float(), adv, mask, LossConfig(loss=name), **kw)
        loss64, _ = policy_loss(logp64.float().double(), old64.float().double(), adv.float().double(), mask,
                                LossConfig(loss=name), **kw)
        assert loss32.dtype == torch.float32 and abs(loss32.item() - loss64.item()) < 1e-5, name
