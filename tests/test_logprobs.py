"""Tests of logprobs.py against the plain path (logits = hidden @ weight.T, log_softmax / temperature,
gather; entropy as a sum), written out here with torch's own ops: values, entropy and gradients in
float64 to 1e-12 for every chunking, temperature included; a bf16 check with a stated tolerance; and a
record of every tensor the fused path creates, to show [B, T, V] never exists.
Run: python -m pytest tests/test_logprobs.py -q
"""
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import logprobs
from logprobs import entropy, hidden_logprobs, token_logprobs

D = torch.float64


def plain(logits, ids, temperature=1.0):
    """The reference: (log pi(o_t), H_t) of softmax(logits / temperature) in float32 / float64."""
    x = logits if logits.dtype == D else logits.float()
    logq = torch.log_softmax(x / temperature, dim=-1)
    return logq.gather(-1, ids[..., None]).squeeze(-1), -(logq.exp() * logq).sum(-1)


def close(a, b, tol=1e-12):
    return torch.allclose(a, b, atol=tol, rtol=tol)


def test_import_without_vllm():
    code = "import sys, logprobs; assert 'vllm' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=logprobs.__file__.rsplit("/", 1)[0])

# ---------------------------------------------------------------------------------------------
# token_logprobs / entropy (from logits)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.0])
@pytest.mark.parametrize("chunk", [1, 5, 16, 23, 30, 50, 1000])  # 30, 50: whole rows, 1 and 2 per block (T = 24)
def test_logits_path_values_and_gradients_equal_plain(chunk, temperature):
    torch.manual_seed(0)
    full = (3 * torch.randn(3, 25, 50, dtype=D)).requires_grad_(True)
    x = full[:, :-1]                                                      # non-contiguous, like logits[:, :-1]
    ids = torch.randint(0, 50, (3, 24))
    a, b = torch.randn(3, 24, dtype=D), torch.randn(3, 24, dtype=D)      # upstream gradients
    lp, H = token_logprobs(x, ids, chunk, temperature), entropy(x, chunk, temperature)
    lp_ref, H_ref = plain(x, ids, temperature)
    assert close(lp, lp_ref) and close(H, H_ref)
    g, = torch.autograd.grad((lp * a + H * b).sum(), full)
    g_ref, = torch.autograd.grad((lp_ref * a + H_ref * b).sum(), full)
    assert close(g, g_ref)


def test_temperature_changes_values_and_gradients():
    """A wrong temperature (or none) in either pass would be visible: T = 0.5 differs from T = 1."""
    torch.manual_seed(5)
    x = torch.randn(1, 4, 7, dtype=D, requires_grad=True)
    ids = torch.randint(0, 7, (1, 4))
    g_half, = torch.autograd.grad(token_logprobs(x, ids, 2, temperature=0.5).sum(), x)
    g_one, = torch.autograd.grad(token_logprobs(x, ids, 2).sum(), x)
    # d log pi / dx = (onehot - softmax(x / T)) / T, written out
    p = torch.softmax(x.detach() / 0.5, -1)
    onehot = torch.nn.functional.one_hot(ids, 7).to(D)
    assert close(g_half, (onehot - p) / 0.5) and not close(g_half, g_one, 1e-3)


def test_bf16_logits_computed_in_float32():
    torch.manual_seed(1)
    x = (4 * torch.randn(2, 9, 300)).bfloat16()
    ids = torch.randint(0, 300, (2, 9))
    out = token_logprobs(x, ids, chunk_size=4)
    lp_ref, H_ref = plain(x, ids)
    assert out.dtype == torch.float32
    assert (out - lp_ref).abs().max() < 1e-5  # a bf16 log_softmax would be off by ~1e-2
    assert (entropy(x, 4) - H_ref).abs().max() < 1e-5
    x.requires_grad_(True)
    w = torch.randn(2, 9)
    g1, = torch.autograd.grad((token_logprobs(x, ids, 4) * w).sum(), x)
    g2, = torch.autograd.grad((plain(x, ids)[0] * w).sum(), x)
    assert g1.dtype == torch.bfloat16 and torch.allclose(g1.float(), g2.float(), rtol=8e-3, atol=1e-6)


def test_bf16_gradients_at_a_temperature():
    """bf16 logits at T = 0.7: both backward passes divide by T and build the softmax in float32, so
    the bf16 gradient is the float32 one rounded (a bf16 softmax would be off by ~1e-1 here)."""
    torch.manual_seed(1)
    x = (4 * torch.randn(2, 9, 300)).bfloat16().requires_grad_(True)
    ids, w = torch.randint(0, 300, (2, 9)), torch.randn(2, 9)
    xf = x.detach().float().requires_grad_(True)
    for ours, ref in ((token_logprobs(x, ids, 4, 0.7), plain(xf, ids, 0.7)[0]),
                      (entropy(x, 4, 0.7), plain(xf, ids, 0.7)[1])):
        g, = torch.autograd.grad((ours * w).sum(), x)
        g_ref, = torch.autograd.grad((ref * w).sum(), xf)
        assert g.dtype == torch.bfloat16 and torch.allclose(g.float(), g_ref, rtol=8e-3, atol=1e-6)


class NewStorage(TorchDispatchMode):
    """Records the size (elements) of every new tensor storage an op allocates: views and in-place
    results share an input's storage and are not counted."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.sizes.append(t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("chunk", [4, 12, 20])  # T = 8: 4 tokens of a row; 1 row (8 tokens); 2 rows (16)
def test_logits_path_temporaries_are_one_chunk(chunk):
    """token_logprobs and entropy, forward and backward: besides the [B, T, V] gradient they must
    return, every tensor they allocate holds at most chunk_size x V elements."""
    B, T, V = 3, 8, 50
    x = torch.randn(B, T, V, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    for fn in (lambda: token_logprobs(x, ids, chunk, 0.9), lambda: entropy(x, chunk, 0.9)):
        with NewStorage() as rec:
            fn().sum().backward()
        big = [n for n in rec.sizes if n > chunk * V]
        assert big == [B * T * V], (chunk, sorted(rec.sizes)[-3:])  # only the gradient itself


def test_gradcheck():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 5, dtype=D, requires_grad=True)
    ids = torch.randint(0, 5, (2, 3))
    assert torch.autograd.gradcheck(lambda t: token_logprobs(t, ids, 2, 0.7), (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda t: entropy(t, 2, 0.7), (x,), fast_mode=True)


def test_shape_and_setting_errors():
    with pytest.raises(ValueError, match=r"ids \(2, 4\) must match logits\[:2\] \(2, 3\)"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids \(1, 3\) must match hidden\[:2\] \(1, 2\)"):
        hidden_logprobs(torch.zeros(1, 2, 4), torch.zeros(5, 4), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, D\]"):
        hidden_logprobs(torch.zeros(2, 4), torch.zeros(5, 4), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="must share a dtype"):
        hidden_logprobs(torch.zeros(1, 2, 4, dtype=torch.bfloat16), torch.zeros(5, 4), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        entropy(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match=r"\[V, D\]"):
        hidden_logprobs(torch.zeros(1, 2, 4), torch.zeros(5, 3), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        hidden_logprobs(torch.zeros(1, 2, 4), torch.zeros(5, 4), torch.zeros(1, 2, dtype=torch.long), chunk_size=0)

# ---------------------------------------------------------------------------------------------
# hidden_logprobs (fused lm_head)


def fused_and_plain(hidden, weight, ids, temperature, chunk, a, b):
    """(values, gradients w.r.t. hidden and weight) of sum(a * log pi + b * H), both paths."""
    lp, H = hidden_logprobs(hidden, weight, ids, temperature, chunk, with_entropy=True)
    grads = torch.autograd.grad((lp * a + H * b).sum(), (hidden, weight))
    lp_ref, H_ref = plain(hidden @ weight.T, ids, temperature)
    grads_ref = torch.autograd.grad((lp_ref * a + H_ref * b).sum(), (hidden, weight))
    return (lp, H, *grads), (lp_ref, H_ref, *grads_ref)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 4, 7, 10 ** 6])  # 7: ragged last chunk (B*T = 30); 10**6 > B*T
def test_hidden_logprobs_equal_plain_path(chunk, temperature):
    torch.manual_seed(2)
    B, T, Dm, V = 3, 10, 6, 13
    full = torch.randn(B, T + 1, Dm, dtype=D, requires_grad=True)
    hidden = full[:, :-1]                                                 # non-contiguous, like hidden[:, :-1]
    weight = torch.randn(V, Dm, dtype=D, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    a, b = torch.randn(B, T, dtype=D), torch.randn(B, T, dtype=D)
    ours, ref = fused_and_plain(hidden, weight, ids, temperature, chunk, a, b)
    for name, x, y in zip(("logp", "H", "d/dhidden", "d/dweight"), ours, ref):
        assert x.shape == y.shape and close(x, y), name
    assert ours[0].dtype == D and ours[2].dtype == D


def test_hidden_logprobs_without_entropy_and_with_unused_entropy():
    torch.manual_seed(3)
    hidden = torch.randn(2, 5, 4, dtype=D, requires_grad=True)
    weight = torch.randn(9, 4, dtype=D, requires_grad=True)
    ids = torch.randint(0, 9, (2, 5))
    lp, H = hidden_logprobs(hidden, weight, ids, 0.8, 3)
    assert H is None
    default, _ = hidden_logprobs(hidden, weight, ids)                      # temperature 1 unless told
    assert close(default, plain(hidden @ weight.T, ids)[0])
    g = torch.autograd.grad(lp.sum(), (hidden, weight))
    lp2, _ = hidden_logprobs(hidden, weight, ids, 0.8, 3, with_entropy=True)  # H computed, not used
    g2 = torch.autograd.grad(lp2.sum(), (hidden, weight))
    g_ref = torch.autograd.grad(plain(hidden @ weight.T, ids, 0.8)[0].sum(), (hidden, weight))
    assert all(close(x, y) and close(z, y) for x, z, y in zip(g, g2, g_ref))


def test_tied_weight_gets_both_gradients():
    """weight is also the input embedding: its gradient sums the lm_head's and the embedding's."""
    torch.manual_seed(6)
    V, Dm = 11, 5
    weight = torch.randn(V, Dm, dtype=D, requires_grad=True)
    proj = torch.randn(Dm, Dm, dtype=D)
    tokens = torch.randint(0, V, (2, 7))

    def forward(fused):
        hidden = torch.tanh(weight[tokens[:, :-1]] @ proj)               # embedding -> a tiny "body"
        if fused:
            return hidden_logprobs(hidden, weight, tokens[:, 1:], 1.0, 4)[0]
        return plain(hidden @ weight.T, tokens[:, 1:])[0]
    g, = torch.autograd.grad(forward(True).sum(), weight)
    g_ref, = torch.autograd.grad(forward(False).sum(), weight)
    assert close(g, g_ref)


def test_gradcheck_hidden_logprobs():
    torch.manual_seed(7)
    hidden = torch.randn(2, 3, 4, dtype=D, requires_grad=True)
    weight = torch.randn(6, 4, dtype=D, requires_grad=True)
    ids = torch.randint(0, 6, (2, 3))
    fn = lambda h, w: hidden_logprobs(h, w, ids, 0.7, 4, with_entropy=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight), fast_mode=True)


def test_bf16_hidden_logprobs_within_stated_tolerance():
    """bf16 hidden and weight: the matmul is bf16 (as the plain path's lm_head), the rest float32.
    Stated tolerance against float64 on the same bf16 values: |log pi|, |H| errors <= 0.05 (a logit
    of size ~8 carries a bf16 rounding of ~0.03), gradients within 2% (relative Frobenius norm), and
    never worse than 1.5x the plain bf16 path's own error."""
    torch.manual_seed(8)
    B, T, Dm, V = 2, 33, 64, 300
    hidden = torch.randn(B, T, Dm).bfloat16().requires_grad_(True)
    weight = (torch.randn(V, Dm) / 4).bfloat16().requires_grad_(True)
    ids = torch.randint(0, V, (B, T))
    a, b = torch.randn(B, T), torch.randn(B, T)
    lp, H = hidden_logprobs(hidden, weight, ids, 0.7, 8, with_entropy=True)
    gh, gw = torch.autograd.grad((lp * a + H * b).sum(), (hidden, weight))
    assert lp.dtype == H.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    h64, w64 = (t.detach().double().requires_grad_(True) for t in (hidden, weight))
    lp_ref, H_ref = plain(h64 @ w64.T, ids, 0.7)
    rh, rw = torch.autograd.grad((lp_ref * a + H_ref * b).sum(), (h64, w64))
    x = hidden @ weight.T                                                 # the plain bf16 path
    lp_bf, H_bf = token_logprobs(x, ids, temperature=0.7), entropy(x, temperature=0.7)
    ph, pw = torch.autograd.grad((lp_bf * a + H_bf * b).sum(), (hidden, weight))
    rel = lambda g, r: ((g.double() - r).norm() / r.norm()).item()       # noqa: E731
    assert (lp - lp_ref).abs().max() < 0.05 and (H - H_ref).abs().max() < 0.05
    assert rel(gh, rh) < 0.02 and rel(gw, rw) < 0.02
    assert rel(gh, rh) <= 1.5 * rel(ph, rh) and rel(gw, rw) <= 1.5 * rel(pw, rw)
    assert (lp - lp_ref).abs().max() <= 1.5 * (lp_bf - lp_ref).abs().max() + 1e-6


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates (forward and backward) and the ops seen."""

    def __init__(self):
        super().__init__()
        self.numel, self.ops = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func.overloadpacket))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_fused_path_never_creates_a_B_T_V_tensor():
    B, T, Dm, V, chunk = 4, 16, 4, 50, 8                                  # B*T*V = 3200, chunk*V = 400
    hidden = torch.randn(B, T, Dm, requires_grad=True)
    weight = torch.randn(V, Dm, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    with LargestTensor() as fused:
        lp, H = hidden_logprobs(hidden, weight, ids, 0.9, chunk, with_entropy=True)
        (lp.sum() + H.sum()).backward()
    assert "aten.scatter_add_" in fused.ops                              # the backward was recorded too
    assert fused.numel == chunk * V                                      # largest: one chunk of logits
    with LargestTensor() as unfused:
        lp, H = plain(hidden @ weight.T, ids, 0.9)
        (lp.sum() + H.sum()).backward()
    assert unfused.numel == B * T * V
