"""Ray backend: direct evaluations run as Ray tasks, the Optuna study stays the single record.

Why Optuna ask/tell driving Ray tasks rather than Ray Tune's ``Tuner`` + ``OptunaSearch``:

- one source of truth: every trial lives in the run's Optuna storage exactly as with the local
  backend, so ``resume``, shared studies and the report work the same (Tune keeps its own
  experiment state beside an in-memory Optuna study);
- the budget pre-filter stays in the driver: an infeasible candidate is recorded in microseconds
  instead of occupying a Tune trial, an actor and a process start;
- the evolutionary sampler, which plans batches on predictors, needs no Tune searcher adapter;
- a task is the unit Ray retries: ``max_retries`` re-runs an evaluation whose worker died (killed,
  out of memory, node lost), which is what Tune's ``FailureConfig(max_failures)`` gives a trial.

The evaluation function — holding the supernet — is put in the object store **once**; each worker
process fetches it on its first task and keeps it, so its weights cross the network once per
worker, not once per trial. At most ``workers`` evaluations are in flight (Tune's
``max_concurrent_trials``).

On a cluster, submit the search as a job; the driver then joins that cluster (``ray job submit``
sets ``RAY_ADDRESS``, so no address is needed)::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        autocomp search --budget 5ms --device remote://TARGET:8765 --backend ray --workers 16

or, from Python on any machine of the cluster, ``run_search(..., backend="ray",
ray_address="auto")``. Ray is imported only when this backend is used.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

_FUNCTIONS: dict[str, Callable[[Any], float]] = {}  # per worker process: object id -> function


def _evaluate(box: list[Any], candidate: Any) -> float:
    """Runs in a worker. ``box`` wraps the function's ObjectRef so that Ray does not resolve it
    (and copy the supernet) for every task; it is fetched once per worker process instead."""
    import ray

    ref = box[0]
    fn = _FUNCTIONS.get(ref.hex())
    if fn is None:
        fn = _FUNCTIONS[ref.hex()] = ray.get(ref)
    return float(fn(candidate))


class RayExecutor:
    """Runs ``evaluate_fn`` on Ray workers; ``submit`` returns a handle, ``wait`` finished ones.

    Uses the Ray this process already joined; else joins ``address`` (or ``$RAY_ADDRESS``, which
    ``ray job submit`` sets); else starts a local Ray with ``workers`` CPUs. Disconnects only
    from a Ray it joined or started itself.
    """

    def __init__(
        self,
        evaluate_fn: Callable[[Any], float],
        *,
        workers: int,
        address: str | None = None,
        max_retries: int = 3,
    ) -> None:
        import ray

        self._ray = ray
        self._owned = not ray.is_initialized()
        if self._owned:
            if address is None and "RAY_ADDRESS" not in os.environ:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            else:  # a cluster: given, or set by `ray job submit` in RAY_ADDRESS
                ray.init(address=address, log_to_driver=False)
        self.capacity = workers
        self._box = [ray.put(evaluate_fn)]
        self._task = ray.remote(num_cpus=1, max_retries=max_retries)(_evaluate)

    def submit(self, candidate: Any) -> Any:
        return self._task.remote(self._box, candidate)

    def wait(self, handles: list[Any]) -> list[tuple[Any, float | BaseException]]:
        """Block until at least one evaluation ends; its value, or the error it raised."""
        ready, _ = self._ray.wait(handles, num_returns=1)
        out: list[tuple[Any, float | BaseException]] = []
        for handle in ready:
            try:
                out.append((handle, self._ray.get(handle)))
            except Exception as err:
                out.append((handle, err))
        return out

    def cancel(self, handles: list[Any]) -> None:
        for handle in handles:
            self._ray.cancel(handle, force=True)

    def close(self) -> None:
        if self._owned:
            self._ray.shutdown()
