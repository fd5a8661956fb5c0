"""maspo.py: the math of MASPO and the baselines it is compared with. Pure tensor functions, no I/O.

What lives here (equations as in PAPER.md; arXiv 2602.17550 and the papers of the baselines):
  1. token_logprobs(logits, ids), entropy(logits): log pi(o_t) and the next-token entropy H_t,
     computed chunk by chunk, so no [B, T, V] float32 temporary is materialised; backward writes
     only the logits' own gradient (bench/logprobs.py measures the saving).
  2. group_advantages(rewards, G): A_i = (R_i - mean R) / (std R + eps), and Dr. GRPO's unscaled
     A_i = R_i - mean R.
  3. One function per objective, side by side, each returning the per-token loss and the gate F:
     maspo_loss (mass-adaptive limiter m, asymmetric risk controller k_pos / k_neg, unilateral soft
     Gaussian gate F on sg(rho)), grpo_loss (hard clip + dual clip c), clip_higher_loss (DAPO),
     dac_loss (DCPO's probability-dependent bounds), sapo_loss (sigmoid gate, not detached),
     bapo_loss (bounds searched per batch), and entropy_advantage, the Entropy-Advantage shaping
     of A used with grpo_loss ("entropy_adv"). LOSSES maps LossConfig.loss to the function.
  4. policy_loss(logp, old_logp, adv, mask, cfg): ratio, objective, aggregation (token-mean,
     seq-mean-token-mean, seq-mean-token-sum-norm), optional k3 KL to a reference policy, metrics.

Use (train.py does this per mini-batch):
    logp = token_logprobs(model(x).logits[:, :-1], x[:, 1:])                   # [B, T]
    loss, metrics = policy_loss(logp, old_logp, adv, mask, LossConfig(loss="maspo"))
    loss.backward()
Tests: `python -m pytest tests/test_maspo.py -q`; benchmark: `python bench/logprobs.py`.

Legend. Shapes: G group size, B sequences, T tokens, V vocabulary. Symbols (per token t):
    rho = pi_theta / pi_old (ratio)       p_old = q = pi_old(o_t)         A = advantage of the sequence
    m = mass-adaptive width               k_pos, k_neg = risk factors      sigma_pos, sigma_neg = m * k
    F = gate weight: gradient = -A * F * rho * grad log pi_theta (F = 1: plain policy gradient)
    sg(.) = stop-gradient (.detach())     H = next-token entropy           tau = SAPO temperature
    r_low, r_high = ratio bounds (clip methods)   c = dual-clip bound   c_low, c_high = BAPO bounds

Where we deviate from the paper or the authors' verl patch, and why:
  1. log rho is clamped to [-20, 20] before exp (as verl does): keeps rho finite; no gradient
     flows through a clamped token.
  2. k_neg is computed from min(A, 0): for A > 0 (where k_neg is unused) 1 - beta_neg * A could
     reach 0; the value used (A < 0) is exactly the paper's.
  3. maspo_loss refuses sigma_base > sigma_high: the clamp of m would be empty (torch would
     silently return sigma_high). "sigma_base -> inf" therefore means sigma_high -> inf too.
  4. For the clip methods F is the 0/1 indicator "this token's gradient survives the clip", for
     SAPO F = sech^2(tau (rho - 1) / 2) = g / rho, so gate_mean / gate_low_frac mean the same
     thing for every objective (for clip methods gate_low_frac is the clipped share).
  5. approx_kl is the k3 estimator of KL(pi_old || pi_theta), mean of rho - 1 - log rho
     (verl logs k1, mean of -log rho, which can be negative).
  6. seq-mean-token-sum-norm is Dr. GRPO's 1/B * sum_i (sum_t loss_t) / L with L = cfg.norm_len
     (0: the padded length T); verl divides the sum by T only, without 1/B.
  7. One aggregation (cfg.agg, default token-mean, the verl setting of the paper) for every
     objective. SAPO's and the original GRPO's per-sequence mean is agg="seq-mean-token-mean".
  8. DAC uses (eps_low, eps_high) = (0.16, 0.2), the values of PAPER.md's table, and the shared
     dual clip c = clip_c = 3. DCPO's own scripts use 0.2 / 0.28 and c = 10.
  9. BAPO follows the paper's rule as we read it: start at (c_low, c_high) = (0.6, 1.2), raise both
     by their steps (capped at 0.9 / 3.0) and keep the first pair for which the positive share of
     sum_t p_old * |A * rho| over tokens whose gradient survives reaches rho_0. The authors' verl
     code instead raises c_low first, then c_high, uses unweighted clipped values, and all-reduces
     its statistics across ranks; here the search sees only the tensors of one call (no
     collectives in pure math), so micro-batches and ranks may pick different bounds.
 10. Entropy-Advantage is implemented from secondary descriptions: A' = A + min(a * sg(H), |A| / kappa),
     H the current policy's entropy handed in by the caller.
 11. The k3 KL to the reference, exp(ref - logp) - (ref - logp) - 1, is clamped to <= 10 (verl).
 12. token_logprobs and entropy are custom autograd functions (memory): they support one backward,
     not double backward.
"""
import math
from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class LossConfig:
    loss: str = "maspo"           # objective: maspo | grpo | clip_higher | dac | sapo | bapo | entropy_adv
    # MASPO (PAPER.md "The three components")
    sigma_base: float = 1.0       # sigma_base: base gate width, default 1
    alpha: float = 0.3            # alpha: mass-adaptive exponent of m = sigma_base / p_old^alpha, default 0.3
    sigma_high: float = 10.0      # sigma_high: upper clamp of m, default 10
    beta_pos: float = 0.03        # beta_pos: k_pos = 1 + beta_pos * A, default 0.03
    beta_neg: float = 0.03        # beta_neg: k_neg = 1 / (1 - beta_neg * A), default 0.03
    adv_low: float = 0.1          # adv_low: lower clamp of k_pos / k_neg, default 0.1
    adv_high: float = 10.0        # adv_high: upper clamp of k_pos / k_neg, default 10
    # GRPO / Clip-Higher (PPO min-form, verl dual clip)
    clip_low: float = 0.2         # eps_low: rho >= 1 - eps_low for A < 0 (grpo, clip_higher), default 0.2
    clip_high: float = 0.2        # eps_high of grpo: rho <= 1 + eps_high for A > 0, default 0.2
    clip_high_dapo: float = 0.28  # eps_high of clip_higher (DAPO), default 0.28
    clip_c: float = 3.0           # c: dual clip, rho <= c for A < 0 (grpo, clip_higher, dac, bapo), default 3
    # DAC (DCPO): bounds from |(rho - 1) rho q| <= eps
    dac_eps_low: float = 0.16     # eps_low of r_low(q), default 0.16 (PAPER.md table; DCPO scripts 0.2)
    dac_eps_high: float = 0.2     # eps_high of r_high(q), default 0.2 (DCPO scripts 0.28)
    dac_r_max: float = 10.0       # cap on r_high(q), default 10
    # SAPO
    sapo_tau_pos: float = 1.0     # tau_pos: gate temperature for A > 0, default 1.0
    sapo_tau_neg: float = 1.05    # tau_neg: gate temperature for A <= 0, default 1.05
    # BAPO: per-batch search of ratio bounds (c_low, c_high)
    bapo_low_start: float = 0.6   # a^-: first c_low, default 0.6
    bapo_low_step: float = 0.02   # delta^-: c_low step, default 0.02
    bapo_low_max: float = 0.9     # b^-: largest c_low, default 0.9
    bapo_high_start: float = 1.2  # a^+: first c_high, default 1.2
    bapo_high_step: float = 0.05  # delta^+: c_high step, default 0.05
    bapo_high_max: float = 3.0    # b^+: largest c_high, default 3.0
    bapo_rho_0: float = 0.4       # rho_0: target positive share of the contribution, default 0.4
    # Entropy-Advantage: A' = A + min(a * sg(H), |A| / kappa)
    ent_adv_a: float = 0.4        # a (alpha in arXiv 2506.14758): entropy coefficient, default 0.4
    ent_adv_kappa: float = 2.0    # kappa: the bonus is at most |A| / kappa, default 2
    # Aggregation and KL
    agg: str = "token-mean"       # aggregation, one of AGG_MODES, default token-mean (DAPO / verl)
    norm_len: int = 0             # L of seq-mean-token-sum-norm (Dr. GRPO's budget); 0 = padded length T
    kl_coef: float = 0.0          # beta_KL: weight of the k3 KL to the reference policy, default 0 (off)


AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# ----------------------------------------------------------------------------------------------
# 1. Log-probs and entropy, chunked over tokens (never a full [B, T, V] float32 tensor)


def _wide(dtype):
    """The dtype chunks are computed in: float32, or float64 for float64 logits."""
    return torch.promote_types(dtype, torch.float32)


def _blocks(B, T, chunk_size):
    """(b0, b1, t0, t1) blocks of about chunk_size tokens tiling [B, T]; slices stay views."""
    if T >= chunk_size:
        return [(b, b + 1, t, min(t + chunk_size, T)) for b in range(B) for t in range(0, T, chunk_size)]
    rows = max(chunk_size // max(T, 1), 1)
    return [(b, min(b + rows, B), 0, T) for b in range(0, B, rows)]


class _TokenLogprobs(torch.autograd.Function):
    """log pi(o_t) = log_softmax(x)[o_t]; backward: d/dx_v = 1[v = o_t] - softmax(x)_v."""

    @staticmethod
    def forward(ctx, logits, ids, chunk_size):
        B, T, V = logits.shape
        dt = _wide(logits.dtype)
        logp = logits.new_empty(B, T, dtype=dt)                            # [B, T]
        lse = logits.new_empty(B, T, dtype=dt)                             # [B, T] logsumexp(x)
        for b0, b1, t0, t1 in _blocks(B, T, chunk_size):
            x = logits[b0:b1, t0:t1].to(dt)                                # [b, t, V] float32, one chunk
            i = ids[b0:b1, t0:t1, None]                                    # [b, t, 1]
            logp[b0:b1, t0:t1] = torch.log_softmax(x, dim=-1).gather(-1, i).squeeze(-1)
            lse[b0:b1, t0:t1] = x.gather(-1, i).squeeze(-1) - logp[b0:b1, t0:t1]  # x[o_t] - log pi
        ctx.save_for_backward(logits, ids, lse)
        ctx.chunk_size = chunk_size
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, ids, lse = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # [B, T, V]
        for b0, b1, t0, t1 in _blocks(*logits.shape[:2], ctx.chunk_size):
            g = grad_logp[b0:b1, t0:t1, None].to(lse.dtype)                # [b, t, 1]
            out = grad[b0:b1, t0:t1]
            inplace = out.dtype == lse.dtype  # float32 logits: write straight into grad, no extra chunk
            p = torch.sub(logits[b0:b1, t0:t1], lse[b0:b1, t0:t1, None], out=out if inplace else None)
            p.exp_().mul_(-g).scatter_add_(-1, ids[b0:b1, t0:t1, None], g)  # g * (onehot - softmax)
            if not inplace:
                out.copy_(p)
        return grad, None, None


class _Entropy(torch.autograd.Function):
    """H = -sum_v p_v log p_v; backward: dH/dx_v = -p_v (log p_v + H)."""

    @staticmethod
    def forward(ctx, logits, chunk_size):
        B, T, V = logits.shape
        H = logits.new_empty(B, T, dtype=_wide(logits.dtype))              # [B, T]
        for b0, b1, t0, t1 in _blocks(B, T, chunk_size):
            logq = torch.log_softmax(logits[b0:b1, t0:t1].to(H.dtype), dim=-1)  # log p, [b, t, V]
            H[b0:b1, t0:t1] = -(logq.exp() * logq).sum(-1)
        ctx.save_for_backward(logits, H)
        ctx.chunk_size = chunk_size
        return H

    @staticmethod
    def backward(ctx, grad_H):
        logits, H = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # [B, T, V]
        for b0, b1, t0, t1 in _blocks(*logits.shape[:2], ctx.chunk_size):
            logq = torch.log_softmax(logits[b0:b1, t0:t1].to(H.dtype), dim=-1)  # log p, recomputed
            p = logq.exp()
            g = grad_H[b0:b1, t0:t1, None].to(H.dtype)                     # [b, t, 1]
            grad[b0:b1, t0:t1] = logq.add_(H[b0:b1, t0:t1, None]).mul_(p).mul_(-g)  # -g p (log p + H)
        return grad, None


def _check_logits(logits, chunk_size):
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def token_logprobs(logits, ids, chunk_size=256):
    """log pi(o_t) of the chosen tokens: logits [B, T, V] (any float dtype), ids [B, T] -> [B, T]
    float32 (float64 for float64 logits). Works in float32 on chunk_size tokens at a time, forward
    and backward; differentiable with respect to logits. Equals log_softmax(logits.float()).gather(ids)."""
    _check_logits(logits, chunk_size)
    if ids.shape != logits.shape[:2]:
        raise ValueError(f"ids {tuple(ids.shape)} must match logits[:2] {tuple(logits.shape[:2])}")
    return _TokenLogprobs.apply(logits, ids.long(), chunk_size)


def entropy(logits, chunk_size=256):
    """Next-token entropy H_t = -sum_v p_v log p_v per position: logits [B, T, V] -> [B, T]
    float32 (float64 for float64 logits), chunked like token_logprobs and differentiable.
    Detach it before handing it to policy_loss for Entropy-Advantage."""
    _check_logits(logits, chunk_size)
    return _Entropy.apply(logits, chunk_size)

# ----------------------------------------------------------------------------------------------
# 2. Group advantages


def group_advantages(rewards, group_size, scale_by_std=True, eps=1e-6):
    """A_i = (R_i - mean(R_group)) / (std(R_group) + eps), std unbiased; scale_by_std=False gives
    Dr. GRPO's A_i = R_i - mean. rewards [num_prompts * G], group after group -> A, same shape.
    A group of one gets mean 0 and std 1 (so A = R / (1 + eps)), as in verl."""
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    R = rewards.to(_wide(rewards.dtype)).view(-1, group_size)               # [prompts, G]
    if group_size == 1:
        mean, std = torch.zeros_like(R), torch.ones_like(R)
    else:
        mean, std = R.mean(-1, keepdim=True), R.std(-1, keepdim=True)     # unbiased std
    A = (R - mean) / (std + eps) if scale_by_std else R - mean             # Eq. A_i
    return A.view(-1)

# ----------------------------------------------------------------------------------------------
# 3. The objectives. Each takes rho, A, p_old, mask [B, T] and the config, and returns
#    (loss_t [B, T], F [B, T], extra). The gradient of loss_t is -A * F * rho * grad log pi.
#    extra: per-token or scalar tensors averaged into metrics.


def maspo_loss(rho, A, p_old, mask, cfg):
    """MASPO: -A * sg(F) * rho, F a Gaussian gate on the optimistic side only; no clip, no dual clip."""
    if cfg.sigma_base > cfg.sigma_high:
        raise ValueError(f"maspo: sigma_base={cfg.sigma_base} > sigma_high={cfg.sigma_high} leaves no "
                         "room for m = clamp(sigma_base / p_old^alpha, sigma_base, sigma_high)")
    m = torch.clamp(cfg.sigma_base / p_old.pow(cfg.alpha), cfg.sigma_base, cfg.sigma_high)  # Eq. m
    k_pos = torch.clamp(1 + cfg.beta_pos * A, cfg.adv_low, cfg.adv_high)  # Eq. k_pos = clamp(1 + beta A)
    A_neg = A.clamp(max=0)  # k_neg is used only where A < 0 (deviation 2)
    k_neg = torch.clamp(1 / (1 - cfg.beta_neg * A_neg), cfg.adv_low, cfg.adv_high)  # Eq. k_neg = clamp(1/(1-beta A))
    sigma_pos = m * k_pos                                                  # Eq. sigma_pos = m k_pos
    sigma_neg = m * k_neg                                                  # Eq. sigma_neg = m k_neg
    rho_sg = rho.detach()  # stop-gradient: F weights the gradient, no gradient flows through F
    F_pos = torch.exp(-(rho_sg - 1) ** 2 / (2 * sigma_pos ** 2))          # Eq. F for A > 0, rho > 1
    F_neg = torch.exp(-(rho_sg - 1) ** 2 / (2 * sigma_neg ** 2))          # Eq. F for A < 0, rho < 1
    ones = torch.ones_like(rho_sg)
    F = torch.where((A > 0) & (rho_sg > 1), F_pos,
                    torch.where((A < 0) & (rho_sg < 1), F_neg, ones))     # Eq. F = 1 otherwise
    loss_t = -A * F * rho                                                  # Eq. loss_t = -A sg(F) rho
    return loss_t, F, {"m_mean": m}


def _ppo_clip(rho, A, r_low, r_high, c):
    """PPO min-form with ratio bounds [r_low, r_high] (floats or [B, T]) and dual clip c for A < 0."""
    if c <= 1:
        raise ValueError(f"dual clip c (clip_c) must be > 1, got {c}")
    loss_1 = -A * rho                                                      # Eq. -rho A
    loss_2 = -A * torch.clamp(rho, r_low, r_high)                          # Eq. -clip(rho, r_low, r_high) A
    loss_clip = torch.maximum(loss_1, loss_2)                              # Eq. -min(rho A, clip(rho) A)
    loss_dual = torch.minimum(loss_clip, -A * c)                           # Eq. min(., -c A), dual clip
    loss_t = torch.where(A < 0, loss_dual, loss_clip)
    with torch.no_grad():  # F: 1 where the gradient survives the clip, 0 where it is cut
        r = rho.detach()  # stop-gradient: indicator only
        cut = ((A > 0) & (r > r_high)) | ((A < 0) & ((r < r_low) | (r > c)))
        F = (~cut).to(rho.dtype)
    return loss_t, F


def grpo_loss(rho, A, p_old, mask, cfg):
    """GRPO as in verl: hard clip [1 - eps_low, 1 + eps_high], dual clip c for A < 0."""
    loss_t, F = _ppo_clip(rho, A, 1 - cfg.clip_low, 1 + cfg.clip_high, cfg.clip_c)
    return loss_t, F, {}


def clip_higher_loss(rho, A, p_old, mask, cfg):
    """Clip-Higher (DAPO): GRPO with the decoupled upper bound 1 + clip_high_dapo (0.28)."""
    loss_t, F = _ppo_clip(rho, A, 1 - cfg.clip_low, 1 + cfg.clip_high_dapo, cfg.clip_c)
    return loss_t, F, {}


def dac_bounds(q, cfg):
    """DAC ratio bounds from |(r - 1) r q| <= eps: q = p_old [B, T] -> (r_low, r_high) [B, T]."""
    r_low = 0.5 + 0.5 * torch.sqrt(torch.clamp(1 - 4 * cfg.dac_eps_low / q, min=0))  # Eq. r_low(q)
    r_high = 0.5 + 0.5 * torch.sqrt(1 + 4 * cfg.dac_eps_high / q)                    # Eq. r_high(q)
    return r_low, torch.clamp(r_high, max=cfg.dac_r_max)                             # Eq. r_high <= r_max


def dac_loss(rho, A, p_old, mask, cfg):
    """DAC (DCPO): PPO min-form with probability-dependent bounds r_low(q), r_high(q); dual clip c."""
    r_low, r_high = dac_bounds(p_old, cfg)
    loss_t, F = _ppo_clip(rho, A, r_low, r_high, cfg.clip_c)
    return loss_t, F, {"dac_r_high_mean": r_high, "dac_r_low_mean": r_low}


def sapo_loss(rho, A, p_old, mask, cfg):
    """SAPO: -A (4 / tau) sigmoid(tau (rho - 1)); not detached, so g = sech^2(tau (rho - 1) / 2) rho."""
    tau = torch.where(A > 0, rho.new_tensor(cfg.sapo_tau_pos), rho.new_tensor(cfg.sapo_tau_neg))  # Eq. tau
    s = torch.sigmoid(tau * (rho - 1))                                     # Eq. sigmoid(tau (rho - 1))
    loss_t = -A * (4 / tau) * s                                            # Eq. loss_t
    F = (4 * s * (1 - s)).detach()  # stop-gradient: metric only; sech^2(tau (rho - 1) / 2) = g / rho
    return loss_t, F, {}


def bapo_bounds(rho, A, p_old, mask, cfg):
    """BAPO's search (deviation 9): the first (c_low, c_high) on the path start + k * step (capped)
    whose surviving tokens give positive-advantage tokens a share >= rho_0 of sum p_old |A rho|."""
    K = max(math.ceil((cfg.bapo_low_max - cfg.bapo_low_start) / cfg.bapo_low_step - 1e-9),
            math.ceil((cfg.bapo_high_max - cfg.bapo_high_start) / cfg.bapo_high_step - 1e-9), 0)
    k = torch.arange(K + 1, device=rho.device, dtype=rho.dtype)[:, None, None]  # [K+1, 1, 1]
    c_low = (cfg.bapo_low_start + k * cfg.bapo_low_step).clamp(max=cfg.bapo_low_max)
    c_high = (cfg.bapo_high_start + k * cfg.bapo_high_step).clamp(max=cfg.bapo_high_max)
    r = rho.detach()  # stop-gradient: the search picks bounds, it is not differentiated
    cut = ((A > 0) & (r > c_high)) | ((A < 0) & ((r < c_low) | (r > cfg.clip_c)))  # [K+1, B, T]
    w = p_old * (A * r).abs() * mask * (~cut)                              # Eq. p_old |A rho| if kept
    share = (w * (A > 0)).sum((1, 2)) / w.sum((1, 2)).clamp(min=1e-30)    # Eq. rho = pos / all, [K+1]
    reached = share >= cfg.bapo_rho_0
    i = torch.where(reached.any(), reached.int().argmax(), K)              # first k that reaches rho_0
    return c_low.view(-1)[i], c_high.view(-1)[i]


def bapo_loss(rho, A, p_old, mask, cfg):
    """BAPO: PPO min-form with the per-batch bounds (c_low, c_high) of bapo_bounds; dual clip c."""
    c_low, c_high = bapo_bounds(rho, A, p_old, mask, cfg)
    loss_t, F = _ppo_clip(rho, A, c_low, c_high, cfg.clip_c)
    return loss_t, F, {"bapo_c_low": c_low, "bapo_c_high": c_high}


def entropy_advantage(A, H, cfg):
    """Entropy-Advantage shaping: A' = A + min(a * sg(H), |A| / kappa); A, H [B, T] -> A' [B, T].
    Never flips the sign of A, is 0 where A = 0."""
    return A + torch.minimum(cfg.ent_adv_a * H.detach(), A.abs() / cfg.ent_adv_kappa)  # Eq. A'; sg(H)


LOSSES = {
    "maspo": maspo_loss,
    "grpo": grpo_loss,
    "clip_higher": clip_higher_loss,
    "dac": dac_loss,
    "sapo": sapo_loss,
    "bapo": bapo_loss,
    "entropy_adv": grpo_loss,  # GRPO on entropy-shaped advantages (policy_loss shapes A first)
}

# ----------------------------------------------------------------------------------------------
# 4. Aggregation, KL, and the entry point


def aggregate(loss_t, mask, agg, num_tokens=None, num_seqs=None, norm_len=0):
    """Scalar from per-token values [B, T] over mask. token-mean: sum / N (N = num_tokens or the
    local token count); seq-mean-token-mean: sum_i mean_t / S (S = num_seqs or B);
    seq-mean-token-sum-norm: sum_i sum_t / (S * L), L = norm_len or T."""
    per_token = loss_t * mask                                              # [B, T]
    if agg == "token-mean":
        N = num_tokens if num_tokens is not None else mask.sum().clamp(min=1)
        return per_token.sum() / N
    S = num_seqs if num_seqs is not None else mask.shape[0]
    if agg == "seq-mean-token-mean":
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / S
    if agg == "seq-mean-token-sum-norm":
        return per_token.sum() / (S * (norm_len or mask.shape[1]))
    raise ValueError(f"unknown agg {agg!r}; choose one of {AGG_MODES}")


def _check_inputs(logp, old_logp, adv, mask, cfg, num_tokens, num_seqs):
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown LossConfig.loss {cfg.loss!r}; choose one of {sorted(LOSSES)}")
    if cfg.agg not in AGG_MODES:
        raise ValueError(f"unknown LossConfig.agg {cfg.agg!r}; choose one of {AGG_MODES}")
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp, old_logp, mask must all be [B, T]; got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(mask.shape)}")
    if adv.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"adv must be [B] or [B, T] with B, T = {tuple(logp.shape)}, got {tuple(adv.shape)}")
    for name, n in (("num_tokens", num_tokens), ("num_seqs", num_seqs)):
        if n is not None and not n > 0:
            raise ValueError(f"{name} must be > 0 when given, got {n}")


def policy_loss(logp, old_logp, adv, mask, cfg, ref_logp=None, entropy=None,
                num_tokens=None, num_seqs=None):
    """Policy loss of cfg.loss and its metrics.

    logp [B, T] (with grad), old_logp [B, T] (pi_old, no grad), adv [B] or [B, T], mask [B, T] (1 on
    response tokens; padded positions may hold any finite log-prob). ref_logp [B, T]: reference log-probs for the k3 KL (needed if kl_coef > 0).
    entropy [B, T]: detached policy entropy, needed only by "entropy_adv".
    num_tokens / num_seqs: the normaliser of the aggregation instead of this call's own count.
    For gradient accumulation over micro-batches pass the mini-batch totals (response tokens for
    token-mean, sequences for the seq-mean modes; for seq-mean-token-sum-norm also fix
    cfg.norm_len): the summed micro-batch gradients then equal one big-batch call exactly. Under
    gradient averaging across W ranks (DDP / FSDP), pass global_count / W. Default: local counts.

    Returns (loss, metrics): loss a scalar for .backward(); metrics python floats over response
    tokens: gate_mean (mean F; for clip methods the unclipped share), gate_low_frac (share with
    F < 0.5; clip methods: clipped share), approx_kl (k3 KL(old || new)), ratio_min, ratio_max,
    ratio_dev_mean (mean |rho - 1|), ratio_dev_frac (share |rho - 1| > 0.2), m_mean (MASPO's mean m;
    0.0 for other objectives), kl_ref (when ref_logp is given), and objective extras (bapo_c_low,
    bapo_c_high, dac_r_low_mean, dac_r_high_mean).
    """
    _check_inputs(logp, old_logp, adv, mask, cfg, num_tokens, num_seqs)
    mask = mask.to(logp.dtype)
    A = (adv[:, None] if adv.dim() == 1 else adv).to(logp.dtype).detach().expand_as(logp)  # [B, T]; sg: data
    if cfg.loss == "entropy_adv":
        if entropy is None:
            raise ValueError('loss "entropy_adv" needs the per-token policy entropy: '
                             "policy_loss(..., entropy=maspo.entropy(logits).detach())")
        A = entropy_advantage(A, entropy, cfg)
    old_logp = old_logp.detach()  # stop-gradient: pi_old is fixed data
    log_ratio = torch.clamp(logp - old_logp, -20.0, 20.0)                  # deviation 1
    rho = torch.exp(log_ratio)                                             # Eq. rho = pi_theta / pi_old
    p_old = torch.exp(old_logp)                                            # Eq. p_old
    loss_t, F, extra = LOSSES[cfg.loss](rho, A, p_old, mask, cfg)
    loss = aggregate(loss_t, mask, cfg.agg, num_tokens, num_seqs, cfg.norm_len)
    kl_ref = None
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError(f"kl_coef={cfg.kl_coef} > 0 needs ref_logp (reference-policy log-probs)")
    if ref_logp is not None:
        d = torch.clamp(ref_logp.detach() - logp, -20.0, 20.0)  # d = log pi_ref / pi_theta; sg(pi_ref)
        kl_ref = torch.clamp(torch.exp(d) - d - 1, max=10.0)    # Eq. k3 = e^d - d - 1 (deviation 11)
        if cfg.kl_coef > 0:
            kl = aggregate(kl_ref, mask, cfg.agg, num_tokens, num_seqs, cfg.norm_len)
            loss = loss + cfg.kl_coef * kl                                 # Eq. L + beta_KL * KL
    return loss, _metrics(rho.detach(), log_ratio.detach(), F, mask, extra,
                          None if kl_ref is None else kl_ref.detach())


def _metrics(rho, log_ratio, F, mask, extra, kl_ref):
    """Python floats over response tokens, gathered with one device sync."""
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        mean = lambda x: (x * mask).sum() / n if x.dim() else x           # noqa: E731
        inf = torch.tensor(float("inf"), dtype=rho.dtype, device=rho.device)
        dev = (rho - 1).abs()
        values = {
            "gate_mean": mean(F),
            "gate_low_frac": mean((F < 0.5).to(rho.dtype)),
            "approx_kl": mean(rho - 1 - log_ratio),                        # k3 of KL(old || new)
            "ratio_min": torch.where(mask > 0, rho, inf).min(),            # inf if no tokens
            "ratio_max": torch.where(mask > 0, rho, -inf).max(),
            "ratio_dev_mean": mean(dev),
            "ratio_dev_frac": mean((dev > 0.2).to(rho.dtype)),
            "m_mean": rho.new_zeros(()),
        }
        values.update({key: mean(x.to(rho.dtype)) for key, x in extra.items()})
        if kl_ref is not None:
            values["kl_ref"] = mean(kl_ref)
        floats = torch.stack([v.reshape(()) for v in values.values()]).tolist()
    metrics = dict(zip(values, floats))
    if math.isinf(metrics["ratio_min"]):  # no response tokens: report the neutral ratio
        metrics["ratio_min"] = metrics["ratio_max"] = 1.0
    return metrics
