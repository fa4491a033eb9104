"""Frozen-tower caching: :mod:`.plan` decides what is frozen and where the
image tower is cut, :mod:`.replay` runs the tower around the cut, :mod:`.store`
keeps the values (memory or disk, checksummed), :mod:`.stats` counts them, and
:mod:`.provider` serves them around the live features provider (its docstring
states the rule every cached run keeps: it equals a live run bit for bit)."""
