"""The DICOM gateway: radiographs in by C-STORE or STOW-RS, analysed by durable jobs, results back to the PACS.

Modules, one concern each: :mod:`service.gateway.store` (what was received and what is left to do, durable across
restarts) and :mod:`service.gateway.scp` (the DICOM Storage SCP that receives by C-STORE into the store).
"""
