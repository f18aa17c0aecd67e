"""The image's geometry, computed rather than guessed: a field of fixed angular size, a cell
from the uv coverage, and the smearing at the field's edge that decides how far channels may
be averaged before gridding (Bridle & Schwab 1999, in Synthesis Imaging in Radio Astronomy
II, lecture 18: eqs. 18-24 for bandwidth, 18-43 for time, both for a Gaussian beam)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

ARCSEC_PER_RAD = math.degrees(1.0) * 3600.0
# Time smearing coefficient of eq. 18-43 (s^-2), for a source at the celestial pole, the
# worst case; at declination delta the loss is smaller.
TIME_SMEARING_COEFF = 1.22e-9


@dataclass(frozen=True)
class FieldGeometry:
    """What the imager is asked to make, and what that costs in smearing.

    cell_arcsec: pixel size (``pixels_per_beam`` across the synthesized beam 1/u_max);
    imsize: pixels on a side (even, with only 2, 3, 5, 7 as factors: fast FFTs);
    field_deg: the image's side, imsize x cell; beam_arcsec: 1/u_max, the resolution the
    smearing is measured against; edge_offset_deg: the field's half-width, where the
    smearing is worst along the axes; chan_avg: channels averaged together before
    gridding; *_loss_at_edge: fractional peak loss of a point source at the edge (bandwidth
    at the averaged channel width, time at the integration time).
    """

    cell_arcsec: float
    imsize: int
    field_deg: float
    umax_lambda: float
    beam_arcsec: float
    edge_offset_deg: float
    channel_width_hz: float
    integration_s: float
    chan_avg: int
    bandwidth_loss_at_edge: float
    time_loss_at_edge: float
    smearing_loss_limit: float

    @property
    def smearing_loss_at_edge(self) -> float:
        return 1.0 - (1.0 - self.bandwidth_loss_at_edge) * (1.0 - self.time_loss_at_edge)

    def as_metrics(self) -> dict[str, Any]:
        return {**asdict(self), "smearing_loss_at_edge": self.smearing_loss_at_edge}


def bandwidth_loss(channel_width_hz: float, freq_hz: float, offset_over_beam: float) -> float:
    """Peak loss of a point source ``offset_over_beam`` synthesized beams from the phase
    centre, for a square channel of ``channel_width_hz`` at ``freq_hz`` (eq. 18-24)."""
    x = channel_width_hz / freq_hz * offset_over_beam
    if x <= 0:
        return 0.0
    ratio = 1.0645 / x * math.erf(0.8326 * x)
    return max(0.0, 1.0 - min(1.0, ratio))


def time_loss(integration_s: float, offset_over_beam: float) -> float:
    """Peak loss from averaging ``integration_s`` seconds, worst case (eq. 18-43)."""
    return min(1.0, TIME_SMEARING_COEFF * (offset_over_beam * integration_s) ** 2)


def fft_friendly(n: int) -> int:
    """The smallest even n' >= n whose only prime factors are 2, 3, 5 and 7."""
    m = max(2, n + (n % 2))
    while True:
        k = m
        for p in (2, 3, 5, 7):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 2


def plan_field(
    *,
    umax_lambda: float,
    freq_min_hz: float,
    channel_width_hz: float,
    channels_per_spw: int,
    integration_s: float,
    field_deg: float,
    pixels_per_beam: float,
    smearing_loss_limit: float,
    max_imsize: int,
) -> FieldGeometry:
    """The geometry of a ``field_deg`` square image, and the largest channel averaging
    (a divisor of ``channels_per_spw``) that keeps the total smearing loss at the field's
    edge within ``smearing_loss_limit`` (never below 1: unaveraged data are what they are).

    The cell is 1 / (``pixels_per_beam`` u_max); if the field would need more than
    ``max_imsize`` pixels, the cell grows rather than the field shrinking."""
    beam_rad = 1.0 / umax_lambda
    cell_arcsec = beam_rad * ARCSEC_PER_RAD / pixels_per_beam
    imsize = fft_friendly(math.ceil(field_deg * 3600.0 / cell_arcsec))
    if imsize > max_imsize:
        imsize = max_imsize - max_imsize % 2
        cell_arcsec = field_deg * 3600.0 / imsize
    cell_arcsec = round(cell_arcsec, 3)
    edge_deg = field_deg / 2.0
    offset_over_beam = math.radians(edge_deg) / beam_rad
    # Smearing is worst at the bottom of the band (largest fractional bandwidth).
    t_loss = time_loss(integration_s, offset_over_beam)
    chan_avg = 1
    for n in range(1, channels_per_spw + 1):
        if channels_per_spw % n:
            continue
        bw = bandwidth_loss(n * channel_width_hz, freq_min_hz, offset_over_beam)
        if n == 1 or 1.0 - (1.0 - bw) * (1.0 - t_loss) <= smearing_loss_limit:
            chan_avg = n
    return FieldGeometry(
        cell_arcsec=cell_arcsec,
        imsize=imsize,
        field_deg=round(imsize * cell_arcsec / 3600.0, 4),
        umax_lambda=umax_lambda,
        beam_arcsec=beam_rad * ARCSEC_PER_RAD,
        edge_offset_deg=edge_deg,
        channel_width_hz=channel_width_hz,
        integration_s=integration_s,
        chan_avg=chan_avg,
        bandwidth_loss_at_edge=bandwidth_loss(
            chan_avg * channel_width_hz, freq_min_hz, offset_over_beam
        ),
        time_loss_at_edge=t_loss,
        smearing_loss_limit=smearing_loss_limit,
    )
