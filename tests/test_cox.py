"""The Cox loss against lifelines, statsmodels and hand computation; stability and invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi
from statsmodels.duration.hazard_regression import PHReg

from psma_lib.cox import neg_partial_log_likelihood

ROSSI_COVARIATES = ["fin", "age", "race", "wexp", "mar", "paro", "prio"]


@pytest.fixture(scope="module")
def rossi():
    return load_rossi()


def fit_linear_cox(df, ties: str) -> tuple[np.ndarray, float]:
    """Newton-Raphson on our loss (float64, autograd Hessian), original covariate scale.

    Returns (coefficients in ROSSI_COVARIATES order, maximised partial log-likelihood).
    """
    x = torch.tensor(df[ROSSI_COVARIATES].to_numpy(), dtype=torch.float64)
    time = torch.tensor(df["week"].to_numpy(), dtype=torch.float64)
    event = torch.tensor(df["arrest"].to_numpy())

    def loss(beta):
        return neg_partial_log_likelihood(x @ beta, time, event, ties=ties, reduction="sum")

    beta = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(50):
        b = beta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(b), b)
        hess = torch.autograd.functional.hessian(loss, beta)
        step = torch.linalg.solve(hess, grad)
        beta = beta - step
        if step.abs().max() < 1e-12:
            break
    else:  # pragma: no cover - a failure to converge is a test failure
        raise AssertionError("Newton did not converge")
    return beta.numpy(), -loss(beta).item()


def test_efron_matches_lifelines_on_rossi(rossi):
    cph = CoxPHFitter(penalizer=0.0).fit(rossi, duration_col="week", event_col="arrest")
    beta, loglik = fit_linear_cox(rossi, ties="efron")
    np.testing.assert_allclose(beta, cph.params_[ROSSI_COVARIATES].to_numpy(), atol=1e-4, rtol=0)
    assert loglik == pytest.approx(cph.log_likelihood_, abs=1e-3)


def test_breslow_matches_statsmodels_on_rossi(rossi):
    model = PHReg(rossi["week"], rossi[ROSSI_COVARIATES], status=rossi["arrest"], ties="breslow")
    result = model.fit()
    beta, loglik = fit_linear_cox(rossi, ties="breslow")
    np.testing.assert_allclose(beta, np.asarray(result.params), atol=1e-4, rtol=0)
    assert loglik == pytest.approx(result.llf, abs=1e-3)


def test_efron_loss_equals_statsmodels_efron_loglik_at_arbitrary_coefficients(rossi):
    """Not only at the optimum: the whole likelihood surface agrees with an independent code."""
    model = PHReg(rossi["week"], rossi[ROSSI_COVARIATES], status=rossi["arrest"], ties="efron")
    x = torch.tensor(rossi[ROSSI_COVARIATES].to_numpy(), dtype=torch.float64)
    time = torch.tensor(rossi["week"].to_numpy(), dtype=torch.float64)
    event = torch.tensor(rossi["arrest"].to_numpy())
    rng = np.random.default_rng(3)
    for _ in range(3):
        beta = rng.normal(scale=0.2, size=len(ROSSI_COVARIATES))
        ours = -neg_partial_log_likelihood(x @ torch.from_numpy(beta), time, event, reduction="sum")
        assert ours.item() == pytest.approx(model.loglike(beta), abs=1e-8)


def hand_example():
    """Three events and one censoring tied at t=1, one event at t=2, one censoring at t=3."""
    eta = [0.3, -0.5, 1.2, 0.1, -0.7, 0.4]
    time = [1.0, 1.0, 1.0, 1.0, 2.0, 3.0]
    event = [1, 1, 1, 0, 1, 0]
    ex = [math.exp(v) for v in eta]
    risk_t1, tied_t1 = sum(ex), ex[0] + ex[1] + ex[2]
    risk_t2 = ex[4] + ex[5]
    events_eta = eta[0] + eta[1] + eta[2] + eta[4]
    breslow = events_eta - 3 * math.log(risk_t1) - math.log(risk_t2)
    efron = (
        events_eta
        - math.log(risk_t1)
        - math.log(risk_t1 - tied_t1 / 3)
        - math.log(risk_t1 - 2 * tied_t1 / 3)
        - math.log(risk_t2)
    )
    tensors = (torch.tensor(eta, dtype=torch.float64), torch.tensor(time), torch.tensor(event))
    return tensors, efron, breslow


def test_hand_computed_example_with_ties_efron_and_breslow():
    (eta, time, event), efron, breslow = hand_example()
    got_efron = neg_partial_log_likelihood(eta, time, event, ties="efron", reduction="sum")
    got_breslow = neg_partial_log_likelihood(eta, time, event, ties="breslow", reduction="sum")
    assert got_efron.item() == pytest.approx(-efron, abs=1e-12)
    assert got_breslow.item() == pytest.approx(-breslow, abs=1e-12)
    # Efron removes part of the tied events from later risk sets: a smaller loss than Breslow.
    assert got_efron.item() < got_breslow.item() - 0.1


def test_reductions_sum_mean_none_agree():
    (eta, time, event), efron, _ = hand_example()
    total = neg_partial_log_likelihood(eta, time, event, reduction="sum")
    mean = neg_partial_log_likelihood(eta, time, event, reduction="mean")
    per_sample = neg_partial_log_likelihood(eta, time, event, reduction="none")
    assert per_sample.shape == eta.shape
    assert per_sample.sum().item() == pytest.approx(total.item(), abs=1e-12)
    assert mean.item() == pytest.approx(-efron / 4, abs=1e-12)
    assert torch.all(per_sample[event == 0] == 0)


def test_column_vector_input_gives_same_loss():
    (eta, time, event), _, _ = hand_example()
    flat = neg_partial_log_likelihood(eta, time, event)
    column = neg_partial_log_likelihood(eta[:, None], time, event)
    assert column.item() == flat.item()


def test_gradient_matches_finite_differences_with_ties():
    (eta, time, event), _, _ = hand_example()
    eta = eta.clone().requires_grad_(True)
    for ties in ("efron", "breslow"):
        assert torch.autograd.gradcheck(
            lambda e, ties=ties: neg_partial_log_likelihood(e, time, event, ties=ties), (eta,)
        )


def test_without_ties_efron_equals_breslow():
    gen = torch.Generator().manual_seed(0)
    eta = torch.randn(50, generator=gen, dtype=torch.float64)
    time = torch.randperm(50, generator=gen).to(torch.float64) + 1.0  # distinct times
    event = torch.rand(50, generator=gen) < 0.6
    efron = neg_partial_log_likelihood(eta, time, event, ties="efron", reduction="sum")
    breslow = neg_partial_log_likelihood(eta, time, event, ties="breslow", reduction="sum")
    assert efron.item() == pytest.approx(breslow.item(), abs=1e-12)


def random_tied_batch(n=300, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    eta = torch.randn(n, generator=gen, dtype=dtype)
    time = torch.randint(1, 20, (n,), generator=gen).to(torch.float32)  # many ties
    event = torch.rand(n, generator=gen) < 0.5
    return eta, time, event


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_permutation_invariance(ties):
    eta, time, event = random_tied_batch()
    perm = torch.randperm(len(eta), generator=torch.Generator().manual_seed(7))
    a = neg_partial_log_likelihood(eta, time, event, ties=ties, reduction="sum")
    b = neg_partial_log_likelihood(eta[perm], time[perm], event[perm], ties=ties, reduction="sum")
    assert b.item() == pytest.approx(a.item(), abs=1e-10)
    per_a = neg_partial_log_likelihood(eta, time, event, ties=ties, reduction="none")
    per_b = neg_partial_log_likelihood(eta[perm], time[perm], event[perm], ties=ties, reduction="none")
    # Efron splits a tie group's correction over its events in sorted order, so per-sample terms
    # within a group may be exchanged; the sum over each time must not change.
    for t in torch.unique(time):
        assert per_b[time[perm] == t].sum().item() == pytest.approx(per_a[time == t].sum().item(), abs=1e-10)


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_shift_invariance(ties):
    eta, time, event = random_tied_batch()
    a = neg_partial_log_likelihood(eta, time, event, ties=ties)
    b = neg_partial_log_likelihood(eta + 37.5, time, event, ties=ties)
    assert b.item() == pytest.approx(a.item(), abs=1e-9)


@pytest.mark.parametrize("ties", ["efron", "breslow"])
@pytest.mark.parametrize("magnitude", [80.0, 500.0])  # exp(500) overflows even float64
def test_extreme_log_hazards_finite_in_float32(ties, magnitude):
    eta64, time, event = random_tied_batch(n=200, seed=2)
    eta64 = torch.where(eta64 > 0, magnitude, -magnitude).to(torch.float64) + 0.01 * eta64
    eta32 = eta64.to(torch.float32).requires_grad_(True)
    loss = neg_partial_log_likelihood(eta32, time, event, ties=ties)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(eta32.grad).all()
    reference = neg_partial_log_likelihood(eta32.detach().double(), time, event, ties=ties)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_bf16_autocast_computes_in_float32_with_finite_gradients(ties):
    eta, time, event = random_tied_batch(n=256, seed=4)
    features = (eta * 40).to(torch.float32)[:, None].repeat(1, 8)
    layer = torch.nn.Linear(8, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_hazard = layer(features)
        assert log_hazard.dtype == torch.bfloat16
        loss = neg_partial_log_likelihood(log_hazard, time, event, ties=ties)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    reference = neg_partial_log_likelihood(log_hazard.detach().double(), time, event, ties=ties)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_event_batch_gives_zero_loss_with_zero_gradient(reduction):
    eta = torch.randn(10, requires_grad=True)
    time = torch.arange(10.0)
    event = torch.zeros(10, dtype=torch.bool)
    loss = neg_partial_log_likelihood(eta, time, event, reduction=reduction)
    loss.sum().backward()
    assert torch.all(loss == 0)
    assert eta.grad is not None and torch.all(eta.grad == 0)


def test_cpu_results_are_bit_identical_between_calls():
    eta, time, event = random_tied_batch(n=5000, seed=9, dtype=torch.float32)
    results = []
    for _ in range(2):
        leaf = eta.clone().requires_grad_(True)
        loss = neg_partial_log_likelihood(leaf, time, event)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_large_batch_has_no_quadratic_memory():
    """n = 200k: an [n, n] float32 tensor would need 160 GB, so this only passes in O(n) memory."""
    torch.set_num_threads(1)
    eta, time, event = random_tied_batch(n=200_000, seed=5, dtype=torch.float32)
    eta.requires_grad_(True)
    loss = neg_partial_log_likelihood(eta, time, event)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(eta.grad).all()


def test_bad_arguments_raise_value_error():
    eta, time, event = random_tied_batch(n=5)
    with pytest.raises(ValueError, match="ties"):
        neg_partial_log_likelihood(eta, time, event, ties="exact")
    with pytest.raises(ValueError, match="reduction"):
        neg_partial_log_likelihood(eta, time, event, reduction="avg")
    with pytest.raises(ValueError, match="same length"):
        neg_partial_log_likelihood(eta, time[:4], event)
    with pytest.raises(ValueError, match="shape"):
        neg_partial_log_likelihood(eta.reshape(5, 1, 1), time, event)


def test_empty_batch_gives_zero_loss():
    eta = torch.zeros(0, requires_grad=True)
    loss = neg_partial_log_likelihood(eta, torch.zeros(0), torch.zeros(0))
    loss.backward()
    assert loss.item() == 0 and eta.grad.shape == (0,)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_cuda_matches_cpu_float64(ties):
    eta, time, event = random_tied_batch(n=4096, seed=6)
    reference = neg_partial_log_likelihood(eta, time, event, ties=ties)
    on_gpu = neg_partial_log_likelihood(eta.float().cuda(), time.cuda(), event.cuda(), ties=ties)
    assert on_gpu.item() == pytest.approx(reference.item(), rel=1e-5)


@needs_cuda
def test_cuda_graph_capture_replays_loss_and_gradient_of_new_data():
    """The loss has fixed shapes and no host sync, so a training step with it can be graphed."""
    eta64, time, event = random_tied_batch(n=512, seed=7)
    eta = eta64.float().cuda().requires_grad_(True)
    time, event = time.cuda(), event.cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as CUDA graphs require
        for _ in range(3):
            eta.grad = None
            neg_partial_log_likelihood(eta, time, event).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    eta.grad = None
    with torch.cuda.graph(graph):
        static_loss = neg_partial_log_likelihood(eta, time, event)
        static_loss.backward()
    new_eta, new_time, new_event = random_tied_batch(n=512, seed=8)
    with torch.no_grad():
        eta.copy_(new_eta.float().cuda())
    time.copy_(new_time.cuda())
    event.copy_(new_event.cuda())
    graph.replay()
    expected_eta = new_eta.float().double().requires_grad_(True)
    expected = neg_partial_log_likelihood(expected_eta, new_time, new_event)
    expected.backward()
    assert static_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(eta.grad.cpu().double(), expected_eta.grad, rtol=1e-4, atol=1e-6)


def test_lesion_linear_fit_matches_penalised_lifelines_on_rossi(rossi):
    """One lesion per patient: :func:`fit_lesion_linear` is lifelines' penalised Cox model; two
    identical lesions per patient summed only add log 2 to every risk, which the Cox model ignores."""
    from psma_lib.train import fit_lesion_linear

    x = rossi[ROSSI_COVARIATES]
    z = (x - x.mean()) / x.std(ddof=0)
    cph = CoxPHFitter(penalizer=0.01).fit(z.assign(week=rossi["week"], arrest=rossi["arrest"]), "week", "arrest")
    inputs = torch.tensor(z.to_numpy(), dtype=torch.float32)
    time, event = torch.tensor(rossi["week"].to_numpy(), dtype=torch.float64), torch.tensor(rossi["arrest"].to_numpy())
    n = len(rossi)
    one = fit_lesion_linear(inputs, torch.arange(n), time, event, "sum", penalizer=0.01)
    np.testing.assert_allclose(one.numpy(), cph.params_[ROSSI_COVARIATES].to_numpy(), atol=1e-4, rtol=0)
    two = fit_lesion_linear(inputs.repeat(2, 1), torch.arange(n).repeat(2), time, event, "sum", penalizer=0.01)
    np.testing.assert_allclose(two.numpy(), one.numpy(), atol=1e-5)


def test_lesion_linear_fit_with_patient_covariates_matches_penalised_lifelines_on_rossi(rossi):
    """Part of rossi's covariates as the lesions' inputs and the rest as the patients' own: the joint
    fit is lifelines' penalised Cox model on all of them (one lesion per patient, or two identical
    lesions summed); the patient covariates' weights follow ``inputs``' in the result."""
    from psma_lib.train import fit_lesion_linear

    x = rossi[ROSSI_COVARIATES]
    z = (x - x.mean()) / x.std(ddof=0)
    cph = CoxPHFitter(penalizer=0.01).fit(z.assign(week=rossi["week"], arrest=rossi["arrest"]), "week", "arrest")
    lesion_cols, patient_cols = ROSSI_COVARIATES[:3], ROSSI_COVARIATES[3:]
    inputs = torch.tensor(z[lesion_cols].to_numpy(), dtype=torch.float32)
    covariates = torch.tensor(z[patient_cols].to_numpy(), dtype=torch.float32)
    time, event = torch.tensor(rossi["week"].to_numpy(), dtype=torch.float64), torch.tensor(rossi["arrest"].to_numpy())
    n = len(rossi)
    expected = cph.params_[[*lesion_cols, *patient_cols]].to_numpy()
    one = fit_lesion_linear(inputs, torch.arange(n), time, event, "sum", 0.01, patient_inputs=covariates)
    np.testing.assert_allclose(one.numpy(), expected, atol=1e-4, rtol=0)
    two = fit_lesion_linear(inputs.repeat(2, 1), torch.arange(n).repeat(2), time, event, "sum", 0.01,
                            patient_inputs=covariates)
    np.testing.assert_allclose(two.numpy(), expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="rows"):
        fit_lesion_linear(inputs, torch.arange(n), time, event, "sum", 0.01, patient_inputs=covariates[:-1])


def test_patient_penalizer_matches_lifelines_with_a_penalizer_per_column_on_rossi(rossi):
    """A heavier ridge on the patient covariates alone is lifelines' per-column ``penalizer``; the
    heavy penalty shrinks their weights, not the lesion inputs' (which it changes only through them)."""
    from psma_lib.train import fit_lesion_linear

    x = rossi[ROSSI_COVARIATES]
    z = (x - x.mean()) / x.std(ddof=0)
    lesion_cols, patient_cols = ROSSI_COVARIATES[:3], ROSSI_COVARIATES[3:]
    penalties = np.array([0.01] * len(lesion_cols) + [0.7] * len(patient_cols))
    frame = z[[*lesion_cols, *patient_cols]].assign(week=rossi["week"], arrest=rossi["arrest"])
    cph = CoxPHFitter(penalizer=penalties).fit(frame, "week", "arrest")
    inputs = torch.tensor(z[lesion_cols].to_numpy())
    covariates = torch.tensor(z[patient_cols].to_numpy())
    time, event = torch.tensor(rossi["week"].to_numpy(), dtype=torch.float64), torch.tensor(rossi["arrest"].to_numpy())
    w = fit_lesion_linear(inputs, torch.arange(len(rossi)), time, event, "sum", 0.01, patient_inputs=covariates,
                          patient_penalizer=0.7)
    np.testing.assert_allclose(w.numpy(), cph.params_[[*lesion_cols, *patient_cols]].to_numpy(), atol=5e-4, rtol=0)
    same = fit_lesion_linear(inputs, torch.arange(len(rossi)), time, event, "sum", 0.01, patient_inputs=covariates)
    assert w[3:].abs().sum() < 0.5 * same[3:].abs().sum()
