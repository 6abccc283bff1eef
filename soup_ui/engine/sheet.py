"""Labelled image strips and grids as one PNG (for the CLI, the README and the evaluation)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

SOUP_COLOUR = (214, 98, 18)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Wrap `text` into lines no wider than `width` pixels, breaking at spaces."""
    words, lines, line = text.split(" "), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def labelled_strip(
    items: Sequence[tuple[str, Image.Image]],
    tile: int = 160,
    set_apart: Sequence[int] = (),
    title: str | None = None,
) -> Image.Image:
    """Images side by side, each scaled to `tile` px with its label below; indices in `set_apart`
    (the soup) get a gap before them and a coloured frame."""
    font, pad, gap = _font(max(11, tile // 11)), 6, 18
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [_fit(probe, label, font, tile) for label, _ in items]
    line_h = font.getbbox("Ag")[3] + 3
    text_h = max(len(lines) for lines in labels) * line_h
    title_h = line_h + pad if title else 0
    width = pad + sum(tile + pad + (gap if i in set_apart else 0) for i in range(len(items)))
    sheet = Image.new("RGB", (width, title_h + pad + tile + pad + text_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    x = pad
    for i, ((_, image), lines) in enumerate(zip(items, labels)):
        if i in set_apart:
            x += gap
        y = title_h + pad
        sheet.paste(image.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        colour = SOUP_COLOUR if i in set_apart else (0, 0, 0)
        if i in set_apart:
            draw.rectangle((x - 3, y - 3, x + tile + 2, y + tile + 2), outline=SOUP_COLOUR, width=3)
        for j, line in enumerate(lines):
            draw.text((x, y + tile + pad + j * line_h), line, fill=colour, font=font)
        x += tile + pad
    return sheet


def grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], col_labels: Sequence[str], tile: int = 96) -> Image.Image:
    """A labelled grid: rows x columns of images, labels on the left and on top."""
    font, pad = _font(max(10, tile // 9)), 4
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = int(max(probe.textlength(label, font=font) for label in row_labels)) + 2 * pad
    line_h = font.getbbox("Ag")[3] + 3
    col_lines = [_fit(probe, c, font, tile) for c in col_labels]
    top = max(len(lines) for lines in col_lines) * line_h + pad
    sheet = Image.new("RGB", (left + len(col_labels) * (tile + pad), top + len(rows) * (tile + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, lines in enumerate(col_lines):
        for j, line in enumerate(lines):
            draw.text((left + c * (tile + pad), j * line_h), line, fill="black", font=font)
    for r, (label, images) in enumerate(zip(row_labels, rows)):
        y = top + r * (tile + pad)
        draw.text((pad, y + tile // 2 - line_h // 2), label, fill="black", font=font)
        for c, image in enumerate(images):
            sheet.paste(image.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (left + c * (tile + pad), y))
    return sheet
