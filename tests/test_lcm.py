"""The linear-combination fit (the classical quantification baseline) recovers known amplitudes."""

import math

import numpy as np
import torch

from mrsfm_model.data.canonical import CanonicalGrid
from mrsfm_model.data.simulate import Simulator
from mrsfm_model.evaluation.lcm import LinearCombinationFit


def test_fit_recovers_amplitudes_of_noise_free_megapress_within_2_percent():
    grid = CanonicalGrid.from_config()
    sim = Simulator("megapress_ge", grid, device="cpu")
    # random linewidths, shift, phase0 over 360 degrees, phase1, baseline and residual water; no noise
    out = sim.simulate(6, seed=11, fixed={"snr": math.inf})
    fit = LinearCombinationFit.from_profile("megapress_ge", grid).fit(out.fid)
    scale = out.truth["norm_scale"]
    for name in ("NAA", "Cr", "PCr", "GABA", "Glu"):
        rel = (fit.amplitudes[name] * scale / out.truth[name] - 1).abs()
        assert rel.max() < 0.02, f"{name}: {rel.tolist()}"
    assert torch.allclose(fit.params["shift_hz"], out.truth["shift_hz"], atol=0.05)
    wrapped = (fit.params["phase0"] - out.truth["phase0"] + 180) % 360 - 180
    assert wrapped.abs().max() < 1.0
    truth = out.truth["GABA"] / (out.truth["Cr"] + out.truth["PCr"])
    assert np.allclose(fit.ratio("GABA", "Cr", "PCr"), truth, rtol=0.02)


def test_fit_of_unedited_press_and_a_single_spectrum():
    grid = CanonicalGrid.from_config()
    out = Simulator("press_siemens", grid, device="cpu").simulate(1, seed=5, fixed={"snr": math.inf})
    fit = LinearCombinationFit.from_profile("press_siemens", grid).fit(out.fid[0])  # (n_sub, points)
    assert fit.amplitudes["NAA"].shape == (1,)
    assert abs(float(fit.amplitudes["NAA"][0] * out.truth["norm_scale"][0] / out.truth["NAA"][0]) - 1) < 0.02
