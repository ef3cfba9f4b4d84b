"""Attention mechanisms, one file each; every one maps (B, N, D) -> (B, N, D) causally.

Configs (conf/attention/*.yaml) name the class by ``_target_``; ``ATTENTIONS`` is the registry of the classes.
Constructor contract: ``(dim, n_heads, seq_len, layer_idx=0, n_layers=1, *, <mechanism options>)``.
"""
from wavetrain.models.attention.dwarf import DwarfDyadicAttention, DwarfFieldAttention, DwarfFullAttention
from wavetrain.models.attention.standard import CausalSelfAttention
from wavetrain.models.attention.wavefield import WaveFieldAttention
from wavetrain.models.attention.wda import WaveDensityAttention

ATTENTIONS = {"standard": CausalSelfAttention, "wavefield": WaveFieldAttention, "wda": WaveDensityAttention,
              "dwarf_field": DwarfFieldAttention, "dwarf_dyadic": DwarfDyadicAttention,
              "dwarf_full": DwarfFullAttention}

__all__ = ["ATTENTIONS", "CausalSelfAttention", "DwarfDyadicAttention", "DwarfFieldAttention", "DwarfFullAttention",
           "WaveDensityAttention", "WaveFieldAttention"]
