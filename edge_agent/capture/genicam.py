"""GenICam cameras (GigE Vision, USB3 Vision) through Aravis 0.8's GObject bindings.

Source ``genicam:<device id>`` (the id as ``edge-agent cameras`` or ``arv-tool-0.8`` list it,
e.g. ``genicam:Aravis-Fake-GV01``); ``genicam:`` alone opens the only camera present. Aravis
(Debian ``gir1.2-aravis-0.8``) and ``gi`` are imported only when such a camera is opened or
listed: an agent without GenICam cameras never needs them.

Settings (GenicamSettings) are written to the camera's GenICam features on every open, in an
order that keeps them valid (acquisition stopped, pixel format before the region, the frame
rate before the trigger, because Aravis' frame-rate setter switches FrameStart triggering
off), then read back: what the camera really took (a gain quantised to its steps, an exposure
rounded to its clock) is logged once and reported in the capture's stats. A value the camera
refuses is a configuration error (GenicamRefused, with the camera's own message); a camera
that stops answering is an outage, reopened with back-off by the capture.

Timestamps: GigE Vision stamps each frame with the camera's clock (ticks, which Aravis turns
into ns), which starts at the camera's power-on and runs at its own rate. ClockMap maps it to
host time: offset = the smallest (host arrival time - device time) seen recently, so that a
frame's host time is its device time plus that offset. The host arrival time is always after
the exposure, by the transfer time and more, and the smallest difference is the least delayed
frame's: the mapped time is never before the true moment of exposure (give or take the
clocks' drift over the window, microseconds), so a frame exposed after a trigger is never
dated before it (the service pairs trigger-mode frames with part ids by that order). A camera
without timestamps (0) gets the host arrival time.

Lost frames: a frame id that skips ids (the camera or the network lost whole frames, or the
stream had no free buffer: an underrun) and a buffer that arrives incomplete are counted and
never handed on as a good frame. Where each frame answers a trigger (``trigger`` software or a
line) each lost frame still becomes an ERROR frame, so that the frames stay in step with the
waiting part ids and the part gets an ERROR verdict rather than the next part's image.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import deque
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from edge_agent.errors import UserError

log = logging.getLogger(__name__)

PREFIX = "genicam:"
INSTALL = "apt-get install gir1.2-aravis-0.8 aravis-tools (scripts/setup.sh installs them)"

# PFNC codes (GenICam Pixel Format Naming Convention) of the formats the agent converts.
PIXEL_FORMATS: dict[str, int] = {
    "Mono8": 0x01080001,
    "Mono10": 0x01100003,
    "Mono12": 0x01100005,
    "Mono16": 0x01100007,
    "BayerGR8": 0x01080008,
    "BayerRG8": 0x01080009,
    "BayerGB8": 0x0108000A,
    "BayerBG8": 0x0108000B,
    "RGB8": 0x02180014,
    "BGR8": 0x02180015,
}
_FORMAT_BY_CODE = {code: name for name, code in PIXEL_FORMATS.items()}
# OpenCV names a Bayer pattern by its second row's second and third pixels, GenICam by the
# first row's first two: GenICam RG is OpenCV BG (test_genicam checks the colours).
_BAYER = {
    "BayerRG8": cv2.COLOR_BayerBG2BGR,
    "BayerGB8": cv2.COLOR_BayerGR2BGR,
    "BayerGR8": cv2.COLOR_BayerGB2BGR,
    "BayerBG8": cv2.COLOR_BayerRG2BGR,
}
_SHIFT = {"Mono10": 2, "Mono12": 4, "Mono16": 8}  # to 8 bit: the top bits

TRIGGER_ACTIVATIONS = {"rising": "RisingEdge", "falling": "FallingEdge"}
FREE = "free"
SOFTWARE = "software"
TRIGGER = re.compile(r"^(free|software|line[0-9]+)$")
TRIGGER_CHOICES = "free, software, line0, line1, ..."
FRAME_ID_WRAP = 0xFFFF  # GigE Vision 1.x block ids: 16 bits, 0 never used
SOCKET_BUFFER = 4 << 20  # bytes at least, for a GigE stream's receive socket (see _start)
CLOCK_WINDOW = 256  # frames the clock offset is the minimum over (drift follows in that time)


@dataclass(frozen=True)
class GenicamSettings:
    """A GenICam camera's settings; None leaves the camera's own value."""

    exposure_us: float | None = None
    gain_db: float | None = None
    pixel_format: str | None = None  # one of PIXEL_FORMATS
    roi: tuple[int, int, int, int] | None = None  # x, y, width, height on the sensor
    frame_rate: float | None = None
    trigger: str = FREE  # free | software | line<N>
    trigger_activation: str = "rising"  # a TRIGGER_ACTIVATIONS key, for line triggers
    packet_size: int = 0  # GigE Vision: 0 negotiates the largest the path carries
    buffers: int = 8  # stream buffers: frames the camera may get ahead of the capture
    features: tuple[tuple[str, str | int | float | bool], ...] = ()  # anything else, in order

    def __post_init__(self) -> None:
        if self.pixel_format is not None and self.pixel_format not in PIXEL_FORMATS:
            raise UserError(
                f"genicam.pixel_format must be one of {', '.join(PIXEL_FORMATS)}, "
                f"got {self.pixel_format!r}"
            )
        if not TRIGGER.match(self.trigger):
            raise UserError(f"genicam.trigger must be {TRIGGER_CHOICES}, got {self.trigger!r}")
        if self.trigger_activation not in TRIGGER_ACTIVATIONS:
            raise UserError(
                f"genicam.trigger_activation must be one of {', '.join(TRIGGER_ACTIVATIONS)}, "
                f"got {self.trigger_activation!r}"
            )
        if self.packet_size < 0 or self.buffers < 1:
            raise UserError("genicam: packet_size must be 0 or more and buffers 1 or more")

    @property
    def triggered(self) -> bool:
        """Every frame answers a trigger (software or a line), none comes on its own."""
        return self.trigger != FREE


class GenicamRefused(UserError):
    """The camera refused a setting: the configuration must change, retrying cannot help."""


class GenicamLost(Exception):
    """The camera cannot be opened or stopped answering: an outage, retried with back-off."""


# -- pure parts ------------------------------------------------------------------------------


def device_id(source: str | int) -> str | None:
    """The Aravis device id of a ``genicam:`` source; None for ``genicam:`` alone."""
    text = str(source)
    text = text[len(PREFIX) :] if text.startswith(PREFIX) else text
    return text.strip() or None


def trigger_source(trigger: str) -> str | None:
    """The GenICam TriggerSource of a `trigger` setting; None for free run."""
    if trigger == FREE:
        return None
    if trigger == SOFTWARE:
        return "Software"
    return "Line" + trigger[len("line") :]


def to_image(data: bytes, pixel_format: str, width: int, height: int) -> np.ndarray:
    """A frame's bytes -> gray or BGR uint8 (Mono10/12/16 keep their top 8 bits, Bayer is
    demosaicked). ValueError when the size does not match the format."""
    if pixel_format in ("RGB8", "BGR8"):
        image = np.frombuffer(data, np.uint8, width * height * 3).reshape(height, width, 3)
        return cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if pixel_format == "RGB8" else image
    if pixel_format in _SHIFT:
        wide = np.frombuffer(data, "<u2", width * height).reshape(height, width)
        return (wide >> _SHIFT[pixel_format]).astype(np.uint8)
    image = np.frombuffer(data, np.uint8, width * height).reshape(height, width)
    if pixel_format in _BAYER:
        return cv2.cvtColor(image, _BAYER[pixel_format])
    if pixel_format != "Mono8":
        raise ValueError(f"pixel format {pixel_format} is not supported")
    return image


def missing_frames(previous: int | None, current: int, wrap: int = FRAME_ID_WRAP) -> int:
    """Frames lost between two frame ids (0 for the first frame or a repeated id). Ids count
    1..wrap and then start again at 1 (GigE Vision never uses 0); ids above `wrap` (64-bit
    extended ids) do not wrap."""
    if previous is None or current == previous:
        return 0
    if current > previous:
        return current - previous - 1
    if previous <= wrap:  # wrapped round: previous+1 .. wrap, then 1 .. current-1
        return (wrap - previous) + max(current - 1, 0)
    return 0  # an extended id went back: a restarted stream, not a loss


class ClockMap:
    """Camera timestamps (ns of the camera's clock) -> host time (s); see the module doc."""

    def __init__(self, window: int = CLOCK_WINDOW) -> None:
        self._offsets: deque[int] = deque(maxlen=window)

    def host_time(self, device_ns: int, arrived_ns: int) -> float:
        if device_ns <= 0:
            return arrived_ns / 1e9
        self._offsets.append(arrived_ns - device_ns)
        return (device_ns + min(self._offsets)) / 1e9


# -- Aravis ----------------------------------------------------------------------------------


def aravis() -> Any:
    """The Aravis 0.8 module; UserError with the install line where it is missing."""
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis
    except (ImportError, ValueError) as exc:
        raise UserError(f"GenICam cameras need Aravis 0.8 ({exc}): {INSTALL}") from None
    return Aravis


def _glib_error() -> type[BaseException]:
    from gi.repository import GLib

    return GLib.Error


def list_devices() -> list[dict[str, str]]:
    """The GenICam devices Aravis finds now: id, vendor, model, serial, address, protocol."""
    arv = aravis()
    arv.update_device_list()
    return [
        {
            "id": arv.get_device_id(i) or "",
            "vendor": arv.get_device_vendor(i) or "",
            "model": arv.get_device_model(i) or "",
            "serial": arv.get_device_serial_nbr(i) or "",
            "address": arv.get_device_address(i) or "",
            "protocol": arv.get_device_protocol(i) or "",
        }
        for i in range(arv.get_n_devices())
    ]


@dataclass(frozen=True)
class Grab:
    """One buffer from the stream: an image, or why there is none (lost or incomplete)."""

    image: np.ndarray | None
    captured_at: float
    frame_id: int
    missing: int  # whole frames lost just before this one
    error: str | None = None


class GenicamCamera:
    """One opened camera with its settings applied and its stream running. Not thread-safe:
    the capture serialises calls (fire() comes from the trigger's thread)."""

    def __init__(self, wanted: str | None, settings: GenicamSettings, where: str) -> None:
        """Open `wanted` (None: the only camera), apply `settings`, start acquisition.
        GenicamLost if the camera cannot be reached, GenicamRefused for a refused setting."""
        self._arv = arv = aravis()
        self._error = _glib_error()
        self.settings = settings
        self.where = where
        self._camera: Any = None
        self._stream: Any = None
        self._previous_id: int | None = None
        self._clock = ClockMap()
        try:
            name = wanted if wanted is not None else self._only_camera()
            self._camera = arv.Camera.new(name)
        except self._error as exc:
            raise GenicamLost(
                f"cannot open GenICam camera {wanted or '(any)'}: {exc.message}"
            ) from None
        self.device = name  # the Aravis id (DeviceID alone is often just the serial)
        self.read_back: dict[str, Any] = {}
        try:
            self._apply()
            self.read_back = self._read_back()
            self._start()
        except self._error as exc:
            # A camera that still answers refused the value; one that does not is gone.
            alive = self.alive()
            self.release()
            if alive:
                raise GenicamRefused(
                    f"{where}: camera {self.device} refused: {exc.message}"
                ) from None
            raise GenicamLost(f"camera {self.device} stopped answering: {exc.message}") from None

    def _only_camera(self) -> str:
        devices = list_devices()
        if len(devices) != 1:
            found = ", ".join(d["id"] for d in devices) or "none"
            raise GenicamLost(f"genicam: without an id needs exactly one camera, found {found}")
        return devices[0]["id"]

    # Each step raises GLib.Error with the camera's own message.
    def _apply(self) -> None:
        cam, s, arv = self._camera, self.settings, self._arv
        cam.set_range_check_policy(arv.RangeCheckPolicy.ENABLE)  # refuse, never clamp silently
        cam.stop_acquisition()
        cam.clear_triggers()  # no half-set trigger while the rest changes
        if s.pixel_format is not None:
            cam.set_pixel_format_from_string(s.pixel_format)
        if s.roi is not None:
            cam.set_region(*s.roi)
        if s.exposure_us is not None:
            if cam.is_exposure_auto_available():
                cam.set_exposure_time_auto(arv.Auto.OFF)
            cam.set_exposure_time(s.exposure_us)
        if s.gain_db is not None:
            if cam.is_gain_auto_available():
                cam.set_gain_auto(arv.Auto.OFF)
            cam.set_gain(s.gain_db)
        if s.frame_rate is not None:
            cam.set_frame_rate(s.frame_rate)
        source = trigger_source(s.trigger)
        if source is not None:
            cam.set_trigger(source)  # FrameStart, TriggerMode On, TriggerSource
            if source != "Software":
                cam.set_string("TriggerActivation", TRIGGER_ACTIVATIONS[s.trigger_activation])
        if cam.is_gv_device():
            if s.packet_size:
                cam.gv_set_packet_size(s.packet_size)
            else:
                cam.gv_auto_packet_size()
        device = cam.get_device()
        for name, value in s.features:
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            device.set_features_from_string(f"{name}={text}")

    def _read_back(self) -> dict[str, Any]:
        cam, s = self._camera, self.settings
        region = cam.get_region()
        took: dict[str, Any] = {
            "device": self.device,
            "pixel_format": cam.get_pixel_format_as_string(),
            "roi": [region.x, region.y, region.width, region.height],
            "exposure_us": cam.get_exposure_time() if cam.is_exposure_time_available() else None,
            "gain_db": cam.get_gain() if cam.is_gain_available() else None,
            "frame_rate": cam.get_frame_rate() if cam.is_frame_rate_available() else None,
            "trigger": s.trigger,
            "buffers": s.buffers,
        }
        if s.triggered:
            took["trigger_source"] = cam.get_string("TriggerSource")
            took["trigger_mode"] = cam.get_string("TriggerMode")
            if s.trigger != SOFTWARE:
                took["trigger_activation"] = cam.get_string("TriggerActivation")
        if cam.is_gv_device():
            took["packet_size"] = cam.gv_get_packet_size()
        device = cam.get_device()
        if s.features:
            took["features"] = {
                name: device.get_feature(name).get_value_as_string() for name, _ in s.features
            }
        return took

    def _start(self) -> None:
        cam, arv = self._camera, self._arv
        if cam.is_gv_device() and self._loopback():
            # Aravis' packet socket (the fast path on a NIC) sees nothing on loopback, where
            # the simulated camera lives: use the plain UDP socket there.
            cam.gv_set_stream_options(arv.GvStreamOption.PACKET_SOCKET_DISABLED)
        stream = cam.create_stream(None, None)
        if stream is None:
            raise GenicamLost(f"camera {self.device}: no stream channel")
        payload = cam.get_payload()
        if hasattr(stream.props, "socket_buffer"):
            # GigE: the kernel's default receive buffer (208 KiB) overflows within one frame's
            # burst of packets, which then arrive incomplete. The kernel caps it at
            # net.core.rmem_max (docs/integrators/cameras.md: raise it for GigE cameras).
            stream.props.socket_buffer = arv.GvStreamSocketBuffer.FIXED
            stream.props.socket_buffer_size = max(SOCKET_BUFFER, 2 * payload)
        for _ in range(self.settings.buffers):
            stream.push_buffer(arv.Buffer.new_allocate(payload))
        self._stream = stream
        cam.set_acquisition_mode(arv.AcquisitionMode.CONTINUOUS)
        cam.start_acquisition()

    def _loopback(self) -> bool:
        try:
            address = self._camera.get_device().get_device_address().to_string()
        except (AttributeError, TypeError):
            return False
        return address.startswith("127.")

    # -- while running -----------------------------------------------------------------------

    def fire(self) -> None:
        """TriggerSoftware; GenicamLost if the camera does not take it."""
        try:
            self._camera.software_trigger()
        except self._error as exc:
            raise GenicamLost(
                f"camera {self.device}: TriggerSoftware failed: {exc.message}"
            ) from None

    def alive(self) -> bool:
        """The camera still answers a register read (a quiet trigger-mode camera, or a lost
        one)."""
        try:
            self._camera.get_pixel_format()
        except self._error:
            return False
        return True

    def grab(self, timeout_s: float) -> Grab | None:
        """The next buffer, or None when none came within `timeout_s`."""
        buffer = self._stream.timeout_pop_buffer(max(1, int(timeout_s * 1e6)))
        if buffer is None:
            return None
        try:
            return self._convert(buffer)
        finally:
            self._stream.push_buffer(buffer)  # back to the stream: it is the camera's now

    def _convert(self, buffer: Any) -> Grab:
        frame_id = buffer.get_frame_id()
        missing = missing_frames(self._previous_id, frame_id)
        self._previous_id = frame_id
        arrived = buffer.get_system_timestamp()
        status = buffer.get_status()
        if status != self._arv.BufferStatus.SUCCESS:
            name = getattr(status, "value_nick", str(status))
            return Grab(None, arrived / 1e9, frame_id, missing, f"incomplete frame ({name})")
        captured_at = self._clock.host_time(buffer.get_timestamp(), arrived)
        code = buffer.get_image_pixel_format()
        fmt = _FORMAT_BY_CODE.get(code)
        if fmt is None:
            error = f"pixel format 0x{code:08x} is not supported"
            return Grab(None, captured_at, frame_id, missing, error)
        width, height = buffer.get_image_width(), buffer.get_image_height()
        try:
            image = to_image(buffer.get_image_data(), fmt, width, height)
        except ValueError as exc:
            return Grab(None, captured_at, frame_id, missing, f"bad {fmt} frame: {exc}")
        return Grab(image, captured_at, frame_id, missing)

    def stream_stats(self) -> dict[str, int]:
        """Aravis' own stream counters (underruns, missing frames and packets, ...)."""
        stream = self._stream
        if stream is None:
            return {}
        wanted = ("n_underruns", "n_missing_frames", "n_missing_packets", "n_failures")
        out: dict[str, int] = {}
        for i in range(stream.get_n_infos()):
            name = stream.get_info_name(i)
            if name in wanted:
                out[name] = int(stream.get_info_uint64(i))
        return out

    def release(self) -> None:
        """Stop acquisition (best effort: the camera may be gone) and drop the objects, which
        closes the stream and gives up control of the camera."""
        camera = self._camera
        if camera is not None:
            # A lost camera cannot be stopped; dropping it below is what is left.
            with contextlib.suppress(self._error):
                camera.stop_acquisition()
        self._stream = None
        self._camera = None
