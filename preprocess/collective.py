"""MPI: the few collectives a multi-rank build needs (`mpirun -n R python -m preprocess build ...`), as
no-ops in a plain run. Rank r builds shards r, r+R, ...; rank 0 plans, deduplicates and writes the manifest."""

from __future__ import annotations

import os

from preprocess.config import BuildError

_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def mpi_communicator():
    """COMM_WORLD when launched by mpirun/mpiexec with more than one rank, else None.

    mpi4py is only imported under an MPI launcher: initialising MPI in a plain run can hang or fail in
    containers without an MPI runtime.
    """
    if not any(name in os.environ for name in _MPI_ENV):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise BuildError("launched under MPI but mpi4py is not installed (pip install mpi4py)") from None
    comm = MPI.COMM_WORLD
    return comm if comm.Get_size() > 1 else None


class Collective:
    """bcast / gather / barrier over COMM_WORLD, or the identity without MPI."""

    def __init__(self, comm) -> None:
        self.comm = comm
        self.rank = comm.Get_rank() if comm else 0
        self.size = comm.Get_size() if comm else 1

    def bcast(self, value):
        return self.comm.bcast(value, root=0) if self.comm else value

    def gather(self, value):
        return self.comm.gather(value, root=0) if self.comm else [value]

    def barrier(self) -> None:
        if self.comm:
            self.comm.barrier()

    def run_on_root(self, function):
        """Run `function` on rank 0 and broadcast its result, or its error to raise on every rank."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = function()
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                error = exc
        result, error = self.bcast((result, error))
        if error is not None:
            raise error
        return result

    def first_error(self, error: BaseException | None) -> BaseException | None:
        """Every rank's error (or None) -> the first one, known to every rank."""
        if not self.comm:
            return error
        errors = self.comm.gather(error, root=0)
        return self.bcast(next((e for e in errors or [] if e is not None), None))
