"""maspo.py: the policy-loss math of MASPO (Mass-Adaptive Soft Policy Optimization, arXiv 2602.17550)
and of the objectives it is compared with. Pure tensor functions: no I/O, no collectives, no model code
(log pi and the entropy come from logprobs.py).

In file order:
  LossConfig, DEFAULTS   one field per hyper-parameter; the per-objective defaults of the fields left
                         None (clip_low, clip_high, agg) in one table; resolve(cfg) fills them in.
  group_advantages       the group-normalised advantage A_i per group of G (Dr. GRPO: without the std).
  entropy_advantage      Entropy-Advantage shaping of A into A' (arXiv 2506.14758), applied by the CALLER
                         to the advantages; the objective is then GRPO's.
  the objectives         one function each, side by side, (rho, A, p_old, mask, cfg) -> (loss_t, F, extra):
                         maspo_loss (mass-adaptive limiter m, risk controller k_pos / k_neg, unilateral
                         soft Gaussian gate F on sg(rho)); grpo_loss (hard clip, dual clip c; also
                         Clip-Higher and Entropy-Adv); dac_loss (DCPO's probability-dependent bounds);
                         sapo_loss (sigmoid gate, not detached, arXiv 2511.20347); bapo_loss (adaptive
                         bounds, arXiv 2510.18927) with its search split in two pure halves, bapo_stats
                         (per-candidate statistics, one tensor the caller sums over micro-batches and
                         ranks) and bapo_pick (the bounds from those statistics).
  LOSSES                 LossConfig.loss -> objective function.
  aggregate              token-mean | seq-mean-token-mean | seq-mean-token-sum-norm.
  policy_loss            ratio rho, objective, aggregation, optional k3 KL to a reference, metrics.

Use (train.py, per micro-batch; T = the sampling temperature, see logprobs.py):
    A = group_advantages(R, G)                                                      # [B], once per step
    logp, H = logprobs.hidden_logprobs(hidden, lm_head_weight, ids, T, with_entropy=...)   # [B, T]
    A = entropy_advantage(A, H, cfg)                            # only for loss "entropy_adv"
    loss, metrics = policy_loss(logp, old_logp, A, mask, cfg, bapo_bounds=bounds)  # bounds: "bapo" only
    loss.backward()
BAPO: once per mini-batch, before its micro-batches, with pi_theta before this mini-batch's update:
    stats = sum over the mini-batch's micro-batches of bapo_stats(logp, old_logp, A, mask)  # [K, 2], no grad
    all_reduce(stats, SUM)                       # every rank then picks the same bounds
    bounds = bapo_pick(stats)                    # [2] = (c_low, c_high), used by all its micro-batches
Tests: `python -m pytest tests/test_maspo.py -q`.

Legend. Shapes: G group size, B sequences, T tokens, K candidate bounds of BAPO's search.
Symbols (per token t of sequence i):
    rho = pi_theta / pi_old (ratio)       p_old = q = pi_old(o_t)          A = advantage (of sequence i)
    m = mass-adaptive width               k_pos, k_neg = risk factors       sigma_pos, sigma_neg = m * k
    F = gate weight: gradient of loss_t = -A * F * rho * grad log pi_theta (F = 1: plain policy gradient)
    sg(.) = stop-gradient (.detach())     H = next-token entropy            tau = SAPO's temperature
    eps_low, eps_high = clip_low, clip_high     r_low, r_high = ratio bounds     c = dual clip (clip_c)
    c_low, c_high = BAPO's bounds         a, kappa = Entropy-Adv's coefficient and cap

Deviations from the papers and from the authors' code, and why:
  1. log rho is clamped to [-20, 20] before exp, as verl does (the papers do not): rho stays finite. A
     clamped token gets no gradient.
  2. k_neg is computed from min(A, 0). The MASPO authors compute 1 / (1 - beta_neg * A) for every token
     and keep it only where A < 0; for large A > 0 that intermediate is negative or infinite. The values
     used are identical.
  3. maspo_loss refuses sigma_base > sigma_high. The authors' torch.clamp(x, lo, hi) with lo > hi
     silently returns hi; we would rather say so. (sigma_base -> inf therefore needs sigma_high -> inf.)
  4. Metrics only: F is, for the clip methods, the 0/1 indicator "this token's gradient survives the
     clip", and for SAPO sech^2(tau (rho - 1) / 2) = g / rho, so gate_mean / gate_low_frac read alike
     for every objective. verl logs pg_clipfrac instead.
  5. Metrics only: approx_kl is the k3 estimator of KL(pi_old || pi_theta), mean of rho - 1 - log rho;
     verl logs k1, mean of -log rho, which can be negative.
  6. seq-mean-token-sum-norm is Dr. GRPO's 1/B * sum_i (sum_t loss_t) / L with L = norm_len (None: the
     padded length T); verl divides the sum by L only, without 1/B, so its loss grows with the batch.
  7. Aggregation defaults per objective (DEFAULTS): token-mean (the verl setting of the MASPO paper's
     runs), except SAPO: seq-mean-token-mean, because verl's SAPO (volcengine/verl and the MASPO
     authors' fork) always aggregates so, ignoring loss_agg_mode. Here LossConfig.agg, when set,
     overrides it for SAPO too, so that objectives can also be compared at one aggregation.
  8. DAC reads clip_low / clip_high as the eps of |(r - 1) r q| <= eps, with (0.16, 0.2) and the shared
     dual clip c = 3 by default (bounds q = 0.9 -> [0.769, 1.187], q = 0.1 -> [0.5, 2.0]). DCPO's own
     scripts use 0.2 / 0.28 and c = 10; we keep GRPO's dual clip so that only the bounds differ.
  9. BAPO follows the authors' verl code (WooooDyy/BAPO, recipe/bapo/policy_loss.py), which is what
     they ran, where the paper's prose leaves details open: (a) each token counts at its clipped
     value, A * min(rho, c_high) where A >= 0 and A * max(rho, c_low) where A < 0, unweighted, no dual
     clip in the statistics; (b) c_low climbs to its maximum first, then c_high; (c) the target is
     positive / (negative + 1e-8) >= rho_0, not a positive share; (d) the statistics are summed over
     ranks before the pick. Numbers: ranges [0.6, 0.9] and [1.2, 3.0] and rho_0 = 0.5 from the README
     ("as used in the paper"; its example script also passes 0.5), steps 0.05 (the recipe config's
     defaults); the recipe's yaml has [0.6, 0.8], [1.2, 2.0] and target 1. A consequence of (a),
     reproduced as is: raising c_low can only add to the negative contribution, so when the start
     misses rho_0, c_low always ends at its maximum and c_high does the work.
     Where we differ: the authors search inside every micro-batch's loss call (statistics all-reduced
     over ranks but not over micro-batches, so one optimizer step mixes bounds); our loop sums the
     statistics over the whole mini-batch and all ranks, with the policy before that mini-batch's
     update, and uses one pair of bounds for the whole optimizer step: the "globally consistent"
     decision their own code comment asks for, carried across micro-batches. All candidates are
     evaluated at once (bapo_stats) instead of in a while loop with a device sync per step; the pick
     is the same. Without bapo_bounds, policy_loss searches on its own tokens only.
 10. Entropy-Advantage: H is whatever the caller hands in, and the loop offers two sources: "old", the
     entropy of pi_old from the no-grad pass that computes old_logp (one H for all mini-batches and
     epochs, no extra cost), and "current", the entropy of pi_theta from each micro-batch's own
     forward. The paper presents the shaping as a one-line change of the advantage inside the PPO /
     GRPO update with H detached; we found no code by its authors, and the verl re-implementations we
     read add it in the actor's update loop with the entropy of that same forward, i.e. "current"
     (equal to "old" on the first mini-batch of each step). Both are at the sampling temperature.
 11. The k3 KL to the reference, e^d - d - 1 with d = log pi_ref - log pi_theta clamped to [-20, 20],
     is capped at 10 (verl's low_var_kl); a capped token gets no gradient.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class LossConfig:
    loss: str = "maspo"  # objective, a key of LOSSES: maspo | grpo | clip_higher | dac | sapo | bapo | entropy_adv
    sigma_base: float = 1.0  # sigma_base: MASPO's base gate width, default 1
    alpha: float = 0.3  # alpha: mass exponent, m = clamp(sigma_base / p_old^alpha, sigma_base, sigma_high), default 0.3
    sigma_high: float = 10.0  # sigma_high: upper clamp of m, default 10
    beta_pos: float = 0.03  # beta_pos: k_pos = clamp(1 + beta_pos A, adv_low, adv_high), default 0.03
    beta_neg: float = 0.03  # beta_neg: k_neg = clamp(1 / (1 - beta_neg A), adv_low, adv_high), default 0.03
    adv_low: float = 0.1  # adv_low: lower clamp of k_pos and k_neg, default 0.1
    adv_high: float = 10.0  # adv_high: upper clamp of k_pos and k_neg, default 10
    clip_low: float | None = None  # eps_low: rho >= 1 - eps_low; DAC: eps of r_low(q); default per objective
    clip_high: float | None = None  # eps_high: rho <= 1 + eps_high; DAC: eps of r_high(q); default per objective
    clip_c: float = 3.0  # c: dual clip, rho <= c where A < 0 (grpo, clip_higher, entropy_adv, dac, bapo), default 3
    ent_adv_a: float = 0.4  # a (alpha in arXiv 2506.14758): Entropy-Adv's coefficient of sg(H), default 0.4
    ent_adv_kappa: float = 2.0  # kappa (> 1): Entropy-Adv's bonus is at most |A| / kappa, default 2
    agg: str | None = None  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm; default per objective
    kl_coef: float = 0.0  # beta_KL: weight of the k3 KL to a reference policy, default 0 (off)


# Defaults of the fields left None, per objective (resolve() fills them in; log the resolved config).
#              clip_low clip_high  agg
DEFAULTS = {
    "maspo":       (None, None, "token-mean"),           # MASPO reads no clip bound (no clip, no dual clip)
    "grpo":        (0.2,  0.2,  "token-mean"),           # verl's PPO clip
    "clip_higher": (0.2,  0.28, "token-mean"),           # DAPO's decoupled eps_high
    "dac":         (0.16, 0.2,  "token-mean"),           # eps of |(r - 1) r q| <= eps (deviation 8)
    "sapo":        (None, None, "seq-mean-token-mean"),  # verl's SAPO (deviation 7)
    "bapo":        (None, None, "token-mean"),           # bounds searched (bapo_stats / bapo_pick)
    "entropy_adv": (0.2,  0.2,  "token-mean"),           # GRPO on shaped advantages
}
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# Constants nobody tunes, with their source.
LOG_RATIO_MAX = 20.0  # |log rho| <= 20 before exp (verl; deviation 1)
KL_MAX = 10.0         # k3 <= 10 (verl's low_var_kl; deviation 11)
DAC_R_MAX = 10.0      # r_high(q) <= 10 (the cap in DCPO's code; not re-read here)
BAPO_LOW = (0.6, 0.05, 0.9)   # a^-, delta^-, b^-: c_low's start, step, maximum. a, b: BAPO's README ("as
BAPO_HIGH = (1.2, 0.05, 3.0)  # a^+, delta^+, b^+  used in the paper"); steps: BAPOPolicyLossConfig's defaults
BAPO_EPS = 1e-8       # positive / (negative + eps) (BAPOPolicyLossConfig.eps)
BAPO_RHO_0 = 0.5      # rho_0: target of positive / negative contribution (BAPO's README and example script)
SAPO_TAU_POS, SAPO_TAU_NEG = 1.0, 1.05  # tau_pos (A > 0), tau_neg (A <= 0): SAPO's gate temperatures (its paper, verl)


def resolve(cfg):
    """cfg with clip_low, clip_high and agg taken from DEFAULTS[cfg.loss] where left None."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown LossConfig.loss {cfg.loss!r}; choose one of {sorted(LOSSES)}")
    clip_low, clip_high, agg = DEFAULTS[cfg.loss]
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return dataclasses.replace(cfg, clip_low=pick(cfg.clip_low, clip_low),
                               clip_high=pick(cfg.clip_high, clip_high), agg=pick(cfg.agg, agg))

# ----------------------------------------------------------------------------------------------
# Advantages


def group_advantages(rewards, group_size, scale_by_std=True, eps=1e-6):
    """A_i = (R_i - mean(R_group)) / (std(R_group) + eps), std unbiased; scale_by_std=False gives
    Dr. GRPO's A_i = R_i - mean. rewards [num_prompts * G], group after group -> A, same shape.
    A group of one gets mean 0 and std 1 (so A = R / (1 + eps)), as in verl."""
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    R = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, group_size)  # [prompts, G]
    if group_size == 1:
        mean, std = torch.zeros_like(R), torch.ones_like(R)
    else:
        mean, std = R.mean(-1, keepdim=True), R.std(-1, keepdim=True)     # unbiased std
    A = (R - mean) / (std + eps) if scale_by_std else R - mean             # Eq. A_i
    return A.view(-1)


def entropy_advantage(A, H, cfg):
    """Entropy-Advantage shaping (arXiv 2506.14758), Eq. A' at the return below.
    A [B] or [B, T], H [B, T] (which policy's entropy: deviation 10) -> A' [B, T]. For kappa > 1 the
    bonus never flips the sign of A and is 0 where A = 0. The caller applies it before policy_loss."""
    if not cfg.ent_adv_kappa > 1:
        raise ValueError(f"ent_adv_kappa must be > 1 (else the bonus can cancel A), got {cfg.ent_adv_kappa}")
    A = A[:, None] if A.dim() == 1 else A                                  # [B, 1] or [B, T]
    bonus = torch.minimum(cfg.ent_adv_a * H.detach(), A.abs() / cfg.ent_adv_kappa)  # sg(H): H is data
    return A + bonus                                                       # Eq. A' = A + min(a sg(H), |A| / kappa)

# ----------------------------------------------------------------------------------------------
# The objectives. Each takes rho, A, p_old, mask [B, T] and the resolved config and returns
# (loss_t [B, T], F [B, T], extra): the gradient of loss_t is -A * F * rho * grad log pi_theta;
# extra holds per-token or scalar tensors averaged into the metrics.


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
    """PPO min-form with ratio bounds [r_low, r_high] (numbers or tensors) and dual clip c for A < 0."""
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
    """GRPO as in verl: hard clip [1 - eps_low, 1 + eps_high], dual clip c for A < 0. Clip-Higher
    (DAPO) is the same with eps_high 0.28, Entropy-Adv the same on shaped advantages (DEFAULTS)."""
    loss_t, F = _ppo_clip(rho, A, 1 - cfg.clip_low, 1 + cfg.clip_high, cfg.clip_c)
    return loss_t, F, {}


def dac_bounds(q, cfg):
    """DAC ratio bounds from |(r - 1) r q| <= eps: q = p_old [B, T] -> (r_low, r_high) [B, T]."""
    r_low = 0.5 + 0.5 * torch.sqrt(torch.clamp(1 - 4 * cfg.clip_low / q, min=0))  # Eq. r_low(q)
    r_high = 0.5 + 0.5 * torch.sqrt(1 + 4 * cfg.clip_high / q)                    # Eq. r_high(q)
    return r_low, torch.clamp(r_high, max=DAC_R_MAX)                              # Eq. r_high <= 10


def dac_loss(rho, A, p_old, mask, cfg):
    """DAC (DCPO): PPO min-form with probability-dependent bounds r_low(q), r_high(q); dual clip c."""
    r_low, r_high = dac_bounds(p_old, cfg)
    loss_t, F = _ppo_clip(rho, A, r_low, r_high, cfg.clip_c)
    return loss_t, F, {"dac_r_high_mean": r_high, "dac_r_low_mean": r_low}


def sapo_loss(rho, A, p_old, mask, cfg):
    """SAPO: -A (4 / tau) sigmoid(tau (rho - 1)); not detached, so g = sech^2(tau (rho - 1) / 2) rho."""
    tau = torch.where(A > 0, rho.new_tensor(SAPO_TAU_POS), rho.new_tensor(SAPO_TAU_NEG))  # Eq. tau
    s = torch.sigmoid(tau * (rho - 1))                                     # Eq. sigmoid(tau (rho - 1))
    loss_t = -A * (4 / tau) * s                                            # Eq. loss_t
    F = (4 * s * (1 - s)).detach()  # stop-gradient: metric only; sech^2(tau (rho - 1) / 2) = g / rho
    return loss_t, F, {}


def bapo_path(device=None):
    """BAPO's candidate bounds in the authors' search order: c_low from a^- up to b^- (c_high = a^+),
    then c_high from a^+ + delta^+ up to b^+ (c_low = b^-). -> [K, 2] float64, columns (c_low, c_high)."""
    (a_lo, d_lo, b_lo), (a_hi, d_hi, b_hi) = BAPO_LOW, BAPO_HIGH
    n_lo, n_hi = (math.ceil((b - a) / d - 1e-9) for a, b, d in ((a_lo, b_lo, d_lo), (a_hi, b_hi, d_hi)))
    path = [(round(min(a_lo + k * d_lo, b_lo), 9), a_hi) for k in range(n_lo + 1)]
    path += [(b_lo, round(min(a_hi + k * d_hi, b_hi), 9)) for k in range(1, n_hi + 1)]
    return torch.tensor(path, dtype=torch.float64, device=device)


def _bapo_contributions(rho, A, mask):
    """[K, 2]: per candidate, (sum of the positive, sum of the negative) A * clipped rho over tokens."""
    path = bapo_path(rho.device)[:, :, None, None]                        # [K, 2, 1, 1]
    r = rho.detach().double()  # stop-gradient: the search picks bounds, it is not differentiated
    r_eff = torch.where(A >= 0, torch.minimum(r, path[:, 1]), torch.maximum(r, path[:, 0]))  # [K, B, T]
    x = r_eff * A * mask                                                   # Eq. A * clipped rho (deviation 9a)
    return torch.stack([x.clamp(min=0).sum((1, 2)), (-x).clamp(min=0).sum((1, 2))], dim=1)


def bapo_stats(logp, old_logp, adv, mask):
    """BAPO's search statistics for these tokens: logp, old_logp, mask [B, T], adv [B] or [B, T] (as for
    policy_loss) -> [K, 2] float64, row k = (positive, negative) contribution at bapo_path()[k]. Sums of
    tokens: add them up over micro-batches and all-reduce (SUM) over ranks, then call bapo_pick."""
    A = (adv[:, None] if adv.dim() == 1 else adv).detach().double()       # [B, 1] or [B, T]
    rho, _ = ratio(logp.detach(), old_logp)
    return _bapo_contributions(rho, A, mask.double())


def bapo_pick(stats):
    """(c_low, c_high) [2]: the first candidate of bapo_path() whose positive / (negative + eps)
    reaches rho_0 (no negative contribution counts as reached), else the last one. stats [K, 2]."""
    pos, neg = stats[:, 0], stats[:, 1]
    pos_neg = torch.where(neg > 0, pos / (neg + BAPO_EPS), math.inf)       # Eq. pos / (neg + eps) (9c)
    reached = pos_neg >= BAPO_RHO_0
    k = torch.where(reached.any(), reached.int().argmax(), len(stats) - 1)  # first reached, else the widest
    return bapo_path(stats.device)[k]


def bapo_loss(rho, A, p_old, mask, cfg, bounds=None):
    """BAPO: PPO min-form with bounds (c_low, c_high) = bounds (picked by the caller for the whole
    mini-batch, bapo_pick) or, when None, searched on this call's tokens; dual clip c."""
    if bounds is None:
        bounds = bapo_pick(_bapo_contributions(rho, A, mask))
    c_low, c_high = bounds.to(rho.dtype)
    loss_t, F = _ppo_clip(rho, A, c_low, c_high, cfg.clip_c)
    return loss_t, F, {"bapo_c_low": c_low, "bapo_c_high": c_high}


LOSSES = {
    "maspo": maspo_loss,
    "grpo": grpo_loss,
    "clip_higher": grpo_loss,  # GRPO with eps_high 0.28 (DEFAULTS)
    "dac": dac_loss,
    "sapo": sapo_loss,
    "bapo": bapo_loss,
    "entropy_adv": grpo_loss,  # GRPO on A' = entropy_advantage(A, H, cfg), shaped by the caller
}

# ----------------------------------------------------------------------------------------------
# Aggregation and the entry point


def aggregate(loss_t, mask, agg, num_tokens=None, num_seqs=None, norm_len=None):
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


def ratio(logp, old_logp):
    """rho = exp(clamp(logp - sg(old_logp), -20, 20)) and the clamped log-ratio, both [B, T]."""
    log_ratio = torch.clamp(logp - old_logp.detach(), -LOG_RATIO_MAX, LOG_RATIO_MAX)  # sg: pi_old is data
    return torch.exp(log_ratio), log_ratio                                 # Eq. rho = pi_theta / pi_old


def _check_inputs(logp, old_logp, adv, mask, cfg, bapo_bounds, num_tokens, num_seqs):
    if cfg.agg not in AGG_MODES:
        raise ValueError(f"unknown LossConfig.agg {cfg.agg!r}; choose one of {AGG_MODES}")
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp, old_logp, mask must all be [B, T]; got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(mask.shape)}")
    if adv.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"adv must be [B] or [B, T] with B, T = {tuple(logp.shape)}, got {tuple(adv.shape)}")
    if bapo_bounds is not None and (LOSSES[cfg.loss] is not bapo_loss or bapo_bounds.shape != (2,)):
        raise ValueError(f"bapo_bounds (a [2] tensor from bapo_pick) is read by loss 'bapo' only; got "
                         f"shape {tuple(bapo_bounds.shape)} with loss {cfg.loss!r}")
    for name, n in (("num_tokens", num_tokens), ("num_seqs", num_seqs)):
        if n is not None and not n > 0:
            raise ValueError(f"{name} must be > 0 when given, got {n}")


def policy_loss(logp, old_logp, adv, mask, cfg, ref_logp=None, bapo_bounds=None,
                num_tokens=None, num_seqs=None, norm_len=None):
    """Policy loss of cfg.loss and its metrics.

    logp [B, T] (with grad), old_logp [B, T] (pi_old, no grad), adv [B] or [B, T] (already shaped by
    entropy_advantage for "entropy_adv"), mask [B, T] (1 on response tokens; padded positions may
    hold any finite log-prob). ref_logp [B, T]: reference log-probs for the k3 KL (needed if
    kl_coef > 0). bapo_bounds [2]: BAPO's (c_low, c_high) from bapo_pick over the whole mini-batch
    (loss "bapo" only; None: searched on this call's tokens).
    num_tokens / num_seqs: the normaliser of the aggregation instead of this call's own count;
    norm_len: L of seq-mean-token-sum-norm (Dr. GRPO's constant; None: the padded length T).
    For gradient accumulation over micro-batches pass the mini-batch totals (response tokens for
    token-mean, sequences for the seq-mean modes; for seq-mean-token-sum-norm also a fixed
    norm_len): the summed micro-batch gradients then equal one big-batch call exactly. Under
    gradient averaging across W ranks (DDP / FSDP), pass global_count / W. Default: local counts.

    Returns (loss, metrics): loss a scalar for .backward(); metrics python floats over response
    tokens: gate_mean (mean F; for clip methods the unclipped share), gate_low_frac (share with
    F < 0.5; clip methods: clipped share), approx_kl (k3 KL(old || new)), ratio_min, ratio_max,
    ratio_dev_mean (mean |rho - 1|), ratio_dev_frac (share |rho - 1| > 0.2), m_mean (MASPO's mean m;
    0.0 for other objectives), kl_ref (when ref_logp is given), and objective extras (bapo_c_low,
    bapo_c_high, dac_r_low_mean, dac_r_high_mean).
    """
    cfg = resolve(cfg)
    _check_inputs(logp, old_logp, adv, mask, cfg, bapo_bounds, num_tokens, num_seqs)
    mask = mask.to(logp.dtype)
    A = (adv[:, None] if adv.dim() == 1 else adv).to(logp.dtype).detach().expand_as(logp)  # [B, T]; sg: data
    rho, log_ratio = ratio(logp, old_logp)                                 # deviation 1
    p_old = torch.exp(old_logp.detach())                                   # Eq. p_old
    extra_args = {} if bapo_bounds is None else {"bounds": bapo_bounds}
    loss_t, F, extra = LOSSES[cfg.loss](rho, A, p_old, mask, cfg, **extra_args)
    loss = aggregate(loss_t, mask, cfg.agg, num_tokens, num_seqs, norm_len)
    kl_ref = None
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError(f"kl_coef={cfg.kl_coef} > 0 needs ref_logp (reference-policy log-probs)")
    if ref_logp is not None:
        d = torch.clamp(ref_logp.detach() - logp, -LOG_RATIO_MAX, LOG_RATIO_MAX)  # log pi_ref / pi_theta; sg(pi_ref)
        kl_ref = torch.clamp(torch.exp(d) - d - 1, max=KL_MAX)           # Eq. k3 = e^d - d - 1 (deviation 11)
        if cfg.kl_coef > 0:
            kl = aggregate(kl_ref, mask, cfg.agg, num_tokens, num_seqs, norm_len)
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
