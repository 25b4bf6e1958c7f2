"""ViT encoder for single-channel radiographs, its config and named sizes, encoder files, MAE weight import."""

from caries_mim.models.config import VIT_SIZES, ViTConfig
from caries_mim.models.encoder_file import LoadedEncoder, load_encoder, save_encoder
from caries_mim.models.mae_import import ImportReport, import_mae_weights
from caries_mim.models.position import resample_position_embedding, sincos_position_embedding
from caries_mim.models.vit import EncoderOutput, VisionTransformer, build_encoder

__all__ = [
    "VIT_SIZES",
    "EncoderOutput",
    "ImportReport",
    "LoadedEncoder",
    "ViTConfig",
    "VisionTransformer",
    "build_encoder",
    "import_mae_weights",
    "load_encoder",
    "resample_position_embedding",
    "save_encoder",
    "sincos_position_embedding",
]
