"""ISMRMRD XML header of a simulated volume, laid out like the headers in fastMRI files.

The document validates against the ISMRMRD schema (``ismrmrd.xsd.CreateFromDocument`` parses it) and holds what
fastMRI readers use: ``encoding/encodedSpace`` and ``reconSpace`` matrix sizes and fields of view, and
``encodingLimits/kspace_encoding_step_1`` from which fastmri derives the phase-encode padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape

__all__ = ["HeaderFields", "ismrmrd_header"]


@dataclass(frozen=True)
class HeaderFields:
    """Values written into the header.

    Attributes:
        encoded_size: ``(H, W)`` k-space matrix (readout with oversampling, phase-encode).
        recon_size: ``(h, w)`` reconstructed matrix.
        fov_mm: ``(rows, cols)`` reconstructed field of view in mm.
        slice_thickness_mm: slice thickness (the z field of view) in mm.
        num_slices: number of slices ``S``.
        num_coils: number of receive channels ``C``.
        pe_lines: acquired phase-encode lines.
        pe_center: index of the k-space centre line among the acquired lines.
        field_strength_t: B0 in tesla.
        tr_ms, te_ms, flip_deg: sequence parameters.
        sequence: ``"spin_echo"`` or ``"gradient_echo"``.
        protocol_name: e.g. ``"AXT1"``.
    """

    encoded_size: tuple[int, int]
    recon_size: tuple[int, int]
    fov_mm: tuple[float, float]
    slice_thickness_mm: float
    num_slices: int
    num_coils: int
    pe_lines: int
    pe_center: int
    field_strength_t: float
    tr_ms: float
    te_ms: float
    flip_deg: float
    sequence: str
    protocol_name: str


def _limit(name: str, maximum: int, center: int) -> str:
    return f"<{name}><minimum>0</minimum><maximum>{maximum}</maximum><center>{center}</center></{name}>"


def ismrmrd_header(fields: HeaderFields) -> str:
    """Return the header XML as a string (stored as the ``ismrmrd_header`` dataset)."""
    (enc_x, enc_y), (rec_x, rec_y) = fields.encoded_size, fields.recon_size
    fov_x, fov_y = fields.fov_mm
    enc_fov_x, enc_fov_y = fov_x * enc_x / rec_x, fov_y * enc_y / rec_y
    larmor_hz = round(42.577478e6 * fields.field_strength_t)
    sequence_type = "TurboSpinEcho" if fields.sequence == "spin_echo" else "Flash"
    return f"""<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xs="http://www.w3.org/2001/XMLSchema">
  <studyInformation><studyDescription>reconkit simulation</studyDescription></studyInformation>
  <measurementInformation>
    <patientPosition>HFS</patientPosition>
    <protocolName>{escape(fields.protocol_name)}</protocolName>
  </measurementInformation>
  <acquisitionSystemInformation>
    <systemVendor>reconkit</systemVendor>
    <systemModel>simulator</systemModel>
    <systemFieldStrength_T>{fields.field_strength_t:g}</systemFieldStrength_T>
    <receiverChannels>{fields.num_coils}</receiverChannels>
    <institutionName>reconkit</institutionName>
  </acquisitionSystemInformation>
  <experimentalConditions><H1resonanceFrequency_Hz>{larmor_hz}</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace>
      <matrixSize><x>{enc_x}</x><y>{enc_y}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{enc_fov_x:.4f}</x><y>{enc_fov_y:.4f}</y><z>{fields.slice_thickness_mm:.4f}</z></fieldOfView_mm>
    </encodedSpace>
    <reconSpace>
      <matrixSize><x>{rec_x}</x><y>{rec_y}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{fov_x:.4f}</x><y>{fov_y:.4f}</y><z>{fields.slice_thickness_mm:.4f}</z></fieldOfView_mm>
    </reconSpace>
    <encodingLimits>
      {_limit("kspace_encoding_step_1", fields.pe_lines - 1, fields.pe_center)}
      {_limit("kspace_encoding_step_2", 0, 0)}
      {_limit("average", 0, 0)}
      {_limit("slice", fields.num_slices - 1, fields.num_slices // 2)}
      {_limit("contrast", 0, 0)}
      {_limit("phase", 0, 0)}
      {_limit("repetition", 0, 0)}
      {_limit("set", 0, 0)}
      {_limit("segment", 0, 0)}
    </encodingLimits>
    <trajectory>cartesian</trajectory>
  </encoding>
  <sequenceParameters>
    <TR>{fields.tr_ms:.2f}</TR>
    <TE>{fields.te_ms:.2f}</TE>
    <flipAngle_deg>{fields.flip_deg:.1f}</flipAngle_deg>
    <sequence_type>{sequence_type}</sequence_type>
  </sequenceParameters>
</ismrmrdHeader>
"""
