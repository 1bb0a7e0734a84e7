"""Latent shard datasets: tar shards through fsspec (local or s3://), bucketed resumable batches."""
from .loader import BucketBatcher, LatentLoader
from .shards import ShardError, ShardReader, read_manifest, write_dataset
from .synthetic import write_synthetic

__all__ = ["BucketBatcher", "LatentLoader", "ShardError", "ShardReader", "read_manifest", "write_dataset",
           "write_synthetic"]
