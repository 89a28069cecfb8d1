"""The io_uring ring against a model: a hypothesis state machine over random
submit / plug / unplug / flush / reap sequences, with pipe reads that stay
in the kernel until the test writes to the pipe.

The invariants are the ring's promises: every operation's callback runs
exactly once, with its own result; the books balance (in flight == pending
callbacks); and in owner mode nothing is held back unless this thread holds
the plug -- so no submission can wait on completions that may never come.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from threadlets.probe import buffer_address, probe_io_uring
from threadlets.uring import OP_READ, Ring

pytestmark = pytest.mark.skipif(
    not probe_io_uring().supported or os.uname().machine != "x86_64",
    reason="io_uring backend not available here",
)

PATTERN = bytes(range(256)) * 16  # 4 KiB


class RingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.path = Path(os.environ["THREADLETS_MODEL_DIR"]) / f"f{id(self)}"
        self.path.write_bytes(PATTERN)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.r, self.w = os.pipe()
        self.efd = os.eventfd(0, os.EFD_NONBLOCK)
        self.ring = Ring(16, eventfd=self.efd)
        self.plugged = False
        self.next_id = 0
        self.expected: dict[int, tuple[int, bytes]] = {}  # id -> (result, data)
        self.results: dict[int, list[int]] = {}
        self.buffers: dict[int, bytearray] = {}
        self.pipe_reads: list[int] = []  # ids of pipe reads not yet fed
        self.pipe_fed = 0

    def _submit(self, fd: int, offset: int, size: int) -> int | None:
        ident = self.next_id
        buf = bytearray(size)

        def done(res: int, ident: int = ident) -> None:
            self.results.setdefault(ident, []).append(res)

        addr = buffer_address(memoryview(buf)) or 0
        if not self.ring.submit(OP_READ, fd, offset, addr, size, 0, done):
            return None  # full: the caller would use the threads
        self.next_id += 1
        self.buffers[ident] = buf
        return ident

    @rule(block=st.integers(0, 15), size=st.sampled_from([1, 16, 256]))
    def read_file(self, block: int, size: int) -> None:
        ident = self._submit(self.fd, block * 256, size)
        if ident is not None:
            self.expected[ident] = (size, PATTERN[block * 256 : block * 256 + size])

    @rule()
    def read_pipe(self) -> None:
        ident = self._submit(self.r, 0, 1)
        if ident is not None:
            self.pipe_reads.append(ident)

    @precondition(lambda self: self.pipe_reads)
    @rule(n=st.integers(1, 3))
    def feed_pipe(self, n: int) -> None:
        n = min(n, len(self.pipe_reads))
        os.write(self.w, b"p" * n)
        self.pipe_fed += n
        for ident in self.pipe_reads[:n]:
            self.expected[ident] = (1, b"p")  # which read gets which byte: all "p"
        del self.pipe_reads[:n]

    @precondition(lambda self: not self.plugged)
    @rule()
    def plug(self) -> None:
        assert self.ring.plug()
        self.plugged = True

    @precondition(lambda self: self.plugged)
    @rule()
    def unplug(self) -> None:
        self.ring.unplug()
        self.plugged = False

    @rule()
    def flush(self) -> None:
        self.ring.flush()

    @rule()
    def reap(self) -> None:
        self.ring.reap()

    @invariant()
    def books_balance(self) -> None:
        ring = self.ring
        assert ring._inflight == len(ring._pending)
        assert ring._in_kernel >= 0
        assert ring._unsubmitted >= 0
        assert ring._inflight <= ring.entries
        assert all(len(r) == 1 for r in self.results.values()), "a callback ran twice"

    @invariant()
    def nothing_held_back_without_the_plug(self) -> None:
        if not self.plugged:
            assert self.ring._unsubmitted == 0

    def teardown(self) -> None:
        ring = self.ring
        try:
            if self.plugged:
                ring.unplug()
            if self.pipe_reads:
                os.write(self.w, b"p" * len(self.pipe_reads))
                for ident in self.pipe_reads:
                    self.expected[ident] = (1, b"p")
            while ring._inflight:
                ring.wait(10)
                ring.reap()
            assert sorted(self.results) == sorted(self.expected)
            for ident, (res, data) in self.expected.items():
                assert self.results[ident] == [res]
                assert bytes(self.buffers[ident]) == data
        finally:
            ring.close()
            for fd in (self.fd, self.r, self.w, self.efd):
                os.close(fd)
            self.path.unlink()


@pytest.fixture
def model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("THREADLETS_MODEL_DIR", str(tmp_path))
    return tmp_path


def test_ring_state_machine(model_dir: Path) -> None:
    RingMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
    RingMachine.TestCase().runTest()
