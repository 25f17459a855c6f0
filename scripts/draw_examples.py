"""Draw docs/detect_example.png and docs/segment_example.png from KNOWN answer strings (not model output).

    python scripts/draw_examples.py

No trained PaliGemma can be downloaded here, so these pictures show what the drawing code makes of
a detection and a segmentation answer written by hand, on a synthetic image. The masks come from
the random reference VQ-VAE in ../shared/reference/vqvae, so their shapes are arbitrary blobs.
"""

from pathlib import Path

from PIL import Image, ImageDraw

from nanopali.tasks import SegmentationVAE, draw, encode_box, parse_objects

ROOT = Path(__file__).resolve().parents[1]
VAE = ROOT.parent / "shared" / "reference" / "vqvae" / "vae-random.npz"


def scene() -> Image.Image:
    image = Image.new("RGB", (480, 320), (235, 232, 220))
    pen = ImageDraw.Draw(image)
    pen.ellipse([40, 60, 200, 220], fill=(200, 40, 40))              # a red circle
    pen.rectangle([260, 120, 420, 280], fill=(40, 80, 200))          # a blue square
    return image


def main() -> None:
    image = scene()
    out = ROOT / "docs"
    out.mkdir(exist_ok=True)
    circle, square = (40, 60, 201, 221), (260, 120, 421, 281)  # (x0, y0, x1, y1), exclusive ends
    detection = (f"{encode_box(circle, image.size)} red circle ; {encode_box(square, image.size)} blue square")
    draw(image, parse_objects(detection, image_size=image.size), out / "detect_example.png")
    segs = "".join(f"<seg{i:03d}>" for i in (5, 17, 99, 3, 64, 12, 127, 0, 45, 45, 8, 90, 33, 71, 2, 110))
    segmentation = f"{encode_box(circle, image.size)}{segs} red circle"
    objects = parse_objects(segmentation, image_size=image.size, vae=SegmentationVAE.from_npz(VAE))
    draw(image, objects, out / "segment_example.png")
    print(f"wrote {out / 'detect_example.png'} and {out / 'segment_example.png'}")


if __name__ == "__main__":
    main()
