"""Data for model/: phantom datasets (:mod:`model.data.phantoms`) and loaders (:mod:`model.data.volumes`)."""
