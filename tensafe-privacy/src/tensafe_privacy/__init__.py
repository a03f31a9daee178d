"""TenSafe privacy accountants for DP-SGD, built on Google's dp-accounting.

Registers the accountants ``rdp``, ``pld`` and ``prv`` (an alias of ``pld``)
and the ``tensafe privacy`` command. See :mod:`tensafe_privacy.accountants`.
"""

__version__ = "0.2.0"
