"""Micro-batches built ahead, in ``data.num_workers`` DataLoader worker processes.

Micro-batch ``k`` of a rank is step ``k // grad_accum``, micro-step ``k % grad_accum``; its
documents are :meth:`DocumentStream.documents` (a pure function of seed, step, micro-step
and rank), so the batches are the same with 0, 1 or 8 workers, in a straight run and in a
resumed one (the loader starts at micro-batch ``start * grad_accum``). Work is split by
rank (each process draws its own stream) and by worker (worker ``w`` builds the micro-batches
``k`` with ``k % num_workers == w``; the DataLoader hands them back in order).

A worker reads, decodes (512 px JPEGs are the cost), packs and collates; the main process
only moves the :class:`~mmgen.data.collate.Batch` to the device. Bad records a worker met come
back with the batch and are counted here (``bad_records`` in the training log). A worker
that dies stops the run with :class:`DataError` naming the record it was reading.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass, field

import torch

from ..data.collate import Batch, Collator, Packer
from ..data.corpora.base import CorpusSource
from ..data.documents import DocumentError
from .data import DataError, DocumentStream

SHOW_PROBLEMS = 20  # problems printed one by one; after that only counted
_STATUS_BYTES = 1024


@dataclass
class MicroBatch:
    step: int
    micro: int
    batch: Batch | None
    problems: list[str] = field(default_factory=list)
    error: str | None = None  # a DataError raised while building it (data.strict, a broken source)


class MicroBatches(torch.utils.data.Dataset):
    """Map-style: item ``k`` is the :class:`MicroBatch` (step, micro) = divmod(k, grad_accum)."""

    def __init__(self, stream: DocumentStream, collator: Collator, *, rank: int, grad_accum: int, rows: int):
        self.stream, self.collator = stream, collator
        self.rank, self.grad_accum, self.rows = rank, grad_accum, rows
        self.status: list = []  # per worker: shared bytes "pid<TAB>what it is reading"

    def __len__(self) -> int:  # pragma: no cover - the sampler gives the indices
        return sys.maxsize

    def __getitem__(self, k: int) -> MicroBatch:
        step, micro = divmod(k, self.grad_accum)
        try:
            batch = self.build(step, micro)
        except DataError as e:
            return MicroBatch(step, micro, None, self._problems(), error=str(e))
        return MicroBatch(step, micro, batch, self._problems())

    def _problems(self) -> list[str]:
        return [str(p) for p in self.stream.take_problems()]

    def build(self, step: int, micro: int) -> Batch:
        """The first ``rows`` full rows of the micro-batch's documents; a document whose images
        don't load is reported and left out (as ``Collator.batches`` would, minus that one)."""
        packer = Packer(self.collator.seq_len, self.collator.max_images_per_seq)
        pending = []
        for doc in self.stream.documents(step, micro, self.rank):
            _tell(doc.origin or doc.id)
            try:
                encoded = self.collator.encode(doc)
            except DocumentError as e:
                self.stream.report(e)
                continue
            pending += packer.add(encoded)
            if len(pending) >= self.rows:
                return self.collator.collate(pending[: self.rows])
        raise AssertionError("the document stream is endless")  # pragma: no cover


_status = None  # this worker's shared status buffer


def _tell(what: str) -> None:
    if _status is not None:
        data = f"{os.getpid()}\t{what}".encode("utf-8", "replace")[: _STATUS_BYTES - 1]
        _status.value = data


def _worker_init(worker_id: int) -> None:
    global _status
    torch.set_num_threads(1)
    info = torch.utils.data.get_worker_info()
    _status = info.dataset.status[worker_id]
    CorpusSource.watch = _tell


def _identity(x):
    return x


class BatchLoader:
    """The micro-batches of steps ``start`` to ``end`` of one rank, in order.

    ``next(step, micro)`` returns that micro-batch's :class:`Batch` (and checks the order);
    ``bad_records`` counts the problems met so far, which are also printed (the first
    ``SHOW_PROBLEMS``). Call ``close`` to stop the workers.
    """

    def __init__(self, cfg, tokenizer, *, seed: int, rank: int, start: int, end: int, world: int = 1,
                 echo=None):
        tc = cfg.train
        self.stream = DocumentStream(cfg.data, seed)
        self.dataset = MicroBatches(self.stream, Collator(tokenizer, cfg), rank=rank,
                                    grad_accum=tc.grad_accum, rows=tc.batch_size)
        self.rank, self.world = rank, world
        self.bad_records = 0
        self.echo = echo or (lambda line: print(line, file=sys.stderr))
        self._absorb(self.dataset._problems())  # found while indexing the sources
        self.workers = cfg.data.num_workers
        indices = range(start * tc.grad_accum, end * tc.grad_accum)
        if self.workers == 0:
            self._it = (self.dataset[k] for k in indices)
            return
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers tokenize
        ctx = multiprocessing.get_context()
        self.dataset.status = [ctx.Array(ctypes.c_char, _STATUS_BYTES, lock=False) for _ in range(self.workers)]
        self._loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, sampler=indices, num_workers=self.workers,
            collate_fn=_identity, worker_init_fn=_worker_init, prefetch_factor=2, multiprocessing_context=ctx)
        previous = signal.getsignal(signal.SIGCHLD) if hasattr(signal, "SIGCHLD") else None
        self._it = iter(self._loader)
        if previous is not None:  # a worker's death is found by the loader's own polling, inside next(),
            signal.signal(signal.SIGCHLD, previous)  # not by a signal raised anywhere in the training step

    def next(self, step: int, micro: int) -> Batch:
        try:
            mb: MicroBatch = next(self._it)
        except RuntimeError as e:
            if "DataLoader worker" not in str(e):
                raise
            raise DataError(self._death(str(e))) from None
        except StopIteration:
            raise DataError(f"the data loader ended before step {step}") from None
        if (mb.step, mb.micro) != (step, micro):
            raise DataError(f"data out of order: got step {mb.step}.{mb.micro}, expected {step}.{micro}")
        self._absorb(mb.problems)
        if mb.error:
            raise DataError(mb.error)
        return mb.batch

    def _absorb(self, problems: list) -> None:
        for p in problems:
            self.bad_records += 1
            if self.bad_records <= SHOW_PROBLEMS:
                self.echo(f"skipped: {p}")
            elif self.bad_records == SHOW_PROBLEMS + 1:
                self.echo(f"(more bad records are counted as bad_records in the training log, not shown)")

    def _death(self, message: str) -> str:
        where = []
        for w, st in enumerate(self.dataset.status):
            pid, _, what = bytes(st.value).decode("utf-8", "replace").partition("\t")
            if pid and pid in message:
                where.append(f"worker {w} (pid {pid}) was reading {what}")
        said = "; ".join(where) or "no record was being read"
        return (f"a data worker died ({message.splitlines()[0]}); {said}. The run stops; the checkpoints "
                "already written are intact (resume with --resume auto)")

    def log_fields(self) -> dict:
        return {"bad_records": self.bad_records}

    def close(self) -> None:
        self._it = iter(())
        self._loader = None
