"""Randomized smoothing: Cohen et al.'s PREDICT and CERTIFY, batched over inputs, with an adaptive option.

Paper: Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019.
Reference code: ``locuslab/smoothing`` ``code/core.py``; this module keeps its shape on purpose so a reader
can check it against the paper's pseudocode line by line:

* :meth:`Smooth._sample_noise` is ``SAMPLEUNDERNOISE`` (hard-vote counts over noisy copies),
* :meth:`Smooth.predict` is ``PREDICT``, :meth:`Smooth.certify` is ``CERTIFY``,
* the statistics (:func:`~certkit.smoothing.statistics.lower_confidence_bound`, ``radius``,
  ``predict_from_counts``, ``certify_from_counts``) are small pure functions in
  :mod:`certkit.smoothing.statistics`.

Threat model: L2. The smoothed classifier is g(x) = argmax_c P(f(x + eta) = c), eta ~ N(0, sigma^2 I), with
noise added in [0, 1] pixel space (normalization is the model's first layer), so sigma and every radius are
pixel-space L2 distances.

The two halves of SAMPLEUNDERNOISE live beside this module: a :class:`~certkit.smoothing.voter.Voter` runs
the network (eval mode, speed options, the logit-shape check), and a
:class:`~certkit.smoothing.samplers.Sampler` draws the noise (per input, or shared by a group) and counts the
votes. Speed never changes the algorithm: several inputs are certified together by stacking their noisy
copies in one forward batch (:meth:`Smooth.certify_batch`), and each input draws the same noise, in the same
order, whether it is certified alone or with others.

Example::

    smoothed = Smooth(model, num_classes=10, sigma=0.25)
    label, r = smoothed.certify(x, n0=100, n=100_000, alpha=0.001, batch_size=1000)

    # the same, built from its parts: inputs of a group of 10 vote on one noise stream, compiled
    smoothed = Smooth.from_sampler(SharedNoise(Voter(model, 10, compile=True), sigma=0.25, group=10))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from certkit.errors import CertkitError
from certkit.smoothing.samplers import Generators, NoiseStream, Sampler, sampler_for
from certkit.smoothing.statistics import (
    AdaptiveSchedule,
    certify_from_counts,
    check_certify_args,
    check_predict_args,
    min_n_certify,
    predict_from_counts,
)
from certkit.smoothing.voter import Voter


@dataclass(frozen=True)
class Certificate:
    """CERTIFY's answer for one input, with what it cost.

    ``prediction`` is the certified class or ABSTAIN; ``radius`` is 0.0 on abstain; ``samples`` counts every
    noisy forward pass spent on the input (n0 selection plus the estimation samples actually drawn).
    """

    prediction: int
    radius: float
    p_lower: float
    samples: int


class Smooth:
    """The smoothed classifier g of a base classifier ``model``.

    Args:
        model: maps a float batch (B, C, H, W) in [0, 1] to logits (B, num_classes); normalization must be
            its first layer. It is put in eval mode for each call and its mode is restored afterwards.
        num_classes: number of classes K.
        sigma: noise level (> 0), in [0, 1] pixel units.
        channels_last, amp, compile: how the network is run (:class:`~certkit.smoothing.voter.Voter`). With
            any of them the certificate is about the network as run; :func:`certkit.certify_dataset` checks
            on a sample that it votes as the fp32 model does before it certifies.
        shared_noise: 0 (default) gives every input its own noise stream
            (:class:`~certkit.smoothing.samplers.PerInputNoise`); G >= 2 lets up to G inputs of one call vote
            on the same draws from one generator (:class:`~certkit.smoothing.samplers.SharedNoise`): every
            certificate keeps its (1 - alpha) guarantee, but certificates of one group are not independent of
            each other.
        rng: ``"torch"`` (default) draws each stream from a ``torch.Generator``, one ``randn`` per block of
            copies; ``"philox"`` from a counter-based :class:`~certkit.smoothing.philox.PhiloxStream`, a whole
            forward batch's noise in one computation (fused with the network's input when compiled). Streams
            passed to the methods below must be of that kind.

    This is the convenience constructor for the common case; :meth:`from_sampler` takes the parts.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        sigma: float,
        *,
        channels_last: bool = False,
        amp: str | None = None,
        compile: bool = False,
        shared_noise: int = 0,
        rng: str = "torch",
    ) -> None:
        voter = Voter(model, num_classes, channels_last=channels_last, amp=amp, compile=compile)
        self.sampler = sampler_for(voter, sigma, shared_noise, rng)

    @classmethod
    def from_sampler(cls, sampler: Sampler) -> Smooth:
        """The smoothed classifier whose votes ``sampler`` (and the voter it holds) counts."""
        smoothed = cls.__new__(cls)
        smoothed.sampler = sampler
        return smoothed

    @property
    def voter(self) -> Voter:
        return self.sampler.voter

    @property
    def model(self) -> nn.Module:
        return self.sampler.voter.model

    @property
    def num_classes(self) -> int:
        return self.sampler.voter.num_classes

    @property
    def sigma(self) -> float:
        return self.sampler.sigma

    @property
    def device(self) -> torch.device:
        return self.sampler.voter.device

    @property
    def shared_noise(self) -> int:
        """Inputs per shared noise stream; 0 when every input has its own."""
        return self.sampler.group

    @property
    def speed_options(self) -> dict[str, object]:
        """The options that change how the network is run (not what is sampled), stem split included."""
        return self.sampler.speed_options

    def __repr__(self) -> str:
        return f"Smooth({self.sampler!r})"

    # --- Cohen et al.'s three procedures, one input at a time --------------------------------------------

    def _sample_noise(self, x: Tensor, num: int, batch_size: int, generator: NoiseStream) -> np.ndarray:
        """SAMPLEUNDERNOISE: hard-vote counts (K,) of f(x + eta) over ``num`` noisy copies of x."""
        return self.sampler.counts(x.unsqueeze(0), [num], batch_size, [generator])[0]

    def predict(self, x: Tensor, n: int, alpha: float, batch_size: int, generator: NoiseStream = None) -> int:
        """PREDICT: the smoothed class of ``x`` ((C, H, W) or (1, C, H, W)), or ABSTAIN.

        With probability >= 1 - alpha it returns g(x) or abstains.
        """
        check_predict_args(n, alpha)
        counts = self._sample_noise(_one_image(x), n, batch_size, generator)
        return predict_from_counts(counts, alpha)

    def certify(
        self, x: Tensor, n0: int, n: int, alpha: float, batch_size: int, generator: NoiseStream = None
    ) -> tuple[int, float]:
        """CERTIFY: (class, radius) or (ABSTAIN, 0.0) for one input ``x`` ((C, H, W) or (1, C, H, W)) in [0, 1].

        With probability >= 1 - alpha, if it returns class c with radius R then g(x + delta) = c for every
        ||delta||_2 < R.
        """
        check_certify_args(n0, n, alpha)
        x = _one_image(x)
        # selection: guess the top class from n0 samples; no statistical test on these
        counts_selection = self._sample_noise(x, n0, batch_size, generator)
        c_hat = int(counts_selection.argmax())
        # estimation: n *new, independent* samples; reusing the n0 would void the guarantee
        counts_estimation = self._sample_noise(x, n, batch_size, generator)
        n_a = int(counts_estimation[c_hat])
        prediction, r, _ = certify_from_counts(c_hat, n_a, n, alpha, self.sigma)
        return prediction, r

    # --- the same procedures for several inputs at once ----------------------------------------------------

    def predict_batch(
        self, xs: Tensor, n: int, alpha: float, batch_size: int, generators: Generators | None = None
    ) -> list[int]:
        """PREDICT for each input of ``xs`` (B, C, H, W); input i draws its noise from ``generators[i]`` (shared
        noise: one generator for all)."""
        check_predict_args(n, alpha)
        counts = self.sampler.counts(xs, [n] * len(xs), batch_size, generators)
        return [predict_from_counts(c, alpha) for c in counts]

    def certify_batch(
        self,
        xs: Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        generators: Generators | None = None,
        adaptive: AdaptiveSchedule | None = None,
    ) -> list[Certificate]:
        """CERTIFY for each input of ``xs`` (B, C, H, W), their noisy copies sharing forward batches.

        Given the same per-input generators, the decisions equal those of :meth:`certify` called one input at
        a time: each input draws the same noise blocks from its own generator in the same order (all
        selection blocks, then all estimation blocks). With ``adaptive``, each input stops at the first stage
        of the schedule where its certificate is settled (see :class:`AdaptiveSchedule`); ``n`` is then the
        most estimation samples any input may use.
        """
        check_certify_args(n0, n, alpha)
        xs, gens = self.sampler.prepare(xs, generators)
        num_inputs = len(xs)

        # selection, from n0 samples per input
        counts_selection = self.sampler.counts(xs, [n0] * num_inputs, batch_size, gens)
        c_hat = counts_selection.argmax(axis=1)

        if adaptive is None:
            # estimation, from n independent samples per input
            counts_estimation = self.sampler.counts(xs, [n] * num_inputs, batch_size, gens)
            certificates = []
            for i in range(num_inputs):
                n_a = int(counts_estimation[i, c_hat[i]])
                prediction, r, p_lower = certify_from_counts(int(c_hat[i]), n_a, n, alpha, self.sigma)
                certificates.append(Certificate(prediction, r, p_lower, n0 + n))
            return certificates
        return self._certify_adaptive(xs, c_hat, n0, n, alpha, batch_size, gens, adaptive)

    def _certify_adaptive(
        self,
        xs: Tensor,
        c_hat: np.ndarray,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        generators: Generators,
        schedule: AdaptiveSchedule,
    ) -> list[Certificate]:
        """Estimation in stages; see :class:`AdaptiveSchedule` for the method and its proof."""
        stages = schedule.stages(n)
        alphas = schedule.alphas(alpha, len(stages))
        if stages[-1] < min_n_certify(alphas[-1]):
            raise CertkitError(
                f"n = {n} cannot certify at the adaptive final level {alphas[-1]:.3g}: "
                f"needs n >= {min_n_certify(alphas[-1])}"
            )
        num_inputs = len(xs)
        n_a = np.zeros(num_inputs, dtype=np.int64)
        drawn = 0
        active = list(range(num_inputs))
        results: list[Certificate | None] = [None] * num_inputs
        for k, n_k in enumerate(stages):
            # draw the next n_k - n_{k-1} estimation samples of every input still sampling
            # (shared noise: the inputs still sampling go on drawing from the one shared stream)
            gens = generators if self.shared_noise else [generators[i] for i in active]
            counts = self.sampler.counts(xs[active], [n_k - drawn] * len(active), batch_size, gens)
            drawn = n_k
            still_active = []
            for row, i in enumerate(active):
                n_a[i] += counts[row, c_hat[i]]
                decision = schedule.decide(int(c_hat[i]), int(n_a[i]), k, stages, alphas, self.sigma)
                if decision is None:
                    still_active.append(i)
                else:
                    prediction, r, p_lower = decision
                    results[i] = Certificate(prediction, r, p_lower, n0 + n_k)
            active = still_active
            if not active:
                break
        return [c for c in results if c is not None]


def _one_image(x: Tensor) -> Tensor:
    """``x`` as one image (C, H, W), from (C, H, W) or (1, C, H, W); anything else is refused."""
    if not isinstance(x, Tensor):
        raise CertkitError(f"certify and predict take a torch.Tensor image (C, H, W), not a {type(x).__name__}")
    if x.dim() == 4 and len(x) == 1:
        return x[0]
    if x.dim() != 3:
        raise CertkitError(
            f"certify and predict take one image (C, H, W) or (1, C, H, W), got shape {tuple(x.shape)}; "
            "use certify_batch or predict_batch for several"
        )
    return x
