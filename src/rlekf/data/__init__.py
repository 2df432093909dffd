"""Atomic data: readers, neighbour lists, data set, batching and the LightningDataModule."""

from rlekf.data.datamodule import AtomsDataModule
from rlekf.data.dataset import AtomsDataset, GroupedBatchSampler, collate_atoms

__all__ = ["AtomsDataModule", "AtomsDataset", "GroupedBatchSampler", "collate_atoms"]
