"""fastMRI data: HDF5 volumes, ISMRMRD headers, slice datasets, undersampling masks and sample transforms.

Masks and transforms match ``fastmri`` 0.3.0 (bit-identical masks, same sample tensors); see each module.
"""

from reconkit.data.ismrmrd_header import HeaderInfo, parse_ismrmrd_header
from reconkit.data.masks import (
    MASK_TYPES,
    EquispacedMaskFractionFunc,
    EquiSpacedMaskFunc,
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
    "CHALLENGES",
    "MASK_TYPES",
    "EquiSpacedMaskFunc",
    "EquispacedMaskFractionFunc",
    "HeaderInfo",
    "MagicMaskFractionFunc",
    "MagicMaskFunc",
    "MaskFunc",
    "RandomMaskFunc",
    "RawSample",
    "SliceDataset",
    "UnetDataTransform",
    "UnetSample",
    "VarNetDataTransform",
    "VarNetSample",
    "VariableDensityMaskFunc",
    "Volume",
    "VolumeInfo",
    "apply_mask",
    "center_crop",
    "center_crop_to_smallest",
    "complex_center_crop",
    "create_mask_for_mask_type",
    "default_cache_file",
    "filename_seed",
    "list_volume_files",
    "normalize",
    "normalize_instance",
    "open_volume",
    "parse_ismrmrd_header",
    "read_volume",
    "read_volume_info",
    "target_key",
    "to_tensor",
]
