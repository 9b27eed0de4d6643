"""fastMRI data: HDF5 volumes, ISMRMRD headers, slice datasets, undersampling masks and sample transforms.

Masks and transforms match ``fastmri`` 0.3.0 (bit-identical masks, same sample tensors); see each module.
"""

from reconkit.data.ismrmrd_header import HeaderInfo, parse_ismrmrd_header
from reconkit.data.masks import (
    MASK_TYPES,
    EquiSpacedMaskFunc,
    EquispacedMaskFractionFunc,
    MagicMaskFractionFunc,
    MagicMaskFunc,
    MaskFunc,
    RandomMaskFunc,
    VariableDensityMaskFunc,
    create_mask_for_mask_type,
)
from reconkit.data.slice_dataset import RawSample, SliceDataset, default_cache_file, list_volume_files
from reconkit.data.transforms import (
    UnetDataTransform,
    UnetSample,
    VarNetDataTransform,
    VarNetSample,
    apply_mask,
    center_crop,
    center_crop_to_smallest,
    complex_center_crop,
    filename_seed,
    normalize,
    normalize_instance,
    to_tensor,
)
from reconkit.data.volume import CHALLENGES, Volume, VolumeInfo, open_volume, read_volume, read_volume_info, target_key

__all__ = [
    "HeaderInfo",
    "parse_ismrmrd_header",
    "MASK_TYPES",
    "MaskFunc",
    "RandomMaskFunc",
    "EquiSpacedMaskFunc",
    "EquispacedMaskFractionFunc",
    "MagicMaskFunc",
    "MagicMaskFractionFunc",
    "VariableDensityMaskFunc",
    "create_mask_for_mask_type",
    "RawSample",
    "SliceDataset",
    "default_cache_file",
    "list_volume_files",
    "to_tensor",
    "apply_mask",
    "center_crop",
    "complex_center_crop",
    "center_crop_to_smallest",
    "normalize",
    "normalize_instance",
    "filename_seed",
    "VarNetSample",
    "VarNetDataTransform",
    "UnetSample",
    "UnetDataTransform",
    "CHALLENGES",
    "Volume",
    "VolumeInfo",
    "open_volume",
    "read_volume",
    "read_volume_info",
    "target_key",
]
