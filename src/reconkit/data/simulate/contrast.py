"""MR contrast from tissue maps: literature relaxation times and spin-echo / gradient-echo signal equations.

Relaxation times (ms) and relative proton density per tissue at 1.5 T and 3 T, rounded from
Gelman et al., Radiology 210:759 (1999) and Wansapura et al., JMRI 9:531 (1999) (WM, GM T1/T2),
Stanisz et al., MRM 54:507 (2005) (muscle), de Bazelaire et al., Radiology 230:652 (2004) (fat); CSF from the
usual T1 ≈ 4 s, T2 ≈ 2 s; proton densities WM 0.70, GM 0.82. T2* is taken as a
fixed fraction of T2 (brain parenchyma ~0.6–0.7), which is enough for the weighting of a gradient echo.

Each volume draws a protocol (sequence, TR, TE, flip angle) for its weighting and jitters every tissue value by a
few per cent, so no two volumes have exactly the same contrast. For training data there is also *contrast
randomisation* (:func:`randomise_signals`): with a chosen probability every tissue gets an independent random
intensity instead, the domain randomisation of SynthSeg (Billot et al., Med. Image Anal. 86:102789, 2023), so a
network sees tissue boundaries at contrasts no protocol list covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "CONTRASTS", "RANDOM_SIGNAL_RANGE", "TISSUE_PARAMETERS", "Protocol", "choose_protocol", "randomise_signals",
    "signal_equation", "tissue_signals",
]  # fmt: skip

CONTRASTS = ("t1", "t2", "pd")

# tissue -> field strength (T) -> (T1 ms, T2 ms, proton density); order of tissues as anatomy.TISSUES
TISSUE_PARAMETERS: dict[str, dict[float, tuple[float, float, float]]] = {
    "wm": {1.5: (700.0, 75.0, 0.70), 3.0: (900.0, 70.0, 0.70)},
    "gm": {1.5: (1200.0, 95.0, 0.82), 3.0: (1550.0, 90.0, 0.82)},
    "csf": {1.5: (4000.0, 2000.0, 1.00), 3.0: (4300.0, 2000.0, 1.00)},
    "fat": {1.5: (343.0, 58.0, 0.90), 3.0: (382.0, 68.0, 0.90)},
    "muscle": {1.5: (1008.0, 44.0, 0.75), 3.0: (1412.0, 50.0, 0.75)},
}
T2STAR_FRACTION = 0.65


@dataclass(frozen=True)
class Protocol:
    """Sequence parameters of one simulated scan.

    Attributes:
        contrast: ``"t1"``, ``"t2"`` or ``"pd"`` weighting.
        sequence: ``"spin_echo"`` or ``"gradient_echo"`` (spoiled).
        field_strength_t: B0 in tesla (1.5 or 3).
        tr_ms: repetition time in ms.
        te_ms: echo time in ms.
        flip_deg: excitation flip angle in degrees (90 for spin echo).
    """

    contrast: str
    sequence: str
    field_strength_t: float
    tr_ms: float
    te_ms: float
    flip_deg: float


def choose_protocol(contrast: str, rng: np.random.Generator, field_strength_t: float | None = None) -> Protocol:
    """Draw sequence parameters for ``contrast`` (``"mixed"`` draws the weighting too).

    T1: spin echo (TR 400–650, TE 8–15 ms) or spoiled gradient echo (TR 150–300, TE 2.5–5 ms, 60–80°);
    T2: (turbo) spin echo TR 3000–6000, TE 80–120 ms; PD: spin echo TR 2500–4000, TE 10–30 ms.
    """
    if contrast == "mixed":
        contrast = CONTRASTS[int(rng.integers(len(CONTRASTS)))]
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; expected one of {', '.join(CONTRASTS)} or 'mixed'")
    field = float(field_strength_t) if field_strength_t is not None else float(rng.choice([1.5, 3.0]))
    if field not in (1.5, 3.0):
        raise ValueError(f"field_strength_t must be 1.5 or 3.0, got {field}")
    if contrast == "t1" and rng.random() < 0.5:
        return Protocol("t1", "gradient_echo", field, rng.uniform(150, 300), rng.uniform(2.5, 5), rng.uniform(60, 80))
    tr, te = {"t1": ((400, 650), (8, 15)), "t2": ((3000, 6000), (80, 120)), "pd": ((2500, 4000), (10, 30))}[contrast]
    return Protocol(contrast, "spin_echo", field, rng.uniform(*tr), rng.uniform(*te), 90.0)


def signal_equation(protocol: Protocol, t1_ms: np.ndarray, t2_ms: np.ndarray, pd: np.ndarray) -> np.ndarray:
    """Steady-state magnitude signal (arbitrary units) per tissue.

    Spin echo: ``PD · (1 − e^(−TR/T1)) · e^(−TE/T2)``.
    Spoiled gradient echo: ``PD · sin α · (1 − E1) / (1 − cos α · E1) · e^(−TE/T2*)``, ``E1 = e^(−TR/T1)``.
    """
    e1 = np.exp(-protocol.tr_ms / t1_ms)
    if protocol.sequence == "spin_echo":
        return pd * (1 - e1) * np.exp(-protocol.te_ms / t2_ms)
    alpha = np.deg2rad(protocol.flip_deg)
    t2star = T2STAR_FRACTION * t2_ms
    return pd * np.sin(alpha) * (1 - e1) / (1 - np.cos(alpha) * e1) * np.exp(-protocol.te_ms / t2star)


def tissue_signals(protocol: Protocol, rng: np.random.Generator, jitter: float = 0.05) -> dict[str, float]:
    """Signal of each tissue for ``protocol``, with T1, T2 and PD each scaled by ``1 + N(0, jitter)``."""
    signals = {}
    for tissue, by_field in TISSUE_PARAMETERS.items():
        t1, t2, pd = (value * (1 + jitter * rng.standard_normal()) for value in by_field[protocol.field_strength_t])
        signals[tissue] = float(signal_equation(protocol, np.float64(t1), np.float64(t2), np.float64(pd)))
    return signals


RANDOM_SIGNAL_RANGE = (0.03, 1.0)


def randomise_signals(
    signals: dict[str, float], rng: np.random.Generator, probability: float
) -> tuple[dict[str, float], bool]:
    """Contrast randomisation: with ``probability`` replace every tissue's signal by an independent uniform draw
    from :data:`RANDOM_SIGNAL_RANGE`; returns ``(signals, randomised)``.

    ``probability=0`` draws no random numbers at all, so datasets made without randomisation stay as they were.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"random_contrast must be a probability in [0, 1], got {probability}")
    if probability == 0 or rng.random() >= probability:
        return signals, False
    return {tissue: float(rng.uniform(*RANDOM_SIGNAL_RANGE)) for tissue in signals}, True
