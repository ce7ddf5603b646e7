"""mrsfm_model: the science of mrsfm (data, simulation, spectrograms, MAE); no Flower import."""

__version__ = "0.1.0"
