"""The gateway's job runner: takes queued jobs from the store, analyses each instance, keeps the results.

A runner claims one job at a time under a lease (:meth:`service.gateway.store.GatewayStore.claim`), renews the
lease from a heartbeat thread while the analysis runs (a slow CPU inference must not let another worker take the
job), and ends the job: ``done`` with its results (:meth:`~service.gateway.store.GatewayStore.complete`: files and
rows together), or ``failed`` with a reason a person can act on. An analysis that raises a library error (an image
the reader refuses, a modality not accepted) fails its job with that error's message; anything else fails it as an
internal error and the runner goes on with the next job: one bad instance never stops the queue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from caries_mim.errors import CariesMimError, DecoderUnavailableError, DecodeTimeoutError
from service.gateway.intake import instance_tag
from service.gateway.loop import repeat_until_stopped
from service.gateway.store import GatewayStore, Job, ResultFile, StoredInstance

log = logging.getLogger(__name__)

#: What the runner calls for each instance: its results (e.g. one caries SR), or a raised CariesMimError.
Analysis = Callable[[StoredInstance], list[ResultFile]]
#: Errors that say the machine was busy, not that the file is bad: the job goes back to the queue (it still counts
#: towards the store's attempts) instead of failing.
TEMPORARY_ERRORS = (DecoderUnavailableError, DecodeTimeoutError)
#: How long a job put back for a temporary error waits before its next attempt.
RETRY_DELAY_S = 30.0


class JobRunner:
    """Runs the store's jobs with ``analyse``, as ``owner`` (unique per runner: host, process and thread).

    Args:
        lease_s: how long a claim holds a job without a heartbeat; the heartbeat renews it every third of that.
        destinations: names of the destinations each result is queued for (:mod:`service.gateway.sender`).
    """

    def __init__(
        self,
        store: GatewayStore,
        analyse: Analysis,
        *,
        owner: str,
        lease_s: float = 120.0,
        destinations: tuple[str, ...] = (),
    ) -> None:
        self.store = store
        self.analyse = analyse
        self.owner = owner
        self.lease_s = lease_s
        self.destinations = destinations

    def run_once(self) -> Job | None:
        """Claim and run one job; the job as claimed, or None when none was due."""
        job = self.store.claim(self.owner, self.lease_s)
        if job is None:
            return None
        tag = instance_tag(job.sop_instance_uid)
        instance = self.store.instance(job.sop_instance_uid)
        stop = threading.Event()
        heartbeat = threading.Thread(target=self._renew, args=(job.sop_instance_uid, stop), daemon=True)
        heartbeat.start()
        try:
            results = self.analyse(instance)
        except TEMPORARY_ERRORS as exc:
            log.warning("job %s put back for %.0f s: %s", tag, RETRY_DELAY_S, type(exc).__name__)
            self.store.release(job.sop_instance_uid, self.owner, RETRY_DELAY_S)
            return job
        except CariesMimError as exc:
            log.warning("job %s failed: %s", tag, exc.message)
            self.store.fail(job.sop_instance_uid, self.owner, exc.message)
            return job
        except Exception as exc:  # an analysis bug: fail this job, keep the queue going
            log.error("job %s failed with an internal error (%s)", tag, type(exc).__name__)
            self.store.fail(job.sop_instance_uid, self.owner, f"internal error ({type(exc).__name__})")
            return job
        finally:
            stop.set()
            heartbeat.join()
        if self.store.complete(job.sop_instance_uid, self.owner, results, self.destinations):
            log.info("job %s done: %d result(s)", tag, len(results))
        else:
            log.warning("job %s was taken over by another worker before it ended; its results are the other's", tag)
        return job

    def run(self, stop: threading.Event, *, idle_s: float = 0.5, error_pause_s: float = 5.0) -> None:
        """Run jobs until ``stop`` is set, waiting ``idle_s`` between looks at an empty queue. An error of the store
        itself (a full disk, a database error) is logged and retried after ``error_pause_s``: the runner never
        dies of one; the job it held is taken again when its lease runs out."""
        repeat_until_stopped(
            self.run_once, stop, name=f"job runner {self.owner}", idle_s=idle_s, error_pause_s=error_pause_s
        )

    def _renew(self, sop_instance_uid: str, stop: threading.Event) -> None:
        while not stop.wait(self.lease_s / 3):
            if not self.store.renew(sop_instance_uid, self.owner, self.lease_s):
                return
