"""The DICOM edge of specgate: what a PACS talks to.

* :mod:`dicom_node.scp` — the Storage SCP (C-ECHO, image C-STORE): allow-list of calling AE *and* host,
  called-AE check, TLS with optional mutual authentication, bounded associations, precise statuses;
* :mod:`dicom_node.receive` — one received instance: decode the header only, compare with the request,
  spool durably, index in the ledger, then answer;
* :mod:`dicom_node.spool` — durable files named after validated UIDs;
* :mod:`dicom_node.listener` — one port, several receiver processes (``specgate scp``);
* :mod:`dicom_node.assembler` — quiet period -> job (``queued``) -> enqueue hook; series rules;
* :mod:`dicom_node.scu` — :func:`~dicom_node.scu.deliver` results with retries and back-off;
  :func:`~dicom_node.scu.echo`;
* :mod:`dicom_node.security` — allow-list matching and TLS contexts.

Modules import ``ledger`` and ``specgate.settings`` only (ARCHITECTURE.md, Layout).
"""
