"""DWARF attention family: every condition of spec dwarf.md §3 (condA … condP) as switches of three modules.

- :mod:`.field` — :class:`DwarfFieldAttention`, the wave-field conditions A–F (spec §3.A–F);
- :mod:`.dyadic` — :class:`DwarfDyadicAttention`, the dyadic-offset conditions G–P (spec §3.G–P);
- :mod:`.full` — :class:`DwarfFullAttention`, block 5 of the hybrid condM (spec §3.M);
- :mod:`.common` — what they share (D4 taps, head split/merge, channel norm, option checks).

A condition is a set of option values, written once: ``conf/attention/dwarf_<condition>.yaml`` names the class by
``_target_`` and sets its options and the model-shell settings the condition was published with (spec §1, §1.A,
§3.P0).  Adding a condition is one such file (plus, for a new mechanism, one switch in the module it extends).
Every fast path has a naive reference beside it (``*_reference``), compared in float64 by tests/test_dwarf.py.

The classes are re-exported here, so the ``_target_`` paths of configs saved before the package split
(``wavetrain.models.attention.dwarf.DwarfFieldAttention`` in a checkpoint's hyper-parameters) still resolve.
"""
from wavetrain.models.attention.dwarf.dyadic import DwarfDyadicAttention
from wavetrain.models.attention.dwarf.field import DwarfFieldAttention
from wavetrain.models.attention.dwarf.full import DwarfFullAttention

__all__ = ["DwarfDyadicAttention", "DwarfFieldAttention", "DwarfFullAttention"]
