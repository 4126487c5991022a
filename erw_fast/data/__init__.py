"""Data: the procedural demo dataset, its toy autoencoder, the resumable batch sampler, and the latent shards
(preprocessing, format, webdataset / DALI loaders behind ``build_loader``).

diffusers (preprocessing) and DALI (``kind="dali"``) are imported only when used.
"""

from erw_fast.data.demo import SHAPES, TOY_LATENT_SCALE, DemoShapesDataset, toy_decode, toy_encode, toy_projection
from erw_fast.data.images import center_crop_arr
from erw_fast.data.latents import sample_latents
from erw_fast.data.loaders import build_loader
from erw_fast.data.prepare import PrepareOptions, prepare, read_file_list, scan_image_folder
from erw_fast.data.sampler import ResumableBatchSampler
from erw_fast.data.shards import DataError, Manifest, SampleError, ShardSet, ShardWriter, read_index
from erw_fast.data.train_loader import TrainLoader

__all__ = [
    "SHAPES",
    "TOY_LATENT_SCALE",
    "DataError",
    "DemoShapesDataset",
    "Manifest",
    "PrepareOptions",
    "ResumableBatchSampler",
    "SampleError",
    "ShardSet",
    "ShardWriter",
    "TrainLoader",
    "build_loader",
    "center_crop_arr",
    "prepare",
    "read_file_list",
    "read_index",
    "sample_latents",
    "scan_image_folder",
    "toy_decode",
    "toy_encode",
    "toy_projection",
]
