"""PyTorch's AdamW with AMSGrad and MultiStepLR (methods/torch_adamw.py).

Oracles: a numpy float64 transcription of `torch.optim.AdamW`'s single-tensor
step (always), and torch itself when installed. Gradients shrink after a few
steps so that the running maximum of the second moment is what sets the step.
"""

import numpy as np
import optax
import pytest

from recontrast_jax.methods import torch_adamw

LR, B1, B2, EPS, WD = 1e-2, 0.9, 0.999, 1e-10, 1e-2
MILESTONES, GAMMA = (3,), 0.2
STEPS = 7


def gradient_sequence(seed=0, shape=(4, 3)):
    rng = np.random.default_rng(seed)
    grads = [rng.normal(size=shape).astype(np.float32) * (3.0 if t < 3 else 0.1)
             for t in range(STEPS)]  # fmt: skip
    return rng.normal(size=shape).astype(np.float32), grads


def numpy_adamw_amsgrad(param, grads):
    """torch.optim.AdamW(amsgrad=True) + MultiStepLR, transcribed in float64."""
    p = param.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    v_max = np.zeros_like(p)
    trajectory = []
    for t, g in enumerate(grads, start=1):
        lr = LR * GAMMA ** sum(t - 1 >= s for s in MILESTONES)
        p = p * (1 - lr * WD)
        m = m + (1 - B1) * (g - m)
        v = B2 * v + (1 - B2) * g.astype(np.float64) ** 2
        v_max = np.maximum(v_max, v)
        denom = np.sqrt(v_max) / np.sqrt(1 - B2**t) + EPS
        p = p - lr / (1 - B1**t) * m / denom
        trajectory.append(p.copy())
    return trajectory


def optax_trajectory(tx, param, grads):
    state = tx.init(param)
    p, trajectory = param, []
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
        trajectory.append(np.asarray(p))
    return trajectory


def project_optimizer():
    schedule = torch_adamw.multistep_lr(LR, MILESTONES, GAMMA)
    return torch_adamw.adamw(schedule, B1, B2, EPS, WD, amsgrad=True)


def test_amsgrad_matches_numpy_transcription():
    param, grads = gradient_sequence()
    got = optax_trajectory(project_optimizer(), param, grads)
    expected = numpy_adamw_amsgrad(param, grads)
    for step, (g, e) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_allclose(g, e, rtol=2e-6, atol=1e-7, err_msg=f"step {step}")


def test_optax_amsgrad_is_not_pytorchs():
    """The reason for the custom transform: optax maximises the corrected moment."""
    param, grads = gradient_sequence()
    optax_version = optax.chain(
        optax.scale_by_amsgrad(B1, B2, EPS),
        optax.add_decayed_weights(WD),
        optax.scale_by_learning_rate(torch_adamw.multistep_lr(LR, MILESTONES, GAMMA)),
    )
    got = optax_trajectory(optax_version, param, grads)[-1]
    expected = numpy_adamw_amsgrad(param, grads)[-1]
    assert np.abs(got - expected).max() > 1e-4


def test_amsgrad_and_multistep_lr_match_torch():
    torch = pytest.importorskip("torch")
    param, grads = gradient_sequence(seed=1)
    weight = torch.nn.Parameter(torch.from_numpy(param.copy()))
    bias = torch.nn.Parameter(torch.from_numpy(param[0].copy()))
    opt = torch.optim.AdamW(
        [{"params": [weight]}, {"params": [bias], "lr": LR / 10}],
        lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD, amsgrad=True,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(MILESTONES), GAMMA)
    expected = []
    for g in grads:
        opt.zero_grad()
        weight.grad = torch.from_numpy(g.copy())
        bias.grad = torch.from_numpy(g[0].copy())
        opt.step()
        sched.step()
        expected.append((weight.detach().numpy().copy(), bias.detach().numpy().copy()))

    def group(lr):
        return torch_adamw.adamw(
            torch_adamw.multistep_lr(lr, MILESTONES, GAMMA), B1, B2, EPS, WD, True
        )

    tx = optax.partition(
        {"w": group(LR), "b": group(LR / 10)}, {"weight": "w", "bias": "b"}
    )
    params = {"weight": param, "bias": param[0]}
    state = tx.init(params)
    for step, g in enumerate(grads):
        updates, state = tx.update({"weight": g, "bias": g[0]}, state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(
            params["weight"], expected[step][0], rtol=1e-6, atol=1e-7
        )
        np.testing.assert_allclose(
            params["bias"], expected[step][1], rtol=1e-6, atol=1e-7
        )


def test_multistep_lr_matches_torch_scheduler():
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 5], 0.2)
    schedule = torch_adamw.multistep_lr(LR, (2, 5), 0.2)
    for update in range(8):
        assert float(schedule(update)) == pytest.approx(
            opt.param_groups[0]["lr"], rel=1e-6
        )
        opt.step()
        sched.step()
