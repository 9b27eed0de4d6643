"""k-space simulator: fastMRI-schema multi-coil volumes from real MRI images (see docs/data.md).

Public API::

    from reconkit.data.simulate import simulate_volume, simulate_dataset, write_volume, SOURCES

    vol = simulate_volume(seed=0, coils=8, slices=16, encoded_size=(320, 184), recon_size=(160, 160))
    vol.kspace              # (16, 8, 320, 184) complex64, fastMRI orientation, zero-padded phase encodes
    vol.reconstruction_rss  # (16, 160, 160) float32
    write_volume(vol, "sim.h5")          # fastMRI file; fastmri.data.SliceDataset reads it

    manifest = simulate_dataset("data/sim", num_volumes=12, coils=(4, 8, 16), snr_db=(20, 40), seed=0,
                                encoded_size=(320, 184), recon_size=(160, 160))
    # data/sim/{train,val,test}/*.h5 and data/sim/manifest.json

Sources: ``"mni152"`` (template brain, T1/T2/PD synthesised from tissue maps), the real fixed-contrast training
images ``"nibabel_epi"`` (EPI brain) / ``"pydicom_abdomen"`` (abdomen), and the real fixed-contrast images
``"dipy_b0"`` / ``"pydicom_mr"`` of other subjects for held-out tests.
"""

from reconkit.data.simulate.anatomy import SOURCES
from reconkit.data.simulate.dataset import simulate_dataset
from reconkit.data.simulate.volume import SimulatedVolume, simulate_volume, write_volume

__all__ = ["SOURCES", "SimulatedVolume", "simulate_dataset", "simulate_volume", "write_volume"]
