"""The Session split by role (issue #14): the decoder's NaN/Inf guard on a backend that keeps
the step's new KV itself, the executor protocol, and the overload-policy registry.

References are independent of the code under test: a session on a plain backend that never
saw the poisoned frame (the guard's documented semantics: a non-finite frame is not
committed), the argparse parser and the pydantic models as the user reaches them.
"""
from __future__ import annotations

import numpy as np
import pytest

from streamgraph.backends.base import Backend
from streamgraph.errors import EngineError
from streamgraph.kv.base import KVBuffer
from tests.conftest import frames, torch_bundle


class _DeviceLike(Backend):
    """A backend that brings its own decoder_step/commit_kv, as a device backend does: the
    step's new KV stays inside it (only ``new_kv_finite`` comes back) and ``commit_kv``
    scatters it. ``poison()`` makes the next step's new KV NaN; ``fail()`` makes it raise."""

    name = "device-like"

    def __init__(self, inner):
        self.inner = inner
        self.commits = 0
        self._pending = None
        self._poison = self._fail = False

    def run(self, engine, inputs):
        return self.inner.run(engine, inputs)

    def alloc_kv(self, shape, dtype="float32"):
        return KVBuffer(shape, dtype)

    def decoder_step(self, kv, inputs):
        if self._fail:
            self._fail = False
            raise RuntimeError("device lost")
        out = dict(self.inner.run("decoder_step", {**inputs, "kv_cache": kv.data}))
        new = out.pop("new_kv")
        if self._poison:
            self._poison = False
            new = np.full_like(new, np.nan)
        self._pending = new
        out["new_kv_finite"] = bool(np.isfinite(new).all())
        return out

    def commit_kv(self, kv, write_slots):
        self.commits += 1
        kv.write(self._pending, write_slots)

    def poison(self):
        self._poison = True

    def fail(self):
        self._fail = True


def _pair(tmp_path):
    from streamgraph.backends import open_backend
    from streamgraph.compiler.bundle import Bundle
    from streamgraph.runtime.session import Session

    b = Bundle.load(torch_bundle(tmp_path, cache="{op: full, capacity_tokens: 256}"))
    raw = open_backend("torch", b)
    dev = _DeviceLike(raw)
    return Session(b, dev, overload="fifo"), Session(b, raw, overload="fifo"), dev


def test_device_backend_nonfinite_step_is_not_committed(tmp_path):
    s, ref, dev = _pair(tmp_path)
    fl = frames(5)
    for k, f in enumerate(fl):
        if k == 2:
            commits, slots, kv = dev.commits, s.slots_in_use, s.kv.data.copy()
            dev.poison()
            rec = s.push_frame(f)
            assert rec.decision == "error" and rec.failed_stage == "prefill" and rec.error_type == "NonFiniteError"
            assert "decoder_step produced NaN/Inf in new_kv" in rec.reason
            assert dev.commits == commits and s.slots_in_use == slots          # nothing committed
            np.testing.assert_array_equal(s.kv.data, kv)
            continue                                   # the reference never sees this frame
        assert s.push_frame(f).decision == ref.push_frame(f).decision == "run"
    assert dev.commits > 0                             # the backend's own commit_kv scattered the KV
    np.testing.assert_array_equal(s.kv.data, ref.kv.data)
    assert s.policy.slots_in_use == ref.policy.slots_in_use
    assert "".join(s.ask("what happened?", at=10.0)) == "".join(ref.ask("what happened?", at=10.0))
    assert s.report().summary["nonfinite"] == 1


def test_device_backend_error_names_the_engine_and_the_turn_recovers(tmp_path):
    s, _, dev = _pair(tmp_path)
    for f in frames(2):
        s.push_frame(f)
    dev.fail()
    with pytest.raises(EngineError, match="engine decoder_step failed: RuntimeError: device lost"):
        list(s.ask("why?"))
    assert "RuntimeError: device lost" in s.questions[-1].error
    assert s.push_frame(frames(3)[2]).decision == "run"


def test_pipeline_and_simulated_session_implement_the_executor_protocol(tmp_path):
    from streamgraph.runtime.scheduler import Scheduler
    from streamgraph.runtime.simulate import SimulatedSession
    from streamgraph.runtime.stream import Executor

    members = {n for n in vars(Executor) if not n.startswith("_")} | set(Executor.__annotations__)
    assert {"execute_frame", "answer", "begin_frame", "calibrate_costs", "slots_in_use", "stage"} <= members
    s, _, _ = _pair(tmp_path)
    sim = SimulatedSession(Scheduler("fifo", 250, 500, budgets=[16]), {"encode": 0.01, "prefill": 0.01})
    for executor in (s.pipeline, sim):
        missing = [m for m in members if not hasattr(executor, m)]
        assert not missing, (type(executor).__name__, missing)
    assert s.executor is s.pipeline and sim.executor is sim


def test_overload_names_come_from_one_registry():
    import argparse

    from streamgraph.cli import build_parser
    from streamgraph.compiler.spec import OVERLOAD_POLICIES as SPEC
    from streamgraph.runtime.scheduler import OVERLOAD, Scheduler
    from streamgraph.serve.app import StreamCreate

    names = tuple(OVERLOAD)
    assert SPEC == names
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for cmd in ("run", "serve", "capacity"):
        (opt,) = [a for a in sub.choices[cmd]._actions if "--overload" in a.option_strings]
        assert tuple(opt.choices) == names, cmd
    for n in names:
        assert StreamCreate(source="x", overload=n).overload == n
        assert Scheduler(n, 100, 100).policy is OVERLOAD[n]
    with pytest.raises(Exception):
        StreamCreate(source="x", overload="sometimes")
    with pytest.raises(ValueError, match="unknown overload policy 'sometimes'"):
        Scheduler("sometimes", 100, 100)
