"""Strata's real-size BiRefNet-class stand-in: the architecture, random weights.

Written for Strata from public facts (the BiRefNet paper, Zheng et al. 2024, "Bilateral
Reference for High-Resolution Dichotomous Image Segmentation"; the Swin Transformer paper,
Liu et al. 2021; the layout of the published hub repos). Not the published code, and
not a model that segments anything: its weights are random, drawn from a fixed seed by
scripts/make_real_size_models.py. What it is for is cost: the same backbone, decoder
shape, tensor sizes and operators as the real model, so that time, memory, dtype and
compile behaviour can be measured without the weights.

Interface, as the real repos': ``model(x)`` with ``x`` of shape (B, 3, H, W), H and W
multiples of 32 (1024x1024 for BiRefNet), RGB / 255 normalised with the ImageNet mean
and std; in eval mode it returns a list holding one (B, 1, H, W) logit map, in training
mode the multi-scale supervision maps (1/32, 1/16, 1/8 of the input) before it.

Built like the published code, not like a model written for transformers:
``__init__(bb_pretrained=True, config=BiRefNetConfig())`` calls
``super().__init__(config)`` and then replaces ``self.config`` with a plain ``Config``
object holding the architecture; it never calls ``post_init()``; the drop-path schedule
is read with ``.item()``. transformers 5's from_pretrained cannot load such a model.

``BACKBONE`` (set by the builder) picks the class: ``swin_v1_l`` (BiRefNet, RMBG-2.0)
or ``swin_v1_t`` (BiRefNet_lite).

The deformable convolutions of the decoder's ASPP blocks run torchvision's
``deform_conv2d`` when torchvision imports. Where it does not (no torchvision can
import beside a CPU torch that did not come from torchvision's own index), they run a
plain convolution of the same weight shape, with the offset and modulator convolutions
computed as well: with this model's weights (offset and modulator convolutions zero, as
the deformable block is initialised) both give the same numbers, but the plain
convolution is faster than deform_conv2d (cuDNN or oneDNN against torchvision's own
kernel), it runs in bfloat16 where deform_conv2d has no bfloat16 kernel, and
torch.compile may drop the unused offsets. ``DEFORM_CONV`` says which runs.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from kornia.filters import laplacian  # noqa: F401 - the published code imports it (training's gradient labels)
from torch import nn
from transformers import PreTrainedModel

from .BiRefNet_config import BiRefNetConfig

try:  # optional: transformers' import check skips imports inside try blocks
    from torchvision.ops import deform_conv2d
except Exception:  # noqa: BLE001 - missing, or built for another torch (fails to register its ops)
    deform_conv2d = None

BACKBONE = "swin_v1_l"
DEFORM_CONV = "torchvision.ops.deform_conv2d" if deform_conv2d is not None else "plain conv2d (no torchvision)"

# Swin Transformer geometries (Liu et al. 2021, Table 1; window sizes as BiRefNet runs them).
SWIN = {
    "swin_v1_l": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
    "swin_v1_t": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
}


class Config:
    """The architecture, as a plain object (the published code keeps it so)."""

    def __init__(self):
        self.bb = BACKBONE
        swin = SWIN[self.bb]
        self.embed_dim = swin["embed_dim"]
        self.depths = swin["depths"]
        self.num_heads = swin["num_heads"]
        self.window_size = swin["window_size"]
        self.mlp_ratio = 4.0
        self.drop_path_rate = 0.2
        # The backbone also runs on the input at half size; each stage's two feature
        # maps are concatenated ("cat" multi-scale input), doubling the channels.
        self.mul_scl_ipt = "cat"
        stage_channels = [self.embed_dim * 2 ** i for i in range(4)]
        # Deepest first, as the decoder consumes them.
        self.lateral_channels_in_collection = [2 * c for c in reversed(stage_channels)]
        # The three shallower stages, resized to the deepest one, concatenated onto it.
        self.cxt = self.lateral_channels_in_collection[1:][::-1]
        self.dec_channels_inter = 64  # decoder blocks' inner width
        self.aspp_channels = 256  # each ASPP branch's width
        self.aspp_kernel_sizes = (1, 3, 7)  # the deformable branches beside the 1x1 one
        self.gdt_channels = 16  # gradient-attention heads' width (out_ref)
        self.ms_supervision = True
        self.out_ref = True
        self.dec_ipt = True  # image patches fed to every decoder stage
        self.dec_ipt_split = True


# --------------------------------------------------------------------------- Swin backbone


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample while training."""

    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside square windows, with a learnt relative position bias."""

    def __init__(self, dim, window_size, num_heads):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Index into the table for every (query, key) pair of a window's tokens.
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
        coords = coords.flatten(1)  # 2, N
        relative = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)  # 2, N, N
        index = relative[0] * (2 * window_size - 1) + relative[1]
        self.register_buffer("relative_position_index", index, persistent=False)

    def forward(self, x, mask=None):
        """x: (B, windows, N, C); mask: (windows, N, N) additive, or None."""
        b, nw, n, c = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).view(b, nw, n, 3, heads, c // heads).permute(3, 0, 1, 4, 2, 5).unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, heads).permute(2, 0, 1).unsqueeze(0)  # 1, heads, N, N
        attn_mask = bias if mask is None else bias + mask.unsqueeze(1)  # (1|windows), heads, N, N
        # The mask in the scores' dtype (BiRefNet's upstream code; RMBG-2.0's copy keeps it float32).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype))
        return self.proj(out.transpose(2, 3).reshape(b, nw, n, c))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention and MLP, each with a residual connection."""

    def __init__(self, dim, num_heads, window_size, shift, mlp_ratio, drop_path):
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, shift_mask):
        """x: (B, H, W, C); shift_mask: (windows, N, N) for the padded size, used when shifting."""
        _, h, w, _ = x.shape
        ws = self.window_size
        y = self.norm1(x)
        y = F.pad(y, (0, 0, 0, -w % ws, 0, -h % ws))  # to whole windows
        hp, wp = y.shape[1:3]
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
        windows = rearrange(y, "b (nh wh) (nw ww) c -> b (nh nw) (wh ww) c", wh=ws, ww=ws)
        windows = self.attn(windows, shift_mask if self.shift else None)
        y = rearrange(windows, "b (nh nw) (wh ww) c -> b (nh wh) (nw ww) c", nh=hp // ws, wh=ws, ww=ws)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y[:, :h, :w])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated and projected: half the size, twice the channels."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        _, h, w, _ = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim, depth, num_heads, window_size, mlp_ratio, drop_paths, downsample):
        super().__init__()
        self.window_size = window_size
        self.shift = window_size // 2
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else self.shift, mlp_ratio, drop_paths[i])
            for i in range(depth)
        ])
        self.downsample = PatchMerging(dim) if downsample else None

    def shift_mask(self, h, w, like):
        """Additive mask keeping shifted windows' attention within their original regions."""
        ws, s = self.window_size, self.shift
        hp, wp = h + (-h % ws), w + (-w % ws)
        regions = torch.zeros((hp, wp), device=like.device)
        label = 0
        for rows in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for cols in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                regions[rows, cols] = label
                label += 1
        windows = rearrange(regions, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=ws, ww=ws)
        differ = windows.unsqueeze(1) != windows.unsqueeze(2)
        return torch.zeros(differ.shape, device=like.device, dtype=like.dtype).masked_fill(differ, -100.0)

    def forward(self, x):
        mask = self.shift_mask(x.shape[1], x.shape[2], x)
        for block in self.blocks:
            x = block(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else x)


class SwinTransformer(nn.Module):
    """Swin Transformer (v1) feature pyramid: four (B, C_i, H/2^(i+2), W/2^(i+2)) maps."""

    def __init__(self, embed_dim, depths, num_heads, window_size, mlp_ratio, drop_path_rate):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=4, stride=4)
        self.patch_norm = nn.LayerNorm(embed_dim)
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depths))]
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.stages.append(SwinStage(embed_dim * 2 ** i, depth, num_heads[i], window_size, mlp_ratio,
                                         rates[first:first + depth], downsample=i < len(depths) - 1))
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dim * 2 ** i) for i in range(len(depths))])

    def forward(self, x):
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % 4, 0, -h % 4))
        x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 1))
        outs = []
        for stage, norm in zip(self.stages, self.norms):
            out, x = stage(x)
            outs.append(norm(out).permute(0, 3, 1, 2).contiguous())
        return tuple(outs)


# --------------------------------------------------------------------------- decoder


def _bn_relu(channels):
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class DeformableConv2d(nn.Module):
    """Modulated deformable convolution (DCNv2): per-tap offsets and a 0..2 modulator,
    both predicted from the input; see the module docstring for its fallback."""

    def __init__(self, in_channels, out_channels, kernel_size, padding, bias=False):
        super().__init__()
        self.padding = padding
        taps = kernel_size * kernel_size
        self.offset_conv = nn.Conv2d(in_channels, 2 * taps, kernel_size, padding=padding)
        self.modulator_conv = nn.Conv2d(in_channels, taps, kernel_size, padding=padding)
        for conv in (self.offset_conv, self.modulator_conv):  # start as a plain convolution
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.regular_conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias)

    def forward(self, x):
        offset = self.offset_conv(x)
        modulator = 2.0 * torch.sigmoid(self.modulator_conv(x))
        weight, bias = self.regular_conv.weight, self.regular_conv.bias
        if deform_conv2d is not None:
            return deform_conv2d(x, offset, weight, bias, padding=(self.padding, self.padding), mask=modulator)
        # Zero offsets and a modulator equal across taps make the deformable convolution a
        # plain one scaled per pixel: exact for this model's weights (offset_conv is zero).
        out = F.conv2d(x, weight, None, padding=self.padding) * modulator.mean(dim=1, keepdim=True)
        return out if bias is None else out + bias.view(1, -1, 1, 1)


class ASPPDeformable(nn.Module):
    """Atrous-spatial-pyramid-style block of deformable branches (1x1, and 1, 3, 7 kernels)
    plus global pooling, fused by a 1x1 convolution."""

    def __init__(self, in_channels, branch_channels, kernel_sizes, out_channels=None):
        super().__init__()
        out_channels = out_channels or in_channels
        self.aspp1 = nn.Sequential(DeformableConv2d(in_channels, branch_channels, 1, 0), _bn_relu(branch_channels))
        self.aspp_deforms = nn.ModuleList([
            nn.Sequential(DeformableConv2d(in_channels, branch_channels, k, k // 2), _bn_relu(branch_channels))
            for k in kernel_sizes
        ])
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, branch_channels, 1, bias=False),
                                             _bn_relu(branch_channels))
        self.fuse = nn.Sequential(nn.Conv2d(branch_channels * (2 + len(kernel_sizes)), out_channels, 1, bias=False),
                                  _bn_relu(out_channels), nn.Dropout(0.5))

    def forward(self, x):
        pooled = self.global_avg_pool(x).expand(-1, -1, *x.shape[-2:])
        return self.fuse(torch.cat([self.aspp1(x), *(branch(x) for branch in self.aspp_deforms), pooled], dim=1))


class BasicDecBlk(nn.Module):
    """3x3 in, deformable ASPP, 3x3 out: the decoder's block at every scale."""

    def __init__(self, in_channels, out_channels, cfg):
        super().__init__()
        inter = cfg.dec_channels_inter
        self.conv_in = nn.Sequential(nn.Conv2d(in_channels, inter, 3, padding=1), _bn_relu(inter))
        self.dec_att = ASPPDeformable(inter, cfg.aspp_channels, cfg.aspp_kernel_sizes)
        self.conv_out = nn.Sequential(nn.Conv2d(inter, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return self.conv_out(self.dec_att(self.conv_in(x)))


class SimpleConvs(nn.Module):
    """Two 3x3 convolutions: the image patches' path into a decoder stage."""

    def __init__(self, in_channels, out_channels, inter_channels=64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, inter_channels, 3, padding=1)
        self.conv_out = nn.Conv2d(inter_channels, out_channels, 3, padding=1)

    def forward(self, x):
        return self.conv_out(self.conv1(x))


class GradientAttention(nn.Module):
    """out_ref: a small head that, trained on image gradients, gates a decoder stage."""

    def __init__(self, in_channels, width):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), _bn_relu(width))
        self.pred = nn.Conv2d(width, 1, 1)  # training's gradient prediction
        self.attn = nn.Conv2d(width, 1, 1)

    def forward(self, x):
        return x * self.attn(self.convs(x)).sigmoid()


def _patches(image, like):
    """The image cut into a grid matching ``like``'s size, tiles stacked as channels."""
    grid_h, grid_w = image.shape[-2] // like.shape[-2], image.shape[-1] // like.shape[-1]
    return rearrange(image, "b c (hg h) (wg w) -> b (c hg wg) h w", hg=grid_h, wg=grid_w)


def _resize(x, like):
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=True)


class Decoder(nn.Module):
    """Coarse to fine over the four feature maps: at each scale the upsampled previous
    output plus a lateral projection of the encoder's map, the image's patches at that
    scale concatenated, a decoder block, a gradient-attention gate; multi-scale
    supervision maps at 1/32, 1/16, 1/8 while training, a 1x1 head at full size."""

    def __init__(self, channels, cfg):
        super().__init__()
        self.cfg = cfg
        out = channels[1:] + [channels[-1] // 2]  # each stage's width: the next lateral's
        ipt = [c // 8 for c in channels]  # image-patch paths' widths
        # Patches of a 3-channel image at 1/32, 1/16, 1/8, 1/4 and full size.
        self.ipt_blk5 = SimpleConvs(3 * 32 ** 2, ipt[0])
        self.ipt_blk4 = SimpleConvs(3 * 16 ** 2, ipt[0])
        self.ipt_blk3 = SimpleConvs(3 * 8 ** 2, ipt[1])
        self.ipt_blk2 = SimpleConvs(3 * 4 ** 2, ipt[2])
        self.ipt_blk1 = SimpleConvs(3, ipt[3])
        self.decoder_block4 = BasicDecBlk(channels[0] + ipt[0], out[0], cfg)
        self.decoder_block3 = BasicDecBlk(channels[1] + ipt[0], out[1], cfg)
        self.decoder_block2 = BasicDecBlk(channels[2] + ipt[1], out[2], cfg)
        self.decoder_block1 = BasicDecBlk(channels[3] + ipt[2], out[3], cfg)
        self.lateral_block4 = nn.Conv2d(channels[1], out[0], 1)
        self.lateral_block3 = nn.Conv2d(channels[2], out[1], 1)
        self.lateral_block2 = nn.Conv2d(channels[3], out[2], 1)
        self.conv_ms_spvn_4 = nn.Conv2d(out[0], 1, 1)
        self.conv_ms_spvn_3 = nn.Conv2d(out[1], 1, 1)
        self.conv_ms_spvn_2 = nn.Conv2d(out[2], 1, 1)
        self.gdt_4 = GradientAttention(out[0], cfg.gdt_channels)
        self.gdt_3 = GradientAttention(out[1], cfg.gdt_channels)
        self.gdt_2 = GradientAttention(out[2], cfg.gdt_channels)
        self.conv_out1 = nn.Conv2d(out[3] + ipt[3], 1, 1)

    def forward(self, x, x1, x2, x3, x4):
        p4 = self.decoder_block4(torch.cat([x4, self.ipt_blk5(_patches(x, x4))], dim=1))
        m4 = self.conv_ms_spvn_4(p4) if self.training else None
        p3 = _resize(self.gdt_4(p4), x3) + self.lateral_block4(x3)
        p3 = self.decoder_block3(torch.cat([p3, self.ipt_blk4(_patches(x, x3))], dim=1))
        m3 = self.conv_ms_spvn_3(p3) if self.training else None
        p2 = _resize(self.gdt_3(p3), x2) + self.lateral_block3(x2)
        p2 = self.decoder_block2(torch.cat([p2, self.ipt_blk3(_patches(x, x2))], dim=1))
        m2 = self.conv_ms_spvn_2(p2) if self.training else None
        p1 = _resize(self.gdt_2(p2), x1) + self.lateral_block2(x1)
        p1 = self.decoder_block1(torch.cat([p1, self.ipt_blk2(_patches(x, x1))], dim=1))
        p1 = _resize(p1, x)
        logits = self.conv_out1(torch.cat([p1, self.ipt_blk1(x)], dim=1))
        return [m4, m3, m2, logits] if self.training else [logits]


# --------------------------------------------------------------------------- model


class BiRefNet(PreTrainedModel):
    """Swin backbone on the image and on its half-size copy, context from the shallower
    stages squeezed into the deepest, then the bilateral-reference decoder."""

    config_class = BiRefNetConfig

    def __init__(self, bb_pretrained=True, config=BiRefNetConfig()):
        super().__init__(config)
        if config.bb_pretrained:
            raise ValueError("this stand-in has no pretrained backbone weights: bb_pretrained must be false")
        self.config = Config()  # the published code's quirk: the architecture, not a PretrainedConfig
        c = self.config
        self.bb = SwinTransformer(c.embed_dim, c.depths, c.num_heads, c.window_size, c.mlp_ratio, c.drop_path_rate)
        channels = c.lateral_channels_in_collection
        self.squeeze_module = BasicDecBlk(channels[0] + sum(c.cxt), channels[0], c)
        self.decoder = Decoder(list(channels), c)

    def forward_enc(self, x):
        x1, x2, x3, x4 = self.bb(x)
        h, w = x.shape[-2:]
        half = F.interpolate(x, size=(h // 2, w // 2), mode="bilinear", align_corners=True)
        x1, x2, x3, x4 = (torch.cat([f, _resize(g, f)], dim=1) for f, g in zip((x1, x2, x3, x4), self.bb(half)))
        x4 = torch.cat([_resize(x1, x4), _resize(x2, x4), _resize(x3, x4), x4], dim=1)
        return x1, x2, x3, x4

    def forward(self, x):
        x1, x2, x3, x4 = self.forward_enc(x)
        return self.decoder(x, x1, x2, x3, self.squeeze_module(x4))
