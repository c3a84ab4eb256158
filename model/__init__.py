"""specgate's model library: Karimi & Gholipour (2023), sections III-B to III-E, in plain PyTorch/NumPy.

It imports nothing else of specgate's. Importing ``model`` does no work; import the modules you need:

- :mod:`model.unet`: ``SegNet`` (residual 3D U-Net with dense encoder skips), ``save_weights`` / ``load_weights``
- :mod:`model.preprocess`: ``preprocess(volume, modality)`` (CT: HU [-1000, 1000] -> [0, 1]; else / std)
- :mod:`model.infer`: ``sliding_window(net, volume, block=96, overlap=24, ...)`` -> ``InferenceResult``
  (probabilities and the streaming spectral signature, in one pass)
- :mod:`model.ood`: ``spectral_signature``, ``SpectralGate`` (fit / score / is_ood / save / load)
- :mod:`model.baselines`: max-softmax, entropy, MC-dropout and Mahalanobis scorers; ``SCORERS``
- :mod:`model.calibration`: ``ece_mce``, ``reliability_diagram``; :mod:`model.metrics`: ``dice``, ``hd95``, ``assd``
- :mod:`model.train`: multi-dataset training; :mod:`model.evaluate`: ``fit_bank``, ``evaluate``
- :mod:`model.data.phantoms`, :mod:`model.data.volumes`: phantom datasets, NIfTI / MSD / DICOM loaders
- :mod:`model.weights`: the shipped default model, ``load_default()``

A whole study, as the worker runs it::

    from model.weights import load_default
    from model.preprocess import preprocess
    from model.infer import sliding_window

    net, gate = load_default(device="cpu")
    res = sliding_window(net, preprocess(volume_zyx, modality), block=96, overlap=24)
    mask = res.foreground >= 0.5
    oodm = gate.score(res.signature); held = gate.is_ood(res.signature)
"""
