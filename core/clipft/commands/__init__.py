"""The commands, one module each, between the command line (:mod:`clipft.cli`,
:mod:`clipft.api`) and the engine they drive: ``run --nproc`` (launch), ``plan``,
``export`` (with ``wiseft``), ``eval`` and ``predict`` (inference, over a
``source``), ``sweep``, ``runs``, ``shards`` and ``new`` (scaffold). ``run``
itself is the engine's session (:mod:`clipft.engine.session`)."""
