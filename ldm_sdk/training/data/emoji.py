"""Noto Color Emoji as captioned RGBA assets (apt ``fonts-noto-color-emoji``).

The font's ``CBDT`` table (``TTFont(path)["CBDT"].strikeData[0]``) holds one 136x128 PNG per glyph. A glyph's
caption comes from the Unicode names (:func:`unicodedata.name`) of the code points behind it: the ``cmap``
maps single code points to glyphs, ``GSUB`` ligature lookups map sequences (ZWJ sequences, skin tones, flags,
keycaps) to the rest. Captions are lower case:

- names of the sequence's base code points joined by spaces (``man personal computer``); the joiners and
  variation selectors (U+200D, U+FE0E, U+FE0F) are dropped, ``emoji component`` prefixes removed
  (``red hair``);
- a Fitzpatrick modifier becomes a suffix (``waving hand sign with dark skin tone``);
- regional-indicator pairs and tag sequences become ``flag US`` / ``flag GB-ENG``; keycaps ``keycap 1``;
- glyphs whose sequence holds only modifiers or components (a lone skin-tone swatch, a lone regional
  indicator or tag, the keycap combiner) or a code point this Python's Unicode database does not name get
  no caption and are not used.

Each captioned glyph is put in one :data:`EMOJI_GROUPS` group by the Unicode block of its first base code
point (a fixed, documented rule; it does not follow the CLDR emoji groups, which ``unicodedata`` lacks).
"""

from __future__ import annotations

import io
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")

#: emoji groups, by the Unicode block of the first base code point (see :func:`emoji_group`)
EMOJI_GROUPS: tuple[str, ...] = (
    "emoji face",  # Emoticons U+1F600..1F64F
    "emoji pictograph",  # Miscellaneous Symbols and Pictographs U+1F300..1F5FF
    "emoji transport",  # Transport and Map Symbols U+1F680..1F6FF
    "emoji supplemental",  # Supplemental Symbols and Pictographs, Extended-A U+1F900..1F9FF, 1FA70..1FAFF
    "emoji flag",  # regional-indicator pairs and tag sequences
    "emoji symbol",  # everything else: Dingbats, Miscellaneous Symbols, arrows, keycaps, (c), (r) ...
)

ZWJ, VS15, VS16, KEYCAP, CANCEL_TAG = 0x200D, 0xFE0E, 0xFE0F, 0x20E3, 0xE007F
SKIN_TONES: dict[int, str] = {
    0x1F3FB: "light",
    0x1F3FC: "medium-light",
    0x1F3FD: "medium",
    0x1F3FE: "medium-dark",
    0x1F3FF: "dark",
}
_INVISIBLE = {ZWJ, VS15, VS16}


def _is_regional(cp: int) -> bool:
    return 0x1F1E6 <= cp <= 0x1F1FF


def _is_tag(cp: int) -> bool:
    return 0xE0020 <= cp <= 0xE007F


def emoji_caption(sequence: Iterable[int]) -> str | None:
    """Caption of a code point sequence (module docstring), or ``None`` for modifier-only / unnamed ones."""
    cps = [cp for cp in sequence if cp not in _INVISIBLE]
    if not cps:
        return None
    regional = [cp for cp in cps if _is_regional(cp)]
    if len(regional) >= 2:
        return "flag " + "".join(chr(ord("A") + cp - 0x1F1E6) for cp in regional)
    tags = [cp for cp in cps if _is_tag(cp) and cp != CANCEL_TAG]
    if CANCEL_TAG in cps and not tags:
        return None  # the font's fallback glyph for an unknown tag sequence
    if tags and len(cps) > len(tags) + (CANCEL_TAG in cps):
        code = "".join(chr(cp - 0xE0000) for cp in tags).upper()
        return "flag " + (f"{code[:2]}-{code[2:]}" if len(code) > 2 else code)
    if KEYCAP in cps:
        base = [cp for cp in cps if cp != KEYCAP]
        return f"keycap {''.join(chr(cp) for cp in base)}" if base else None
    words: list[str] = []
    tones: list[str] = []
    for cp in cps:
        if cp in SKIN_TONES:
            tones.append(SKIN_TONES[cp])
            continue
        if _is_regional(cp) or _is_tag(cp):
            return None  # a lone regional indicator or tag: a component, not an emoji
        name = unicodedata.name(chr(cp), None)
        if name is None:
            return None
        words.append(name.lower().removeprefix("emoji component "))
    if not words:
        return None
    caption = " ".join(words)
    if not tones:
        return caption
    if len(set(tones)) == 1:
        return f"{caption} with {tones[0]} skin tone"
    return f"{caption} with {' and '.join(tones)} skin tones"


_GENDER_SIGNS = {0x2640, 0x2642, 0x26A7}
_PERSON_WORDS = {"man", "woman", "person", "adult", "boy", "girl", "child", "older", "kiss", "couple"}


def _reading_order(sequence: tuple[int, ...]) -> tuple[bool, bool, bool, int]:
    """Sort key choosing the standard (left-to-right) order of a ZWJ sequence: the font also holds each
    one reversed segment by segment (for right-to-left text). The standard order puts a gender sign last,
    a person first, a heart first (heart on fire, mending heart); otherwise the higher first code point."""
    segments: list[list[int]] = [[]]
    for cp in sequence:
        if cp == ZWJ:
            segments.append([])
        elif cp not in _INVISIBLE:
            segments[-1].append(cp)
    first = segments[0][0] if segments[0] else 0
    last = segments[-1][0] if segments[-1] else 0
    first_word = unicodedata.name(chr(first), "").lower().split(" ")[0] if first else ""
    return (last in _GENDER_SIGNS, first_word in _PERSON_WORDS, first == 0x2764, first)


def emoji_group(sequence: Iterable[int]) -> str:
    """The :data:`EMOJI_GROUPS` entry of a captioned sequence (module docstring)."""
    cps = [cp for cp in sequence if cp not in _INVISIBLE]
    if sum(_is_regional(cp) for cp in cps) >= 2 or any(_is_tag(cp) for cp in cps):
        return "emoji flag"
    base = next((cp for cp in cps if cp not in SKIN_TONES), cps[0] if cps else 0)
    if 0x1F600 <= base <= 0x1F64F:
        return "emoji face"
    if 0x1F300 <= base <= 0x1F5FF:
        return "emoji pictograph"
    if 0x1F680 <= base <= 0x1F6FF:
        return "emoji transport"
    if 0x1F900 <= base <= 0x1F9FF or 0x1FA70 <= base <= 0x1FAFF:
        return "emoji supplemental"
    return "emoji symbol"


@dataclass(frozen=True)
class EmojiGlyph:
    """One captioned glyph: its name in the font, the code points behind it, caption and group."""

    glyph: str
    sequence: tuple[int, ...]
    caption: str
    group: str


def _ligatures(font: object) -> list[tuple[tuple[str, ...], str]]:
    """``(component glyphs, ligature glyph)`` of every GSUB ligature lookup, in lookup order."""
    if "GSUB" not in font:  # type: ignore[operator]
        return []
    out: list[tuple[tuple[str, ...], str]] = []
    for lookup in font["GSUB"].table.LookupList.Lookup:  # type: ignore[index]
        subtables = list(lookup.SubTable)
        if lookup.LookupType == 7:  # extension lookups wrap the real subtable
            subtables = [st.ExtSubTable for st in subtables]
        for st in subtables:
            if not hasattr(st, "ligatures"):
                continue
            for first, ligatures in st.ligatures.items():
                out.extend(((first, *lig.Component), lig.LigGlyph) for lig in ligatures)
    return out


def read_emoji_glyphs(font_path: str | Path = EMOJI_FONT) -> list[EmojiGlyph]:
    """Every captioned glyph of the font's first CBDT strike, sorted by glyph name."""
    from fontTools.ttLib import TTFont

    font = TTFont(str(font_path), lazy=True)
    if "CBDT" not in font:
        raise ValueError(f"{font_path} has no CBDT table: not a colour-bitmap emoji font")
    strike: Mapping[str, object] = font["CBDT"].strikeData[0]
    sequences: dict[str, tuple[int, ...]] = {}
    for cp, glyph in sorted(font.getBestCmap().items()):
        sequences.setdefault(glyph, (cp,))
    from_cmap = {glyph for glyph, seq in sequences.items() if emoji_caption(seq) is not None}
    candidates: dict[str, list[tuple[int, ...]]] = {}
    for components, glyph in _ligatures(font):
        parts = [sequences.get(c) for c in components]  # components are cmap glyphs in this font
        if glyph not in from_cmap and all(p is not None for p in parts):
            candidates.setdefault(glyph, []).append(tuple(cp for p in parts for cp in p))  # type: ignore[union-attr]
    for glyph, seqs in candidates.items():
        sequences[glyph] = max(seqs, key=_reading_order)
    out: list[EmojiGlyph] = []
    for glyph in sorted(strike):
        seq = sequences.get(glyph)
        caption = emoji_caption(seq) if seq else None
        if seq and caption:
            out.append(EmojiGlyph(glyph, seq, caption, emoji_group(seq)))
    return out


class EmojiBitmaps:
    """Lazy reader of the font's glyph PNGs: ``rgba(glyph)`` -> ``uint8 [H, W, 4]``.

    The font is opened on first use (about 0.3 s), once per process, so a dataset that holds one pickles
    cheaply into DataLoader workers."""

    def __init__(self, font_path: str | Path = EMOJI_FONT) -> None:
        self.font_path = Path(font_path)
        self._strike: Mapping[str, object] | None = None

    def __getstate__(self) -> dict[str, object]:
        return {"font_path": self.font_path, "_strike": None}

    def png(self, glyph: str) -> bytes:
        if self._strike is None:
            from fontTools.ttLib import TTFont

            self._strike = TTFont(str(self.font_path), lazy=True)["CBDT"].strikeData[0]
        if glyph not in self._strike:
            raise KeyError(f"glyph {glyph!r} has no bitmap in {self.font_path}")
        return bytes(self._strike[glyph].imageData)  # type: ignore[attr-defined]

    def rgba(self, glyph: str) -> np.ndarray:
        from PIL import Image

        with Image.open(io.BytesIO(self.png(glyph))) as im:
            return np.asarray(im.convert("RGBA"))
