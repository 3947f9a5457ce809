"""The diffusion family's mathematics against closed forms and textbook transcriptions.

For Gaussian data x0 ~ N(mu, c^2 I) the optimal denoiser is E[x0 | x] = mu + a c^2 / (a^2 c^2
+ s^2) (x - a mu) at x = a x0 + s noise: plugged into every sampler on every process, the
samples must have mean mu and std c. The objectives' losses at that optimum have closed forms;
EDM's preconditioning has identities; the samplers' steps in the process frame must equal the
textbook algorithms (DDPM's posterior step, EDM's Algorithm 2, rectified flow's Euler step).
"""
import math
import pytest
import torch

from dgm_scale.families.diffusion import SamplerConfig
from dgm_scale.families.diffusion.processes import EDM, Flow, VPContinuous, VPDiscrete, discrete_alpha_bar
from dgm_scale.families.diffusion.samplers import SAMPLERS, generate, levels
from dgm_scale.losses.diffusion import OBJECTIVES, edm_preconditioning, edm_weight, denoising_loss
from dgm_scale.modules.sampling import keyed_noise

MU, STD = 0.3, 0.5  # the Gaussian data
SHAPE = (1, 4, 4)
NUM = 2000


def posterior_mean(x, alpha, sigma):
    return MU + alpha * STD ** 2 / (alpha ** 2 * STD ** 2 + sigma ** 2) * (x - alpha * MU)


def analytic_denoiser(process):
    def denoise(x, t):
        alpha, sigma = (float(v) for v in process.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
        return posterior_mean(x, alpha, sigma)
    return denoise


def step_noise_of(seed, num=NUM):
    return lambda k: keyed_noise(seed * 1000 + k + 1, 0, num, SHAPE).double()


def no_step_noise(k):
    raise AssertionError("a deterministic sampler drew step noise")


PROCESSES = {
    "vp-discrete-cosine": VPDiscrete("cosine", 1000),
    "vp-discrete-linear": VPDiscrete("linear", 1000),
    "vp-continuous-cosine": VPContinuous("cosine"),
    "vp-continuous-linear": VPContinuous("linear"),
    "edm": EDM(-1.2, 1.2, 0.002, 80.0, 7.0),
    "flow": Flow("uniform", 0.0, 1.0),
}
#: steps at which each sampler is accurate on every process (ancestral sampling needs many)
STEPS = {"ddpm": 500, "ddim": 200, "euler": 200, "heun": 40, "dpmpp_2m": 40}


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_every_sampler_on_every_process_samples_gaussian_data_exactly(name, sampler):
    process = PROCESSES[name]
    settings = SamplerConfig(name=sampler, steps=STEPS[sampler])
    noise = keyed_noise(7, 0, NUM, SHAPE).double()
    stochastic = sampler == "ddpm"
    samples = generate(settings, analytic_denoiser(process), process, noise,
                       step_noise_of(7) if stochastic else no_step_noise)
    assert abs(samples.mean().item() - MU) < 0.01
    assert abs(samples.std().item() - STD) < 0.01


@pytest.mark.parametrize("name", ["edm", "vp-discrete-cosine", "flow"])
def test_heun_with_churn_and_ddim_with_eta_also_sample_gaussian_data(name):
    process = PROCESSES[name]
    noise = keyed_noise(3, 0, NUM, SHAPE).double()
    for settings in (SamplerConfig(name="heun", steps=80, churn=8.0, churn_noise=1.0), SamplerConfig(name="ddim", steps=400, eta=0.5)):
        samples = generate(settings, analytic_denoiser(process), process, noise, step_noise_of(3))
        assert abs(samples.mean().item() - MU) < 0.01 and abs(samples.std().item() - STD) < 0.01, settings


def test_flow_euler_is_the_textbook_step_x_plus_dt_v():
    """Rectified flow's Euler: x_{t'} = x_t + (t' - t) v(x_t, t), v = (x_t - D) / t, from t = 1."""
    process, steps = PROCESSES["flow"], 7
    noise = keyed_noise(1, 0, 50, SHAPE).double()
    denoise = analytic_denoiser(process)
    x, times = noise.clone(), [1 - k / steps for k in range(steps + 1)]
    for t, following in zip(times[:-1], times[1:]):
        x = x + (following - t) * (x - denoise(x, t)) / t
    ours = generate(SamplerConfig(name="euler", steps=steps), denoise, process, noise, no_step_noise)
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-10)


def test_ddpm_is_the_posterior_step_of_ho_et_al():
    """x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(1 - beta_t) + sqrt(beta~_t) z over all T steps."""
    T = 50
    process = VPDiscrete("linear", T)
    bar = discrete_alpha_bar("linear", T)
    betas = 1 - bar / torch.cat([torch.ones(1, dtype=torch.float64), bar[:-1]])
    noise, draws = keyed_noise(2, 0, 100, SHAPE).double(), step_noise_of(2, 100)
    denoise = analytic_denoiser(process)
    x = (1 - bar[-1]).sqrt() * noise  # x_T without its alpha x0 part (~0), as every sampler starts
    for k, i in enumerate(range(T - 1, -1, -1)):
        eps = (x - bar[i].sqrt() * denoise(x, float(i))) / (1 - bar[i]).sqrt()
        x = (x - betas[i] / (1 - bar[i]).sqrt() * eps) / (1 - betas[i]).sqrt()
        if i > 0:
            x = x + ((1 - bar[i - 1]) / (1 - bar[i]) * betas[i]).sqrt() * draws(k)
    ours = generate(SamplerConfig(name="ddpm", steps=T), denoise, process, noise, draws)
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-8)


def test_heun_with_churn_is_edm_algorithm_2():
    """EDM (Karras et al. 2022) Algorithm 2, transcribed in its own variables, on the EDM process."""
    process, steps = PROCESSES["edm"], 12
    settings = SamplerConfig(name="heun", steps=steps, churn=10.0, churn_min=0.05, churn_max=50.0, churn_noise=1.003)
    denoise, draws = analytic_denoiser(process), step_noise_of(4)
    noise = keyed_noise(4, 0, NUM, SHAPE).double()
    sigmas = [float(s) for s in process.sampling_times(steps)] + [0.0]
    x = sigmas[0] * noise
    for i, (t, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        gamma = min(settings.churn / steps, math.sqrt(2) - 1) if settings.churn_min <= t <= settings.churn_max else 0.0
        t_hat = t + gamma * t
        x_hat = x + math.sqrt(t_hat ** 2 - t ** 2) * settings.churn_noise * draws(i) if gamma > 0 else x
        d = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x = x_hat + (t_next - t_hat) * d
        if t_next > 0:
            x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * (x - denoise(x, t_next)) / t_next)
    ours = generate(settings, denoise, process, noise, draws)
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-9)


def test_dpmpp_2m_is_k_diffusions_multistep_update():
    """DPM-Solver++(2M) as k-diffusion writes it (sigma space, t = -log sigma), on the EDM process,
    with diffusers' first-order step into the smallest sigma."""
    process, steps = PROCESSES["edm"], 10
    denoise = analytic_denoiser(process)
    noise = keyed_noise(5, 0, 200, SHAPE).double()
    sigmas = [float(s) for s in process.sampling_times(steps)] + [0.0]
    x, old = sigmas[0] * noise, None
    for i in range(steps):
        denoised = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            break
        h = math.log(sigmas[i]) - math.log(sigmas[i + 1])
        combined = denoised
        if old is not None and i < steps - 2:
            r = (math.log(sigmas[i - 1]) - math.log(sigmas[i])) / h
            combined = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old
        x = sigmas[i + 1] / sigmas[i] * x - math.expm1(-h) * combined
        old = denoised
    ours = generate(SamplerConfig(name="dpmpp_2m", steps=steps), denoise, process, noise, no_step_noise)
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-9)


def noisy_gaussian_batch(alpha, sigma, count=20000):
    generator = torch.Generator().manual_seed(0)
    x0 = MU + STD * torch.randn(count, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(count, 8, generator=generator, dtype=torch.float64)
    return x0, noise, alpha * x0 + sigma * noise


def optimal_loss(name, alpha, sigma):
    """The minimum of E|F - target|^2 per dimension: Var(target | x), from the joint Gaussian."""
    c2, a, s = STD ** 2, alpha, sigma
    var_x = a * a * c2 + s * s
    if name == "eps":
        return a * a * c2 / var_x
    if name == "v":  # v = a n - s x0
        return (a * a + s * s * c2) - (a * s - s * a * c2) ** 2 / var_x
    if name == "flow":  # v = n - x0
        return (1 + c2) - (s - a * c2) ** 2 / var_x
    return edm_weight(torch.tensor(s), 0.5).item() * s * s * c2 / (s * s + c2)  # EDM: lambda Var(x0 | x)


@pytest.mark.parametrize("name, t", [("eps", 0.3), ("eps", 0.9), ("v", 0.3), ("v", 0.8), ("flow", 0.25),
                                     ("flow", 0.7), ("edm", 0.2), ("edm", 3.0)])
def test_each_objectives_loss_at_the_optimum_is_the_closed_form(name, t):
    process = PROCESSES["edm"] if name == "edm" else PROCESSES["flow"] if name == "flow" else PROCESSES["vp-continuous-cosine"]
    alpha, sigma = (float(v) for v in process.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
    objective = OBJECTIVES[name]
    x0, noise, x = noisy_gaussian_batch(alpha, sigma)
    best = posterior_mean(x, alpha, sigma)
    prediction = objective.target(best, (x - alpha * best) / sigma, torch.tensor(alpha), torch.tensor(sigma))
    loss = denoising_loss(prediction, objective.target(x0, noise, torch.tensor(alpha), torch.tensor(sigma))).mean()
    assert loss.item() == pytest.approx(optimal_loss(name, alpha, sigma), rel=0.03)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_the_target_denoises_back_to_the_clean_data(name):
    process = {"edm": PROCESSES["edm"], "flow": PROCESSES["flow"]}.get(name, PROCESSES["vp-discrete-linear"])
    t = torch.tensor([0.05, 0.5, 0.9]) * (50 if name == "edm" else 999 if name in ("eps", "v") else 1)
    alpha, sigma = (v.float().reshape(-1, 1) for v in process.alpha_sigma(t.double()))
    x0, noise = torch.randn(3, 5, dtype=torch.float32), torch.randn(3, 5)
    objective = OBJECTIVES[name]
    target = objective.target(x0, noise, alpha, sigma)
    recovered = objective.denoised(target, alpha * x0 + sigma * noise, alpha, sigma)
    torch.testing.assert_close(recovered, x0, rtol=1e-4, atol=1e-4)


def test_edm_preconditioning_identities():
    data = 0.5
    c_skip, c_out, c_in, c_noise = edm_preconditioning(torch.tensor(data), data)
    assert c_skip.item() == pytest.approx(0.5) and c_out.item() == pytest.approx(data / math.sqrt(2))
    assert c_in.item() == pytest.approx(1 / (data * math.sqrt(2))) and c_noise.item() == pytest.approx(math.log(data) / 4)
    sigmas = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    _, c_out, c_in, _ = edm_preconditioning(sigmas, data)
    torch.testing.assert_close(edm_weight(sigmas, data) * c_out ** 2, torch.ones_like(sigmas))  # unit weighted loss
    torch.testing.assert_close(c_in ** 2 * (sigmas ** 2 + data ** 2), torch.ones_like(sigmas))  # unit-variance input


def test_processes():
    bar = discrete_alpha_bar("linear", 1000)
    assert bar[-1].item() == pytest.approx(4.036e-5, rel=1e-3)  # DDPM's linear schedule: sqrt(abar_T) ~ 0.00635
    for name, process in PROCESSES.items():
        times = process.sampling_times(9)
        assert torch.all(times[1:] < times[:-1]), name
        alpha, sigma = process.alpha_sigma(times)
        if name.startswith("vp"):
            torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(alpha))
        inside = alpha > 0
        torch.testing.assert_close(process.time_of(sigma[inside] / alpha[inside]), times[inside], rtol=1e-6, atol=1e-6,
                                   msg=name)
    edm = PROCESSES["edm"].sampling_times(18)
    assert edm[0].item() == pytest.approx(80.0) and edm[-1].item() == pytest.approx(0.002)
    assert PROCESSES["flow"].sampling_times(4).tolist() == [1.0, 0.75, 0.5, 0.25]
    assert levels(PROCESSES["flow"], 4)[-1].sigma == 0.0
