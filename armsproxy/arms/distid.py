"""Distribution ID (§4): the SA's 128-bit identity and its text form.

The SA compares distids with ``strcmp``, so the text form is case-sensitive upper-case hex; we
treat anything else as a different (invalid) identity rather than normalising it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DISTID_PATTERN = r"[0-9A-F]{4}(?:-[0-9A-F]{4}){7}"
_DISTID_RE = re.compile(rf"\A{DISTID_PATTERN}\Z")


class DistributionIdError(ValueError):
    """A string that is not a distid in the exact text form of §4."""


def is_distid(text: str) -> bool:
    return bool(_DISTID_RE.match(text))


@dataclass(frozen=True, slots=True)
class DistributionId:
    version: int
    vendor: int
    sa_type: int
    code: int

    @classmethod
    def from_text(cls, text: str) -> DistributionId:
        if not is_distid(text):
            raise DistributionIdError(
                f"not a distribution id (8 groups of 4 upper-case hex digits): {text!r}"
            )
        return cls.from_bytes(bytes.fromhex(text.replace("-", "")))

    @classmethod
    def from_bytes(cls, raw: bytes) -> DistributionId:
        if len(raw) != 16:
            raise DistributionIdError(f"a distribution id is 16 octets, got {len(raw)}")
        return cls(
            version=int.from_bytes(raw[0:2], "big"),
            vendor=int.from_bytes(raw[2:6], "big"),
            sa_type=int.from_bytes(raw[6:8], "big"),
            code=int.from_bytes(raw[8:16], "big"),
        )

    def to_bytes(self) -> bytes:
        return (
            self.version.to_bytes(2, "big")
            + self.vendor.to_bytes(4, "big")
            + self.sa_type.to_bytes(2, "big")
            + self.code.to_bytes(8, "big")
        )

    @property
    def text(self) -> str:
        h = self.to_bytes().hex().upper()
        return "-".join(h[i : i + 4] for i in range(0, 32, 4))

    def __str__(self) -> str:
        return self.text

    def reserved_fields(self) -> list[str]:
        """Fields holding values the docs call reserved.

        Informational only: real devices use them (the captured SA has SA type 0x0004), so the
        proxy never refuses a distid for this.
        """
        notes = []
        if self.version in (0x0000, 0xFFFF):
            notes.append(f"version 0x{self.version:04X} is reserved")
        if self.vendor in (0x00000000, 0xFFFFFFFF):
            notes.append(f"vendor code 0x{self.vendor:08X} is reserved")
        if self.sa_type <= 0x007F or self.sa_type == 0xFFFF:
            notes.append(f"SA type 0x{self.sa_type:04X} is in a reserved range")
        return notes
