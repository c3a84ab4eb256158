"""The DICOM edge of specgate: what a PACS talks to.

* :mod:`dicom_node.config` — the node's own frozen configuration (AE, callers, timeouts, spool, TLS,
  series rules, destinations), built by ``specgate.settings`` and passed down;
* :mod:`dicom_node.scp` — the Storage SCP: the live associations, counted, bounded and stopped;
* :mod:`dicom_node.association` — one association: negotiation (allow-list of calling AE *and* host,
  called-AE check, TLS with optional mutual authentication), C-ECHO and C-STORE, one error boundary per
  message, precise statuses;
* :mod:`dicom_node.ul` — the upper-layer protocol: PDUs read and written by hand;
* :mod:`dicom_node.sink` — a C-STORE's data set streamed to a temporary file behind our file meta;
* :mod:`dicom_node.receive` — one received instance: decode the header only, compare with the request,
  spool durably, index in the ledger (:mod:`ledger.instances`), then answer;
* :mod:`dicom_node.spool` — durable files named after validated UIDs;
* :mod:`dicom_node.handoff` — one port, several receiver processes (``specgate scp``): the listener and
  the receiver's side;
* :mod:`dicom_node.assembler` — quiet period -> job (``queued``) -> enqueue hook; series rules;
* :mod:`dicom_node.scu` — :func:`~dicom_node.scu.deliver` results with retries and back-off;
  :func:`~dicom_node.scu.echo`;
* :mod:`dicom_node.security` — allow-list matching and TLS contexts.

Modules import ``ledger`` only (ARCHITECTURE.md, Layout); never ``specgate``.
"""
