"""logprobs.py: log pi(o_t) and the next-token entropy H_t of a causal LM, without ever holding the
[B, T, V] logits in float32 (or, on the fused path, at all). Pure tensor functions, no I/O.

Why chunking. The policy loss needs one number per token, log pi(o_t), but the softmax behind it runs
over the whole vocabulary: at B x T = 8 x 4096 tokens and V = 151,936 (Qwen2.5) the float32 logits
take 20 GB, their gradient as much again. Every function here walks the tokens chunk_size at a time,
so the float32 temporaries are [chunk_size, V]; backward writes only the gradient it must return.

  token_logprobs(logits, ids)    logits [B, T, V] (any float dtype) -> log pi(o_t) [B, T]
  entropy(logits)                logits [B, T, V] -> H_t [B, T]
  hidden_logprobs(hidden, weight, ids, with_entropy=...)
                                 the fused path: hidden [B, T, D] (the model body's last hidden states)
                                 and the lm_head weight [V, D] -> (log pi(o_t) [B, T], H_t [B, T] or
                                 None). The logits hidden @ weight.T are formed one chunk at a time
                                 inside a custom autograd Function whose backward RECOMPUTES each chunk
                                 instead of storing it, so neither pass holds [B, T, V]: the idea of
                                 Liger-Kernel's fused linear cross-entropy and of verl's fused kernels.
                                 Gradients flow to hidden and to weight (which may be tied to the
                                 input embeddings). bench/update.py measures one optimizer update.

All three take `temperature` T: they return log-probs / entropy of softmax(logits / T), the
distribution the sampler drew from when it sampled at temperature T (verl divides the logits by the
rollout temperature in the trainer for the same reason: the ratio rho = pi_theta / pi_old must compare
the sampling distributions).

Equations (z = logits / T, p = softmax(z), lse = logsumexp(z), one row per token):
    log pi(o_t) = z[o_t] - lse                   d/dz = onehot(o_t) - p
    H_t = -sum_v p_v log p_v                     d/dz = -p * (log p + H_t)
    z = hidden @ weight.T / T                    d/dhidden = (dL/dz / T) @ weight,
                                                 d/dweight = sum over tokens of (dL/dz / T)^T @ hidden

Exactness. Each function computes the same formula as the plain path (log_softmax + gather; the
entropy sum) in float32 (float64 for float64 inputs) whatever the input dtype; only the summation
order differs, so in float64 the results and gradients agree with the plain path to ~1e-12 for
any chunk_size, ragged last chunks included (tests/test_logprobs.py). With bf16 inputs the matmul
runs in bf16 as the plain path's lm_head does, the softmax and all sums over tokens (the weight's
gradient) accumulate in float32. Each Function supports one backward (no double backward).

Use (train.py):
    hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state       # [B, T, D]
    logp, H = hidden_logprobs(hidden[:, :-1], model.lm_head.weight, ids[:, 1:],
                              temperature=T, with_entropy=True)                       # [B, T-1] each
Tests: `python -m pytest tests/test_logprobs.py -q`; benchmarks: `python bench/logprobs.py`,
`python bench/update.py`.
"""
import torch


def _wide(dtype):
    """The dtype the softmax is computed in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _check(temperature, chunk_size):
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _scaled(x, dtype, T):
    """z = x / T in `dtype`; at T = 1 no copy is made for float32 x (x itself is returned)."""
    x = x.to(dtype)
    return x if T == 1 else x / T

# ----------------------------------------------------------------------------------------------
# 1. From logits [B, T, V]


def _blocks(B, T, chunk_size):
    """(b0, b1, t0, t1) blocks of about chunk_size tokens tiling [B, T]; slices stay views."""
    if T >= chunk_size:
        return [(b, b + 1, t, min(t + chunk_size, T)) for b in range(B) for t in range(0, T, chunk_size)]
    rows = max(chunk_size // max(T, 1), 1)
    return [(b, min(b + rows, B), 0, T) for b in range(0, B, rows)]


class _TokenLogprobs(torch.autograd.Function):
    """log pi(o_t) = z[o_t] - lse, z = logits / T; backward: d/dlogits = g (onehot - p) / T."""

    @staticmethod
    def forward(ctx, logits, ids, temperature, chunk_size):
        B, T, V = logits.shape
        dt = _wide(logits.dtype)
        logp = logits.new_empty(B, T, dtype=dt)                            # [B, T]
        lse = logits.new_empty(B, T, dtype=dt)                             # [B, T] logsumexp(z)
        for b0, b1, t0, t1 in _blocks(B, T, chunk_size):
            z = _scaled(logits[b0:b1, t0:t1], dt, temperature)             # [b, t, V] float32, one chunk
            lse[b0:b1, t0:t1] = torch.logsumexp(z, dim=-1)
            logp[b0:b1, t0:t1] = z.gather(-1, ids[b0:b1, t0:t1, None]).squeeze(-1) - lse[b0:b1, t0:t1]
        ctx.save_for_backward(logits, ids, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, ids, lse = ctx.saved_tensors
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)  # [B, T, V]
        for b0, b1, t0, t1 in _blocks(*logits.shape[:2], ctx.chunk_size):
            g = grad_logp[b0:b1, t0:t1, None].to(lse.dtype) / ctx.temperature   # [b, t, 1]
            out, x = grad[b0:b1, t0:t1], logits[b0:b1, t0:t1]
            inplace = out.dtype == lse.dtype  # float32 logits: work straight in grad, no extra chunk
            z = torch.div(x, ctx.temperature, out=out) if inplace else x.to(lse.dtype) / ctx.temperature
            p = z.sub_(lse[b0:b1, t0:t1, None]).exp_()                          # softmax(z), recomputed
            p.mul_(-g).scatter_add_(-1, ids[b0:b1, t0:t1, None], g)             # g (onehot - p) / T
            if not inplace:
                out.copy_(p)
        return grad, None, None, None


class _Entropy(torch.autograd.Function):
    """H = -sum_v p_v log p_v of p = softmax(logits / T); backward: dH/dlogits = -p (log p + H) / T."""

    @staticmethod
    def forward(ctx, logits, temperature, chunk_size):
        B, T, V = logits.shape
        H = logits.new_empty(B, T, dtype=_wide(logits.dtype))              # [B, T]
        for b0, b1, t0, t1 in _blocks(B, T, chunk_size):
            logq = torch.log_softmax(_scaled(logits[b0:b1, t0:t1], H.dtype, temperature), dim=-1)  # log p
            H[b0:b1, t0:t1] = -(logq.exp() * logq).sum(-1)
        ctx.save_for_backward(logits, H)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return H

    @staticmethod
    def backward(ctx, grad_H):
        logits, H = ctx.saved_tensors
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)  # [B, T, V]
        for b0, b1, t0, t1 in _blocks(*logits.shape[:2], ctx.chunk_size):
            logq = torch.log_softmax(_scaled(logits[b0:b1, t0:t1], H.dtype, ctx.temperature), dim=-1)
            g = grad_H[b0:b1, t0:t1, None].to(H.dtype) / ctx.temperature   # [b, t, 1]
            p = logq.exp()
            grad[b0:b1, t0:t1] = logq.add_(H[b0:b1, t0:t1, None]).mul_(p).mul_(-g)  # -g p (log p + H) / T
        return grad, None, None


def _check_logits(logits, temperature, chunk_size):
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    _check(temperature, chunk_size)


def token_logprobs(logits, ids, chunk_size=256, temperature=1.0):
    """log pi(o_t) under softmax(logits / temperature): logits [B, T, V] (any float dtype), ids [B, T]
    -> [B, T] float32 (float64 for float64 logits), differentiable with respect to logits. Equals
    log_softmax(logits.float() / temperature).gather(ids), computed chunk_size tokens at a time."""
    _check_logits(logits, temperature, chunk_size)
    if ids.shape != logits.shape[:2]:
        raise ValueError(f"ids {tuple(ids.shape)} must match logits[:2] {tuple(logits.shape[:2])}")
    return _TokenLogprobs.apply(logits, ids.long(), float(temperature), chunk_size)


def entropy(logits, chunk_size=256, temperature=1.0):
    """Next-token entropy H_t = -sum_v p_v log p_v of p = softmax(logits / temperature): logits
    [B, T, V] -> [B, T] float32 (float64 for float64 logits), chunked like token_logprobs and
    differentiable. Detach it before using it as data (maspo.entropy_advantage does)."""
    _check_logits(logits, temperature, chunk_size)
    return _Entropy.apply(logits, float(temperature), chunk_size)

# ----------------------------------------------------------------------------------------------
# 2. Fused: from the last hidden states [B, T, D] and the lm_head weight [V, D]


def _chunk_logits(h, weight, temperature, dt):
    """z = h @ weight.T / T for one chunk: h [n, D] -> [n, V] in dt. The matmul runs in the inputs'
    dtype (bf16 like the plain path's lm_head), the division and everything after it in dt."""
    return (h @ weight.T).to(dt).div_(temperature)


class _HiddenLogprobs(torch.autograd.Function):
    """(log pi(o_t), H_t) of z = hidden @ weight.T / T, chunk by chunk over the N = B*T tokens.
    Saves only hidden, weight, ids and per-token lse, H; backward recomputes each chunk's z."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, temperature, chunk_size, with_entropy):
        B, T, D = hidden.shape
        h = hidden.reshape(B * T, D)                                       # [N, D] (a copy only if not viewable)
        i = ids.reshape(B * T, 1)                                          # [N, 1]
        dt = _wide(hidden.dtype)
        logp = h.new_empty(B * T, dtype=dt)                                # [N]
        lse = h.new_empty(B * T, dtype=dt)                                 # [N] logsumexp(z)
        H = h.new_empty(B * T, dtype=dt) if with_entropy else None         # [N]
        for n0 in range(0, B * T, chunk_size):
            n1 = min(n0 + chunk_size, B * T)
            z = _chunk_logits(h[n0:n1], weight, temperature, dt)            # [n, V], the only big tensor
            lse[n0:n1] = torch.logsumexp(z, dim=-1)
            logq = z.sub_(lse[n0:n1, None])                                # log p = z - lse, in place
            logp[n0:n1] = logq.gather(-1, i[n0:n1]).squeeze(-1)            # Eq. log pi(o_t) = z[o_t] - lse
            if with_entropy:
                H[n0:n1] = -(logq.exp() * logq).sum(-1)                    # Eq. H = -sum p log p
        ctx.save_for_backward(h, weight, i, lse, H)
        ctx.temperature, ctx.chunk_size, ctx.hidden_shape = temperature, chunk_size, hidden.shape
        ctx.set_materialize_grads(False)  # an output nobody differentiates (H used detached) arrives as None
        return (logp.view(B, T), H.view(B, T)) if with_entropy else logp.view(B, T)

    @staticmethod
    def backward(ctx, grad_logp, *grad_H):
        h, weight, i, lse, H = ctx.saved_tensors
        temperature, N = ctx.temperature, h.shape[0]
        need_h, need_w = ctx.needs_input_grad[:2]
        g_lp = grad_logp.reshape(N, 1).to(lse.dtype) if grad_logp is not None else lse.new_zeros(N, 1)  # dL/dlog pi
        g_H = grad_H[0].reshape(N, 1).to(lse.dtype) if grad_H and grad_H[0] is not None else None
        grad_h = torch.empty_like(h) if need_h else None                   # [N, D]
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=h.device) if need_w else None  # [V, D] fp32
        for n0 in range(0, N, ctx.chunk_size):
            n1 = min(n0 + ctx.chunk_size, N)
            logq = _chunk_logits(h[n0:n1], weight, temperature, lse.dtype).sub_(lse[n0:n1, None])  # recomputed log p
            p = logq.exp()                                                 # [n, V]
            if g_H is None:
                dz = p.mul_(-g_lp[n0:n1])                                  # -g p
            else:  # coefficient -(g + g_H (log p + H)) on p, built in logq's memory
                dz = p.mul_(logq.add_(H[n0:n1, None]).mul_(g_H[n0:n1]).add_(g_lp[n0:n1]).neg_())
            del logq
            dz.scatter_add_(-1, i[n0:n1], g_lp[n0:n1])  # Eq. dL/dz = g (onehot - p) - g_H p (log p + H)
            dx = dz.div_(temperature).to(weight.dtype)                     # dL/d(hidden @ weight.T) = dL/dz / T
            if need_h:
                grad_h[n0:n1] = dx @ weight                                # Eq. d/dhidden = dx @ weight
            if need_w and dx.dtype == grad_w.dtype:
                grad_w.addmm_(dx.T, h[n0:n1])                              # Eq. d/dweight = sum_chunks dx^T @ hidden
            elif need_w:  # bf16: the chunk's product in bf16 (as the plain path), the sum over chunks in float32
                grad_w += (dx.T @ h[n0:n1]).to(grad_w.dtype)
        return (grad_h.view(ctx.hidden_shape) if need_h else None,
                grad_w.to(weight.dtype) if need_w else None, None, None, None, None)


def hidden_logprobs(hidden, weight, ids, temperature=1.0, chunk_size=512, with_entropy=False):
    """log pi(o_t) (and H_t) of softmax(hidden @ weight.T / temperature), never forming [B, T, V].

    hidden [B, T, D]: the model body's last hidden states (after the final norm), any float dtype;
    weight [V, D]: the lm_head weight (tied or not); ids [B, T]: the tokens o_t. Returns
    (logp [B, T], H [B, T] or None), float32 (float64 for float64 inputs). Differentiable with respect
    to hidden and weight; backward recomputes the logits chunk_size tokens at a time. Equals
    token_logprobs(hidden @ weight.T, ids, temperature=temperature) and entropy(...) of the same."""
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must be [B, T, D] and weight [V, D]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    if ids.shape != hidden.shape[:2]:
        raise ValueError(f"ids {tuple(ids.shape)} must match hidden[:2] {tuple(hidden.shape[:2])}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    _check(temperature, chunk_size)
    out = _HiddenLogprobs.apply(hidden, weight, ids.long(), float(temperature), chunk_size, with_entropy)
    return out if with_entropy else (out, None)
