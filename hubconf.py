"""torch.hub entry point, as DETR offers one:

    grounder = torch.hub.load("path/to/this/clone", "hivg", source="local", checkpoint="best_checkpoint.pth")
    [hit] = grounder.ground([Image.open("street.jpg")], ["the man on the left"])
    [hit] = grounder.ground([Image.open("street.jpg")], ["the man on the left"], mask=True)
    hit.mask            # [height, width] bool of the image (checkpoints trained with --use_mask_loss)

Checkpoints are local files (ours, or the authors' converted on load); nothing is downloaded.
"""
from models.api import Grounder

dependencies = ["torch", "torchvision", "open_clip", "numpy", "PIL"]


def hivg(checkpoint: str, device: str = "cpu", bridge_attention: str = "per_sample") -> Grounder:
    """A HiVG grounder (models.api.Grounder) from a checkpoint file, on `device`."""
    return Grounder.from_checkpoint(checkpoint, device, bridge_attention)
