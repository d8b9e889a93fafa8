"""Trim the CUDA fat binaries inside an ELF shared library to one GPU architecture.

A CUDA library keeps its device code in the ELF section ``.nv_fatbin``: a run of fatbin
containers, one per compiled source file, each holding one entry per target (SASS machine code
as an ``ELF`` entry for ``sm_XY``, or ``PTX`` for the JIT). The CUDA runtime is handed each
container's start address (``__cudaRegisterFatBinary``) and reads the container's header to find
its entries; it loads the SASS built for the device's own architecture. ``nvprune`` does this
pruning for objects and static libraries only, not for a linked ``.so``.

Layout (little-endian; the same one ``cuobjdump`` and the open fatbin readers decode)::

    container  u32 magic 0xBA55ED50 | u16 version (1) | u16 header size (16) | u64 entries' bytes
    entry      u16 kind (1 PTX, 2 ELF) | u16 version | u32 header size | u64 payload bytes
               | ... | u32 arch at offset 28 (90 for sm_90) | ...; then the payload

Trimming keeps, in each container, the entries a GPU of architecture ``arch`` loads -- every
SASS entry built for exactly ``arch``; where a container has none, its newest PTX not newer than
``arch`` (JIT-compiled at load, as the driver would); where it has neither, the container is left
as it is (nothing in it runs on that GPU either way) -- and moves them to the front of the
container, lowers the header's byte count and zeroes the rest of the container's old span. Every
container keeps its address and the file its size, so no pointer or offset elsewhere changes;
the zeroes cost nothing once compressed. The result is the fatbin ``nvcc -gencode
arch=compute_XY,code=sm_XY`` would have written. Anything that does not parse exactly as above
raises FatbinError: an unknown layout is never rewritten.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ELF_MAGIC = b"\x7fELF"
FATBIN_SECTION = ".nv_fatbin"
FATBIN_MAGIC = 0xBA55ED50
CONTAINER = struct.Struct("<IHHQ")  # magic, version, header size, entries' bytes
ENTRY = struct.Struct("<HHIQ")  # kind, version, header size, payload bytes
ENTRY_ARCH_OFFSET = 28
ENTRY_MIN_HEADER = 32
KIND_PTX = 1
KIND_ELF = 2
CONTAINER_ALIGN = 8


class FatbinError(ValueError):
    """The library's device code is not laid out as this module expects."""


@dataclass(frozen=True)
class Entry:
    kind: int
    arch: int
    start: int  # offset in the section, header included
    end: int


@dataclass
class TrimStats:
    containers: int = 0
    trimmed: int = 0
    untouched: int = 0  # no SASS and no usable PTX for the architecture: left as they were
    bytes_before: int = 0  # entries' bytes (headers and payloads) in all containers
    bytes_after: int = 0

    def add(self, other: TrimStats) -> None:
        self.containers += other.containers
        self.trimmed += other.trimmed
        self.untouched += other.untouched
        self.bytes_before += other.bytes_before
        self.bytes_after += other.bytes_after


def elf_section(data: bytes | bytearray, name: str) -> tuple[int, int] | None:
    """(file offset, size) of the ELF64 little-endian section ``name``, or None without it."""
    if data[:4] != ELF_MAGIC:
        raise FatbinError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise FatbinError("not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shoff == 0:
        return None
    if shentsize < 64 or shoff + max(shnum, 1) * shentsize > len(data):
        raise FatbinError("ELF section headers lie outside the file")

    def header(i: int) -> tuple[int, int, int, int]:
        base = shoff + i * shentsize
        sh_name = struct.unpack_from("<I", data, base)[0]
        sh_offset, sh_size = struct.unpack_from("<QQ", data, base + 24)
        sh_link = struct.unpack_from("<I", data, base + 40)[0]
        return sh_name, sh_offset, sh_size, sh_link

    # Extended numbering (over 0xff00 sections): the real counts live in section 0.
    if shnum == 0:
        shnum = header(0)[2]
    if shstrndx == 0xFFFF:
        shstrndx = header(0)[3]
    _, str_off, str_size, _ = header(shstrndx)
    strtab = bytes(data[str_off : str_off + str_size])
    wanted = name.encode()
    for i in range(shnum):
        sh_name, sh_offset, sh_size, _ = header(i)
        end = strtab.find(b"\0", sh_name)
        if strtab[sh_name:end] == wanted:
            if sh_offset + sh_size > len(data):
                raise FatbinError(f"section {name} lies outside the file")
            return sh_offset, sh_size
    return None


def _entries(section: bytearray | memoryview, start: int, end: int) -> list[Entry]:
    entries = []
    pos = start
    while pos < end:
        if pos + ENTRY_MIN_HEADER > end:
            raise FatbinError(f"truncated fatbin entry header at {pos}")
        kind, _, header_size, payload = ENTRY.unpack_from(section, pos)
        if kind not in (KIND_PTX, KIND_ELF) or header_size < ENTRY_MIN_HEADER:
            raise FatbinError(f"unknown fatbin entry (kind {kind}, header {header_size}) at {pos}")
        arch = struct.unpack_from("<I", section, pos + ENTRY_ARCH_OFFSET)[0]
        entry_end = pos + header_size + payload
        if entry_end > end:
            raise FatbinError(f"fatbin entry at {pos} runs past its container")
        entries.append(Entry(kind, arch, pos, entry_end))
        pos = entry_end
    return entries


def keep_for(entries: list[Entry], arch: int) -> list[Entry]:
    """The entries a GPU of architecture ``arch`` loads: its SASS, else its newest PTX not newer
    than ``arch``; [] when neither is there (the container is then left alone)."""
    sass = [e for e in entries if e.kind == KIND_ELF and e.arch == arch]
    if sass:
        return sass
    ptx = [e for e in entries if e.kind == KIND_PTX and e.arch <= arch]
    if ptx:
        newest = max(e.arch for e in ptx)
        return [e for e in ptx if e.arch == newest]
    return []


def trim_section(section: bytearray | memoryview, arch: int) -> TrimStats:
    """Trim every fatbin container of a ``.nv_fatbin`` section in place (module docstring)."""
    stats = TrimStats()
    pos = 0
    size = len(section)
    while pos < size:
        if pos + CONTAINER.size > size:
            if any(section[pos:]):
                raise FatbinError(f"stray bytes at the end of the fatbin section ({pos})")
            break
        magic, version, header_size, body = CONTAINER.unpack_from(section, pos)
        if magic != FATBIN_MAGIC:
            # Containers are 8-byte aligned; only zero padding may sit between them.
            if any(section[pos : pos + CONTAINER_ALIGN]):
                raise FatbinError(f"no fatbin container at {pos} of the section")
            pos += CONTAINER_ALIGN
            continue
        if version != 1 or header_size != CONTAINER.size:
            raise FatbinError(f"fatbin container version {version} at {pos} is not known")
        start, end = pos + header_size, pos + header_size + body
        if end > size:
            raise FatbinError(f"fatbin container at {pos} runs past the section")
        entries = _entries(section, start, end)
        keep = keep_for(entries, arch)
        stats.containers += 1
        stats.bytes_before += body
        if not keep or len(keep) == len(entries):
            stats.untouched += not keep
            stats.bytes_after += body
        else:
            kept = b"".join(bytes(section[e.start : e.end]) for e in keep)
            section[start : start + len(kept)] = kept
            section[start + len(kept) : end] = bytes(end - start - len(kept))
            struct.pack_into("<Q", section, pos + 8, len(kept))
            stats.trimmed += 1
            stats.bytes_after += len(kept)
        pos = end
    return stats


def trim_elf(data: bytes, arch: int) -> tuple[bytes, TrimStats] | None:
    """``data`` (an ELF shared library) with its fatbins trimmed to ``arch``, and what changed;
    None when it has no device code."""
    where = elf_section(data, FATBIN_SECTION)
    if where is None:
        return None
    offset, size = where
    out = bytearray(data)
    with memoryview(out) as view:
        stats = trim_section(view[offset : offset + size], arch)
    return bytes(out), stats
