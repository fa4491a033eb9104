"""The version, in a module of its own: modules below the package's front
(``clipft/__init__``, whose ``clipft.load`` reaches up to :mod:`clipft.api`
when called) read it here, so that no layer depends on the front."""
__version__ = "0.1.0"
