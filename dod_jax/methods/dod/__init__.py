"""DOD as a method (MFM -> PLA -> one UNet step -> HDE): its model, builders, training stages,
restore runner and the authors' checkpoints in and out; method.py puts it behind the interface
of dod_jax.methods."""

from dod_jax.methods.dod.build import BaseModels, abstract_dod, build_dod, load_base, random_base
from dod_jax.methods.dod.model import DOD, GENERATOR, parameter_counts, parameter_report, trainable

__all__ = ["BaseModels", "DOD", "GENERATOR", "abstract_dod", "build_dod", "load_base", "parameter_counts",
           "parameter_report", "random_base", "trainable"]
