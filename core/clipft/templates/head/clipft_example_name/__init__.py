"""clipft head `example-name`: a cosine classifier, ``scale * cos(x, w_c)`` against one
learned prototype per class, on the (normalised) image embeddings.

``build(options, ctx)`` gets a clipft.context.BuildContext: ``ctx.embed_dim``,
``ctx.classnames`` (``needs_classes=True`` makes the engine require them),
``ctx.device`` and the model itself.
"""
import attrs

from clipft import HeadSpec, hookimpl

NAME = "example-name"


@attrs.frozen
class ExampleNameOptions:
    scale: float = attrs.field(default=10.0, validator=attrs.validators.gt(0), metadata={
        "help": "the logits' scale (inverse temperature)"})


def build(opts: ExampleNameOptions, ctx):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class CosineClassifier(nn.Module):
        def __init__(self, dim: int, classes: int, scale: float):
            super().__init__()
            self.prototypes = nn.Parameter(torch.randn(classes, dim) * dim ** -0.5)
            self.scale = scale

        def forward(self, image_features):
            w = F.normalize(self.prototypes, dim=-1).to(image_features.dtype)
            return self.scale * F.normalize(image_features, dim=-1) @ w.t()

    return CosineClassifier(ctx.embed_dim, len(ctx.classnames), opts.scale).to(ctx.device)


@hookimpl
def clipft_register_heads(register):
    register(HeadSpec(
        name=NAME,
        summary="Cosine classifier against learned class prototypes.",
        options=ExampleNameOptions,
        build=build,
        needs_classes=True,
        # its forward never runs the text tower (True for a head that encodes class prompts live)
        encodes_text=False,
    ))
