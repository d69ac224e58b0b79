"""Cox proportional-hazards loss: the negative log partial likelihood of a batch of log-hazards.

The partial likelihood of log-hazards ``eta`` (higher = shorter expected survival) with event
times ``t`` and event indicators ``e`` is, for each distinct event time ``t_g`` with ``d_g``
events (set ``D_g``) and risk set ``R_g = {j : t_j >= t_g}``:

* Breslow: ``log L = sum_g [ sum_{i in D_g} eta_i - d_g * log sum_{j in R_g} exp(eta_j) ]``
* Efron:   ``log L = sum_g [ sum_{i in D_g} eta_i
  - sum_{l=0}^{d_g-1} log( sum_{R_g} exp(eta_j) - (l/d_g) sum_{D_g} exp(eta_i) ) ]``

Both are equal when there are no tied event times. The implementation sorts once
(O(n log n)), gets every risk-set log-sum-exp from one reverse cumulative ``logcumsumexp`` and
computes the Efron correction as ``logR + log1p(-(l/d) * exp(logD - logR))`` with
``exp(logD - logR) <= 1``, so nothing overflows in float32 even for log-hazards of +-80 and no
tensor is larger than ``[n]``. It always computes in float32 (float64 if the input is float64)
with autocast switched off, so it is safe inside ``torch.autocast(..., dtype=torch.bfloat16)``.
"""

from __future__ import annotations

import torch

_TIES = ("efron", "breslow")
_REDUCTIONS = ("mean", "sum", "none")


def neg_partial_log_likelihood(
    log_hazard: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    ties: str = "efron",
    reduction: str = "mean",
) -> torch.Tensor:
    """Negative log partial likelihood of a Cox model (the training loss of the ResNet-Cox).

    Args:
        log_hazard: ``[n]`` or ``[n, 1]`` float tensor, the model's log-hazard (risk) per
            sample; any float dtype (bf16/fp16 inputs are upcast to float32).
        time: ``[n]`` survival or censoring times (any unit, e.g. months), same device.
        event: ``[n]`` bool or 0/1 tensor, 1 = event observed, 0 = censored.
        ties: ``"efron"`` (default, as lifelines) or ``"breslow"`` (as statsmodels' default).
        reduction: ``"sum"`` returns exactly ``-log L``; ``"mean"`` divides that by the number of
            events (the scale does not depend on batch size or censoring rate); ``"none"`` returns
            ``[n]`` per-sample contributions (0 for censored samples) whose sum is ``-log L``.

    Returns:
        A scalar (``[n]`` for ``"none"``) in float32, or float64 for float64 input. A batch
        without events gives a loss of exactly 0 whose gradient is all zeros (never None/NaN).
        Non-finite inputs are not checked here (that would synchronise a GPU every step).
        CPU results are bit-identical between calls; on CUDA the Efron tie-group sums use
        ``index_add`` (atomic float adds), so the last bits may vary between runs.

    Example:
        >>> import torch
        >>> eta = torch.tensor([0.5, -0.2, 1.0, 0.0], requires_grad=True)
        >>> t = torch.tensor([2.0, 5.0, 2.0, 7.0])   # months
        >>> e = torch.tensor([1, 0, 1, 1])
        >>> loss = neg_partial_log_likelihood(eta, t, e)   # Efron, mean over 3 events
        >>> loss.backward()
        >>> round(loss.item(), 4), eta.grad.shape
        (0.5697, torch.Size([4]))
    """
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    eta = _as_vector(log_hazard, "log_hazard")
    n = eta.shape[0]
    time = _as_vector(time, "time")
    event = _as_vector(event, "event")
    if time.shape[0] != n or event.shape[0] != n:
        raise ValueError(
            f"log_hazard, time and event must have the same length, got "
            f"{n}, {time.shape[0]}, {event.shape[0]}"
        )
    if not eta.is_floating_point():
        raise ValueError(f"log_hazard must be a float tensor, got {eta.dtype}")

    compute_dtype = torch.float64 if eta.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=eta.device.type, enabled=False):
        per_sample = _per_sample_terms(eta.to(compute_dtype), time, event.to(torch.bool), ties)
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    if reduction == "sum":
        return total
    n_events = event.to(torch.bool).sum().clamp(min=1).to(compute_dtype)
    return total / n_events


def _as_vector(x: torch.Tensor, name: str) -> torch.Tensor:
    """Accept ``[n]`` or ``[n, 1]``; anything else is a caller bug."""
    if x.dim() == 2 and x.shape[1] == 1:
        return x[:, 0]
    if x.dim() != 1:
        raise ValueError(f"{name} must have shape [n] or [n, 1], got {tuple(x.shape)}")
    return x


def _per_sample_terms(
    eta: torch.Tensor, time: torch.Tensor, event: torch.Tensor, ties: str
) -> torch.Tensor:
    """``[n]`` contributions to ``-log L`` in the input order (0 for censored samples).

    Every tensor has a fixed size ``[n]`` and nothing is read back to the host, so the loss can
    be captured in a CUDA graph (no ``unique``/``nonzero``/``.item()``).
    """
    n = eta.shape[0]
    # Descending time: the risk set of the k-th sorted sample is a prefix ending at the last
    # sample tied with it, so one logcumsumexp gives every risk set's log-sum-exp.
    order = torch.argsort(time, descending=True, stable=True)
    eta_s, time_s, event_s = eta[order], time[order], event[order]
    starts_group = torch.ones(n, dtype=torch.long, device=eta.device)
    starts_group[1:] = (time_s[1:] != time_s[:-1]).long()
    group = torch.cumsum(starts_group, 0) - 1  # tie-group id of each sorted sample
    group_size = torch.zeros(n, dtype=torch.long, device=eta.device).index_add(0, group, torch.ones_like(group))
    group_last = torch.cumsum(group_size, 0) - 1  # last sorted position of each group
    log_risk = torch.logcumsumexp(eta_s, 0)[group_last[group]]  # logR of each sample's group

    event_f = event_s.to(eta.dtype)
    if ties == "breslow":
        term = log_risk
    else:
        # D_g / R_g from exp(eta_i - logR_g) <= 1: never overflows; l = 0..d_g-1 ranks events in a group.
        zeros = torch.zeros(n, dtype=eta.dtype, device=eta.device)
        events_in_group = zeros.index_add(0, group, event_f)
        ratio_in_group = zeros.index_add(0, group, event_f * torch.exp(eta_s - log_risk))
        cum_events = torch.cumsum(event_f, 0)
        events_before_group = cum_events[group_last] - events_in_group
        rank_in_group = cum_events - 1 - events_before_group[group]
        d = events_in_group[group].clamp(min=1)
        term = log_risk + torch.log1p(-(rank_in_group / d) * ratio_in_group[group] * event_f)

    sorted_terms = event_f * (term - eta_s)
    return torch.zeros_like(sorted_terms).scatter(0, order, sorted_terms)
