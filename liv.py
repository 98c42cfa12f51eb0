"""The LIV operator family (STAR, arXiv 2411.17800, section 3 of the paper).

A linear input-varying operator maps x (length l, width d) to y_i = sum_j T_ij(x) x_j. Every LIV
here is built the same way:

    features = featurizer(x)            # C (query-like), B (key-like), V (values), A (decays)
    y_heads  = mixer(features)          # the token-mixing structure of T
    y        = out_proj(y_heads)        # channel mixing back to width d

and the four token-mixing structures of the paper are the mixers below, with two of ours beside
them (sliding-window attention, the gated delta rule):

    diagonal (1)                 GatedMixer      SwiGLU: T_ii = silu(C_i)            GMemless
    low-rank (2)                 AttentionMixer  T_ij = softmax(C_i B_j^T)           SA-1..SA-4
                                                 same, banded |i - j| < w            SWA-1
    scaled Toeplitz (3)          ShortConvMixer  T_ij = C_i K_(i-j) B_j, |K| = 3     GConv-1
                                 LongConvMixer   same, implicit K of length l (FFT)  GConv-2
    semi-separable (4)           RecurrenceMixer T_ij = C_i A_(i-1)...A_(j+1) B_j    Rec-1, Rec-2
                                 DeltaMixer      the gated delta rule (DeltaNet)     Delta-1

A differential LIV (X-Diff) runs two mixers on separate C/B (and A) features with a shared V and
returns y1 - lambda * y2 with lambda learned per head, then a per-head RMSNorm.

Each LIV runs two ways that the tests hold equal: `forward(x)` over a whole sequence (training,
prefill) and `step(x_t, cache)` for one token with a cache from `init_cache`. Sharing (paper
section 2, backbone genes 2-5): `featurizer_from=leader` reuses the leader's projection weights;
`shared_groups=('B', 'V')` takes those features from the leader at run time instead of
computing them (for attention: cross-layer KV sharing, so this LIV owns no K/V cache).

Dimension names: b batch, l length, d width, h heads, k head dim (d = h * k), g K/V heads,
n recurrent state size per head, t cached length.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class LIVConfig:
    """Everything a LIV needs: operator genome (mixer, diff), featurizer settings and sizes."""
    mixer: str = "attention"   # attention | recurrence | short_conv | long_conv | gated
    width: int = 64            # d
    heads: int = 4             # h
    kv_repeat: int = 1         # attention: query heads per K/V head (1 MHA, 4 GQA, 0 = all: MQA)
    window: int = 0            # attention: banded (sliding-window) sparsity mask; 0 = none
    feature_conv: int = 0      # causal short conv (kernel size) inside the featurizer; 0 = none
    state: int = 16            # recurrence: state expansion n
    kernel: int = 3            # short_conv: kernel length
    expansion: float = 1.0     # gated: hidden = expansion * d, rounded to a multiple of 64
    diff: bool = False         # differential variant
    max_len: int = 1024        # long_conv: implicit filter length
    chunk: int = 64            # recurrence: chunk length of the chunked form

    @property
    def head_dim(self):
        return self.width // self.heads

    @property
    def kv_heads(self):
        return 1 if self.kv_repeat == 0 else max(1, self.heads // self.kv_repeat)

    @property
    def hidden(self):
        """SwiGLU hidden width: expansion * d rounded to a multiple of 64 (ours: as in Llama)."""
        return max(64, 64 * round(self.expansion * self.width / 64))

    def check(self):
        """The one rule on shapes: heads of an even size (RoPE rotates pairs), and for attention
        K/V heads that divide the heads. A ValueError says which fails."""
        if self.width % self.heads or self.head_dim % 2:
            raise ValueError(f"width {self.width} must split into {self.heads} heads of an even size")
        if self.mixer == "attention" and self.heads % self.kv_heads:
            raise ValueError(f"would have {self.kv_heads} K/V heads, which do not divide {self.heads} heads")
        return self


# ---------------------------------------------------------------------------------------------
# Small parts shared by several mixers


class CausalConv(nn.Module):
    """Depthwise causal convolution over time, y_i = sum_{s<kernel} w_s x_(i-s), with a step form."""

    def __init__(self, channels, kernel):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.randn(channels, 1, kernel) / math.sqrt(kernel))

    def forward(self, x):  # x (b, l, c): channel-last, no transposed copies (a conv1d needs (b, c, l))
        l, padded = x.size(1), F.pad(x, (0, 0, self.kernel - 1, 0))  # (b, l + kernel - 1, c)
        y = sum(padded[:, s: s + l] * self.weight[:, 0, s] for s in range(self.kernel))  # (b, l, c)
        return y.to(x.dtype)  # under autocast: bf16 in, float32 sums, bf16 out as every feature is

    def step(self, x, state):  # x (b, 1, c), state (b, c, kernel - 1): the last inputs
        window = torch.cat([state, x.transpose(1, 2)], dim=2)  # (b, c, kernel)
        state.copy_(window[:, :, 1:])
        return (window * self.weight[:, 0]).sum(-1).unsqueeze(1).to(x.dtype)  # (b, 1, c)

    def prefill(self, x, state):  # remember the last kernel-1 inputs of x (b, l, c)
        tail = F.pad(x.transpose(1, 2), (self.kernel - 1, 0))[:, :, -(self.kernel - 1):]
        state.copy_(tail)


def rms_norm(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x, start):
    """Rotary position embedding (RoFormer) of x (b, heads, l, k) at positions start..start+l-1."""
    k, l = x.size(-1), x.size(-2)
    freqs = 10000.0 ** (-torch.arange(0, k, 2, device=x.device, dtype=torch.float32) / k)  # (k/2,)
    pos = torch.arange(start, start + l, device=x.device, dtype=torch.float32)
    angles = pos[:, None] * freqs[None, :]  # (l, k/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def heads(x, n):  # (b, l, n * k) -> (b, n, l, k)
    b, l, _ = x.shape
    return x.view(b, l, n, -1).transpose(1, 2)


def merge(y):  # (b, h, l, k) -> (b, l, h * k)
    b, h, l, k = y.shape
    return y.transpose(1, 2).reshape(b, l, h * k)


# ---------------------------------------------------------------------------------------------
# Mixers: the token-mixing structure of T. Each takes the features of one copy and returns
# (y (b, l, h*k), exposed features). Exposed features are what a later LIV may share.


class AttentionMixer(nn.Module):
    """Low-rank token mixing with softmax: multi-head / grouped-query / multi-query attention, RoPE.

    The K/V cache holds rotated keys and values; with B (and V) shared, the leader's cache is used
    and none is kept here. With a window (banded sparsity: sliding-window attention, SWA-1) the
    cache is a ring of `window` slots, so its size does not grow with the sequence.
    """
    groups = ("C", "B", "V")

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def sizes(self):
        c = self.cfg
        return {"C": c.width, "B": c.kv_heads * c.head_dim, "V": c.kv_heads * c.head_dim}

    def forward(self, f, shared=(), cache=None):
        c, start = self.cfg, (int(cache["pos"]) if cache is not None else 0)
        q = f["C"] if "C" in shared else rope(heads(f["C"], c.heads), start)  # (b, h, l, k)
        k = f["B"] if "B" in shared else rope(heads(f["B"], c.kv_heads), start)  # (b, g, t, k)
        v = f["V"] if "V" in shared else heads(f["V"], c.kv_heads)  # (b, g, t, k)
        mask = None
        if cache is not None and c.window:
            k, v, mask = self.roll(cache, k, v, start, q.size(2), shared)
        elif cache is not None:  # append this call's keys/values; attend over the whole history
            end = start + q.size(2)
            if "B" not in shared:
                cache["k"][:, :, start:end] = k
                k = cache["k"][:, :, :end]
            if "V" not in shared:
                cache["v"][:, :, start:end] = v
                v = cache["v"][:, :, :end]
        y = self.attend(q, k, v, mask)  # (b, h, l, k)
        return merge(y), {"C": q, "B": k, "V": v}

    step = forward  # one token is a prefill of length 1 against the cached history

    def roll(self, cache, k, v, start, l, shared):
        """Sliding-window cache: a ring of `window` slots, position p in slot p % window. A prefill
        attends over its own keys (banded) and keeps the last window of them; a step writes its slot
        and attends over the ring, masking the slots not written yet (k/v (b, g, window, k))."""
        own = [(name, t) for name, group, t in (("k", "B", k), ("v", "V", v)) if group not in shared]
        ring = cache[own[0][0]].size(2) if own else k.size(2)  # k and v shared: the leader's ring
        if start == 0:  # prefill
            keep = torch.arange(max(0, l - ring), l, device=k.device)  # the last `ring` of the l positions
            for name, t in own:
                cache[name][:, :, keep % ring] = t[:, :, keep]
            return k, v, None
        if l != 1:
            raise ValueError("chunked prefill after a prefix is not supported: prefill once, then step")
        for name, t in own:
            cache[name][:, :, start % ring] = t[:, :, 0]
        k, v = cache.get("k", k), cache.get("v", v)  # the ring (a shared group: the leader's)
        return k, v, (torch.arange(ring, device=k.device) <= start)[None]  # (1, ring): slots written so far

    def attend(self, q, k, v, mask=None):
        l, t = q.size(2), k.size(2)
        if mask is None and self.cfg.window:  # banded: key j is visible from query i iff i - window < j <= i
            i = torch.arange(t - l, t, device=q.device)[:, None]
            j = torch.arange(t, device=q.device)[None, :]
            mask = (j <= i) & (j > i - self.cfg.window)  # (l, t)
        causal = mask is None and l > 1
        if causal and l != t:
            raise ValueError("chunked prefill after a prefix is not supported: prefill once, then step")
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=q.size(1) != k.size(1))

    def slots(self, max_len):
        """Cached positions: the whole history, or only the window (a sliding-window class)."""
        return min(self.cfg.window, max_len) if self.cfg.window else max_len

    def init_cache(self, batch, max_len, shared, device, dtype):
        c, cache = self.cfg, {}
        for name, group in (("k", "B"), ("v", "V")):
            if group not in shared:
                cache[name] = torch.zeros(batch, c.kv_heads, self.slots(max_len), c.head_dim, device=device, dtype=dtype)
        return cache

    def cache_numel(self, batch, max_len, shared):
        own = sum(g not in shared for g in ("B", "V"))
        return own * batch * self.cfg.kv_heads * self.slots(max_len) * self.cfg.head_dim

    def param_numel(self):
        return 0


def attention_reference(q, k, v, window=0):
    """Naive masked-softmax attention (tests only). q (b, h, l, k), k/v (b, g, l, k)."""
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (b, h, l, k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))  # (b, h, l, l)
    i = torch.arange(q.size(2))[:, None]
    j = torch.arange(q.size(2))[None, :]
    visible = (j <= i) & ((j > i - window) if window else True)
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


class RecurrenceMixer(nn.Module):
    """Sequentially semi-separable token mixing: a gated linear recurrence with data-dependent decay.

        S_i = a_i S_(i-1) + B_i^T V_i      (per head: S is n x k, a_i = sigmoid(A_i) in (0, 1))
        y_i = C_i S_i

    Training runs the chunked form (Mamba-2's SSD, `ssd_minimal`): a masked matmul with
    exp(segsum(log a)) inside each chunk and a recurrence over chunk states across chunks.
    The decay is a scalar per head and step (ours: Mamba-2 style; the paper fixes no form).
    """
    groups = ("C", "B", "V", "A")

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # decay bias: per-head initial decays spread between 0.9 and 0.999 (ours)
        target = 1 - torch.logspace(-1, -3, cfg.heads)
        self.decay_bias = nn.Parameter(torch.log(target / (1 - target)))

    def sizes(self):
        c = self.cfg
        return {"C": c.heads * c.state, "B": c.heads * c.state, "V": c.width, "A": c.heads}

    def split(self, f):
        c = self.cfg
        q = heads(f["C"], c.heads) * c.state ** -0.5  # (b, h, l, n)
        kk = heads(f["B"], c.heads)  # (b, h, l, n)
        v = heads(f["V"], c.heads)  # (b, h, l, k)
        log_a = F.logsigmoid(f["A"].float() + self.decay_bias).transpose(1, 2)  # (b, h, l)
        return q, kk, v, log_a

    def forward(self, f, shared=(), cache=None):
        q, kk, v, log_a = self.split(f)
        y, state = chunked_recurrence(q, kk, v, log_a, self.cfg.chunk)
        if cache is not None:
            cache["state"].copy_(state)
        return merge(y), f

    def step(self, f, shared, cache):
        q, kk, v, log_a = self.split(f)  # l = 1
        s = cache["state"]  # (b, h, n, k), float32 in any model: in bf16 a decay of 0.999 rounds to 1.0
        s.mul_(log_a.exp()[..., None]).add_(kk.float().transpose(-1, -2) @ v.float())
        return merge((q.float() @ s).to(v.dtype)), f

    def init_cache(self, batch, max_len, shared, device, dtype):
        c = self.cfg  # the state stays float32 whatever the cache dtype (counted at the nominal size)
        return {"state": torch.zeros(batch, c.heads, c.state, c.head_dim, device=device, dtype=torch.float32)}

    def cache_numel(self, batch, max_len, shared):
        return batch * self.cfg.heads * self.cfg.state * self.cfg.head_dim

    def param_numel(self):
        return self.cfg.heads


def segsum(x):
    """out[..., i, j] = x[j+1] + ... + x[i] for j <= i, -inf above the diagonal. x (..., T)."""
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)  # (..., T, T): x[..., i, j] = x_i
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), -1)
    x = x.masked_fill(~below, 0).cumsum(-2)  # sums of x_(j+1..i)
    return x.masked_fill(~torch.tril(below | torch.eye(T, dtype=torch.bool, device=x.device)), float("-inf"))


def state_in_float32(chunked):
    """A chunked form run with autocast off on float32 inputs: y in v's dtype, the state float32.
    Autocast runs every `@` in bf16 whatever its operands' dtype, and a decay of 0.999 is 1.0 in
    bf16: the decays, chunk states and carried state stay float32, as the decode steps keep theirs
    (ours). Relative error at l = 2,048, decays ~0.999, under CPU bf16 autocast: 4.5e-3 (recurrence)
    and 6.4e-3 (delta rule) before, ~1e-3 now (y's own bf16 rounding)."""
    @functools.wraps(chunked)
    def run(q, kk, v, *gates, **chunk):
        with torch.autocast(q.device.type, enabled=False):
            y, state = chunked(*(t.float() if torch.is_tensor(t) else t for t in (q, kk, v, *gates)), **chunk)
        return y.to(v.dtype), state  # (b, h, l, k), (b, h, n, k)
    return run


@state_in_float32
def chunked_recurrence(q, kk, v, log_a, chunk):
    """Chunked form of S_i = a_i S_(i-1) + kk_i^T v_i, y_i = q_i S_i (Mamba-2 SSD, no time loop).

    q, kk (b, h, l, n); v (b, h, l, k); log_a (b, h, l). Any l: padded to a multiple of the chunk
    with a_i = 1 and kk_i = 0, which leaves outputs and the final state unchanged.
    Returns y (b, h, l, k) and the final state (b, h, n, k).
    """
    b, h, l, n = q.shape
    T = min(chunk, l)
    pad = (-l) % T
    q, kk, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, kk, v))
    log_a = F.pad(log_a, (0, pad))
    c = (l + pad) // T
    q, kk = q.view(b, h, c, T, n), kk.view(b, h, c, T, n)  # (b, h, c, T, n)
    v = v.view(b, h, c, T, -1)  # (b, h, c, T, k)
    log_a = log_a.view(b, h, c, T)  # (b, h, c, T), float32
    cum = log_a.cumsum(-1)  # (b, h, c, T)
    # 1. inside each chunk: y = ((q kk^T) * exp(segsum log a)) v
    decay = segsum(log_a).exp()  # (b, h, c, T, T)
    y = ((q @ kk.transpose(-1, -2)) * decay) @ v  # (b, h, c, T, k)
    # 2. each chunk's contribution to the state at its end
    to_end = (cum[..., -1:] - cum).exp()  # (b, h, c, T)
    chunk_states = (kk * to_end[..., None]).transpose(-1, -2) @ v  # (b, h, c, n, k)
    # 3. across chunks: state entering chunk c = sum over earlier chunks, decayed (segsum over chunks)
    chunk_decay = segsum(F.pad(cum[..., -1], (1, 0))).exp()  # (b, h, c+1, c+1)
    zero = torch.zeros_like(chunk_states[:, :, :1])
    states = torch.cat([zero, chunk_states], dim=2)  # (b, h, c+1, n, k)
    states = (chunk_decay @ states.flatten(-2)).view_as(states)  # (b, h, c+1, n, k)
    # 4. the entering state's contribution inside each chunk
    y = y + (q @ states[:, :, :-1]) * cum.exp()[..., None]  # (b, h, c, T, k)
    return y.view(b, h, c * T, -1)[:, :, :l], states[:, :, -1]


def recurrence_reference(q, kk, v, log_a):
    """The recurrence as a loop over time steps (tests only)."""
    s = q.new_zeros(q.size(0), q.size(1), q.size(-1), v.size(-1))  # (b, h, n, k)
    ys = []
    for i in range(q.size(2)):
        s = log_a[:, :, i, None, None].exp() * s + kk[:, :, i, :, None] * v[:, :, i, None, :]
        ys.append(q[:, :, i, None] @ s)  # (b, h, 1, k)
    return torch.cat(ys, 2), s


class DeltaMixer(nn.Module):
    """Semi-separable token mixing by the gated delta rule (Gated DeltaNet, Yang et al. 2024):

        S_i = a_i (I - b_i k_i k_i^T) S_(i-1) + b_i k_i v_i^T     (per head: S is k x k)
        y_i = q_i S_i

    with q, k L2-normalised (q also scaled by k^-1/2), a_i = sigmoid(A_i) the decay and
    b_i = sigmoid(beta_i) the write strength, both per head and step; the A feature group holds
    both (2h). Each write first erases what the state holds under k_i, so the state stores the
    latest value per key: better in-context recall than a sum of outer products (Rec-1).
    Training runs the chunkwise form (`chunked_delta_rule`), the state is float32 in any dtype.
    """
    groups = ("C", "B", "V", "A")

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        target = 1 - torch.logspace(-1, -3, cfg.heads)  # initial decays 0.9..0.999, as Rec-1 (ours)
        self.decay_bias = nn.Parameter(torch.log(target / (1 - target)))

    def sizes(self):
        c = self.cfg
        return {"C": c.width, "B": c.width, "V": c.width, "A": 2 * c.heads}

    def split(self, f):
        c = self.cfg
        q = F.normalize(heads(f["C"], c.heads).float(), dim=-1) * c.head_dim ** -0.5  # (b, h, l, k)
        kk = F.normalize(heads(f["B"], c.heads).float(), dim=-1)  # (b, h, l, k)
        v = heads(f["V"], c.heads)  # (b, h, l, k)
        decay, beta = f["A"].float().transpose(1, 2).chunk(2, dim=1)  # (b, h, l) each
        return q, kk, v, F.logsigmoid(decay + self.decay_bias[:, None]), torch.sigmoid(beta)

    def forward(self, f, shared=(), cache=None):
        q, kk, v, log_a, beta = self.split(f)
        y, state = chunked_delta_rule(q, kk, v, log_a, beta, self.cfg.chunk)
        if cache is not None:
            cache["state"].copy_(state)
        return merge(y), f

    def step(self, f, shared, cache):
        q, kk, v, log_a, beta = self.split(f)  # l = 1
        s = cache["state"]  # (b, h, k, k), float32
        k_col, b = kk.transpose(-1, -2), beta[..., None]  # (b, h, k, 1), (b, h, 1, 1)
        s.sub_(b * k_col @ (kk @ s)).mul_(log_a.exp()[..., None]).add_(b * k_col @ v.float())
        return merge((q @ s).to(v.dtype)), f

    def init_cache(self, batch, max_len, shared, device, dtype):
        c = self.cfg  # float32 whatever the cache dtype (counted at the nominal size)
        return {"state": torch.zeros(batch, c.heads, c.head_dim, c.head_dim, device=device, dtype=torch.float32)}

    def cache_numel(self, batch, max_len, shared):
        return batch * self.cfg.heads * self.cfg.head_dim ** 2

    def param_numel(self):
        return self.cfg.heads


@state_in_float32
def chunked_delta_rule(q, kk, v, log_a, beta, chunk):
    """Chunkwise form of the gated delta rule (DeltaNet's WY/UT form, Yang et al. 2024), float32.

    q, kk, v (b, h, l, k); log_a, beta (b, h, l). Inside a chunk every step is parallel: the UT
    transform T = (I + tril(diag(beta) K K^T * decay, -1))^-1 by one triangular solve turns the
    chunk's writes into pseudo-values U = T (beta V) and W = T (beta K * decay). Across chunks the
    state is carried by a loop over the l / chunk chunks (16 at the gpu preset), as in the paper's
    chunkwise algorithm. Any l: padded with a = 1, beta = 0, which leaves the state unchanged.
    Returns y (b, h, l, k) and the final state (b, h, k, k)."""
    b, h, l, n = q.shape
    T = min(chunk, l)
    pad = (-l) % T
    q, kk, v = (F.pad(t, (0, 0, 0, pad)).unflatten(2, (-1, T)) for t in (q, kk, v))  # (b, h, c, T, k)
    log_a, beta = F.pad(log_a, (0, pad)).unflatten(2, (-1, T)), F.pad(beta, (0, pad)).unflatten(2, (-1, T))
    cum = log_a.cumsum(-1)  # (b, h, c, T)
    decay = segsum(log_a).exp()  # (b, h, c, T, T): prod of a over (j, i], 0 above the diagonal
    eye = torch.eye(T, device=q.device)
    write = (beta[..., None] * kk) @ kk.transpose(-1, -2) * decay  # (b, h, c, T, T)
    ut = eye + write.tril(-1)  # unit lower triangular
    u = torch.linalg.solve_triangular(ut, beta[..., None] * v, upper=False, unitriangular=True)  # (b, h, c, T, k)
    w = torch.linalg.solve_triangular(ut, beta[..., None] * kk * cum.exp()[..., None], upper=False,
                                      unitriangular=True)  # (b, h, c, T, k)
    inner = q @ kk.transpose(-1, -2) * decay  # (b, h, c, T, T), lower triangular with the diagonal
    to_end = (cum[..., -1:] - cum).exp()[..., None]  # (b, h, c, T, 1)
    state, ys = q.new_zeros(b, h, n, v.size(-1)), []
    for c in range(q.size(2)):  # across chunks: the state entering each
        fresh = u[:, :, c] - w[:, :, c] @ state  # (b, h, T, k): values net of what the state holds
        ys.append((q[:, :, c] * cum[:, :, c, :, None].exp()) @ state + inner[:, :, c] @ fresh)
        state = state * cum[:, :, c, -1, None, None].exp() + (kk[:, :, c] * to_end[:, :, c]).transpose(-1, -2) @ fresh
    return torch.cat(ys, 2)[:, :, :l], state


def delta_rule_reference(q, kk, v, log_a, beta):
    """The gated delta rule as a loop over time steps (tests only)."""
    s = q.new_zeros(q.size(0), q.size(1), q.size(-1), v.size(-1))  # (b, h, k, k)
    ys = []
    for i in range(q.size(2)):
        k_i, b_i = kk[:, :, i, :, None], beta[:, :, i, None, None]  # (b, h, k, 1), (b, h, 1, 1)
        s = log_a[:, :, i, None, None].exp() * (s - b_i * k_i @ (k_i.transpose(-1, -2) @ s))
        s = s + b_i * k_i @ v[:, :, i, None, :]
        ys.append(q[:, :, i, None] @ s)  # (b, h, 1, k)
    return torch.cat(ys, 2), s


class ShortConvMixer(nn.Module):
    """Scaled Toeplitz with a short explicit kernel: y = C * conv_k(B * V) (double-gated, GConv-1)."""
    groups = ("C", "B", "V")

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.conv = CausalConv(cfg.width, cfg.kernel)

    def sizes(self):
        return {"C": self.cfg.width, "B": self.cfg.width, "V": self.cfg.width}

    def forward(self, f, shared=(), cache=None):
        z = f["B"] * f["V"]  # (b, l, d)
        if cache is not None:
            self.conv.prefill(z, cache["z"])
        return f["C"] * self.conv(z), f

    def step(self, f, shared, cache):
        return f["C"] * self.conv.step(f["B"] * f["V"], cache["z"]), f

    def init_cache(self, batch, max_len, shared, device, dtype):
        return {"z": torch.zeros(batch, self.cfg.width, self.cfg.kernel - 1, device=device, dtype=dtype)}

    def cache_numel(self, batch, max_len, shared):
        return batch * self.cfg.width * (self.cfg.kernel - 1)

    def param_numel(self):
        return self.cfg.width * self.cfg.kernel


class LongConvMixer(nn.Module):
    """Scaled Toeplitz with an implicit long kernel (Hyena): y = C * (K * (B * V) + D * B * V).

    K (d, max_len) = MLP(positional features of t) * exp(-alpha_c t), computed by FFT convolution.
    The cache keeps the whole history of B * V (an implicit filter sees every past token).
    """
    groups = ("C", "B", "V")
    bands, order = 4, 32  # positional sin/cos frequencies, filter-MLP hidden width (ours)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        t = torch.linspace(0, 1, cfg.max_len)[:, None]  # (max_len, 1)
        bands = torch.arange(1, self.bands + 1)[None, :] * math.pi
        self.register_buffer("pos", torch.cat([t, (t * bands).sin(), (t * bands).cos()], -1), persistent=False)
        self.register_buffer("alpha", torch.logspace(0, 1.5, cfg.width)[:, None] * 3, persistent=False)
        self.mlp_in = nn.Linear(self.pos.size(1), self.order)
        self.mlp_out = nn.Linear(self.order, cfg.width)
        self.skip = nn.Parameter(torch.ones(cfg.width))  # D

    def sizes(self):
        return {"C": self.cfg.width, "B": self.cfg.width, "V": self.cfg.width}

    def filter(self, l):  # -> (d, l)
        pos = self.pos[:l]  # (l, 1 + 2 * bands)
        k = self.mlp_out(torch.sin(self.mlp_in(pos))).T  # (d, l)
        return k * torch.exp(-self.alpha * pos[:, 0][None, :])  # decay window

    def forward(self, f, shared=(), cache=None):
        z = f["B"] * f["V"]  # (b, l, d)
        l = z.size(1)
        if l > self.cfg.max_len:
            raise ValueError(f"sequence of {l} tokens is longer than the long filter ({self.cfg.max_len})")
        if cache is not None:
            cache["z"][:, :, :l] = z.transpose(1, 2)
        return f["C"] * (fft_conv(z, self.filter(l)) + z * self.skip), f

    def step(self, f, shared, cache):
        z = f["B"] * f["V"]  # (b, 1, d)
        t = int(cache["pos"])
        cache["z"][:, :, t] = z[:, 0]
        history = cache["z"][:, :, : t + 1]  # (b, d, t+1)
        k = self.filter(t + 1).flip(-1)  # (d, t+1): k[t - j] lines up with z_j
        y = (history * k).sum(-1)[:, None] + z * self.skip  # (b, 1, d)
        return f["C"] * y, f

    def init_cache(self, batch, max_len, shared, device, dtype):
        return {"z": torch.zeros(batch, self.cfg.width, max_len, device=device, dtype=dtype)}

    def cache_numel(self, batch, max_len, shared):
        return batch * self.cfg.width * max_len

    def param_numel(self):
        p, o, d = self.pos.size(1), self.order, self.cfg.width
        return p * o + o + o * d + d + d


def fft_conv(z, k):
    """Causal convolution y_i = sum_{j<=i} k[i-j] z_j by FFT: pad to 2l, rfft, multiply, irfft, truncate.

    z (b, l, d), k (d, l). Computed in float32 (bf16 FFTs lose too much precision).
    """
    l = z.size(1)
    zf = torch.view_as_real(torch.fft.rfft(z.float().transpose(1, 2), n=2 * l))  # (b, d, l+1, 2)
    kf = torch.view_as_real(torch.fft.rfft(k.float(), n=2 * l))  # (d, l+1, 2)
    # the complex product in real arithmetic: inductor generates no code for complex tensors
    re = zf[..., 0] * kf[..., 0] - zf[..., 1] * kf[..., 1]
    im = zf[..., 0] * kf[..., 1] + zf[..., 1] * kf[..., 0]
    yf = torch.view_as_complex(torch.stack([re, im], -1))  # (b, d, l+1)
    return torch.fft.irfft(yf, n=2 * l)[..., :l].transpose(1, 2).to(z.dtype)  # (b, l, d)


def conv_reference(z, k):
    """Direct causal convolution (tests only): conv1d with the kernel flipped and left padding."""
    l, d = z.size(1), z.size(2)
    zp = F.pad(z.transpose(1, 2), (l - 1, 0))  # (b, d, 2l-1)
    return F.conv1d(zp, k.flip(-1)[:, None], groups=d).transpose(1, 2)


class GatedMixer(nn.Module):
    """Diagonal token mixing (memoryless): SwiGLU, y = silu(C) * V. No cache."""
    groups = ("C", "V")

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def sizes(self):
        return {"C": self.cfg.hidden, "V": self.cfg.hidden}

    def forward(self, f, shared=(), cache=None):
        return F.silu(f["C"]) * f["V"], f

    def step(self, f, shared, cache):
        return self.forward(f)  # memoryless: a token needs nothing from the past

    def init_cache(self, batch, max_len, shared, device, dtype):
        return {}

    def cache_numel(self, batch, max_len, shared):
        return 0

    def param_numel(self):
        return 0


MIXERS = {"attention": AttentionMixer, "recurrence": RecurrenceMixer, "delta": DeltaMixer,
          "short_conv": ShortConvMixer, "long_conv": LongConvMixer, "gated": GatedMixer}


# ---------------------------------------------------------------------------------------------
# The LIV: featurizer + one or two mixers + output projection


class Feature(nn.Module):
    """One feature group: a linear projection, optionally followed by a causal short conv."""

    def __init__(self, width, size, conv):
        super().__init__()
        self.proj = nn.Linear(width, size, bias=False)
        self.conv = CausalConv(size, conv) if conv else None

    def forward(self, x, state=None, step=False):  # x (b, l, d); state: this LIV's conv cache
        y = self.proj(x)  # (b, l, size)
        if self.conv is None:
            return y
        if state is not None and step:
            return self.conv.step(y, state)
        if state is not None:
            self.conv.prefill(y, state)
        return self.conv(y)


class LIV(nn.Module):
    """A linear input-varying operator (paper section 3.1): featurizer -> mixer(s) -> projection.

    featurizer_from: an earlier LIV of the same class whose featurizer weights are reused.
    shared_groups:   feature groups ('C', 'B', 'V') taken at run time from an earlier LIV.
    """

    def __init__(self, cfg, featurizer_from=None, shared_groups=()):
        super().__init__()
        self.cfg = cfg.check()
        self.copies = 2 if cfg.diff else 1
        self.mixers = nn.ModuleList(MIXERS[cfg.mixer](cfg) for _ in range(self.copies))
        self.shared_groups = tuple(shared_groups)
        unknown = set(shared_groups) - set(self.mixers[0].groups)
        if unknown:
            raise ValueError(f"{cfg.mixer} LIV has no feature group {sorted(unknown)} to share")
        donor = featurizer_from.features if featurizer_from is not None else {}
        self.features = nn.ModuleDict()
        for name, size in self.feature_sizes().items():
            if name.rstrip("2") in self.shared_groups:
                continue
            self.features[name] = donor[name] if name in donor else Feature(cfg.width, size, self.conv_kernel(name))
        self.owned = {n for n in self.features if n not in donor}
        inner = cfg.hidden if cfg.mixer == "gated" else cfg.width  # width of the mixer's output
        self.out_proj = nn.Linear(inner, cfg.width, bias=False)
        if cfg.diff:  # lambda per head (init 0.8 as in the Differential Transformer) and per-head norm
            self.diff_lambda = nn.Parameter(torch.full((cfg.heads,), 0.8))
            self.diff_norm = nn.Parameter(torch.ones(inner))

    def conv_kernel(self, name):
        """The featurizer's short conv on a feature group (decays, A, get none); 0 = none."""
        return self.cfg.feature_conv if name[0] != "A" else 0

    def feature_sizes(self):
        """Feature groups of this LIV; a differential LIV has a second C, B (and A), V is shared."""
        sizes = dict(self.mixers[0].sizes())
        if self.copies == 2:
            sizes.update({g + "2": s for g, s in sizes.items() if g != "V"})
        return sizes

    def featurize(self, x, shared, cache, step):
        states = cache if cache is not None else {}
        f = {name: feat(x, states.get("conv_" + name), step) for name, feat in self.features.items()}
        for g in self.shared_groups:
            f.update({name: shared[name] for name in shared if name.rstrip("2") == g})
        return f

    def copy_features(self, f, i):  # features of copy i under the mixer's names
        return {g: f[g + ("2" if i and g != "V" else "")] for g in self.mixers[i].groups}

    def forward(self, x, shared=None, cache=None):
        """x (b, l, d) -> (y (b, l, d), features for later LIVs). With a cache: prefill it."""
        return self.run(x, shared, cache, step=False)

    def step(self, x, cache, shared=None):
        """One token x (b, 1, d) with the cache of the previous ones."""
        return self.run(x, shared, cache, step=True)

    def run(self, x, shared, cache, step):
        f = self.featurize(x, shared or {}, cache, step)
        ys, exposed = [], {}
        for i, mixer in enumerate(self.mixers):
            sub = cache["mixers"][i] if cache is not None else None
            if sub is not None and "pos" in cache:
                sub["pos"] = cache["pos"]
            fi, s = self.copy_features(f, i), set(self.shared_groups)
            if i == 1:  # the differential copy reads the first copy's values (for attention: its V cache)
                fi["V"], s = exposed["V"], s | {"V"}
            y, out = mixer.step(fi, s, sub) if step else mixer(fi, s, sub)
            ys.append(y)
            exposed.update({(g + "2" if i and g != "V" else g): t for g, t in out.items()})
        if cache is not None:
            cache["pos"] = cache.get("pos", 0) + x.size(1)
        return self.out_proj(self.combine(ys)), exposed

    def combine(self, ys):
        if self.copies == 1:
            return ys[0]
        h = self.cfg.heads
        lam = self.diff_lambda.view(1, 1, h, 1)
        y = ys[0].unflatten(-1, (h, -1)) - lam * ys[1].unflatten(-1, (h, -1))  # (b, l, h, k)
        return rms_norm(y, self.diff_norm.view(h, -1)).flatten(-2)  # per-head RMSNorm

    # --- cache and parameter formulas, held against the real tensors by the tests ---

    def init_cache(self, batch, max_len, device=None, dtype=torch.float32):
        shared = set(self.shared_groups)
        cache = {"pos": 0, "mixers": []}
        for i, m in enumerate(self.mixers):
            s = shared | ({"V"} if i == 1 else set())
            cache["mixers"].append(m.init_cache(batch, max_len, s, device, dtype))
        for name, feat in self.features.items():
            if feat.conv is not None:
                cache["conv_" + name] = torch.zeros(batch, feat.proj.out_features, self.cfg.feature_conv - 1,
                                                    device=device, dtype=dtype)
        return cache

    def cache_bytes(self, batch, seq_len, bytes_per_element=4):
        """Inference-cache size for `batch` sequences of `seq_len` tokens (the quality-cache objective)."""
        shared, sizes = set(self.shared_groups), self.feature_sizes()
        numel = sum(m.cache_numel(batch, seq_len, shared | ({"V"} if i else set()))
                    for i, m in enumerate(self.mixers))
        numel += sum(batch * sizes[n] * (self.conv_kernel(n) - 1) for n in self.features if self.conv_kernel(n))
        return numel * bytes_per_element

    def param_count(self):
        """Parameters this LIV owns (shared featurizer weights count once, at their leader)."""
        c, sizes = self.cfg, self.feature_sizes()
        per_group = {n: c.width * s + s * self.conv_kernel(n) for n, s in sizes.items()}
        inner = self.out_proj.in_features
        count = sum(per_group[n] for n in self.owned) + sum(m.param_numel() for m in self.mixers)
        count += inner * c.width
        if c.diff:
            count += c.heads + inner
        return count
