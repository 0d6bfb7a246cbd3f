"""The DOD model (MFM -> PLA -> one UNet step -> HDE), its builders and image handling."""

from dod_jax.dod.build import BaseModels, abstract_dod, build_dod, load_base, random_base
from dod_jax.dod.model import DOD, GENERATOR, parameter_counts, parameter_report, trainable

__all__ = ["BaseModels", "DOD", "GENERATOR", "abstract_dod", "build_dod", "load_base", "parameter_counts",
           "parameter_report", "random_base", "trainable"]
