"""Differential privacy for a site's private spectra: Opacus DP-SGD on the MAE.

- Per-sample gradients with Opacus hooks: the MAE keeps its learned tokens in tiny modules
  (mae.PrependToken / MaskTokenFill) for which per-sample gradient rules are registered
  here, and timm's LayerNorm subclass gets Opacus' LayerNorm rule (it is not matched by type).
- Only the private in vivo set goes through the DP data loader (Poisson sampling); shared
  simulated data is trained in separate non-private steps (`public()`), so it neither dilutes
  the sampling rate nor costs privacy.
- Parameters the private spectra cannot train (the MAE's latent head: private spectra carry no
  simulator truth) sit out the private steps. Otherwise DP noise would be their only gradient,
  and AdamW turns pure noise into full-size steps: the head was lost at every epsilon.
- The accountant's history persists between rounds (`state()` / `PrivateSite(..., state=)`),
  so the reported epsilon is the true cumulative value over the whole federation; when the
  budget is spent the site stops taking private steps.
"""

from __future__ import annotations

import contextlib
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from timm.layers import LayerNorm as TimmLayerNorm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mrsfm_model.config import ConfigSection
from mrsfm_model.model.mae import MaskTokenFill, PrependToken
from mrsfm_model.training.trainer import StepPolicy, Trainer


@dataclass
class DPConfig(ConfigSection):
    """DP-SGD settings; values (and their reasons) in configs/privacy/default.yaml."""

    SECTION = "privacy"
    enabled: bool
    noise_multiplier: float | None  # sigma; None: derived from target_epsilon
    target_epsilon: float | None  # with planned_steps: pick sigma to end exactly there
    planned_steps: int  # private steps planned over the whole run (for target_epsilon)
    delta: float
    max_grad_norm: float
    epsilon_budget: float | None  # stop private steps once epsilon would exceed this
    batch_size: int  # expected private batch (Poisson sampling)
    accountant: str  # prv (tight, Gopi et al. 2021) | rdp (looser, classic)
    clipping: str  # ghost: per-sample norms only (faster, less memory) | flat: per-sample gradients


_REGISTERED = False


def register_grad_samplers() -> None:
    """Per-sample gradient rules for the MAE's own parameter-owning modules (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return

    @register_grad_sampler(PrependToken)
    def _prepend(layer: PrependToken, activations, backprops: torch.Tensor):
        return {layer.token: backprops[:, :1].unsqueeze(1)}  # output row 0 is the token

    @register_grad_sampler(MaskTokenFill)
    def _fill(layer: MaskTokenFill, activations, backprops: torch.Tensor):
        kept = activations[0].shape[1]
        return {layer.token: backprops[:, kept:].sum(dim=1, keepdim=True).unsqueeze(1)}

    register_grad_sampler(TimmLayerNorm)(compute_layer_norm_grad_sample)
    _REGISTERED = True


def secret_generator(device: torch.device | str) -> torch.Generator:
    """A torch generator seeded with 63 bits from the OS's CSPRNG (`secrets`), kept in memory only."""
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63))
    return gen


def noise_for_target(cfg: DPConfig, sample_rate: float) -> float:
    """sigma that spends exactly target_epsilon over planned_steps (Opacus' search)."""
    return get_noise_multiplier(target_epsilon=cfg.target_epsilon, target_delta=cfg.delta,
                                sample_rate=sample_rate, steps=cfg.planned_steps, accountant=cfg.accountant)


class PrivateSite:
    """DP-SGD on `private_x` as a collaborator of a Trainer: its private steps run through the
    Trainer's one training step with a private StepPolicy (Opacus' module and optimizer); every
    other step is the Trainer's own. The Trainer itself is never rewired."""

    def __init__(self, trainer: Trainer, private_x: torch.Tensor, cfg: DPConfig, state: dict | None = None):
        register_grad_samplers()
        self.trainer, self.cfg = trainer, cfg
        n = len(private_x)
        if n == 0:
            raise ValueError("differential privacy needs a private data set; this site has none")
        self.sample_rate = min(1.0, cfg.batch_size / n)
        sigma = cfg.noise_multiplier
        if cfg.target_epsilon is not None:
            if cfg.planned_steps <= 0:
                raise ValueError("privacy.target_epsilon needs privacy.planned_steps > 0")
            sigma = noise_for_target(cfg, self.sample_rate)
        if sigma is None:
            raise ValueError("set privacy.noise_multiplier or privacy.target_epsilon")
        if cfg.clipping not in ("flat", "ghost"):
            raise ValueError(f"privacy.clipping must be flat or ghost, got {cfg.clipping!r}")
        self.ghost = cfg.clipping == "ghost"
        self.noise_multiplier = float(sigma)
        # Which private samples a step draws (Poisson) and the Gaussian noise come from generators
        # seeded from the operating system's CSPRNG, never from the config, the site's seed or any
        # saved state: whoever knows those cannot regenerate them (the global torch generator, which
        # masking uses and checkpoints save, is not touched by DP).
        loader = DataLoader(TensorDataset(private_x), batch_size=min(cfg.batch_size, n),
                            generator=secret_generator("cpu"))
        with warnings.catch_warnings():
            # Opacus' advice is its secure_mode (torchcsprng, which no package index offers for this
            # torch); the generators here stand in: seeded from OS entropy, never stored (their
            # streams are Mersenne/Philox, not a CSPRNG's: see docs/privacy.md)
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            self.engine = PrivacyEngine(accountant=cfg.accountant)
            if state:
                self.engine.accountant.history = [tuple(h) for h in state["history"]]
            model, optimizer, *rest = self.engine.make_private(
                module=trainer.model, optimizer=trainer.optimizer, data_loader=loader,
                noise_generator=secret_generator(trainer.device),
                noise_multiplier=self.noise_multiplier, max_grad_norm=cfg.max_grad_norm, poisson_sampling=True,
                grad_sample_mode="ghost" if self.ghost else "hooks",
                **({"criterion": nn.MSELoss()} if self.ghost else {}),  # Opacus wants one; ours: _ghost_loss
            )
        self.loader = rest[-1]
        self.dp_model, self.dp_optimizer = model, optimizer
        # Opacus clips per sample, so no global clip; its hooks run only during private steps
        self.policy = StepPolicy(model, optimizer, self._ghost_loss if self.ghost else trainer.loss_fn, None)
        self.dp_model.disable_hooks()

    def _ghost_loss(self, model: nn.Module, batch) -> tuple[DPTensorFastGradientClipping, dict]:
        """Ghost clipping needs one loss per sample: its backward runs twice (norms, then the
        norm-weighted loss), so per-sample gradients are never materialised."""
        x = batch.x if hasattr(batch, "x") else batch
        per_sample = model(x, per_sample=True).loss
        return DPTensorFastGradientClipping(model, self.dp_optimizer, per_sample, "mean"), {}

    # -- accounting ------------------------------------------------------------------------
    def epsilon(self) -> float:
        return float(self.engine.accountant.get_epsilon(self.cfg.delta)) if self.engine.accountant.history else 0.0

    def state(self) -> dict:
        """What must persist between rounds (JSON-able): the accountant's history."""
        return {"history": [list(h) for h in self.engine.accountant.history], "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "delta": self.cfg.delta, "accountant": self.cfg.accountant}

    def budget_left(self) -> bool:
        """Would one more private step stay within the budget?"""
        return self.steps_within_budget(1) == 1

    def steps_within_budget(self, wanted: int) -> int:
        """How many of `wanted` more private steps keep epsilon within the budget. Epsilon only grows
        with steps, so a binary search finds it in ~log2(wanted) accountant evaluations: one PRV
        evaluation costs 0.1-0.4 s on a CPU (more at small noise), too much to pay for every step."""
        wanted = max(0, int(wanted))
        if self.cfg.epsilon_budget is None or wanted == 0:
            return wanted
        if self._epsilon_after(wanted) <= self.cfg.epsilon_budget:
            return wanted
        lo, hi = 0, wanted  # lo steps fit, hi steps do not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self._epsilon_after(mid) <= self.cfg.epsilon_budget else (lo, mid)
        return lo

    def _epsilon_after(self, steps: int) -> float:
        probe = create_accountant(self.cfg.accountant)
        probe.history = list(self.engine.accountant.history)
        for _ in range(steps):
            probe.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return probe.get_epsilon(self.cfg.delta)

    # -- steps -------------------------------------------------------------------------------
    def private_batches(self) -> Iterator[torch.Tensor]:
        while True:
            for (x,) in self.loader:
                yield x.to(self.trainer.device)

    @contextlib.contextmanager
    def _public_only_kept(self) -> Iterator[None]:
        """The model's public-only parameters come out of a private step as they went in, with their
        AdamW moments. (Freezing them instead would clash with ghost clipping, whose parameter list
        is fixed when Opacus wraps the model; the noise drawn for them is simply discarded.)"""
        params = getattr(self.trainer.model, "public_only_parameters", list)()
        opt = self.trainer.optimizer
        saved = [(p.detach().clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                  if p in opt.state else None) for p in params]
        try:
            yield
        finally:
            with torch.no_grad():
                for p, (value, state) in zip(params, saved):
                    p.copy_(value)
                    p.grad = None
                    if state is None:
                        opt.state.pop(p, None)
                    else:
                        opt.state[p] = state

    def private_steps(self, steps: int) -> dict:
        """Up to `steps` DP-SGD steps; fewer (maybe none) when the budget runs out."""
        done = self._dp_steps(self.steps_within_budget(steps))
        return {"private_steps": done, "epsilon": self.epsilon(), "budget_spent": not self.budget_left()}

    def _dp_steps(self, steps: int) -> int:
        """`steps` DP-SGD steps (the caller checked the budget)."""
        it = self.private_batches()
        for _ in range(steps):
            batch = next(it)
            if len(batch) == 0:  # Poisson sampling can draw an empty batch: a noise-only step, still counted
                with self._public_only_kept():
                    self.dp_optimizer.zero_grad(set_to_none=True)
                    for p in self.dp_optimizer.params:
                        if self.ghost:
                            p.grad = torch.zeros_like(p)
                        else:
                            p.grad_sample = p.new_zeros((0, *p.shape))
                    self.dp_optimizer.step()
            else:
                self.private_step(batch)
        return steps

    def run_round(self, public_batches: Iterator[Any], steps: int, private_steps: int) -> dict:
        """A site's local round: `private_steps` DP-SGD steps on the private set, spread evenly
        among `steps` in all; the others (and any private step the budget no longer allows) are
        non-private steps on `public_batches` (shared simulated data). Returns the round's metrics;
        `loss` is the public steps' mean only (None without public steps): a loss measured on the
        private spectra without noise would leak beside the DP guarantee."""
        private_steps = max(0, min(private_steps, steps))
        allowed = self.steps_within_budget(private_steps)  # the private turns after these become public
        public_losses, done = [], 0
        for i in range(steps):
            private_turn = (i + 1) * private_steps // steps > i * private_steps // steps
            if private_turn and done < allowed:
                done += self._dp_steps(1)
                continue
            public_losses.append(float(self.trainer.train_step(next(public_batches))["loss"]))
        loss = sum(public_losses) / len(public_losses) if public_losses else None
        return {"loss": loss, "private_steps": done, "public_steps": steps - done,
                "epsilon": self.epsilon(), "delta": self.cfg.delta, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "budget_spent": not self.budget_left()}

    def private_step(self, batch: torch.Tensor) -> dict:
        """One DP-SGD step on a private batch: the Trainer's step with the private policy, Opacus'
        per-sample hooks on for exactly this step."""
        self.dp_model.enable_hooks()
        try:
            with self._public_only_kept():
                return self.trainer.train_step(batch, self.policy)
        finally:
            self.dp_model.disable_hooks()

    def close(self) -> Trainer:
        """Remove the Opacus hooks from the model; the Trainer (its AdamW state included) is as it was."""
        self.dp_model.to_standard_module()
        return self.trainer
