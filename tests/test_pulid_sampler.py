"""KarrasDPMSolverPP2MScheduler: k-diffusion's DPM-Solver++(2M) on Karras sigmas (PuLID v1.1's sampler)."""

from __future__ import annotations

import math

import torch

from fastface.schedulers import KarrasDPMSolverPP2MScheduler


def test_karras_sigmas_and_nearest_timesteps():
    s = KarrasDPMSolverPP2MScheduler()
    s.set_timesteps(5)
    betas = [(math.sqrt(0.00085) + i * (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2 for i in range(1000)]
    table, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        table.append(math.sqrt((1 - prod) / prod))
    assert abs(float(s.sigmas[0]) - table[-1]) < 1e-4 and abs(float(s.sigmas[-2]) - table[0]) < 1e-6
    assert float(s.sigmas[-1]) == 0.0 and len(s.timesteps) == 5
    # rho = 7: sigma^(1/7) is evenly spaced
    roots = s.sigmas[:-1].double() ** (1 / 7)
    assert torch.allclose(roots.diff(), roots.diff()[0].expand(4), rtol=1e-4)
    for sigma, t in zip(s.sigmas[:-1].tolist(), s.timesteps.tolist()):
        nearest = min(range(1000), key=lambda i: abs(math.log(sigma) - math.log(table[i])))
        assert t == nearest
    assert s.timesteps[0] == 999 and s.timesteps[-1] == 0
    assert torch.allclose(s.scale_model_input(torch.ones(1)), 1 / (s.sigmas[0] ** 2 + 1) ** 0.5)
    assert s.init_noise_sigma == float(s.sigmas[0])


def _sample(scheduler, denoise, x):
    for t in scheduler.timesteps:
        sigma = scheduler.sigmas[scheduler._step_index]
        eps = (x - denoise(sigma)) / sigma  # an ε-model whose data prediction is denoise(σ)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def test_exact_for_a_constant_data_prediction_and_second_order_otherwise():
    s = KarrasDPMSolverPP2MScheduler()
    s.set_timesteps(4)
    target = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    x0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(1)) * s.init_noise_sigma
    assert torch.allclose(_sample(s, lambda sigma: target, x0), target, atol=1e-5)
    # data prediction linear in t = -log σ: the multistep correction (1 + 1/2r) D_i - (1/2r) D_{i-1}
    s.set_timesteps(4)

    def moving(sigma):
        return target * (1 + 0.1 * sigma.log())

    x, denoised_prev = x0.clone(), None
    sig = s.sigmas.tolist()
    for i in range(4):
        d = moving(torch.tensor(sig[i]))
        t, t_next = -math.log(sig[i]), (math.inf if sig[i + 1] == 0 else -math.log(sig[i + 1]))
        h = t_next - t
        if denoised_prev is None or sig[i + 1] == 0:
            x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * d
        else:
            r = (t + math.log(sig[i - 1])) / h
            x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * d - (1 / (2 * r)) * denoised_prev)
        denoised_prev = d
    assert torch.allclose(_sample(s, moving, x0.clone()), x, rtol=1e-5, atol=1e-5)
    # fresh from its config (the engine makes one per call)
    again = KarrasDPMSolverPP2MScheduler.from_config(s.config)
    again.set_timesteps(4)
    assert torch.equal(again.sigmas, s.sigmas)
