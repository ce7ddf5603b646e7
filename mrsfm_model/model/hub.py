"""The shipped pretrained encoder as a timm model: `import mrsfm_model.model.hub` registers `mrsfm_micro`,
then `timm.create_model("mrsfm_micro", pretrained=True, num_classes=3)` returns it with a fresh head
(`pretrained=False`: the same architecture from random weights). Weights never come from the
network: they are the file the package ships (mrsfm_model/resources/encoders/)."""

from __future__ import annotations

from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from mrsfm_model.model.export import build_vit, load_encoder, read_encoder_config, shipped

_TIMM_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")  # passed by timm.create_model


@register_model
def mrsfm_micro(pretrained: bool = False, num_classes: int = 0, global_pool: str = "avg",
                **kwargs) -> VisionTransformer:
    for key in _TIMM_KWARGS:
        kwargs.pop(key, None)
    if kwargs:
        raise TypeError(f"mrsfm_micro: unsupported arguments {sorted(kwargs)}")
    if pretrained:
        return load_encoder(shipped(), num_classes=num_classes, global_pool=global_pool)
    return build_vit(read_encoder_config(shipped()), num_classes=num_classes, global_pool=global_pool)
