"""SAM2 box prompts decoded against one shared image embedding (no per-box copy of the image features).

``transformers``' ``Sam2MaskDecoder`` starts by ``repeat_interleave``-ing the image embedding, its
positional encoding and both high-resolution feature maps once per prompt, so ``n`` boxes of an image
cost ``n`` copies of them, and its first two-way attention block projects the same (copied) image
tokens ``n`` times. :func:`decode_boxes` computes the same masks with the decoder's own modules and
weights, but keeps every tensor that does not depend on the prompt at one copy per *image*:

* tokens → image attention of the first block and of the final layer read the image keys/values
  once: all boxes' tokens of an image are one query sequence (attention is independent per query,
  so this is the same computation);
* image → tokens attention of the first block projects the image tokens once and attends, per box,
  over that box's tokens (scores ``(B, heads, h·w, n·T)`` from one product);
* the high-resolution features are added by broadcasting, not repeated.

What stays per box is what SAM2 computes per box: the two-way transformer *updates the image
embedding once per prompt* (image → tokens attention), so from the first block's image → tokens step
on, each box has its own ``(h·w, C)`` image tokens, upscaled to its own stride-4 features. That part is
inherent to SAM2; :meth:`~reference_pipeline.models.teacher.FoundationTeacher.segment` bounds it by
decoding ``box_chunk`` boxes at a time (checkpointed when a gradient is needed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["decode_boxes"]


def _token_to_image(attention: nn.Module, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """Box tokens attend to image tokens; image tokens shared by the boxes (``p = 1``) or per box (``p = n``).

    Shape:
        - query: ``(B, n, T, C)``
        - key, value: ``(B, p, hw, C)``
        - output: ``(B, n, T, C)``
    """
    batch, boxes, tokens, channels = query.shape
    if key.shape[1] == boxes:
        return attention(query=query, key=key, value=value)[0]
    merged = query.reshape(batch, 1, boxes * tokens, channels)  # (B, 1, n·T, C) one query sequence per image
    return attention(query=merged, key=key, value=value)[0].reshape(batch, boxes, tokens, -1)


def _image_to_token(attention: nn.Module, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """Image tokens attend to each box's tokens; image tokens shared (``p = 1``, projected once) or per box.

    Shape:
        - query: ``(B, p, hw, C)``
        - key, value: ``(B, n, T, C)``
        - output: ``(B, n, hw, C)``
    """
    batch, boxes, tokens, _ = key.shape
    if query.shape[1] == boxes:
        return attention(query=query, key=key, value=value)[0]
    heads, head_dim = attention.num_attention_heads, attention.head_dim
    pixels = query.shape[2]
    q = attention.q_proj(query).view(batch, pixels, heads, head_dim).transpose(1, 2)  # (B, heads, hw, d)
    k = attention.k_proj(key).view(batch, boxes * tokens, heads, head_dim).permute(0, 2, 3, 1)  # (B, heads, d, n·T)
    v = attention.v_proj(value).view(batch, boxes, tokens, heads, head_dim).permute(0, 3, 1, 2, 4)  # (B, heads, n, T, d)
    scores = (q @ k) * attention.scaling  # (B, heads, hw, n·T)
    scores = scores.view(batch, heads, pixels, boxes, tokens).transpose(2, 3)  # (B, heads, n, hw, T)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # softmax over each box's own tokens
    out = weights @ v  # (B, heads, n, hw, d)
    out = out.permute(0, 2, 3, 1, 4).reshape(batch, boxes, pixels, heads * head_dim)  # (B, n, hw, heads·d)
    return attention.o_proj(out)  # (B, n, hw, C)


def decode_boxes(segmenter: nn.Module, boxes: Tensor, embeddings: Sequence[Tensor]) -> Tensor:
    """SAM2 single-mask logits of box prompts, every box of an image against the image's one embedding.

    Equal (up to float rounding) to
    ``segmenter(image_embeddings=embeddings, input_boxes=boxes, multimask_output=False).pred_masks[:, :, 0]``,
    including SAM2's dynamic multimask choice in eval mode, without its per-box copies of the image
    features (see the module docstring).

    Args:
        segmenter: a ``transformers`` ``Sam2Model``.
        boxes: ``(x0, y0, x1, y1)`` in SAM2 input pixels.
        embeddings: the three image-embedding levels, high resolution first (``feat_s0`` and ``feat_s1``
            already projected by the mask decoder's ``conv_s0`` / ``conv_s1``, as ``get_image_features`` returns).

    Shape:
        - boxes: ``(B, n, 4)``
        - embeddings: ``[(B, C/8, 4h, 4w), (B, C/4, 2h, 2w), (B, C, h, w)]``
        - output: ``(B, n, 4h, 4w)``

    Returns:
        Low-resolution mask logits.
    """
    decoder = segmenter.mask_decoder
    feat_s0, feat_s1, image = embeddings
    batch, channels, height, width = image.shape
    sparse, dense = segmenter.prompt_encoder(input_points=None, input_labels=None, input_boxes=boxes, input_masks=None)
    num_boxes = sparse.shape[1]  # sparse: (B, n, 3, C) two corners + a padding point; dense: (B, C, h, w)
    positions = segmenter.get_image_wide_positional_embeddings()  # (1, C, h, w)
    output_tokens = torch.cat([decoder.obj_score_token.weight, decoder.iou_token.weight, decoder.mask_tokens.weight])
    tokens = torch.cat([output_tokens.expand(batch, num_boxes, -1, -1), sparse], dim=2)  # (B, n, T, C)
    tokens = tokens.to(decoder.iou_token.weight.dtype)
    keys = (image + dense).flatten(2).transpose(1, 2)[:, None]  # (B, 1, hw, C) shared by the boxes
    key_positions = positions.flatten(2).transpose(1, 2)[:, None]  # (1, 1, hw, C)

    transformer = decoder.transformer
    queries = tokens
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(query=queries, key=queries, value=queries)[0]
        else:
            query = queries + tokens
            queries = queries + layer.self_attn(query=query, key=query, value=queries)[0]
        queries = layer.layer_norm1(queries)  # (B, n, T, C)
        keyed = keys + key_positions  # (B, p, hw, C)
        queries = layer.layer_norm2(queries + _token_to_image(layer.cross_attn_token_to_image, queries + tokens,
                                                              keyed, keys))  # fmt: skip
        queries = layer.layer_norm3(queries + layer.mlp(queries))
        update = _image_to_token(layer.cross_attn_image_to_token, keyed, queries + tokens, queries)  # (B, n, hw, C)
        keys = layer.layer_norm4(keys + update)  # (B, n, hw, C) from here on: SAM2's per-box image embedding
    final = _token_to_image(transformer.final_attn_token_to_image, queries + tokens, keys + key_positions, keys)
    queries = transformer.layer_norm_final_attn(queries + final)  # (B, n, T, C)
    keys = keys.expand(batch, num_boxes, -1, -1)  # (B, n, hw, C) a no-op unless the transformer has no layer

    mask_tokens = queries[:, :, 2 : 2 + decoder.num_mask_tokens, :]  # (B, n, 4, C)
    image_tokens = keys.transpose(2, 3).reshape(batch * num_boxes, channels, height, width)  # (B·n, C, h, w)
    up = decoder.upscale_conv1(image_tokens)  # (B·n, C/4, 2h, 2w)
    up = (up.view(batch, num_boxes, *up.shape[1:]) + feat_s1[:, None]).flatten(0, 1)  # broadcast, not repeated
    up = decoder.activation(decoder.upscale_layer_norm(up))
    up = decoder.upscale_conv2(up)  # (B·n, C/8, 4h, 4w)
    up = decoder.activation(up.view(batch, num_boxes, *up.shape[1:]) + feat_s0[:, None])  # (B, n, C/8, 4h, 4w)
    hyper = torch.stack(
        [mlp(mask_tokens[:, :, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=2
    )  # (B, n, 4, C/8)
    masks = (hyper @ up.flatten(3)).view(batch, num_boxes, -1, *up.shape[-2:])  # (B, n, 4, 4h, 4w)
    if decoder.dynamic_multimask_via_stability and not decoder.training:
        iou = decoder.iou_prediction_head(queries[:, :, 1, :])  # (B, n, 4)
        masks, _ = decoder._dynamic_multimask_via_stability(masks, iou)  # (B, n, 1, 4h, 4w)
    return masks[:, :, 0]  # (B, n, 4h, 4w)
