"""The reference sketches of the techniques' formulations (docs/techniques.md), single-rank and unfused: the
oracle the production modules are checked against.

This is the one place the sketch code lives; nothing outside tests/ imports it.
"""

# Reference sketches for the five techniques specified in docs/techniques.md.
# Layout follows Megatron: hidden states are [s, b, d]. Not production code.
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.w.float()).to(x.dtype)


# ---------------------------------------------------------------- 000 LCM
def causal_anchor(h, pos, taps):
    """c_t = sum_j taps[j-1] * h_{t-j} over lags j=1..K that stay inside the document,
    renormalised by the sum of valid taps. h [s,b,d] fp32, pos [s,b] = position inside document."""
    c = torch.zeros_like(h)
    wsum = torch.zeros(h.shape[:2], dtype=h.dtype, device=h.device)
    for j in range(1, min(len(taps), h.shape[0] - 1) + 1):
        valid = (pos[j:] >= j).to(h.dtype) * taps[j - 1]
        c[j:] += valid[..., None] * h[:-j]
        wsum[j:] += valid
    has = wsum > 0
    c = torch.where(has[..., None], c / wsum.clamp_min(1e-12)[..., None], h)  # no history -> no pull
    return c


class LCM(nn.Module):
    """h_t <- h_t - g_t * a (.) (h_t - c_t): one explicit Euler step of gradient flow on
    Phi = 1/2 ||h_t - c_t||^2_diag(a); a = a_max*tanh(alpha) = 0 at init (exact identity)."""

    def __init__(self, d, K=16, beta=0.8, a_max=0.5):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(d))
        self.gate_w = nn.Parameter(torch.zeros(d))
        self.gate_b = nn.Parameter(torch.zeros(1))
        self.norm = RMSNorm(d)
        taps = beta ** torch.arange(0, K, dtype=torch.float32)  # lag 1..K
        self.register_buffer("taps", taps / taps.sum(), persistent=False)
        self.a_max = a_max

    def forward(self, h, pos):
        hf = h.float()
        c = causal_anchor(hf, pos, self.taps)
        g = torch.sigmoid(self.norm(h).float() @ self.gate_w.float() + self.gate_b.float())  # [s,b]
        a = self.a_max * torch.tanh(self.alpha.float())  # [d], in [0, a_max) after training if alpha>=0
        a = a.clamp(min=0.0)
        return (hf - g[..., None] * a * (hf - c)).to(h.dtype)


# ---------------------------------------------------------------- 001 SCR
def segmented_cumsum(x, start):
    """Inclusive cumsum along dim 0 that restarts at document starts. x [s,b,k], start [s,b] bool."""
    cs = x.cumsum(0)
    t = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(start)
    first = torch.where(start, t, torch.zeros_like(t)).cummax(0).values  # index of current doc start
    excl = cs - x
    return cs - excl.gather(0, first[..., None].expand_as(x))


class SCR(nn.Module):
    """rho^l = gamma*rho^{l-1} + (1-gamma)*sigmoid(w_r.u + b_r);  m_t = sum_{k<=t} rho_k v_k / sum rho_k;
    h <- h + W_up m  (W_p = W_up W_down low rank, W_up = 0 at init)."""

    def __init__(self, d, r=64, gamma=0.5):
        super().__init__()
        self.norm = RMSNorm(d)
        self.rel = nn.Linear(d, 1)
        nn.init.zeros_(self.rel.weight)
        nn.init.zeros_(self.rel.bias)
        self.down = nn.Linear(d, r, bias=False)
        nn.init.normal_(self.down.weight, std=d**-0.5)
        self.up = nn.Linear(r, d, bias=False)
        nn.init.zeros_(self.up.weight)
        self.gamma = gamma

    def forward(self, h, start, rho_prev=None):
        u = self.norm(h)
        r = torch.sigmoid(self.rel(u).float().squeeze(-1))
        rho = r if rho_prev is None else self.gamma * rho_prev + (1 - self.gamma) * r
        v = self.down(u).float()
        num = segmented_cumsum(rho[..., None] * v, start)
        den = segmented_cumsum(rho[..., None], start)
        m = num / (den + 1e-6)
        return h + self.up(m.to(h.dtype)), rho


# ---------------------------------------------------------------- 002 CMR
class LayerCapture(nn.Module):
    def __init__(self, d, r):
        super().__init__()
        self.norm = RMSNorm(d)
        self.proj = nn.Linear(d, r, bias=False)
        nn.init.normal_(self.proj.weight, std=d**-0.5)
        self.gate = nn.Linear(d, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, h):  # -> gated compressed latent state [s,b,r]
        u = self.norm(h)
        return torch.sigmoid(self.gate(u)) * self.proj(u)


class Reweave(nn.Module):
    def __init__(self, d, r, n_src):
        super().__init__()
        self.norm = RMSNorm(d)
        self.q = nn.Linear(d, r, bias=False)
        nn.init.normal_(self.q.weight, std=d**-0.5)
        self.layer_bias = nn.Parameter(torch.zeros(n_src))
        self.out = nn.Linear(r, d, bias=False)
        nn.init.zeros_(self.out.weight)
        self.scale = r**-0.5

    def forward(self, h, bank):  # bank [s,b,n_src,r]
        q = self.q(self.norm(h)).float()
        logits = torch.einsum("sbr,sbnr->sbn", q, bank.float()) * self.scale + self.layer_bias.float()
        w = logits.softmax(-1)
        mem = torch.einsum("sbn,sbnr->sbr", w, bank.float())
        return h + self.out(mem.to(h.dtype))


# ---------------------------------------------------------------- 003 SCA
class SCAHead(nn.Module):
    """Training-only auxiliary loss at one layer. Buffers = per-token statistical field (mean, diag var)."""

    def __init__(self, d, V, r=128, beta=0.99, W=64, tau=0.1):
        super().__init__()
        self.norm = RMSNorm(d)
        self.proj = nn.Linear(d, r, bias=False)
        nn.init.normal_(self.proj.weight, std=d**-0.5)
        self.register_buffer("mu", torch.zeros(V, r))
        self.register_buffer("var", torch.full((V, r), 1.0 / r))
        self.register_buffer("cnt", torch.zeros(V))
        self.beta, self.W, self.tau, self.r = beta, W, tau, r

    def forward(self, h, tokens, doc):
        z = F.normalize(self.proj(self.norm(h)).float(), dim=-1)  # [s,b,r]
        zt, ids = z.reshape(-1, self.r), tokens.reshape(-1)
        # (1) field convergence: whitened pull toward running per-token statistics
        seen = self.cnt[ids] > 0
        sd = self.var[ids].clamp_min(1e-4).sqrt()
        l_field = (((zt - self.mu[ids]) / sd) ** 2).mean(-1)[seen].mean() if seen.any() else zt.sum() * 0
        # (2) anti-collapse: variance hinge (target std of isotropic unit vectors) + covariance
        zc = zt - zt.mean(0)
        std = zc.pow(2).mean(0).add(1e-6).sqrt()
        cov = (zc.T @ zc) / max(zc.shape[0] - 1, 1)
        corr = cov / (std[:, None] * std[None, :])
        off = corr - torch.diag(torch.diag(corr))
        l_vc = F.relu(1.0 - math.sqrt(self.r) * std).mean() + off.pow(2).sum() / (self.r * (self.r - 1))
        # (3) windowed contrastive coherence: first half vs second half of W-token chunks
        s, b = tokens.shape
        n = s // self.W
        zz = z[: n * self.W].reshape(n, self.W, b, self.r).permute(2, 0, 1, 3).reshape(b * n, self.W, self.r)
        dd = doc[: n * self.W].reshape(n, self.W, b).permute(2, 0, 1).reshape(b * n, self.W)
        ok = (dd == dd[:, :1]).all(1)  # chunk inside one document
        a = F.normalize(zz[:, : self.W // 2].mean(1), dim=-1)[ok]
        p = F.normalize(zz[:, self.W // 2 :].mean(1), dim=-1)[ok]
        cd = dd[ok, 0] + 1000003 * torch.arange(b, device=h.device).repeat_interleave(n)[ok]
        logits = a @ p.T / self.tau
        same_doc = (cd[:, None] == cd[None, :]) & ~torch.eye(len(cd), dtype=torch.bool, device=h.device)
        logits = logits.masked_fill(same_doc, float("-inf"))
        l_coh = F.cross_entropy(logits, torch.arange(len(cd), device=h.device)) if len(cd) > 1 else zt.sum() * 0
        self._ema(zt.detach(), ids)
        return l_field, l_vc, l_coh

    @torch.no_grad()
    def _ema(self, z, ids):
        u, inv = ids.unique(return_inverse=True)
        n = torch.zeros(len(u), device=z.device).index_add_(0, inv, torch.ones_like(inv, dtype=z.dtype))
        m = torch.zeros(len(u), self.r, device=z.device).index_add_(0, inv, z) / n[:, None]
        m2 = torch.zeros(len(u), self.r, device=z.device).index_add_(0, inv, z * z) / n[:, None]
        lr = torch.maximum(torch.full_like(n, 1 - self.beta), 1.0 / (self.cnt[u] + 1.0))[:, None]
        self.mu[u] += lr * (m - self.mu[u])
        self.var[u] += lr * ((m2 - m * m).clamp_min(0) + (m - self.mu[u]) ** 2 - self.var[u])
        self.cnt[u] += n


# ---------------------------------------------------------------- 004 HCMA
def spherical_kmeans(Y, K, iters=20, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    C = Y[torch.randperm(Y.shape[0], generator=g)[:K]].clone()
    for _ in range(iters):
        a = (Y @ C.T).argmax(1)
        C = F.normalize(torch.zeros_like(C).index_add_(0, a, Y), dim=-1)
    return a, C


class HCMA:
    """Periodic (non-differentiable) hierarchy + per-step differentiable pull of the input embedding
    table toward coarse/fine cluster centroids, weighted by inverse kNN density, with a trust-region
    anchor. Single-rank sketch: under TP the rows are the local vocab shard and Y/centroids use
    all_gather / all_reduce over the TP group."""

    def __init__(self, emb, K1=8, K2=32, p=64, knn=8, w=(0.5, 1.0), lam_anchor=1.0, gamma=0.5, pi_max=4.0):
        self.emb, self.K1, self.K2, self.knn, self.w = emb, K1, K2, knn, w
        self.lam_anchor, self.gamma, self.pi_max = lam_anchor, gamma, pi_max
        g = torch.Generator().manual_seed(1234)
        self.R = torch.randn(emb.weight.shape[1], p, generator=g) / math.sqrt(p)

    @torch.no_grad()
    def refresh(self):
        E = F.normalize(self.emb.weight.float(), dim=-1)
        Y = F.normalize(E @ self.R, dim=-1)
        sim = Y @ Y.T
        sim.fill_diagonal_(-2.0)
        dist = 1 - sim.topk(self.knn, dim=1).values  # cosine distance to kNN
        rho = 1.0 / dist.mean(1).clamp_min(1e-6)  # kNN density
        self.pi = (rho.median() / rho).clamp(max=self.pi_max) ** self.gamma
        a1, _ = spherical_kmeans(Y, self.K1)
        a2 = torch.zeros_like(a1)
        per = self.K2 // self.K1
        for c in range(self.K1):  # nested fine clusters inside each coarse cluster
            idx = (a1 == c).nonzero().squeeze(1)
            if len(idx) == 0:
                continue
            sub, _ = spherical_kmeans(Y[idx], min(per, len(idx)), seed=c)
            a2[idx] = c * per + sub
        self.assign = (a1, a2)
        self.cent = []
        for a, K in ((a1, self.K1), (a2, self.K2)):
            self.cent.append(F.normalize(torch.zeros(K, E.shape[1]).index_add_(0, a, E), dim=-1))
        self.anchor = E.clone()

    def loss(self):
        E = F.normalize(self.emb.weight.float(), dim=-1)
        total = 0.0
        for w, a, C in zip(self.w, self.assign, self.cent):
            total = total + w * ((E - C[a]).pow(2).sum(-1) * self.pi).mean()
        return total + self.lam_anchor * (E - self.anchor).pow(2).sum(-1).mean()
