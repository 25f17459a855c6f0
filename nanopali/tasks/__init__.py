"""Task outputs: parse detection/segmentation answers, the mask VQ-VAE, and drawing the results.

    objs = parse_objects(text, image_size=(W, H), vae=SegmentationVAE.from_npz("vae-oid.npz"))
    draw(image, objs, "out.png")

locseg.py parses `<loc>`/`<seg>` strings and encodes boxes and masks back; vqvae.py holds the
VQ-VAE and mask pasting; drawing.py draws objects on the image.
"""

from nanopali.tasks.drawing import draw
from nanopali.tasks.locseg import (
    CONVENTIONS,
    DetectedObject,
    DroppedObject,
    ParsedObjects,
    box_to_locs,
    encode_box,
    encode_segmentation,
    parse_objects,
)
from nanopali.tasks.vqvae import SegmentationVAE, find_checkpoint, paste_mask, paste_soft_mask

__all__ = [
    "CONVENTIONS", "DetectedObject", "DroppedObject", "ParsedObjects", "SegmentationVAE", "box_to_locs", "draw",
    "encode_box", "encode_segmentation", "find_checkpoint", "parse_objects", "paste_mask", "paste_soft_mask",
]
