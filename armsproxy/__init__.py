"""armsproxy: an ARMS Proxy between libarms devices (SAs) and an operator's RS."""

__version__ = "0.1.0"
