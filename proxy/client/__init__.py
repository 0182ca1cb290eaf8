"""Client-side helpers for Backtrack's streams; they import nothing of the proxy (see `mend`)."""

from proxy.client.mend import Mender, View, amend, mend

__all__ = ["Mender", "View", "amend", "mend"]
