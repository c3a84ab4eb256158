"""Data for model/: phantom datasets, shifted and real cases, the named index ranges, and loaders.

- :mod:`model.data.phantoms`: synthetic CT/MR/PET datasets ("kinds"), each case a pure function of
  ``(kind, seed, index)``. ``TRAINING_KINDS`` (``ct_liver``, ``ct_lung``, ``mr_prostate``) train the shipped
  model; ``UNSEEN_KINDS`` (``mr_hippocampus``, ``pt_tumour``) are another organ and another modality;
  ``NEAR_OOD_KINDS`` are near the training distribution: ``mr_prostate_t1`` (the same pelvis in a T1-like
  contrast), ``ct_head`` (a CT of a body region never trained on), ``ct_liver_child`` (the liver phantom at
  0.55-0.65 of adult size, same spacing). Each kind's generator id is frozen (``kind_id``): adding a kind
  changes no existing case.
- :mod:`model.data.shifts`: shift sets with known failure, each at default strengths (mild to severe),
  applied to any case: ``blur`` (sigma 0.5-2 voxels), ``thick`` (6, 8, 10 mm slab-averaged slices),
  ``noise`` (0.1-1 x the body's std; Rician for MR), ``gamma`` (0.5, 0.7, 1.5, 2), ``bias`` (smooth
  multiplicative field, log-amplitude 0.25-1), ``invert`` (contrast reversed inside the body, blend
  0.25-1), ``ghost`` (motion replicas along y, amplitude 0.1-0.5). ``shifted_case(kind, seed, index, shift,
  strength)``; the result's ``kind`` records it (``mr_prostate+blur1.5``).
- :mod:`model.data.mni`: a real MR, the MNI152 template shipped in nilearn's wheel, as deformed "subjects"
  with a bias field and Rician noise, labelled grey matter > 0.5 (``mni_case(seed, index)``, kind
  ``mr_mni152``).
- :mod:`model.data.splits`: the index ranges (train, validation, test, demo) every command draws from.
- :mod:`model.data.clinical`: phantoms rescanned on clinical grids; :mod:`model.data.series_writer`: DICOM
  series; :mod:`model.data.volumes`: loaders (MSD folders, DICOM series).
"""
