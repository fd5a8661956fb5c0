"""Tests of maspo.py: the math against PAPER.md's worked numbers and hand-computed values, and
autograd checks of every objective's gradient. Expected values are written from the paper's
formulas with the `math` module, never read back from maspo.py. Run: python -m pytest tests/test_maspo.py -q
"""
import math
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
    """PAPER.md's gate, written out for one token with the math module."""
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
# token_logprobs / entropy


def naive_logp(x, ids):
    return torch.log_softmax(x.float() if x.dtype != D else x, -1).gather(-1, ids[..., None]).squeeze(-1)


def naive_entropy(x):
    lp = torch.log_softmax(x.float() if x.dtype != D else x, -1)
    return -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("chunk", [1, 5, 16, 23, 64, 1000])
def test_token_logprobs_and_entropy_equal_naive(chunk):
    torch.manual_seed(0)
    x = 3 * torch.randn(3, 24, 50)
    x = torch.cat([x, x[:, :1]], 1)[:, 1:]  # non-contiguous view, like logits[:, :-1]
    ids = torch.randint(0, 50, (3, 24))
    assert (maspo.token_logprobs(x, ids, chunk) - naive_logp(x, ids)).abs().max() < 1e-5
    assert (maspo.entropy(x, chunk) - naive_entropy(x)).abs().max() < 1e-5


def test_bf16_logits_computed_in_float32():
    torch.manual_seed(1)
    x = (4 * torch.randn(2, 9, 300)).bfloat16()
    ids = torch.randint(0, 300, (2, 9))
    out = maspo.token_logprobs(x, ids, chunk_size=4)
    assert out.dtype == torch.float32
    assert (out - naive_logp(x, ids)).abs().max() < 1e-5  # bf16 log_softmax would be off by ~1e-2
    assert (maspo.entropy(x, 4) - naive_entropy(x)).abs().max() < 1e-5
    x.requires_grad_(True)
    w = torch.randn(2, 9)
    g1, = torch.autograd.grad((maspo.token_logprobs(x, ids, 4) * w).sum(), x)
    g2, = torch.autograd.grad((naive_logp(x, ids) * w).sum(), x)
    assert g1.dtype == torch.bfloat16 and torch.allclose(g1.float(), g2.float(), rtol=8e-3, atol=1e-6)


@pytest.mark.parametrize("chunk", [3, 7, 100])
def test_gradients_equal_naive(chunk):
    torch.manual_seed(2)
    x = torch.randn(2, 7, 11, dtype=D, requires_grad=True)
    ids = torch.randint(0, 11, (2, 7))
    w = torch.randn(2, 7, dtype=D)
    for ours, ref in ((lambda: maspo.token_logprobs(x, ids, chunk), lambda: naive_logp(x, ids)),
                      (lambda: maspo.entropy(x, chunk), lambda: naive_entropy(x))):
        g1, = torch.autograd.grad((ours() * w).sum(), x)
        g2, = torch.autograd.grad((ref() * w).sum(), x)
        assert close(g1, g2, 1e-12)


def test_gradcheck():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 5, dtype=D, requires_grad=True)
    ids = torch.randint(0, 5, (2, 3))
    assert torch.autograd.gradcheck(lambda t: maspo.token_logprobs(t, ids, 2), (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda t: maspo.entropy(t, 2), (x,), fast_mode=True)


def test_logits_shape_errors():
    with pytest.raises(ValueError, match="ids"):
        maspo.token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        maspo.entropy(torch.zeros(3, 5))

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
    k_pos, k_neg = 1.07425, 1 / 1.01062                                   # PAPER.md: 1.074 and 1/1.0106
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
    r_low, r_high = maspo.dac_bounds(torch.tensor([0.9, 0.1, 0.01, 1e-4], dtype=D), cfg)
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


def test_bapo_bound_search():
    cfg = LossConfig(loss="bapo")
    # positive token rho 1.52 needs c_high >= 1.55 (k = 7); negatives at 0.7 are cut from k = 6
    rho, A = [1.52, 0.7, 0.7, 0.7, 1.0], [1.0, -1.0, -1.0, -1.0, -1.0]
    g, _, met = grads(rho, A, [0.5] * 5, cfg)
    assert abs(met["bapo_c_low"] - 0.74) < 1e-9 and abs(met["bapo_c_high"] - 1.55) < 1e-9
    assert close(g, [-1.52 / 5, 0, 0, 0, 1.0 / 5])
    _, _, met = grads([1.0, 1.0], [1.0, -1.0], [0.5, 0.5], cfg)          # share 0.5 >= 0.4 at once
    assert (met["bapo_c_low"], met["bapo_c_high"]) == (0.6, 1.2)
    _, _, met = grads([1.0, 1.0], [-1.0, -1.0], [0.5, 0.5], cfg)         # no positives: widest bounds
    assert abs(met["bapo_c_low"] - 0.9) < 1e-9 and abs(met["bapo_c_high"] - 3.0) < 1e-9


def test_entropy_advantage_shaping():
    A, H = [2.0, 2.0, -1.0, 0.0], [1.0, 10.0, 1.0, 5.0]
    shaped = [2.4, 3.0, -0.6, 0.0]                                        # A + min(0.4 H, |A| / 2)
    Ht = torch.tensor(H, dtype=D, requires_grad=True)
    g, _, _ = grads([1.0] * 4, A, [0.5] * 4, LossConfig(loss="entropy_adv"), entropy=Ht[None])
    assert close(g, [-a / 4 for a in shaped]) and Ht.grad is None         # sg(H)
    with pytest.raises(ValueError, match="entropy"):
        grads([1.0], [1.0], [0.5], LossConfig(loss="entropy_adv"))


@pytest.mark.parametrize("name", sorted(maspo.LOSSES))
def test_every_objective_is_plain_policy_gradient_on_policy(name):
    A = [1.5, -0.5, 0.8]
    g, _, met = grads([1.0] * 3, A, [0.3, 0.05, 0.9], LossConfig(loss=name),
                      entropy=torch.zeros(1, 3, dtype=D))
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
                          LossConfig(loss="grpo", agg="seq-mean-token-sum-norm", norm_len=8))
    assert abs(loss.item() - 21 / 16) < 1e-12


@pytest.mark.parametrize("agg", maspo.AGG_MODES)
def test_micro_batches_with_global_counts_equal_one_batch(agg):
    torch.manual_seed(3)
    lens = [5, 2, 7, 3]
    seqs = [torch.randn(n, dtype=D).requires_grad_(True) for n in lens]   # log pi_theta per sequence
    olds = [s.detach() + 0.3 * torch.randn(n, dtype=D) for s, n in zip(seqs, lens)]
    adv = torch.tensor([1.2, -0.4, 0.7, -1.1], dtype=D)
    cfg = LossConfig(agg=agg, norm_len=10)

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
            policy_loss(logp, old, adv[idx], mask, cfg, **kw)[0].backward()
        return [s.grad.clone() for s in seqs]

    whole = grad_of([[0, 1, 2, 3]])
    split = grad_of([[0, 1], [2, 3]], num_tokens=sum(lens), num_seqs=4)
    assert all(close(a, b, 1e-12) for a, b in zip(whole, split))
    local = grad_of([[0, 1], [2, 3]])                                     # local counts differ
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


def test_metrics_over_response_tokens_only():
    rho = [1.5, 0.5, 1.1, 50.0]
    g, _, met = grads(rho, [1.0, 1.0, -1.0, 1.0], [0.5] * 4, LossConfig(loss="grpo"), mask=[1, 1, 1, 0])
    live = rho[:3]
    assert met["ratio_min"] == pytest.approx(0.5) and met["ratio_max"] == pytest.approx(1.5)
    assert met["approx_kl"] == pytest.approx(sum(r - 1 - math.log(r) for r in live) / 3)
    assert met["ratio_dev_mean"] == pytest.approx((0.5 + 0.5 + 0.1) / 3)
    assert met["ratio_dev_frac"] == pytest.approx(2 / 3) and met["gate_low_frac"] == pytest.approx(1 / 3)
    assert met["m_mean"] == 0.0 and g[3].item() == 0.0
