"""Data: the procedural demo dataset, its toy autoencoder, and the resumable batch sampler."""

from erw_fast.data.demo import SHAPES, TOY_LATENT_SCALE, DemoShapesDataset, toy_decode, toy_encode, toy_projection
from erw_fast.data.sampler import ResumableBatchSampler

__all__ = [
    "SHAPES",
    "TOY_LATENT_SCALE",
    "DemoShapesDataset",
    "ResumableBatchSampler",
    "toy_decode",
    "toy_encode",
    "toy_projection",
]
