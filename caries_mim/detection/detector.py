"""``CariesDetector``: MONAI's RetinaNetDetector (anchors, ATSS matching, focal loss or hard negative sampling,
box coding, losses, box selection with NMS, sliding-window inference) around the ViT feature-pyramid network.

Coordinates. Outside this module boxes are ``[x0, y0, x1, y1]`` with x along columns. MONAI's 2D detection
components index box coordinates in tensor-dimension order instead ("ij"): for (B, C, H, W) images its
``[x0, y0, x1, y1]`` runs along H first, i.e. it is ``[row0, col0, row1, col1]``. :class:`CariesDetector` swaps
the axes on the way in and out, so callers never see MONAI's order; its anchor shapes are swapped the same way.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
from monai.losses.giou_loss import BoxGIoULoss
from torch import nn

from caries_mim.detection.batched_loss import (
    IGNORED,
    batched_atss_matches,
    classification_targets,
    foreground_box_pairs,
    pad_boxes,
)
from caries_mim.detection.box_fusion import fuse_passes, vote_boxes
from caries_mim.detection.box_selection import padded_nms
from caries_mim.detection.cnn_backbone import ResNetRetinaNet
from caries_mim.detection.config import DetectorConfig
from caries_mim.detection.encoder_loading import load_detector_encoder
from caries_mim.detection.lesion_times_class import LesionTimesClassLoss, lesion_times_class_scores
from caries_mim.detection.losses import FocalLossPerPositive
from caries_mim.detection.network import ViTRetinaNet
from caries_mim.detection.sliding_window import BatchSlidingWindow
from caries_mim.errors import InvalidArgumentError
from caries_mim.models.mae_import import ImportReport
from caries_mim.models.vit import VisionTransformer

#: [x0, y0, x1, y1] (x = column) <-> MONAI's [row0, col0, row1, col1]; the permutation is its own inverse.
_SWAP_XY = [1, 0, 3, 2]
#: Key of a MONAI target's ignore regions (MONAI's own keys are the detector's target_box_key / target_label_key).
_IGNORE_KEY = "ignore_boxes"


def _unmirror(boxes: torch.Tensor, width: int, height: int, mirror_x: bool, mirror_y: bool) -> torch.Tensor:
    """Boxes found on a mirrored image, mapped back onto the image.

    Args:
        boxes: (N, 4) float ``[x0, y0, x1, y1]`` in pixels of the mirrored image of size ``width`` x ``height``.
    Returns:
        (N, 4) the same boxes on the unmirrored image: x -> width - x maps the mirror's pixel edges back onto the
        image's, so ``[x0, x1]`` becomes ``[W - x1, W - x0]``; likewise in y.
    """
    mapped = boxes.clone()
    if mirror_x:
        mapped[:, [0, 2]] = width - boxes[:, [2, 0]]
    if mirror_y:
        mapped[:, [1, 3]] = height - boxes[:, [3, 1]]
    return mapped


class _RetinaNetDetector(RetinaNetDetector):
    """RetinaNetDetector whose anchor matching calls its ATSS matcher directly and whose box selection runs one
    non-maximum suppression for the whole batch.

    MONAI's ``compute_anchor_matched_idxs`` first tests ``isinstance(matcher, torchvision Matcher)``; torchvision
    is not a dependency of this project, and without it that test raises ``OptionalImportError`` before the ATSS
    branch is reached. ATSS is the only matcher used here, so the test is skipped (the override MONAI's error
    message itself points to for other matchers).

    MONAI's ``postprocess_detections`` selects boxes image by image and runs a looped NMS (see
    :mod:`caries_mim.detection.box_selection` for what that cost); the override runs the same steps on the whole
    batch's tensors, with MONAI's box coder, and one NMS for all images. It assumes MONAI's default IoU overlap
    metric, the one :class:`CariesDetector` configures.

    With :attr:`lesion_times_class` set, the last classification output of each anchor is a lesion logit and the
    class scores are :func:`~caries_mim.detection.lesion_times_class.lesion_times_class_scores` instead of a sigmoid
    per output. With :attr:`box_voting_iou` set, each kept box is the score-weighted mean of the candidates of its
    class overlapping it at that IoU (:func:`~caries_mim.detection.box_fusion.vote_boxes`).

    A target may carry ignore regions (``ignore_boxes``, same axis order as its boxes): the anchors ATSS would
    match to one of them, and to no lesion, are left out of the classification loss (MONAI's
    ``BETWEEN_THRESHOLDS`` anchors, which its own per-image losses already skip), so a detection there is neither
    rewarded nor penalized.
    """

    #: Class scores as P(lesion) x P(class | lesion) (``DetectorConfig.class_scores``); False: a sigmoid per class.
    lesion_times_class: bool = False
    #: ``DetectorConfig.box_fusion_iou``: box voting after NMS at this IoU; None: NMS's boxes as they are.
    box_voting_iou: float | None = None

    def compute_loss(
        self,
        head_outputs_reshape: dict[str, torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        anchors: list[torch.Tensor],
        num_anchor_locs_per_level: Sequence[int],
    ) -> dict[str, torch.Tensor]:
        """MONAI's losses (same arguments, same result) with the matching, targets and box pairs of the whole
        batch computed at once (:mod:`caries_mim.detection.batched_loss`).

        MONAI's per-image path stays for what the batched one does not cover: a foreground/background sampler
        (hard negative sampling draws per image) and anchors that differ between images.
        """
        if (
            self.fg_bg_sampler is not None
            or not isinstance(self.proposal_matcher, ATSSMatcher)
            or any(image_anchors is not anchors[0] for image_anchors in anchors)
        ):
            return super().compute_loss(head_outputs_reshape, targets, anchors, num_anchor_locs_per_level)
        cls_logits = head_outputs_reshape[self.cls_key]  # (B, A, C)
        box_regression = head_outputs_reshape[self.box_reg_key]  # (B, A, 4)
        if not bool(torch.isfinite(cls_logits).all() & torch.isfinite(box_regression).all()):
            # MONAI's per-image checks raise while training and only warn without gradients.
            message = "NaN or Inf in predicted classification logits or box regression."
            if torch.is_grad_enabled():
                raise ValueError(message)
            warnings.warn(message, stacklevel=2)
        boxes, labels, valid = pad_boxes(
            [target[self.target_box_key] for target in targets], [target[self.target_label_key] for target in targets]
        )
        matches = self._atss(boxes, valid, anchors[0], num_anchor_locs_per_level)
        if bool((valid.any(dim=1) & (matches < 0).all(dim=1)).any()):
            # MONAI warns per image; one check for the batch (a host synchronization on a GPU).
            warnings.warn(
                "No anchor is matched with a ground-truth box in an image of this batch: check the anchor shapes, "
                "the pyramid levels and atss_center_in_gt against the lesion sizes at the working scale.",
                stacklevel=2,
            )
        class_targets = classification_targets(matches, labels, cls_logits.shape[-1], cls_logits.dtype)
        logits, class_targets = cls_logits.flatten(0, 1), class_targets.flatten(0, 1)  # (B * A, C)
        ignore = [target.get(_IGNORE_KEY) for target in targets]
        if any(regions is not None and regions.numel() for regions in ignore):
            per_image = [boxes.new_zeros((0, 4)) if one is None else one for one in ignore]
            regions, _, region_valid = pad_boxes(
                per_image, [torch.zeros(len(one), dtype=torch.long, device=boxes.device) for one in per_image]
            )
            region_matches = self._atss(regions, region_valid, anchors[0], num_anchor_locs_per_level)
            trained = ((matches >= 0) | (region_matches < 0)).flatten()  # (B * A,)
            logits, class_targets = logits[trained], class_targets[trained]
        classification = self.cls_loss_func(logits, class_targets).to(cls_logits.dtype)
        predicted, matched_anchors, matched_boxes = foreground_box_pairs(box_regression, boxes, anchors[0], matches)
        if predicted.shape[0] == 0:
            box_loss = torch.zeros((), dtype=box_regression.dtype, device=box_regression.device)
        else:
            if self.encode_gt:
                matched_boxes = self.box_coder.encode_single(matched_boxes, matched_anchors)
            if self.decode_pred:
                predicted = self.box_coder.decode_single(predicted, matched_anchors)
            box_loss = self.box_loss_func(predicted, matched_boxes).to(predicted.dtype)
        return {self.cls_key: classification, self.box_reg_key: box_loss}

    def _atss(
        self, boxes: torch.Tensor, valid: torch.Tensor, anchors: torch.Tensor, num_anchor_locs_per_level: Sequence[int]
    ) -> torch.Tensor:
        """:func:`~caries_mim.detection.batched_loss.batched_atss_matches` with this detector's matcher settings."""
        return batched_atss_matches(
            boxes,
            valid,
            anchors,
            num_anchor_locs_per_level,
            self.num_anchors_per_loc,
            self.proposal_matcher.num_candidates,
            self.proposal_matcher.center_in_gt,
            self.proposal_matcher.min_dist,
        )

    def compute_anchor_matched_idxs(
        self,
        anchors: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        num_anchor_locs_per_level: Sequence[int],
    ) -> list[torch.Tensor]:
        matched = []
        for anchors_per_image, targets_per_image in zip(anchors, targets, strict=True):
            matched_per_image = self._matches(
                anchors_per_image, targets_per_image[self.target_box_key], num_anchor_locs_per_level
            )
            regions = targets_per_image.get(_IGNORE_KEY)
            if regions is not None and regions.numel():
                on_region = self._matches(anchors_per_image, regions, num_anchor_locs_per_level) >= 0
                matched_per_image = matched_per_image.masked_fill((matched_per_image < 0) & on_region, IGNORED)
            matched.append(matched_per_image)
        return matched

    def _matches(
        self, anchors: torch.Tensor, boxes: torch.Tensor, num_anchor_locs_per_level: Sequence[int]
    ) -> torch.Tensor:
        """MONAI's matches of one image's anchors (A,) to ``boxes`` (M, 4): a box index, or -1 for background."""
        boxes = boxes.to(anchors.device)
        if boxes.numel() == 0:
            # As MONAI does: every anchor is background (the matcher's own answer would land on the CPU).
            return torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
        _, matched = self.proposal_matcher(boxes, anchors, num_anchor_locs_per_level, self.num_anchors_per_loc)
        return matched

    def postprocess_detections(
        self,
        head_outputs_reshape: dict[str, torch.Tensor],
        anchors: list[torch.Tensor],
        image_sizes: list[list[int]],
        num_anchor_locs_per_level: Sequence[int],
        need_sigmoid: bool = True,
    ) -> list[dict[str, torch.Tensor]]:
        """MONAI's detections (same arguments, same steps and result), computed for the batch at once.

        Per level, as MONAI's ``BoxSelector``: scores (sigmoid of the logits) above the score threshold, the top
        ``topk_candidates_per_level`` of them, their boxes decoded with MONAI's box coder and clipped to the image
        (boxes under 1 px dropped, MONAI's ``clip_boxes_to_image``); then one NMS for all images. MONAI runs those
        steps image by image with 500-odd tensor operations each; here they run on (B, ...) tensors. The result is
        MONAI's bit for bit, except where scores tie exactly: ``torch.topk`` orders tied values as it pleases (in
        MONAI too), and here it sees the whole row with the scores under the threshold masked instead of only the
        ones above, so tied candidates may come out in another order and NMS may keep the other of two tied boxes.

        Args:
            head_outputs_reshape: ``cls_key`` (B, sum(HWA), num_classes + lesion_times_class) logits and ``box_reg_key``
                (B, sum(HWA), 4) box offsets.
            anchors: B tensors (sum(HWA), 4) in MONAI's axis order.
            image_sizes: B spatial sizes the boxes are clipped to.
            num_anchor_locs_per_level: H * W of each pyramid level.
            need_sigmoid: unused, as in MONAI (the box selector applies the sigmoid).
        Returns:
            B dicts: ``target_box_key`` (N, 4), ``pred_score_key`` (N,) descending, ``target_label_key`` (N,).
        """
        selector = self.box_selector
        per_level = [count * self.num_anchors_per_loc for count in num_anchor_locs_per_level]
        logits = head_outputs_reshape[self.cls_key]
        compute_dtype = logits.dtype
        classes = logits.shape[-1] - self.lesion_times_class
        limits = torch.tensor(image_sizes, dtype=torch.float32, device=logits.device)[:, None, :].repeat(1, 1, 2)
        levels = zip(
            logits.split(per_level, dim=1),
            head_outputs_reshape[self.box_reg_key].split(per_level, dim=1),
            torch.stack(anchors).split(per_level, dim=1),
            strict=True,
        )
        boxes, scores, labels, valid = [], [], [], []
        for level_logits, level_offsets, level_anchors in levels:
            flat = level_logits.flatten(1)  # (B, HWA * classes)
            if self.lesion_times_class:
                level_scores = lesion_times_class_scores(level_logits).flatten(1)  # (B, HWA * classes)
                above = level_scores > selector.score_thresh
            elif selector.apply_sigmoid:
                level_scores = torch.sigmoid(flat.to(torch.float32))
                above = level_scores > selector.score_thresh
            else:  # MONAI compares raw scores in their own dtype, then ranks them in float32
                above = flat > selector.score_thresh
                level_scores = flat.to(torch.float32)
            top = min(selector.topk_candidates_per_level, level_scores.shape[1])
            top_scores, top_index = level_scores.masked_fill(~above, float("-inf")).topk(top, dim=1)  # (B, top)
            anchor_index = (top_index // classes)[..., None].expand(-1, -1, 4)
            decoded = self.box_coder.decode_single(
                level_offsets.gather(1, anchor_index).reshape(-1, 4).to(torch.float32),
                level_anchors.gather(1, anchor_index).reshape(-1, 4),
            ).to(compute_dtype)
            # MONAI's clip_boxes_to_image: clamp to [0, size] in float32, keep boxes at least 1 px in every axis.
            clipped = torch.minimum(decoded.to(torch.float32).view(*top_index.shape, 4).clamp(min=0), limits)
            nonempty = (clipped[..., 2] >= clipped[..., 0] + 1) & (clipped[..., 3] >= clipped[..., 1] + 1)
            boxes.append(clipped.to(compute_dtype))
            scores.append(top_scores)
            labels.append(top_index % classes)
            valid.append((top_scores > selector.score_thresh) & nonempty)  # the -inf fill is never above
        boxes_t, scores_t, labels_t = torch.cat(boxes, dim=1), torch.cat(scores, dim=1), torch.cat(labels, dim=1)
        valid_t = torch.cat(valid, dim=1)
        kept = padded_nms(boxes_t, scores_t, labels_t, valid_t, selector.nms_thresh, selector.detections_per_img)
        kept_boxes = [boxes_t[row, keep] for row, keep in enumerate(kept)]
        if self.box_voting_iou is not None:
            kept_boxes = [
                vote_boxes(
                    kept_boxes[row],
                    labels_t[row, keep],
                    boxes_t[row, valid_t[row]],
                    scores_t[row, valid_t[row]],
                    labels_t[row, valid_t[row]],
                    self.box_voting_iou,
                )
                for row, keep in enumerate(kept)
            ]
        return [
            {
                self.target_box_key: kept_boxes[row],
                self.pred_score_key: scores_t[row, keep].to(compute_dtype),
                self.target_label_key: labels_t[row, keep],
            }
            for row, keep in enumerate(kept)
        ]


class CariesDetector(nn.Module):
    """Caries detector: (B, 1, H, W) radiographs in [0, 1] -> boxes, scores and class labels.

    Only :attr:`network` (encoder, pyramid, heads) has parameters; save and load this module's ``state_dict``
    together with ``config.to_dict()``.

    Inputs need not be padded: MONAI pads the bottom and right with zeros to a multiple of 2p (32 for 16 px
    patches). Inputs larger than ``config.roi_size`` in either side are predicted with the sliding window, so the
    cost grows linearly with the area (global attention over the whole image would grow with its square).

    Args:
        config: the detector's architecture and settings.
        encoder: an encoder to use (see :func:`build_detector` to load one from ``encoder.pt``); by default a
            freshly initialized one. Its config must equal ``config.encoder``.
    """

    def __init__(self, config: DetectorConfig, encoder: VisionTransformer | None = None) -> None:
        super().__init__()
        if config.backbone != "vit" and encoder is not None:
            raise InvalidArgumentError(f"a {config.backbone} backbone takes no ViT encoder")
        if encoder is None and config.backbone == "vit":
            encoder = VisionTransformer(config.encoder)
        elif encoder is not None and encoder.config != config.encoder:
            raise InvalidArgumentError(
                f"the encoder's config {encoder.config.to_dict()} differs from the detector's "
                f"{config.encoder.to_dict()}"
            )
        self.config = config
        anchors = AnchorGeneratorWithAnchorShape(
            feature_map_scales=config.anchor_scales,
            base_anchor_shapes=[(height, width) for width, height in config.anchor_shapes],
            indexing="ij",
        )
        if encoder is None:
            network = ResNetRetinaNet(
                config.backbone,
                config.head_outputs,
                len(config.anchor_shapes),
                config.pyramid_channels,
                config.encoder.input_mean,
                config.encoder.input_std,
                levels=config.pyramid_levels,
                head_convs=config.head_convs,
            )
        else:
            network = ViTRetinaNet(
                encoder,
                config.head_outputs,
                len(config.anchor_shapes),
                config.pyramid_channels,
                config.pyramid_levels,
                config.spatial_prior_width,
                config.spatial_prior_stem,
                config.head_convs,
            )
        detector = _RetinaNetDetector(network, anchors)
        detector.set_atss_matcher(num_candidates=config.atss_candidates, center_in_gt=config.atss_center_in_gt)
        if config.hard_negative_sampling:
            detector.set_hard_negative_sampler(
                batch_size_per_image=config.sampler_batch_size,
                positive_fraction=config.sampler_positive_fraction,
                min_neg=config.sampler_min_negatives,
                pool_size=config.sampler_pool_size,
            )
        if config.classification_loss == "focal":
            focal = FocalLossPerPositive(gamma=config.focal_gamma, alpha=config.focal_alpha)
            if config.class_scores == "lesion_times_class":
                detector.set_cls_loss(LesionTimesClassLoss(focal, config.class_loss_weight))
                detector.lesion_times_class = True
            else:
                detector.set_cls_loss(focal)
        if config.box_regression_loss == "giou":
            # MONAI's GIoU loss compares decoded predicted boxes with the ground truth boxes, so the ground truth
            # is not encoded and the predictions are decoded (its documented pairing).
            detector.set_box_regression_loss(BoxGIoULoss(reduction="mean"), encode_gt=False, decode_pred=True)
        detector.box_voting_iou = config.box_fusion_iou
        detector.set_box_selector_parameters(
            score_thresh=config.score_threshold,
            topk_candidates_per_level=config.candidates_per_level,
            nms_thresh=config.nms_threshold,
            detections_per_img=config.detections_per_image,
        )
        self.retinanet = detector
        self.set_window_batch_size(config.sliding_window_batch_size)

    def set_window_batch_size(self, windows: int) -> None:
        """How many sliding windows go through the network at once: the config's value by default; a GPU wants
        many more (all windows of a micro-batch in one pass), a CPU gains nothing from it. Results do not change.
        """
        if windows < 1:
            raise InvalidArgumentError(f"the sliding window batch size must be >= 1, got {windows}")
        # MONAI's SlidingWindowInferer(mode="constant"), stitching a batch at once (see BatchSlidingWindow).
        self.retinanet.inferer = BatchSlidingWindow(self.config.roi_size, windows, self.config.sliding_window_overlap)

    @property
    def network(self) -> ViTRetinaNet | ResNetRetinaNet:
        return self.retinanet.network

    @property
    def encoder(self) -> VisionTransformer:
        """The ViT encoder (a CNN yardstick detector has none)."""
        if not isinstance(self.network, ViTRetinaNet):
            raise InvalidArgumentError(f"a {self.config.backbone} detector has no ViT encoder")
        return self.network.encoder

    def forward(self, images: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Same as :meth:`losses`: the training step goes through ``forward`` so DistributedDataParallel can
        synchronize gradients."""
        return self.losses(images, targets)

    def losses(self, images: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Training losses for a batch.

        Args:
            images: (B, 1, H, W) float in [0, 1], H and W at most a few multiples of ``roi_size`` (the whole image
                goes through the encoder).
            targets: B dicts with ``boxes`` float (N_i, 4) ``[x0, y0, x1, y1]`` in pixels of ``images``
                (x1 > x0, y1 > y0) and ``labels`` int64 (N_i,) in [0, num_classes); N_i may be 0.
        Returns:
            scalar tensors ``classification`` (``config.classification_loss``: the focal loss over every anchor per
            positive anchor, or binary cross-entropy over the hard-negative-sampled anchors),
            ``box_regression`` (``config.box_regression_loss`` over the positive anchors: smooth L1 on their encoded
            offsets or 1 - GIoU of their decoded boxes; 0 without positives)
            and ``total``, their sum.

        Dropout and stochastic depth follow the module's train/eval mode, so this also gives validation losses.
        """
        monai_targets = [self._monai_target(images, index, target) for index, target in enumerate(targets)]
        if len(monai_targets) != images.shape[0]:
            raise InvalidArgumentError(f"{images.shape[0]} images but {len(monai_targets)} targets")
        self._drop_stale_anchors(images)
        with _detector_mode(self.retinanet, training=True):
            losses = self.retinanet(images, monai_targets)
        classification = losses[self.retinanet.cls_key]
        # MONAI returns a constant CPU zero when no anchor is positive.
        box_regression = losses[self.retinanet.box_reg_key].to(classification.device)
        return {
            "classification": classification,
            "box_regression": box_regression,
            "total": classification + box_regression,
        }

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections for a batch of same-size images (call ``eval()`` first for deterministic output).

        With test-time flips (``config.test_time_flip``, ``config.test_time_vertical_flip``) the images and their
        mirrors all go through the network, each pass's boxes are mapped back onto the image, and each image's
        passes are fused (:func:`~caries_mim.detection.box_fusion.fuse_passes`).

        Args:
            images: (B, 1, H, W) float in [0, 1], any H and W.
        Returns:
            B dicts: ``boxes`` float (N, 4) ``[x0, y0, x1, y1]`` in pixels of ``images``, inside them;
            ``scores`` float (N,) in [0, 1], descending; ``labels`` int64 (N,) class indices.
        """
        mirrors = self.config.test_time_mirrors
        if len(mirrors) == 1:
            return self._predict_once(images)
        height, width = images.shape[-2:]
        passes = []
        for mirror_x, mirror_y in mirrors:
            flipped_dims = [dim for dim, flipped in ((-1, mirror_x), (-2, mirror_y)) if flipped]
            found = self._predict_once(images.flip(flipped_dims) if flipped_dims else images)
            passes.append(
                [{**one, "boxes": _unmirror(one["boxes"], width, height, mirror_x, mirror_y)} for one in found]
            )
        fused = [
            fuse_passes(
                list(image_passes),
                iou_threshold=self.config.box_fusion_iou,
                max_kept=self.config.detections_per_image,
            )
            for image_passes in zip(*passes, strict=True)
        ]
        # A score-weighted mean of boxes inside the image is inside it, up to float rounding (an edge at W can come
        # back as W plus one ulp): clipped so the contract holds exactly.
        inside = images.new_tensor([width, height, width, height])
        return [{**one, "boxes": torch.minimum(one["boxes"].clamp(min=0), inside)} for one in fused]

    def _predict_once(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """:meth:`predict` in one pass, without test-time flips."""
        height, width = images.shape[-2:]
        use_window = max(height, width) > self.config.roi_size
        if use_window:
            # MONAI's sliding window pads inputs smaller than the window on both sides, by amounts that need not
            # be multiples of the coarsest stride, which would shift the stitched coarse maps against their
            # anchors. Padded here (bottom/right) it never needs to.
            roi = self.config.roi_size
            images = F.pad(images, (0, max(roi - width, 0), 0, max(roi - height, 0)))
        self._drop_stale_anchors(images)
        with _detector_mode(self.retinanet, training=False):
            detections = self.retinanet(images, use_inferer=use_window)
        results = []
        for detection in detections:
            boxes = detection[self.retinanet.target_box_key][:, _SWAP_XY]
            # MONAI clips to the tensor it was given, which may include the padding above.
            boxes = torch.minimum(boxes, boxes.new_tensor([width, height, width, height]))
            results.append(
                {
                    "boxes": boxes,
                    "scores": detection[self.retinanet.pred_score_key],
                    "labels": detection[self.retinanet.target_label_key],
                }
            )
        return results

    def _drop_stale_anchors(self, images: torch.Tensor) -> None:
        """MONAI caches anchors by input shape only; after the module moved to another device they must be rebuilt."""
        cached = self.retinanet.anchors
        if cached and cached[0].device != images.device:
            self.retinanet.anchors = None

    def _monai_target(self, images: torch.Tensor, index: int, target: dict[str, torch.Tensor]) -> dict:
        """Validate one target and put its boxes in MONAI's axis order."""
        boxes, labels = target.get("boxes"), target.get("labels")
        if not isinstance(boxes, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise InvalidArgumentError(f"target {index} needs tensors 'boxes' and 'labels', got keys {sorted(target)}")
        # Checked where the target lives (the data loader's CPU tensors), then moved: on a GPU each check would be
        # a host synchronization per image.
        boxes = boxes.reshape(-1, 4).to(dtype=torch.float32)
        labels = labels.reshape(-1).to(dtype=torch.long)
        if boxes.shape[0] != labels.shape[0]:
            raise InvalidArgumentError(f"target {index} has {boxes.shape[0]} boxes but {labels.shape[0]} labels")
        if bool(((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any()):
            raise InvalidArgumentError(f"target {index} has a box without area (need x1 > x0 and y1 > y0)")
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < self.config.num_classes:
            raise InvalidArgumentError(
                f"target {index} has labels outside [0, {self.config.num_classes}) (classes: {self.config.class_names})"
            )
        monai_target = {
            self.retinanet.target_box_key: boxes[:, _SWAP_XY].to(images.device, non_blocking=True),
            self.retinanet.target_label_key: labels.to(images.device, non_blocking=True),
        }
        regions = target.get(_IGNORE_KEY)
        if regions is not None:
            if not isinstance(regions, torch.Tensor):
                raise InvalidArgumentError(f"target {index} 'ignore_boxes' must be a tensor, got {type(regions)}")
            regions = regions.reshape(-1, 4).to(dtype=torch.float32)
            if bool(((regions[:, 2] <= regions[:, 0]) | (regions[:, 3] <= regions[:, 1])).any()):
                raise InvalidArgumentError(f"target {index} has an ignore region without area")
            monai_target[_IGNORE_KEY] = regions[:, _SWAP_XY].to(images.device, non_blocking=True)
        return monai_target


@contextlib.contextmanager
def _detector_mode(detector: RetinaNetDetector, *, training: bool) -> Iterator[None]:
    """Set only the detector's own ``training`` flag for the duration.

    MONAI's RetinaNetDetector decides between returning losses and returning detections by ``self.training``.
    Flipping just that flag (not the submodules') keeps the network's dropout and stochastic depth in whatever
    mode the caller chose, so losses can be computed in eval mode and predictions in train mode.
    """
    previous = detector.training
    detector.training = training
    try:
        yield
    finally:
        detector.training = previous


def build_detector(
    config: DetectorConfig, encoder_path: str | os.PathLike | None = None
) -> tuple[CariesDetector, ImportReport]:
    """A detector for fine-tuning: encoder weights from ``encoder_path`` (an ``encoder.pt``) or freshly initialized,
    pyramid and heads freshly initialized. Returns the report of :func:`load_detector_encoder`.

    A CNN yardstick backbone (``config.backbone`` other than ``vit``) starts from a random initialization and
    takes no encoder file; its report is empty.

    Raises:
        InvalidCheckpointError: see :func:`load_detector_encoder`.
        InvalidArgumentError: an encoder file for a CNN backbone.
    """
    if config.backbone != "vit":
        if encoder_path is not None:
            raise InvalidArgumentError(
                f"backbone {config.backbone} trains from scratch: an encoder file ({encoder_path}) fits only the ViT"
            )
        return CariesDetector(config), ImportReport()
    encoder, report = load_detector_encoder(config, encoder_path)
    return CariesDetector(config, encoder), report
