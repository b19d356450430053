"""Parity assertions that record their observed error, and tolerances derived from fp32 arithmetic.

Two evaluations of one function in fp32 that differ only in the order of their roundings
(merged ``W + sBA`` vs ``Wx + sB(Ax)``, TP shards vs one matrix, another CPU's GEMM kernel, a KV
cache vs a full forward) differ by rounding errors, each at most ``u |value|`` (``u = 2^-24``).
A ``K``-term dot product's errors add up like a random walk, ``~ u sqrt(K) |largest term|``, and a
chain of ``depth`` such sums (layers, then the LM head) adds one such error per link, so

    |a - b|  <=  SAFETY * depth * sqrt(K) * u * scale          (:func:`fp32_tolerance`)

with ``scale`` the largest magnitude of the compared values (``max |logits|`` for log-probs, whose
error is at most twice the logits': ``log p_i = z_i - logsumexp(z)``) and ``SAFETY`` covering
weight matrices of norm above 1 and the tails of the error distribution.  Tolerances are written
this way, never as a bare constant tuned on one machine's kernels.

``assert_close(actual, expected, atol=..., rtol=..., what=...)`` is ``torch.testing.assert_close``
that also appends ``{"test", "what", "max_abs", "max_rel", "worst_ratio", "atol", "rtol"}`` as a JSON
line to ``$SLIME_NUMERICS_LOG`` when that variable is set; ``tools/test_numerics.py`` (``make
test-numerics``) runs the tests marked ``numerics`` under several CPU kernel settings and prints the
worst error per assertion and setting against its tolerance.  Subprocesses (``train.py`` runs,
gloo workers) inherit the variable, so assertions made there are recorded too.
"""

from __future__ import annotations

import json
import os

import torch

UNIT_ROUNDOFF_FP32 = 2.0**-24  # u: |fl(x) - x| <= u |x|
SAFETY = 16.0
LOG_ENV = "SLIME_NUMERICS_LOG"


def fp32_tolerance(scale: float, depth: int, width: int, log_softmax: bool = False) -> float:
    """``SAFETY * depth * sqrt(width) * u * scale`` (twice that through a log-softmax): the absolute
    difference allowed between two fp32 evaluations of ``depth`` chained ``width``-term sums whose
    results reach ``scale`` in magnitude.  For a transformer: ``depth = layers + 1``, ``width`` its
    widest reduction (hidden or FFN size), ``scale = max |logits|``."""
    return (2.0 if log_softmax else 1.0) * SAFETY * depth * width**0.5 * UNIT_ROUNDOFF_FP32 * float(scale)


def arch_tolerance(arch, scale: float, log_softmax: bool = False) -> float:
    """:func:`fp32_tolerance` of two fp32 forwards of the model ``arch`` describes (a ``ModelArch``)."""
    return fp32_tolerance(scale, arch.num_layers + 1, max(arch.hidden_size, arch.ffn_hidden_size), log_softmax)


def _as_tensor(x) -> torch.Tensor:
    return x.detach().to(torch.float64).cpu() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)


def record(what: str, actual, expected, atol: float, rtol: float) -> dict:
    """Measure ``actual`` against ``expected`` and append it to the numerics log (if enabled).

    ``worst_ratio`` is ``max |a - e| / (atol + rtol |e|)``: the assertion holds iff it is <= 1, and
    ``1 / worst_ratio`` is the margin left on this machine.
    """
    a, e = _as_tensor(actual), _as_tensor(expected)
    diff = (a - e).abs()
    allowed = atol + rtol * e.abs()
    entry = {
        "test": os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0],
        "what": what,
        "max_abs": float(diff.max()) if diff.numel() else 0.0,
        "max_rel": float((diff / e.abs().clamp_min(1e-30)).max()) if diff.numel() else 0.0,
        "worst_ratio": float((diff / allowed.clamp_min(1e-300)).max()) if diff.numel() else 0.0,
        "atol": atol,
        "rtol": rtol,
    }
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a") as f:  # one short line per write: appends from several processes interleave whole
            f.write(json.dumps(entry) + "\n")
    return entry


def assert_close(actual, expected, *, atol: float, rtol: float, what: str) -> None:
    """``torch.testing.assert_close`` on fp64 copies (tensors, floats or lists), recorded by :func:`record`."""
    record(what, actual, expected, atol, rtol)
    torch.testing.assert_close(_as_tensor(actual), _as_tensor(expected), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
