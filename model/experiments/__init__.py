"""The paper's experiments, regenerated on the phantoms: each writes ``<name>.json`` with every number and
``<name>.md`` with tables made from that JSON (:mod:`model.experiments.report`), plus its figures.

===============  =====================================================================================
experiment       what it reproduces
===============  =====================================================================================
``calibration``  Table II: multi-task against single-task models, 3-fold patient-wise cross-validation,
                 DSC / HD95 / ASSD / ECE / MCE, paired t-tests at p = 0.01, reliability diagrams
                 (:mod:`model.experiments.calibration`)
``ood``          Tables V-VI: OOD detection by the spectral gate against every baseline (accuracy,
                 sensitivity, specificity at C = 2.5, AUC with bootstrap intervals, time per study),
                 OODM histograms with tau, the layer study (:mod:`model.experiments.ood`)
===============  =====================================================================================

Each runs at a scale: ``tiny`` (tests, seconds), ``cpu`` (a 2-core machine), ``gpu`` (the paper's settings
as far as the phantoms allow). ``specgate model experiment NAME --scale ... --out DIR`` runs one.
"""
