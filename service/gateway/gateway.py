"""One gateway process: the Storage SCP, job runners and a result sender around one store, started and stopped
together (``caries-mim gateway``).

One folder, one gateway: the process holds an exclusive lock on ``ROOT/gateway.lock`` for its life, so a second
gateway on the same folder is refused instead of taking the first one's jobs. At start it takes back the jobs and
deliveries its previous run held (:meth:`GatewayStore.recover`: a gateway killed with SIGKILL resumes its unfinished
work at once instead of waiting for its leases to run out), then listens. On :meth:`Gateway.stop` the SCP stops
accepting and aborts its associations, then the runners and the sender finish what they hold; anything cut short
is taken back at the next start.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import config as pydicom_config

from caries_mim.errors import InvalidConfigError
from caries_mim.inference import Predictor
from caries_mim.io.isolation import IsolatedReader
from caries_mim.io.options import ReadOptions
from caries_mim.package import read_package
from service.gateway.analysis import CariesReportAnalysis
from service.gateway.scp import ScpConfig, StorageScp
from service.gateway.sender import Destination, ResultSender
from service.gateway.store import GatewayStore, durable_write
from service.gateway.worker import JobRunner
from service.logs import silence_header_text
from service.runtime import ModelIdentity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewayConfig:
    """Everything one gateway process needs.

    Attributes:
        root: the gateway's folder (received instances, results, the SQLite store).
        database: a PostgreSQL URL for the jobs, deliveries and catalog instead of SQLite in ``root``.
        model: the model package to analyse with.
        scp: the Storage SCP's settings (AE title, port, allowed calling AE titles, stability wait).
        destinations: where results are sent back by C-STORE, by name.
        workers: job runner threads (each analysis decodes in an isolated worker process, then predicts).
        device: "cpu", "cuda", "cuda:N", or None for CUDA when available.
        read_options: what the reader accepts.
        lease_s: job and delivery leases.
        include_below_threshold: also report findings under the operating threshold in the SRs.
        retry_backoff_s: (first, longest) wait before a failed delivery is tried again; it doubles each time.
        outputs: the results made of each radiograph (:data:`service.gateway.analysis.RESULT_KINDS`: ``sr``,
            ``gsps``, ``sc``).
        model_name: the algorithm's name in the SRs (with the package's version and checksum it also derives the
            SRs' UIDs).
    """

    root: Path
    model: Path
    database: str | None = None
    scp: ScpConfig = field(default_factory=ScpConfig)
    destinations: tuple[Destination, ...] = ()
    workers: int = 1
    device: str | None = None
    read_options: ReadOptions = field(default_factory=ReadOptions)
    lease_s: float = 120.0
    include_below_threshold: bool = False
    model_name: str = "caries-mim caries detector"
    outputs: tuple[str, ...] = ("sr",)
    retry_backoff_s: tuple[float, float] = (5.0, 600.0)


class Gateway:
    """The gateway's parts, built from a :class:`GatewayConfig`; :meth:`start`, then :meth:`stop`."""

    def __init__(self, config: GatewayConfig) -> None:
        if config.workers < 1:
            raise InvalidConfigError(f"the gateway needs at least one worker, got {config.workers}")
        names = [destination.name for destination in config.destinations]
        if len(set(names)) != len(names):
            raise InvalidConfigError(f"destination names must be unique, got {names}")
        if not config.model.is_file():
            raise InvalidConfigError(f"model package {config.model} does not exist")
        self.config = config
        config.root.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(config.root / "gateway.lock", "a")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise InvalidConfigError(f"another gateway is running on {config.root}") from None
        # pydicom reports a non-conformant value (a UID with a leading zero...) by quoting it in a warning, highdicom
        # a person name: header values must stay out of the gateway's logs.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        silence_header_text()
        package = read_package(config.model)
        self.identity = ModelIdentity(config.model_name, package.version, package.checksum)
        self.predictor = Predictor(package, config.device, source=str(config.model))
        self.store = GatewayStore(config.root, database=config.database)
        self.scp = StorageScp(self.store, config.scp)
        #: This gateway's name in leases, kept in its folder: recover() takes back exactly what an earlier run of it
        #: held, even from another host name (a recreated container).
        self.owner = f"{_gateway_identity(config.root)}:{config.scp.ae_title}"
        self._reader = IsolatedReader(workers=config.workers)
        analysis = CariesReportAnalysis(
            self.predictor,
            self.identity,
            self._reader.read,
            config.read_options,
            include_below_threshold=config.include_below_threshold,
            outputs=config.outputs,
        )
        self.runners = [
            JobRunner(
                self.store,
                analysis,
                owner=f"{self.owner}/{os.getpid()}/worker-{index}",
                lease_s=config.lease_s,
                destinations=tuple(names),
            )
            for index in range(config.workers)
        ]
        self.sender = ResultSender(
            self.store,
            {destination.name: destination for destination in config.destinations},
            calling_ae_title=config.scp.ae_title,
            owner=f"{self.owner}/{os.getpid()}/sender",
            lease_s=config.lease_s,
            backoff_s=config.retry_backoff_s,
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Take back the previous run's unfinished work, then listen and run."""
        recovered = self.store.recover(f"{self.owner}/")
        if recovered:
            log.warning("resuming %d job(s) an earlier run of this gateway left unfinished", recovered)
        self.scp.start()
        loops = [(runner.run, f"gateway-worker-{index}") for index, runner in enumerate(self.runners)]
        loops.append((self.sender.run, "gateway-sender"))
        self._threads = [threading.Thread(target=loop, args=(self._stop,), name=name) for loop, name in loops]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop listening, let the runners and the sender finish what they hold, close the store."""
        self.scp.stop()
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        self._reader.close()
        self.store.close()
        self._lock_file.close()


def _gateway_identity(root: Path) -> str:
    """The gateway's identity, made once and kept in ``root / "gateway.id"`` (one gateway per folder: the lock)."""
    path = root / "gateway.id"
    if not path.is_file():
        durable_write(path, f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}\n".encode())
    return path.read_text().strip()
