"""Flow matching and ODE samplers: distribution recovery, time shift, solver order."""
import math

import pytest
import torch
import torch.nn as nn

from core.generator.flow import flow_loss, sample, sample_t, shift_for, time_grid, time_shift

MEANS = torch.tensor([[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]])
WEIGHTS = torch.tensor([0.1, 0.2, 0.3, 0.4])
STD = 0.3


def mixture(n: int, g: torch.Generator) -> torch.Tensor:
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
    return MEANS[k] + STD * torch.randn(n, 2, generator=g)


class MLPVelocity(nn.Module):
    """v(x, t): unconditional MLP on [x, sin/cos features of t]; labels are ignored."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 + 8, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2),
        )

    def forward(self, x, t, y=None):
        f = t[:, None] * torch.tensor([1.0, 2.0, 4.0, 8.0]) * math.pi
        return self.net(torch.cat([x, f.sin(), f.cos()], dim=1))


def test_time_shift_matches_hand_computation():
    # Latent 16×4×4 = 256 values: s = sqrt(256/4096) = 0.25.
    assert shift_for((16, 4, 4)) == pytest.approx(0.25)
    # RAE: 768×16×16 -> sqrt(48).
    assert shift_for((768, 16, 16)) == pytest.approx(math.sqrt(48))
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    # s = 3: t' = 3t / (1 + 2t) -> 0, 0.75/1.5 = 0.5, 1.5/2 = 0.75, 1.
    assert torch.allclose(time_shift(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    # s = 0.25 at t = 0.5: 0.125 / (1 - 0.375) = 0.2.
    assert time_shift(torch.tensor(0.5), 0.25).item() == pytest.approx(0.2)
    assert torch.equal(time_shift(t, 1.0), t)
    grid = time_grid(4, 3.0)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and torch.all(grid[1:] < grid[:-1])


def test_logit_normal_times():
    g = torch.Generator().manual_seed(0)
    t = sample_t(200_000, generator=g)
    assert 0 < t.min() and t.max() < 1
    # sigmoid(N(0,1)): median 0.5, P(t < sigmoid(1)) = Phi(1) ≈ 0.8413.
    assert t.median().item() == pytest.approx(0.5, abs=0.01)
    assert (t < torch.sigmoid(torch.tensor(1.0))).float().mean().item() == pytest.approx(0.8413, abs=0.01)
    ts = sample_t(200_000, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ts, time_shift(t, 3.0))


def test_flow_loss_target_and_class_dropout():
    seen = {}

    def model(x_t, t, y):
        seen.update(x_t=x_t, t=t, y=y)
        return torch.zeros_like(x_t)

    x = torch.randn(4096, 3)
    y = torch.zeros(4096, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    loss = flow_loss(model, x, y, class_dropout=0.25, null_class=7, generator=g)
    # Replaying the generator gives the t and ε the loss used: x_t = (1−t)x + tε, target ε − x.
    g2 = torch.Generator().manual_seed(1)
    t = sample_t(4096, generator=g2)
    eps = torch.randn(x.shape, generator=g2)
    assert torch.allclose(seen["t"], t)
    assert torch.allclose(seen["x_t"], (1 - t[:, None]) * x + t[:, None] * eps)
    assert loss.item() == pytest.approx(((eps - x) ** 2).mean().item(), rel=1e-5)
    assert set(seen["y"].tolist()) == {0, 7}
    assert (seen["y"] == 7).float().mean().item() == pytest.approx(0.25, abs=0.03)
    with pytest.raises(ValueError, match="null_class"):
        flow_loss(model, x, y, class_dropout=0.1)


def gaussian_velocity(mu: float, sigma: float):
    """Exact flow-matching velocity for data N(mu, sigma²) in 1-D: E[ε − x | x_t].

    x_t = (1−t)mu + sqrt((1−t)²σ² + t²)·ε' in law, and the ODE maps noise z to mu + σz.
    """

    def v(x, t):
        t = t[:, None]
        var = (1 - t) ** 2 * sigma**2 + t**2
        r = x - (1 - t) * mu
        e_x = mu + (1 - t) * sigma**2 / var * r
        e_eps = t / var * r
        return e_eps - e_x

    return v


def test_heun_beats_euler_on_known_solution():
    mu, sigma = 1.5, 0.2
    v = gaussian_velocity(mu, sigma)
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    exact = mu + sigma * z
    reference = sample(v, z, steps=2000, sampler="euler")
    assert torch.allclose(reference, exact, atol=2e-3)  # the solution is what we claim
    for steps in (4, 8):
        err_euler = (sample(v, z, steps=steps, sampler="euler") - reference).abs().max()
        err_heun = (sample(v, z, steps=steps, sampler="heun") - reference).abs().max()
        assert err_heun < 0.5 * err_euler
    # Second order: halving the step divides Heun's error by ~4, Euler's by ~2.
    e8 = (sample(v, z, steps=8, sampler="heun") - exact).abs().max()
    e16 = (sample(v, z, steps=16, sampler="heun") - exact).abs().max()
    assert e8 / e16 > 2.5
    with pytest.raises(ValueError, match="sampler"):
        sample(v, z, steps=4, sampler="rk4")


@pytest.mark.parametrize("sampler,steps", [("euler", 50), ("heun", 25)])
def test_learned_flow_recovers_gaussian_mixture(sampler, steps, trained_mixture_model):
    model = trained_mixture_model
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(4000, 2, generator=g)
    with torch.no_grad():
        x = sample(lambda x, t: model(x, t), noise, steps=steps, sampler=sampler)
    k = torch.cdist(x, MEANS).argmin(dim=1)
    props = torch.bincount(k, minlength=4).float() / len(x)
    assert torch.allclose(props, WEIGHTS, atol=0.04), props
    for j in range(4):
        pts = x[k == j]
        assert torch.allclose(pts.mean(0), MEANS[j], atol=0.15), (j, pts.mean(0))
        std = pts.std(0)
        assert torch.all((std > 0.75 * STD) & (std < 1.3 * STD)), (j, std)


@pytest.fixture(scope="module")
def trained_mixture_model():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = MLPVelocity()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    y = torch.zeros(512, dtype=torch.long)
    for _ in range(800):
        loss = flow_loss(model, mixture(512, g), y, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
