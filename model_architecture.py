"""The seed's import path for the models; they live in lib/models.py (below lib/checkpoints.py, which builds them).

    from model_architecture import build_model
    model = build_model("resnet50", num_classes=10, weights="models/pretrained/resnet50-11ad3fa6.pth")
"""
from lib.models import ARCHS, PRETRAINED_DIR, PRETRAINED_FILES, build_model, load_state_file  # noqa: F401
