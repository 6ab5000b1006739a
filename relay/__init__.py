"""CAT Relay: one Supabase Realtime socket per Torn faction, served to every member over plain HTTP."""

from importlib import metadata

try:
    __version__ = metadata.version("cat-relay")
except metadata.PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+unknown"
