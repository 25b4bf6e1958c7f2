"""The DICOM gateway: radiographs in by C-STORE or STOW-RS, analysed by durable jobs, results back to the PACS.

Modules, one concern each: :mod:`service.gateway.store` (what was received, what is left to do and what came of it,
durable across restarts), :mod:`service.gateway.scp` (the DICOM Storage SCP that receives by C-STORE into the store),
:mod:`service.gateway.worker` (the job runner that analyses each instance and keeps its results),
:mod:`service.gateway.analysis` (the analysis: the caries SR on each radiograph, with reproducible UIDs) and
:mod:`service.gateway.sender` (results sent back by C-STORE, retried with backoff until each destination has them)
and :mod:`service.gateway.gateway` (one process of them all: ``caries-mim gateway run``); the runners and the sender
share :mod:`service.gateway.loop`.
"""
