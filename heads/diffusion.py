"""Diffusion / flow-matching head: a small denoising MLP that models p(x | h) for one continuous token
x (C values) given its hidden state h (D values), trained with a denoising loss instead of a
likelihood.  This is MAR's "diffusion loss" (Li et al., 2024, "Autoregressive Image Generation without
Vector Quantization"); NextStep-1 (2025) uses the flow-matching variant.  Shapes: N tokens, D hidden
width, C token width.

Two objectives, one network ``net(x_t, t, h)`` (C + time + D -> C):

``flow``  rectified flow / flow matching (Liu et al., 2023; Lipman et al., 2023).  The path runs from
          data at t = 0 to noise at t = 1:  x_t = (1 - t) x0 + t eps,  eps ~ N(0, I),  t ~ U(0, 1).
          The net predicts the velocity v = dx_t/dt = eps - x0; loss |v_pred - v|^2.  Sampling
          integrates dx/dt = v from t = 1 to t = 0 with ``steps`` Euler steps.
``ddpm``  denoising diffusion (Ho et al., 2020): a cosine (Nichol & Dhariwal, 2021) or linear beta
          schedule of ``train_steps`` timesteps, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; the net
          predicts eps; loss |eps_pred - eps|^2.  Sampling takes ``steps`` evenly respaced timesteps with
          the DDIM update (Song et al., 2021); ``eta`` = 1 is ancestral (DDPM) sampling, 0 the
          deterministic DDIM ODE.  The eps prediction is sqrt(1 - abar_t) x_t + net(...): the best
          linear guess for unit-scale data plus a learned correction (a skip connection in the spirit
          of EDM's preconditioning, Karras et al., 2022).  At high noise eps ~ x_t, and an error in eps
          is amplified by 1 / sqrt(abar_t) in the implied x0; with the skip the net only learns a small
          correction there, which keeps DDIM (eta = 0) accurate at 50+ steps.

The per-token loss is the mean over the C channels (MAR's convention), averaged over ``batch_mul``
noise draws per token (MAR trains each token with 4 draws: cheap, since the head is small).

``temperature`` multiplies every Gaussian draw of sampling: the starting noise (both objectives) and the
noise of each reverse step (ddpm with eta > 0; MAR's temperature scales that per-step noise).
Temperature 0 draws nothing: the sample is the deterministic ODE / DDIM path from the prior's mean.

Classifier-free guidance (Ho & Salimans, 2022) combines the predictions (velocity or eps) made from h
and from ``h_uncond`` at every step: pred_u + s (pred_c - pred_u), both from one batched call.

Conditioning of the net: ``adaln`` modulates every residual block's LayerNorm with a shift, scale and
gate computed from (time embedding + projected h), gates and output layer zero-initialised (DiT, Peebles
& Xie, 2023; MAR's MLP); ``concat`` concatenates h and the time embedding to the input of plain
residual blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqgen.registry import register_head
from seqgen.sampling import cfg_combine
from seqgen.types import DomainSpec, SeqgenError

OBJECTIVES = ("flow", "ddpm")
CONDITIONINGS = ("adaln", "concat")
SCHEDULES = ("cosine", "linear")
DEFAULT_STEPS = {"flow": 32, "ddpm": 50}


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (Vaswani et al., 2017) of (M,) float times -> (M, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift); without a modulation (concat): x + MLP(LN(x))."""

    def __init__(self, width: int, adaln: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=not adaln, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.mod = None
        if adaln:
            self.mod = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
            nn.init.zeros_(self.mod[1].weight)
            nn.init.zeros_(self.mod[1].bias)

    def forward(self, x: Tensor, c: Tensor | None) -> Tensor:
        if self.mod is None:
            return x + self.mlp(self.norm(x))
        shift, scale, gate = self.mod(c).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class Denoiser(nn.Module):
    """net(x_t (M, C), t (M,) on the 0..1000 scale, h (M, D)) -> (M, C) velocity or eps."""

    def __init__(self, C: int, D: int, width: int, depth: int, time_embed_dim: int, conditioning: str):
        super().__init__()
        self.adaln, self.time_embed_dim = conditioning == "adaln", time_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_proj = nn.Linear(D, width) if self.adaln else None
        self.inp = nn.Linear(C if self.adaln else C + D + width, width)
        self.blocks = nn.ModuleList(ResBlock(width, self.adaln) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width, elementwise_affine=not self.adaln, eps=1e-6)
        self.out_mod = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width)) if self.adaln else None
        self.out = nn.Linear(width, C)
        for lin in [self.out] + ([self.out_mod[1]] if self.adaln else []):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, t: Tensor, h: Tensor) -> Tensor:
        dtype = self.inp.weight.dtype  # inputs follow the parameters; autocast, if on, picks the compute dtype
        x, h = x.to(dtype), h.to(dtype)
        temb = self.time_mlp(timestep_embedding(t, self.time_embed_dim).to(dtype))
        if self.adaln:
            c = temb + self.cond_proj(h)
            z = self.inp(x)
        else:
            c, z = None, self.inp(torch.cat([x, h, temb], dim=-1))
        for block in self.blocks:
            z = block(z, c)
        z = self.out_norm(z)
        if self.adaln:
            shift, scale = self.out_mod(c).chunk(2, dim=-1)
            z = z * (1 + scale) + shift
        return self.out(z)


def alpha_bars(schedule: str, T: int) -> Tensor:
    """(T,) float64 cumulative products abar_t of 1 - beta_t for t = 0..T-1 (t = 0 is the least noisy)."""
    if schedule == "linear":  # Ho et al. (2020), betas 1e-4 .. 0.02 at T = 1000, rescaled for other T
        scale = 1000 / T
        betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    else:  # cosine (Nichol & Dhariwal, 2021), betas clipped at 0.999
        f = lambda s: torch.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2
        s = torch.arange(T + 1, dtype=torch.float64)
        betas = (1 - f(s[1:]) / f(s[:-1])).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


@register_head("diffusion")
class DiffusionHead(nn.Module):
    defines_nll = False
    """the loss is a denoising loss, not a likelihood: evaluation reports it as a loss"""
    continuous = True
    """built for a continuous domain (spec.value_dim); targets and samples are values (N, C)"""

    @dataclass
    class Config:
        objective: str = "flow"
        """flow (rectified flow: velocity prediction, Euler sampling) or ddpm (eps prediction, DDIM/DDPM sampling)"""
        width: int = 256
        """width of the denoising MLP"""
        depth: int = 3
        """residual blocks of the denoising MLP"""
        conditioning: str = "adaln"
        """adaln: h and time modulate each block's LayerNorm (DiT / MAR); concat: h and time join the input"""
        time_embed_dim: int = 256
        """size of the sinusoidal time embedding (time on a 0..1000 scale for both objectives)"""
        batch_mul: int = 4
        """noise draws per token in training (MAR); the reported per-token loss is their mean"""
        sample_steps: int | None = None
        """denoising steps at sampling time (sample(steps=) overrides); None: 32 for flow, 50 for ddpm"""
        train_steps: int = 1000
        """ddpm only: timesteps of the noise schedule"""
        schedule: str = "cosine"
        """ddpm only: beta schedule, cosine or linear"""
        eta: float = 1.0
        """ddpm only: DDIM eta; 1 is ancestral DDPM sampling, 0 deterministic DDIM"""

        @classmethod
        def tiny(cls) -> "DiffusionHead.Config":
            return cls(width=32, depth=2, time_embed_dim=32, batch_mul=2, sample_steps=8, train_steps=100)

    def __init__(self, config: "DiffusionHead.Config", dim: int, spec: DomainSpec):
        super().__init__()
        if spec.value_dim is None:
            raise SeqgenError(f"diffusion head needs a continuous domain (value_dim); {spec.name!r} is discrete "
                              f"(vocab_size={spec.vocab_size}): use the categorical head for it")
        c = config
        for name, value, known in (("objective", c.objective, OBJECTIVES),
                                   ("conditioning", c.conditioning, CONDITIONINGS), ("schedule", c.schedule, SCHEDULES)):
            if value not in known:
                raise SeqgenError(f"diffusion head: unknown {name} {value!r}; known: {', '.join(known)}")
        if min(c.width, c.depth, c.time_embed_dim, c.batch_mul, c.train_steps) < 1 or c.eta < 0:
            raise SeqgenError(f"diffusion head: width, depth, time_embed_dim, batch_mul and train_steps must be >= 1 "
                              f"and eta >= 0; got {c}")
        self.config, self.spec, self.C = config, spec, spec.value_dim
        self.net = Denoiser(self.C, dim, c.width, c.depth, c.time_embed_dim, c.conditioning)
        if c.objective == "ddpm":
            abar = alpha_bars(c.schedule, c.train_steps)
            self.abar_list = abar.tolist()  # float64 values for sampling, whatever dtype the module is cast to
            self.register_buffer("abar", abar.float(), persistent=False)

    # ------------------------------------------------------------------ training
    def loss(self, h: Tensor, targets: Tensor, loss_mask: Tensor | None = None,
             weights: Tensor | None = None) -> tuple[Tensor, dict]:
        """Mean denoising loss over tokens.  h (..., D), targets (..., C) float -> (loss, {nll_sum, count}):
        nll_sum is the summed per-token loss (mean over channels and over ``batch_mul`` draws).
        ``weights`` (an evidence bound's per-token weights) do not apply to a denoising loss: ignored."""
        if loss_mask is not None:
            h, targets = h[loss_mask], targets[loss_mask]
        if not targets.is_floating_point() or targets.shape[-1:] != (self.C,):
            raise SeqgenError(f"diffusion head for {self.spec.name!r} needs float value targets (..., {self.C}); "
                              f"got {targets.dtype} {tuple(targets.shape)}")
        h, x0 = h.reshape(-1, h.shape[-1]), targets.reshape(-1, self.C).float()
        N, B = x0.shape[0], self.config.batch_mul
        h, x0 = h.repeat(B, 1), x0.repeat(B, 1)
        eps = torch.randn_like(x0)
        if self.config.objective == "flow":
            t = torch.rand(len(x0), device=x0.device)
            x_t, want, t_in, skip = (1 - t[:, None]) * x0 + t[:, None] * eps, eps - x0, t * 1000, 0.0
        else:
            T = self.config.train_steps
            step = torch.randint(0, T, (len(x0),), device=x0.device)
            a = self.abar[step][:, None].float()
            x_t, want, t_in, skip = a.sqrt() * x0 + (1 - a).sqrt() * eps, eps, step * (1000 / T), (1 - a).sqrt()
        pred = self._predict(x_t, t_in, h, skip)
        per_token = (pred - want).pow(2).mean(-1).view(B, N).mean(0)
        loss = per_token.mean() if N else pred.sum() * 0
        return loss, {"nll_sum": per_token.detach().sum(), "count": torch.tensor(N, device=h.device)}

    def _predict(self, x_t: Tensor, t: Tensor, h: Tensor, skip: Tensor | float) -> Tensor:
        """The prediction (M, C) float32: the net's output plus ``skip * x_t`` (ddpm's eps skip, see the top)."""
        return self.net(x_t, t, h).float() + skip * x_t

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, h: Tensor, *, generator: torch.Generator | None = None, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, h_uncond: Tensor | None = None,
               cfg_scale: float = 1.0, allowed: Tensor | None = None, with_logprob: bool = False,
               steps: int | None = None) -> Tensor:
        """h (..., D) -> values (..., C) float32.  ``temperature`` scales every noise draw (0: none);
        ``steps`` overrides ``config.sample_steps``; with h_uncond and cfg_scale != 1 the predictions are
        guided.  top_k, top_p, allowed and with_logprob have no meaning for continuous tokens."""
        for knob, value in (("top_k", top_k), ("top_p", top_p), ("allowed", allowed)):
            if value is not None:
                raise SeqgenError(f"diffusion head: {knob} applies to discrete heads only; leave it unset for "
                                  f"the continuous domain {self.spec.name!r}")
        if with_logprob:
            raise SeqgenError("diffusion head: with_logprob is not available: a diffusion head gives no "
                              "log-probability of its samples (use a discrete head for confidence-based decoding)")
        if temperature < 0:
            raise SeqgenError(f"temperature must be >= 0, got {temperature}")
        c = self.config
        steps = steps or c.sample_steps or DEFAULT_STEPS[c.objective]
        if steps < 1:
            raise SeqgenError(f"diffusion head: steps must be >= 1, got {steps}")
        lead, h = h.shape[:-1], h.reshape(-1, h.shape[-1])
        guided = h_uncond is not None and cfg_scale != 1.0
        if guided:
            h = torch.cat([h, h_uncond.reshape(-1, h.shape[-1]).to(h.dtype)])  # one batched net call per step
        N = len(h) // 2 if guided else len(h)

        def noise() -> Tensor:
            if generator is None:
                return torch.randn(N, self.C, device=h.device)
            return torch.randn(N, self.C, generator=generator, device=generator.device).to(h.device)

        def predict(x: Tensor, t: float, skip: float = 0.0) -> Tensor:
            xx = torch.cat([x, x]) if guided else x
            pred = self._predict(xx, torch.full((len(xx),), t, device=h.device), h, skip)
            return cfg_combine(*pred.chunk(2), cfg_scale) if guided else pred

        x = noise() * temperature if temperature > 0 else torch.zeros(N, self.C, device=h.device)
        if c.objective == "flow":
            ts = torch.linspace(1, 0, steps + 1).tolist()
            for t, t_next in zip(ts[:-1], ts[1:]):
                x = x + (t_next - t) * predict(x, t * 1000)
        else:
            # evenly spaced from t = 0 with stride T / steps (guided-diffusion's respacing): the last, nearly
            # pure-noise timesteps are skipped, since dividing by sqrt(abar) there amplifies any eps error
            idx = (torch.arange(steps - 1, -1, -1) * c.train_steps // steps).unique_consecutive().tolist()
            abar = self.abar_list
            for i, step in enumerate(idx):
                a, a_prev = abar[step], (abar[idx[i + 1]] if i + 1 < len(idx) else 1.0)
                eps = predict(x, step * 1000 / c.train_steps, skip=math.sqrt(1 - a))
                x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
                sigma = c.eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
                x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
                if sigma > 0 and temperature > 0:
                    x = x + sigma * temperature * noise()
        return x.view(*lead, self.C)
