"""specgate's model library: Karimi & Gholipour (2023), sections III-B to III-E, in plain PyTorch/NumPy.

It imports nothing else of specgate's. Importing ``model`` does no work; import the modules you need:

- :mod:`model.unet`: ``SegNet`` (residual 3D U-Net with dense encoder skips), ``save_weights`` / ``load_weights``
- :mod:`model.preprocess`: ``preprocess(volume, modality)`` (CT: HU [-1000, 1000] -> [0, 1]; else / std)
- :mod:`model.infer`: ``sliding_window(net, volume, block=96, overlap=24, ...)`` -> ``InferenceResult``
  (probabilities and the streaming spectral signature, in one pass)
- :mod:`model.ood`: ``spectral_signature``, ``SpectralGate`` (fit / score / is_ood / save / load)
- :mod:`model.resample`: the model's grid (``model_grid``, ``to_grid``, ``from_grid``)
- :mod:`model.study_inference`: ``segment_volume``, ``InferenceSettings``: one study as production runs it;
  ``prepare_study``: its model grid, intensities and body crop (what every baseline reads too)
- :mod:`model.baselines`: the paper's comparison methods (MSP, entropy, MC dropout, deep ensemble, Mahalanobis
  after Lee et al. 2018, ODIN, DkNN, Outlier Exposure) as OOD scorers; ``observe_study`` / ``fit_baseline`` run
  them through the production path; ``SCORERS``. Their network passes: :mod:`model.baseline_inference`
- :mod:`model.calibration`: ``ece_mce``, ``reliability_diagram``; :mod:`model.scores`: ``dice``, ``hd95``, ``assd``
- :mod:`model.train`: multi-dataset training; :mod:`model.evaluate`: ``fit_bank``, ``evaluate``
- :mod:`model.data.phantoms`, :mod:`model.data.volumes`: phantom datasets, NIfTI / MSD / DICOM loaders;
  :mod:`model.data.clinical`: phantoms re-gridded to clinical scanner geometries
- :mod:`model.weights`: the shipped default model, ``load_default()``

A whole study, as the worker runs it (the model's grid, the body crop, windows, back to the source grid)::

    from model.study_inference import InferenceSettings, segment_volume
    from model.unet import load_weights
    from model.weights import WEIGHTS_PATH, load_default

    net, gate = load_default(device="cpu")
    settings = InferenceSettings.for_weights(load_weights(WEIGHTS_PATH)[1])
    gate.check_inference(settings.signature_settings())   # the bank was fitted through this path
    res = segment_volume(net, volume_zyx, spacing_zyx_mm, modality, settings)
    mask = res.foreground >= 0.5                           # on the source grid
    oodm = gate.score(res.signature); held = gate.is_ood(res.signature)
"""
