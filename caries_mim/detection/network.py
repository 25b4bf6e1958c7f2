"""The trainable network of the detector: ViT encoder -> simple feature pyramid -> MONAI's RetinaNet heads.

:class:`ViTRetinaNet` is MONAI's :class:`~monai.apps.detection.networks.retinanet_network.RetinaNet` (its
classification and regression heads, its output contract) with :class:`ViTFeatureExtractor` as the feature
extractor, so :class:`~monai.apps.detection.networks.retinanet_detector.RetinaNetDetector` takes it as ``network``.
"""

from __future__ import annotations

import torch
from monai.apps.detection.networks.retinanet_network import RetinaNet
from torch import nn

from caries_mim.detection.heads import keep_head_convs
from caries_mim.detection.pyramid import SimpleFeaturePyramid, pyramid_strides
from caries_mim.detection.spatial_prior import SpatialPriorModule
from caries_mim.models.vit import VisionTransformer


class ViTFeatureExtractor(nn.Module):
    """(B, 1, H, W) images in [0, 1] -> pyramid levels [(B, C, H/(p/2), W/(p/2)), (B, C, H/p, W/p),
    (B, C, H/2p, W/2p)] from the encoder's final patch tokens, with (B, C, H/(p/4), W/(p/4)) first for four levels.
    H and W must be multiples of 2p.

    ``spatial_prior_width``: when set, a convolutional spatial prior of that stride-4 width
    (:class:`~caries_mim.detection.spatial_prior.SpatialPriorModule`, with ``spatial_prior_stem``) adds fine detail
    to every level.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        channels: int = 256,
        levels: int = 3,
        spatial_prior_width: int | None = None,
        spatial_prior_stem: str = "vit_adapter",
    ) -> None:
        super().__init__()
        self.encoder = encoder
        strides = pyramid_strides(encoder.config.patch_size, levels)
        self.spatial_prior = (
            None
            if spatial_prior_width is None
            else SpatialPriorModule(
                strides,
                spatial_prior_width,
                encoder.config.input_mean,
                encoder.config.input_std,
                spatial_prior_stem,
            )
        )
        prior_widths = () if self.spatial_prior is None else self.spatial_prior.out_widths
        self.pyramid = SimpleFeaturePyramid(encoder.config.embed_dim, channels, levels, prior_widths)
        #: Read by MONAI's RetinaNet to size its heads.
        self.out_channels = channels

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        priors = None if self.spatial_prior is None else self.spatial_prior(images)
        return self.pyramid(self.encoder(images).feature_map(), priors)


class ViTRetinaNet(RetinaNet):
    """RetinaNet heads on a ViT feature pyramid, in the form MONAI's ``RetinaNetDetector`` expects.

    ``forward(images)`` takes (B, 1, H, W) images in [0, 1] with H, W multiples of ``size_divisible`` and returns
    ``{cls_key: [(B, A * num_classes, h_i, w_i)], box_reg_key: [(B, A * 4, h_i, w_i)]}`` for the three (or four) levels,
    finest first: classification logits and box deltas relative to each level's A anchors per position.

    Attributes (the contract ``RetinaNetDetector`` reads): ``spatial_dims`` = 2, ``num_classes``,
    ``num_anchors`` = A, ``size_divisible`` = (2p, 2p), ``cls_key`` = "classification",
    ``box_reg_key`` = "box_regression".
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        num_classes: int,
        num_anchors: int,
        channels: int = 256,
        levels: int = 3,
        spatial_prior_width: int | None = None,
        spatial_prior_stem: str = "vit_adapter",
        head_convs: int = 4,
    ) -> None:
        super().__init__(
            spatial_dims=2,
            num_classes=num_classes,
            num_anchors=num_anchors,
            feature_extractor=ViTFeatureExtractor(encoder, channels, levels, spatial_prior_width, spatial_prior_stem),
            # The stride-2p level max-pools the patch grid by 2: an even number of patches keeps it exact.
            size_divisible=2 * encoder.config.patch_size,
        )
        keep_head_convs(self, head_convs)

    @property
    def encoder(self) -> VisionTransformer:
        return self.feature_extractor.encoder
