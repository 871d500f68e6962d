"""kubecertd: heals Kubernetes worker certificates in place."""

__version__ = "0.2.0"
