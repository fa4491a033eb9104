"""Frozen-tower caching: :mod:`.plan` decides what is frozen and where the
image tower is cut, :mod:`.replay` runs the tower around the cut, :mod:`.store`
keeps the values (memory or disk, checksummed), :mod:`.stats` counts them.
The feature providers in :mod:`clipft.engine.features` put them together."""
